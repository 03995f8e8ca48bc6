"""A multi-round segmentation conversation about one image (SegLLM inference), round by round.

:class:`MultiRoundSession` keeps what earlier rounds produced (each round's mask, its box and the
reference embedding made from it) and the language model's KV cache, so round ``k`` runs only
its own tokens: the image passes CLIP and DINOv2 once per session, the proposals are pooled
once, and a round that refers to earlier ones (``[REF:k]`` in the query) gets their *predicted*
masks written at its ``<ref>`` tokens. SegLLM's own demos rebuild and re-run the whole
conversation every round; here the cost of a round does not grow with the history (see
``benchmarks/bench_multi_round.py``). Each session object is one conversation: a web server keeps
one per visitor, never a module-level one.

Rounds are teacher-forced as in SegLLM's inference and LLM-Seg's evaluation: the answer is fixed
to ``"[SEG]."`` and the mask comes from that ``[SEG]``. Exactness: the ids of the whole
conversation are re-tokenized every round and only the suffix after the cached prefix is run;
a prefix that does not match the cache (a tokenizer that merges across the round boundary)
falls back to a full forward, so the result always equals a full re-forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from model.generation import CACHE_ARGUMENT
from model.heads.reference_relations import round_relations
from model.heads.selection import select_mask
from model.inference import SegmentationRound, Segmenter, _round, build_question
from utils.batch import ReferenceInputs
from utils.data.conversation import VALIDATION_ANSWER
from utils.data.images import preprocess_for_clip, preprocess_for_dinov2
from utils.data.references import REF_MARKER, parse_references
from utils.data.samples import encode_reference_masks
from utils.proposal_store import build_proposal_sample

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """One round of a session.

    Attributes:
        index: the round, 1-based.
        query: the user's text (markers included).
        references: the earlier rounds it named (1-based).
        mask: ``(H, W)`` bool prediction at the image size.
        box: ``[x0, y0, x1, y1]`` tight box of the mask (exclusive max; zeros when empty).
        scores: the proposals as scored (:class:`~model.inference.SegmentationRound`).
        similarity: ``(K,)`` fp32 cosines of the round's ``[SEG]`` with the proposals.
        cached_tokens: how many tokens of the conversation came from the KV cache.
    """

    index: int
    query: str
    references: tuple[int, ...]
    mask: np.ndarray
    box: list[int]
    scores: SegmentationRound
    similarity: torch.Tensor
    cached_tokens: int = 0


def mask_box(mask: np.ndarray) -> list[int]:
    """``[x0, y0, x1, y1]`` (exclusive max) of a mask; zeros when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@dataclass
class _ImageState:
    """What is computed once per image."""

    vision_features: torch.Tensor  # (1, g*g, C) pre-projector CLIP patches
    clip_pixels: torch.Tensor  # (1, 3, S, S)
    pooled: torch.Tensor  # (K, E) proposal features
    proposal_maps: torch.Tensor  # (K, M, M)
    feature_map: torch.Tensor | None  # (E, G, G) projected DINOv2 features (None: no proposal)
    sample: object  # the ProposalSample (binary masks, indices)


@dataclass
class MultiRoundSession:
    """A conversation about ``image`` with an exported multi-round model.

    Args:
        segmenter: a :class:`~model.inference.Segmenter` (model, tokenizer, proposals, settings).
        image: ``(H, W, 3)`` uint8 RGB.
        key: the image's name in a proposal store.
        use_cache: extend the KV cache round by round (False: re-run the whole conversation).
    """

    segmenter: Segmenter
    image: np.ndarray
    key: str = ""
    use_cache: bool = True
    rounds: list[RoundResult] = field(default_factory=list)
    _turns: list[tuple[str, str]] = field(default_factory=list)
    _cache: object = None
    _cached_ids: list[int] = field(default_factory=list)
    _state: _ImageState | None = None

    def __post_init__(self) -> None:
        if self.model.proposal_scorer is None:
            raise ValueError("multi-round sessions need the proposal head (not --mask_head sam)")

    @property
    def model(self):
        return self.segmenter.model

    def clear(self) -> None:
        """Forget every round (the image features stay: a new conversation about it)."""
        self.rounds, self._turns = [], []
        self._cache, self._cached_ids = None, []

    @torch.no_grad()
    def _image_state(self) -> _ImageState:
        if self._state is not None:
            return self._state
        segmenter, model = self.segmenter, self.model
        manifest = segmenter.manifest
        proposals = segmenter.proposals(self.image, self.key)
        sample = build_proposal_sample(
            proposals, None, top_k=manifest.preprocessing.top_k_proposals,
            order=manifest.preprocessing.proposal_order, size=manifest.model.proposal_map_size,
            antialias=manifest.preprocessing.antialias,
        )  # fmt: skip
        device, dtype = segmenter.device, segmenter.dtype
        clip_pixels = preprocess_for_clip(segmenter.clip_processor, self.image)[None]
        clip_pixels = clip_pixels.to(device, dtype)
        vision = model.backbone.vision_features(clip_pixels)
        dino_pixels, _ = preprocess_for_dinov2(self.image, manifest.model.dino_image_size)
        maps = sample.weight_maps.to(device, dtype)
        if len(maps):
            feature_map = model.proposal_scorer.project_features(
                model.dino(dino_pixels[None].to(device, dtype))
            )[0]
            pooled = model.proposal_scorer.proposal_features(feature_map, maps)
        else:
            feature_map = None
            pooled = maps.new_zeros((0, model.proposal_scorer.config.embed_dim))
        self._state = _ImageState(vision, clip_pixels, pooled, maps, feature_map, sample)
        return self._state

    def _references(self, rounds: tuple[int, ...]) -> ReferenceInputs | None:
        if not rounds:
            return None
        masks = torch.from_numpy(np.stack([self.rounds[k - 1].mask for k in rounds]))
        settings = self.segmenter
        crops = settings.manifest.model.mask_encoder == "crop_cls"
        inputs = encode_reference_masks(
            masks.to(torch.uint8), settings.clip_processor, self.model.num_image_tokens,
            settings.manifest.model.proposal_map_size, settings.manifest.preprocessing.antialias,
            self.image if crops else None,
        )  # fmt: skip
        device, dtype = settings.device, settings.dtype
        return ReferenceInputs(
            clip_maps=inputs["reference_clip_maps"].to(device, dtype),
            geometry=inputs["reference_geometry"].to(device, dtype),
            proposal_maps=inputs["reference_maps"].to(device, dtype),
            image_index=torch.zeros(len(rounds), dtype=torch.long, device=device),
            crop_pixels=inputs["reference_crops"].to(device, dtype) if crops else None,
        )

    def _all_references(self, turns) -> tuple[list[int], ReferenceInputs | None]:
        """The rounds named by every ``<ref>`` of the conversation so far, and their inputs."""
        named: list[int] = []
        for index, (question, _) in enumerate(turns, 1):
            if REF_MARKER.search(question):
                named += parse_references(question, index).references
        return named, self._references(tuple(named))

    @torch.no_grad()
    def ask(self, query: str) -> RoundResult:
        """Run one round: ``query`` may name earlier rounds with ``[REF:k]``.

        Raises:
            ValueError: a reference to a round that does not exist yet, an empty query, or
                references asked of a model without SegLLM parts.
        """
        index = len(self.rounds) + 1
        parsed = parse_references(query, index) if REF_MARKER.search(query) else None
        rounds = parsed.references if parsed else ()
        if rounds and self.model.mask_encoder is None:
            raise ValueError("this model has no SegLLM parts (mask encoder): it cannot use [REF:k]")
        question = build_question(query, "long") if index == 1 else query.strip()
        if not question:
            raise ValueError("the query is empty")
        turns = [*self._turns, (question, VALIDATION_ANSWER)]
        ids = self.segmenter.encode_turns(turns).tolist()
        state = self._image_state()
        named, references = self._all_references(turns)
        hidden, cached = self._run(ids, state, references)
        seg_positions = [i for i, t in enumerate(ids) if t == self.model.seg_token_id]
        position = seg_positions[-1] - 1 - cached  # the state before this round's [SEG]
        seg = self.model.text_projection(hidden[0, position][None].to(self.segmenter.dtype))
        relations = None
        if rounds and state.feature_map is not None:
            this_round = references.proposal_maps[len(named) - len(rounds) :]
            relations = round_relations(
                self.model.proposal_scorer.relations(
                    state.feature_map, state.proposal_maps, this_round
                ),
                torch.ones((1, len(rounds)), dtype=torch.bool, device=seg.device),
            )
        scores = self.model.proposal_scorer.score(state.pooled, seg, relations)
        settings = self.segmenter.settings
        result = select_mask(
            scores.similarity[0].float().cpu(), scores.iop[0].float().cpu(), state.sample.masks,
            settings.strategy, settings.threshold, settings.top_k,
            output_size=self.image.shape[:2],
        )  # fmt: skip
        mask = result.mask.cpu().numpy().astype(bool)
        answer = RoundResult(
            index, query, tuple(rounds), mask, mask_box(mask), _round(result, state.sample),
            scores.similarity[0].float().cpu(), cached,
        )  # fmt: skip
        self.rounds.append(answer)
        self._turns = turns
        return answer

    def _run(self, ids: list[int], state: _ImageState, references) -> tuple[torch.Tensor, int]:
        """Hidden states of the tokens not in the cache; returns ``(hidden, cached_length)``."""
        model, device = self.model, self.segmenter.device
        cached = len(self._cached_ids)
        if not self.use_cache or self._cache is None or ids[:cached] != self._cached_ids:
            self._cache, self._cached_ids, cached = None, [], 0
        input_ids = torch.tensor([ids], device=device)
        extra = positions = None
        ref_mask = input_ids == model.ref_token_id if model.ref_token_id is not None else None
        if references is not None:
            extra = model.mask_encoder(state.vision_features, references, model.backbone)
            positions = ref_mask
        embeds = model.backbone.embed_inputs(
            input_ids, state.clip_pixels, torch.zeros(1, dtype=torch.long, device=device),
            extra, positions, state.vision_features,
        )[:, cached:]  # fmt: skip
        outputs = model.backbone.language_model.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
            use_cache=self.use_cache,
            **{CACHE_ARGUMENT: self._cache},
        )
        if self.use_cache:
            self._cache, self._cached_ids = getattr(outputs, CACHE_ARGUMENT), list(ids)
        return outputs.last_hidden_state, cached
