"""Segmenting one image from one query with an exported LLM-Seg (what ``chat.py`` runs).

Two modes:

* ``free``: the model writes its own answer (greedy decoding); every ``[SEG]`` it emits becomes
  a mask. The answer is then scored in one teacher-forced pass over prompt + answer, so a
  generated ``[SEG]`` is scored exactly as :meth:`LLMSegModel.score` scores a given one (the
  hidden state before ``[SEG]`` only depends on the tokens before it). No ``[SEG]``: the answer
  says so and the mask is empty.
* ``teacher_forced``: upstream's evaluation protocol: the answer is fixed to ``"[SEG]."``.

Proposals come from a store written by ``prepare_datasets`` (keyed by image name) or are made on
the fly by a generator (SAM everything, or the weight-free demo backend) on the image shrunk to a
longest side of 1024, as the prepare scripts do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from model.evaluation import HEAD_MASKS, combine_heads
from model.generation import generate_answers
from model.heads.selection import SELECTION_STRATEGIES, select_mask
from utils.batch import LLMSegBatch
from utils.data.conversation import (
    VALIDATION_ANSWER,
    VALIDATION_LONG_QUESTION,
    VALIDATION_SHORT_QUESTION,
    answer_start,
    conversation_format,
    encode_conversation,
)
from utils.data.images import clip_image_processor, preprocess_for_clip, preprocess_for_dinov2
from utils.data.rejection import rejection_decisions, rejection_probe
from utils.legacy_tokenizer import LegacyLlamaTokenizer, resolve_tokenization
from utils.masks import resize_longest_side
from utils.proposal_store import ImageProposals, ProposalReader, build_proposal_sample
from utils.tokenizer import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN, SEG_TOKEN

logger = logging.getLogger(__name__)

MODES = ("free", "teacher_forced")
TEMPLATES = ("long", "short", "raw")
NO_SEG_NOTE = "The model did not produce a [SEG] token, so no mask was made."


@dataclass
class InferenceSettings:
    """How a query is asked and how scores become a mask."""

    mode: str = "free"
    template: str = "long"  # long: "{query} Please output segmentation mask." as in evaluation
    max_new_tokens: int = 128
    strategy: str = "iop"
    threshold: float = 0.5
    top_k: int = 5
    mask_head: str = ""  # proposals, sam or combined (both heads); "": the model's first head

    def validate(self) -> None:
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("template", self.template, TEMPLATES),
            ("strategy", self.strategy, SELECTION_STRATEGIES),
            ("mask_head", self.mask_head, ("", "proposals", "sam", "combined")),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")


@dataclass
class ProposalScore:
    """One proposal as the model saw it.

    Attributes:
        index: its row in the image's stored / generated proposals.
        area: pixels at the proposal resolution.
        bbox: x y w h at the proposal resolution.
        cosine: cosine between its embedding and the ``[SEG]`` embedding.
        iop: the IoP head's estimate of how much of it lies inside the target.
        selected: part of the mask.
    """

    index: int
    area: int
    bbox: list[float]
    cosine: float
    iop: float
    selected: bool


@dataclass
class SegmentationRound:
    """The mask of one ``[SEG]``: ``mask`` is ``(H, W)`` bool at the image size."""

    mask: np.ndarray
    proposals: list[ProposalScore]

    @property
    def selected(self) -> list[int]:
        return [p.index for p in self.proposals if p.selected]


@dataclass
class SegmentationAnswer:
    """Everything one query produced.

    Attributes:
        query: the user's text.
        prompt: the rendered prompt the model read (image placeholders not expanded).
        answer: the model's answer text (``[SEG]`` kept), or the fixed teacher-forced one.
        mode: ``free`` or ``teacher_forced``.
        rounds: one per ``[SEG]`` in the answer.
        mask: ``(H, W)`` bool union of the rounds' masks (all false without ``[SEG]``).
        num_proposals: proposals the model scored.
        note: why the mask is empty, when it is.
        prompt_text: the whole text the model read (image tags as the model sees them, the
            answer and ``</s>`` included).
        prompt_tokens, prompt_ids: its tokens and ids; the image is one ``<image>`` / ``-200``
            placeholder, as upstream writes it.
    """

    query: str
    prompt: str
    answer: str
    mode: str
    rounds: list[SegmentationRound]
    mask: np.ndarray
    num_proposals: int
    note: str = ""
    settings: dict = field(default_factory=dict)
    prompt_text: str = ""
    prompt_tokens: list[str] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)


UPSTREAM_IMAGE_ID = -200  # LLaVA's IMAGE_TOKEN_INDEX: how upstream writes the image in ids


def readable_ids(tokenizer, input_ids: list[int], image_token_id: int) -> tuple[list, list]:
    """``(ids, tokens)`` of a sequence with each run of image placeholders as one ``-200`` /
    ``<image>`` (what upstream's ``tokenizer_image_token`` gives, so ids can be compared)."""
    ids: list[int] = []
    for token_id in input_ids:
        if token_id == image_token_id:
            if ids and ids[-1] == UPSTREAM_IMAGE_ID:
                continue
            token_id = UPSTREAM_IMAGE_ID
        ids.append(int(token_id))
    tokens = [
        IMAGE_TOKEN if t == UPSTREAM_IMAGE_ID else tokenizer.convert_ids_to_tokens(t) for t in ids
    ]
    return ids, tokens


class StoreProposals:
    """Proposals read from a ``prepare_datasets`` store (``masks.h5`` / ``masks.json``)."""

    def __init__(self, path) -> None:
        self.reader = ProposalReader(path)
        self.name = f"store:{self.reader.path}"

    def __call__(self, image: np.ndarray, key: str) -> ImageProposals:
        if key not in self.reader:
            raise KeyError(f"{self.reader.path}: no proposals for {key!r}; is it the image's name?")
        proposals = self.reader.get(key)
        image_ratio = image.shape[0] / image.shape[1]
        if abs(proposals.height / proposals.width - image_ratio) > 0.02 * image_ratio:
            raise ValueError(
                f"{self.reader.path}: proposals of {key!r} are {proposals.height}x"
                f"{proposals.width}, the image is {image.shape[0]}x{image.shape[1]}"
            )
        return proposals


class GeneratedProposals:
    """Proposals made on the fly by ``generator`` on the image shrunk to ``max_side``."""

    def __init__(self, generator: Callable[[np.ndarray], ImageProposals], name: str, max_side=1024):
        self.generator, self.name, self.max_side = generator, name, max_side

    def __call__(self, image: np.ndarray, key: str) -> ImageProposals:
        return self.generator(resize_longest_side(image, self.max_side))


def build_question(query: str, template: str) -> str:
    """The first user turn for ``query`` (with the ``<image>`` placeholder)."""
    query = query.strip()
    if not query:
        raise ValueError("the query is empty")
    if IMAGE_TOKEN in query or SEG_TOKEN in query:
        raise ValueError(f"the query may not contain {IMAGE_TOKEN} or {SEG_TOKEN}: {query!r}")
    if template == "long":
        return VALIDATION_LONG_QUESTION.format(sent=query)
    if template == "short":
        return VALIDATION_SHORT_QUESTION.format(class_name=query)
    return f"{IMAGE_TOKEN}\n{query}"


class Segmenter:
    """Image + query -> :class:`SegmentationAnswer`, with an exported model.

    Args:
        exported: from :func:`model.export.load_exported`.
        proposals: a proposal source (:class:`StoreProposals`, :class:`GeneratedProposals`).
        settings: mode, template, selection.
        logits_processor: extra ``transformers`` logits processors for free generation.
    """

    def __init__(self, exported, proposals, settings: InferenceSettings, logits_processor=None):
        settings.validate()
        self.model, self.tokenizer = exported.model, exported.tokenizer
        self.manifest = exported.manifest
        self.proposals, self.settings = proposals, settings
        self.logits_processor = logits_processor
        self._probe = None  # the rejection probe, worked out on first use
        self.format = conversation_format(self.manifest.preprocessing.conv_type)
        tower = self.model.backbone.vision_tower.config
        self.clip_processor = clip_image_processor(
            self.manifest.model.vision_tower, tower.image_size
        )
        self.device = next(self.model.text_projection.parameters()).device
        self.dtype = next(self.model.text_projection.parameters()).dtype
        self.tokenization = resolve_tokenization(self.manifest.model.tokenization, self.tokenizer)
        available = HEAD_MASKS[self.model.mask_head]
        self.head = settings.mask_head or available[0]
        if self.head not in available:
            raise ValueError(
                f"--mask_head {self.head}: this model has {self.model.mask_head} (masks: "
                f"{', '.join(available)})"
            )
        self.legacy = (
            LegacyLlamaTokenizer.from_tokenizer(self.tokenizer)
            if self.tokenization == "llava_legacy"
            else None
        )

    def encoded(self, question: str, answer: str | None, max_length: int | None = None):
        """One turn encoded as training encoded it (:class:`EncodedConversation`)."""
        return encode_conversation(
            self.tokenizer, [(question, answer)], self.model.num_image_tokens, self.format,
            self.manifest.architecture.use_im_start_end, max_length, legacy=self.legacy,
            label_answer_space=self.model.rejection != "none",
        )  # fmt: skip

    def encode(self, question: str, answer: str | None) -> tuple[torch.Tensor, str]:
        """``(input_ids (L,), rendered text)`` of one turn; ``answer=None`` leaves it open."""
        encoded = self.encoded(question, answer, self.manifest.model.model_max_length)
        return encoded.input_ids, encoded.text

    def open_prompt(self, question: str) -> tuple[torch.Tensor, str]:
        """``(input_ids (L,), rendered text)`` of ``question`` with the answer left open where
        training starts the answer's labels (:func:`~utils.data.conversation.answer_start`)."""
        encoded = self.encoded(question, VALIDATION_ANSWER)
        _, text = self.encode(question, None)
        return encoded.input_ids[: answer_start(encoded)], text

    def encode_turns(self, turns: list[tuple[str, str | None]]) -> torch.Tensor:
        """``(L,)`` ids of a whole multi-round conversation (``[REF:k]`` markers become
        ``<ref>`` tokens for a model with SegLLM parts); no length limit: a conversation grows
        with its rounds and the language model handles its own context length."""
        references = "tokens" if self.model.ref_token_id is not None else "strip"
        encoded = encode_conversation(
            self.tokenizer, turns, self.model.num_image_tokens, self.format,
            self.manifest.architecture.use_im_start_end, None, legacy=self.legacy,
            references=references,
            ref_placement=self.manifest.preprocessing.ref_placement or "inline",
        )  # fmt: skip
        return encoded.input_ids

    def _sam_inputs(self, image: np.ndarray) -> dict:
        """The SAM head's input for one image (nothing for a model without it)."""
        if self.model.sam_head is None:
            return {}
        pixels, resized = preprocess_for_dinov2(image, self.model.sam_image_size)
        return {
            "sam_pixels": pixels[None],
            "sam_resized_hw": [resized],
            "image_sizes": [tuple(image.shape[:2])],
        }

    def _model_text(self, prompt: str) -> str:
        """The rendered prompt with the image tags the model reads around ``<image>``."""
        if self.manifest.architecture.use_im_start_end:
            return prompt.replace(IMAGE_TOKEN, IMAGE_START_TOKEN + IMAGE_TOKEN + IMAGE_END_TOKEN)
        return prompt

    def _rejection(self, input_ids: torch.Tensor, logits: torch.Tensor) -> float | None:
        """For a model trained with ``--rejection``, teacher-forced: the probability with which
        it would rather reject (:func:`~utils.data.rejection.rejection_decisions`) when that is
        its choice, else ``None``.

        Args:
            input_ids: ``(L,)`` the scored sequence; logits: ``(L, vocab)`` of it.
        """
        if self.model.rejection == "none":
            return None
        if self._probe is None:  # where the answers part does not depend on the question
            question = VALIDATION_SHORT_QUESTION.format(class_name="it")
            self._probe = rejection_probe(
                lambda answer: self.encoded(question, answer),
                self.model.rejection,
                self.model.seg_token_id,
            )
        positions = (input_ids == self.model.seg_token_id).nonzero().squeeze(1)
        rejected, probability = rejection_decisions(
            logits, positions.to(logits.device), self._probe
        )
        return float(probability.max()) if bool(rejected.any()) else None

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, clip_pixels: torch.Tensor) -> torch.Tensor:
        """Greedy answer ids ``(T,)`` after ``prompt_ids`` (eos included when reached)."""
        return generate_answers(
            self.model.backbone, self.tokenizer, [prompt_ids], clip_pixels.to(self.device),
            torch.zeros(1, dtype=torch.long), self.settings.max_new_tokens, self.logits_processor,
        )[0]  # fmt: skip

    def __call__(self, image: np.ndarray, query: str, key: str = "") -> SegmentationAnswer:
        """Segment ``image`` ``(H, W, 3)`` uint8 RGB for ``query``; ``key`` names it in a store."""
        settings, manifest = self.settings, self.manifest
        question = build_question(query, settings.template)
        # The SAM head alone needs no proposals (no store, no SAM-everything pass).
        proposals = self.proposals(image, key) if self.head != "sam" else None
        if proposals is None:
            proposals = ImageProposals.empty(*image.shape[:2])
        sample = build_proposal_sample(
            proposals,
            None,
            top_k=manifest.preprocessing.top_k_proposals,
            order=manifest.preprocessing.proposal_order,
            size=manifest.model.proposal_map_size,
            antialias=manifest.preprocessing.antialias,
        )
        clip_pixels = preprocess_for_clip(self.clip_processor, image)[None]
        dino_pixels, _ = preprocess_for_dinov2(image, manifest.model.dino_image_size)
        if settings.mode == "teacher_forced":
            input_ids, prompt = self.encode(question, VALIDATION_ANSWER)
            answer = VALIDATION_ANSWER
            prompt_text = self._model_text(prompt)
        else:
            prompt_ids, prompt = self.open_prompt(question)
            answer_ids = self.generate(prompt_ids, clip_pixels)
            input_ids = torch.cat([prompt_ids, answer_ids])
            answer = self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
            prompt_text = self._model_text(prompt) + " " + self.tokenizer.decode(answer_ids)
        readable = readable_ids(
            self.tokenizer, input_ids.tolist(), self.model.backbone.image_token_id
        )
        batch = LLMSegBatch(
            input_ids=input_ids[None],
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            labels=None,
            clip_pixels=clip_pixels,
            dino_pixels=dino_pixels[None],
            image_index=torch.zeros(1, dtype=torch.long),
            proposal_masks=[sample.weight_maps],
            **self._sam_inputs(image),
        )
        height, width = image.shape[:2]
        output = self.model.score(batch.to(self.device, self.dtype))  # one pass for all below
        if self.head == "proposals":
            rounds = [
                _round(select_mask(sim, prob, sample.masks, settings.strategy, settings.threshold,
                                   settings.top_k, (height, width)), sample)
                for sim, prob in zip(output.similarities[0], output.iop_scores[0])
            ]  # fmt: skip
        else:
            masks = [(mask > 0).cpu() for mask in output.sam_logits[0]]
            if self.head == "combined":
                masks = [combine_heads(mask, sample.masks) for mask in masks]
            rounds = [SegmentationRound(mask=m.numpy().astype(bool), proposals=[]) for m in masks]
        rejected = self._rejection(input_ids, output.logits[0]) if settings.mode != "free" else None
        if rejected is not None:  # the scores stay in the JSON; nothing is selected
            rounds = [
                SegmentationRound(
                    mask=np.zeros_like(r.mask),
                    proposals=[dataclasses.replace(p, selected=False) for p in r.proposals],
                )
                for r in rounds
            ]
        mask = np.zeros((height, width), bool)
        for round_ in rounds:
            mask |= round_.mask
        note = ""
        if rejected is not None:
            note = (f"The model would rather answer that there is no such object (probability "
                    f"{rejected:.2f}), so the mask is empty.")  # fmt: skip
        elif not rounds:
            note = NO_SEG_NOTE
            answer = f"{answer} [{NO_SEG_NOTE}]" if answer else NO_SEG_NOTE
        elif len(sample.indices) == 0:
            note = "No mask proposals for this image, so the mask is empty."
        elif not mask.any():
            note = f"No proposal passed the {settings.strategy} selection, so the mask is empty."
        return SegmentationAnswer(
            query=query,
            prompt=prompt,
            answer=answer,
            mode=settings.mode,
            rounds=rounds,
            mask=mask,
            num_proposals=len(sample.indices),
            note=note,
            settings={"strategy": settings.strategy, "threshold": settings.threshold,
                      "top_k": settings.top_k, "template": settings.template,
                      "tokenization": self.tokenization, "mask_head": self.head},
            prompt_text=prompt_text,
            prompt_ids=readable[0],
            prompt_tokens=readable[1],
        )  # fmt: skip


def _round(result, sample) -> SegmentationRound:
    selected = set(result.selected)
    scores = [
        ProposalScore(
            index=int(sample.indices[k]),
            area=int(sample.masks[k].sum()),
            bbox=[round(float(v), 2) for v in sample.bbox[k]],
            cosine=float(result.similarity[k]),
            iop=float(result.iop[k]),
            selected=k in selected,
        )
        for k in range(len(sample.indices))
    ]
    return SegmentationRound(mask=result.mask.cpu().numpy().astype(bool), proposals=scores)
