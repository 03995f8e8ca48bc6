"""The whole LLM-Seg model: LLaVA emits ``[SEG]``, whose hidden state scores mask proposals.

Forward pass for a :class:`~utils.batch.LLMSegBatch` of ``B`` rows over ``I`` images:

1. LLaVA (CLIP features written at the ``<image>`` positions) gives logits and last-layer hidden
   states ``(B, L, hidden)``; the LM loss comes from the logits.
2. For every ``[SEG]`` token, the hidden state at the position *before* it (the one that
   predicts ``[SEG]``; LISA's convention) goes through ``text_projection`` (hidden -> hidden ->
   256). Positions come from the token ids, so any number of image tokens, of ``[SEG]`` per row
   and of rows per image work.
3. The proposal head: frozen DINOv2 features and the proposals' weight maps feed the
   :class:`~model.heads.proposal_scorer.ProposalScorer`, giving per image ``(R_i, K_i)`` cosines and
   IoP scores, and the alignment and IoP-regression losses.

The proposal scorer is one "head" reading the ``[SEG]`` embeddings; a second head (e.g. LISA's
SAM mask decoder) can be added beside it in :meth:`LLMSegModel.forward` without touching the rest.

SegLLM (multi-round; a model built with a ``mask_encoder``): a question's ``<ref>`` tokens stand
for earlier rounds' masks (``batch.references``). The :class:`~model.mask_encoder.PooledMaskEncoder`
writes each mask's embedding at its ``<ref>`` position (dropped with ``ref_dropout`` in training).
Mask-aware decoding: each ``[SEG]``'s proposals see their relation to the masks of the same
round's references (:mod:`model.heads.reference_relations`), and the last-layer state *at* each
``<ref>`` goes through the same text projection and is trained to select the referenced mask
(``ref_loss``, weight ``LossConfig.ref_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.backbones.features import DinoFeatureExtractor
from model.backbones.llava import LlavaBackbone
from model.heads.losses import (
    LossConfig,
    alignment_loss,
    dice_loss,
    iop_regression_loss,
    language_model_loss,
    sigmoid_bce_loss,
)
from model.heads.proposal_scorer import ProposalScorer, ProposalScores
from model.heads.reference_relations import round_relations
from model.heads.sam_decoder import SamMaskHead
from model.heads.selection import SelectionResult, select_mask
from model.mask_encoder import PooledMaskEncoder
from utils.batch import LLMSegBatch
from utils.run_checkpoints import AddedParts

MASK_HEADS = ("proposals", "sam", "both")


@dataclass
class LLMSegOutput:
    """Output of :meth:`LLMSegModel.forward`.

    Attributes:
        loss: scalar total ``w_ce * ce + w_align * align + w_iop * iop`` (``None`` without
            labels and targets).
        ce_loss: scalar LM cross-entropy (``None`` without labels).
        align_loss: scalar alignment loss, mean over rounds then images (``None`` without
            targets; 0 when no image has both a ``[SEG]`` and a proposal).
        iop_loss: scalar IoP regression loss, averaged likewise.
        ref_loss: scalar reference-selection loss over the ``<ref>`` states (``None`` without
            references or targets).
        similarities: per image ``(R_i, K_i)`` fp32 cosines.
        iop_scores: per image ``(R_i, K_i)`` fp32 IoP-head outputs.
        seg_embeddings: per image ``(R_i, E)`` projected ``[SEG]`` hidden states.
        logits: ``(B, L, vocab)``.
        ref_similarities: per image ``(N_i, K_i)`` cosines of its ``<ref>`` states (SegLLM).
        sam_logits: per image ``(R_i, H_i, W_i)`` SAM-head mask logits at the original size.
        bce_loss, dice_loss: LISA's mask losses of the SAM head (``None`` without it/targets).
    """

    loss: torch.Tensor | None
    ce_loss: torch.Tensor | None
    align_loss: torch.Tensor | None
    iop_loss: torch.Tensor | None
    similarities: list[torch.Tensor] = field(default_factory=list)
    iop_scores: list[torch.Tensor] = field(default_factory=list)
    seg_embeddings: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None
    ref_loss: torch.Tensor | None = None
    ref_similarities: list[torch.Tensor] = field(default_factory=list)
    sam_logits: list[torch.Tensor] = field(default_factory=list)
    bce_loss: torch.Tensor | None = None
    dice_loss: torch.Tensor | None = None


def build_text_projection(hidden_size: int, out_dim: int) -> nn.Sequential:
    """Upstream's ``text_hidden_fcs[0]``: ``Linear(h, h) -> ReLU -> Linear(h, out)``.

    (Upstream ends with ``Dropout(0.0)``, a no-op without parameters; it is left out.)
    """
    return nn.Sequential(
        nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out_dim)
    )


class LLMSegModel(nn.Module):
    """LLaVA + ``[SEG]`` text projection + frozen DINOv2 + proposal scorer.

    Args:
        backbone: the LLaVA backbone (tokenizer already holds ``[SEG]``).
        dino: frozen DINOv2 feature extractor (``None`` for a SAM-head-only model).
        proposal_scorer: the scorer; its ``embed_dim`` is the text projection's output size
            (``None`` for a SAM-head-only model, whose projection gives SAM's prompt width).
        seg_token_id: id of ``[SEG]``.
        loss_config: loss weights and constants.
        mask_encoder: SegLLM's encoder of earlier masks (``None``: single-round LLM-Seg).
        ref_token_id: id of ``<ref>`` (with ``mask_encoder``).
        ref_dropout: training probability of keeping the plain ``<ref>`` embedding instead.
        sam_head: LISA's SAM mask decoder head (:class:`~model.heads.sam_decoder.SamMaskHead`).
        mask_head: which heads run and train: ``proposals`` (LLM-Seg), ``sam`` (LISA) or
            ``both`` (trained jointly, each evaluated).
    """

    def __init__(
        self,
        backbone: LlavaBackbone,
        dino: DinoFeatureExtractor | None,
        proposal_scorer: ProposalScorer | None,
        seg_token_id: int,
        loss_config: LossConfig | None = None,
        mask_encoder: PooledMaskEncoder | None = None,
        ref_token_id: int | None = None,
        ref_dropout: float = 0.5,
        sam_head: SamMaskHead | None = None,
        mask_head: str = "proposals",
    ) -> None:
        super().__init__()
        if mask_head not in MASK_HEADS:
            raise ValueError(f"unknown mask head {mask_head!r}; expected one of {MASK_HEADS}")
        if (mask_head != "proposals") != (sam_head is not None):
            raise ValueError(f"--mask_head {mask_head} and the SAM head go together")
        if (proposal_scorer is None or dino is None) != (mask_head == "sam"):
            raise ValueError("the proposal head (DINOv2 + scorer) is built unless --mask_head sam")
        if proposal_scorer is None:
            embed_dim = sam_head.prompt_dim
        else:
            embed_dim = proposal_scorer.config.embed_dim
            if sam_head is not None and sam_head.prompt_dim != embed_dim:
                raise ValueError(
                    f"SAM's prompts are {sam_head.prompt_dim}-d but the [SEG] projection gives "
                    f"{embed_dim} (set --out_dim to SAM's prompt width)"
                )
            if mask_encoder is not None and not proposal_scorer.config.relation_features:
                raise ValueError("a multi-round model needs a scorer with relation_features")
            if proposal_scorer.config.feature_dim != dino.feature_dim:
                raise ValueError(
                    f"scorer expects {proposal_scorer.config.feature_dim}-d features but DINOv2 "
                    f"gives {dino.feature_dim}"
                )
        self.backbone = backbone
        self.text_projection = build_text_projection(backbone.hidden_size, embed_dim)
        self.dino = dino
        self.proposal_scorer = proposal_scorer
        self.seg_token_id = seg_token_id
        self.loss_config = loss_config or LossConfig()
        self.mask_encoder = mask_encoder
        self.ref_token_id = ref_token_id
        self.ref_dropout = ref_dropout
        # How it answers a query about nothing (utils/data/rejection.py); set by
        # model.builder.configure_rejection.
        self.rejection = "none"
        self.sam_head = sam_head
        self.mask_head = mask_head
        # SegLLM with the SAM head: [SEG] gives two prompts, one re-detecting the referenced
        # object (an auxiliary loss) and one for the target. Both start as the [SEG] embedding.
        self.sam_prompt_groups = None
        if sam_head is not None and mask_encoder is not None:
            dim = sam_head.prompt_dim
            self.sam_prompt_groups = nn.Linear(dim, 2 * dim)
            with torch.no_grad():
                self.sam_prompt_groups.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)]))
                self.sam_prompt_groups.bias.zero_()

    @property
    def sam_image_size(self) -> int:
        """SAM's input side when the SAM head is built, else 0 (what the encoder needs)."""
        return self.sam_head.image_size if self.sam_head is not None else 0

    @property
    def num_image_tokens(self) -> int:
        """How many ids ``<image>`` expands to (from the CLIP config; 256 for ViT-L/14 at 224)."""
        return self.backbone.num_image_tokens

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the language model's activations in the backward pass (saves memory)."""
        language_model = self.backbone.language_model
        if enabled:
            # Non-reentrant checkpointing needs no inputs_embeds.requires_grad trick.
            language_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            language_model.activation_checkpointing_disable()

    @property
    def gradient_checkpointing(self) -> bool:
        return self.backbone.language_model.is_activation_checkpointing

    def added_parts(self) -> AddedParts:
        """What this model adds to a single-round LLM-Seg run it may start from
        (``training.py --init_weights``): SegLLM's mask encoder, relation embedding and SAM
        prompt split, and the ``<ref>`` token's rows when it is the last token (with
        ``--rejection token`` it is not: ``[REJ]`` comes after it, and the saved rows would not
        line up)."""
        if self.mask_encoder is None:
            return AddedParts()
        prefixes = ("mask_encoder.", "proposal_scorer.relation_embedding.", "sam_prompt_groups.")
        rows = self.backbone.language_model.get_input_embeddings().weight.shape[0]
        return AddedParts(prefixes=prefixes, token_rows=int(self.ref_token_id == rows - 1))

    def train(self, mode: bool = True) -> LLMSegModel:
        # The frozen vision encoders never leave eval mode.
        super().train(mode)
        self.backbone.vision_tower.eval()
        if self.dino is not None:
            self.dino.eval()
        return self

    def seg_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last-layer hidden state that predicts each ``[SEG]``, in row-major order.

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)``; ``[SEG]`` ids at padded positions are ignored.
            hidden: ``(B, L, hidden)`` final hidden states.
        Returns:
            ``(states (N, hidden), rows (N,))``: the state at position ``p - 1`` for every
            ``[SEG]`` at position ``p``, and the row it belongs to.
        """
        seg = (input_ids == self.seg_token_id) & attention_mask.bool()
        rows, cols = seg.nonzero(as_tuple=True)  # row-major: by row, then position
        if (cols == 0).any():
            raise ValueError("a [SEG] token at position 0 has no preceding hidden state")
        return hidden[rows, cols - 1], rows

    def seg_embeddings(self, batch: LLMSegBatch, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Projected ``[SEG]`` embeddings grouped per image: ``I`` tensors ``(R_i, E)``."""
        states, rows = self.seg_hidden_states(batch.input_ids, batch.attention_mask, hidden)
        return self._project_per_image(batch, states, rows)

    def _project_per_image(self, batch, states, rows) -> list[torch.Tensor]:
        projection_dtype = self.text_projection[0].weight.dtype
        embeddings = self.text_projection(states.to(projection_dtype))
        image_of_row = batch.image_index[rows]
        return [embeddings[image_of_row == i] for i in range(batch.num_images)]

    def _positions(self, batch: LLMSegBatch, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (batch.input_ids == token_id) & batch.attention_mask.bool()
        return mask.nonzero(as_tuple=True)  # row-major: by row, then position

    def reference_embeddings(self, batch: LLMSegBatch, hidden: torch.Tensor) -> list[torch.Tensor]:
        """Projected last-layer states *at* the ``<ref>`` tokens, per image ``(N_i, E)``."""
        rows, cols = self._positions(batch, self.ref_token_id)
        return self._project_per_image(batch, hidden[rows, cols], rows)

    def round_references(self, batch: LLMSegBatch) -> list[torch.Tensor]:
        """Which references each round has: per image ``(R_i, N_i)`` bool, a ``[SEG]`` owning
        the ``<ref>`` tokens of its row between the previous ``[SEG]`` and itself (the
        question of the same round)."""
        seg_rows, seg_cols = self._positions(batch, self.seg_token_id)
        ref_rows, ref_cols = self._positions(batch, self.ref_token_id)
        previous = torch.full_like(seg_cols, -1)
        same_row = seg_rows[1:] == seg_rows[:-1]
        previous[1:] = torch.where(same_row, seg_cols[:-1], previous[1:])
        owns = (
            (ref_rows.unsqueeze(0) == seg_rows.unsqueeze(1))
            & (ref_cols.unsqueeze(0) < seg_cols.unsqueeze(1))
            & (ref_cols.unsqueeze(0) > previous.unsqueeze(1))
        )
        seg_image, ref_image = batch.image_index[seg_rows], batch.image_index[ref_rows]
        return [
            owns[seg_image == i][:, ref_image == i] for i in range(batch.num_images)
        ]  # fmt: skip

    def score_proposals(
        self,
        batch: LLMSegBatch,
        seg_embeddings: list[torch.Tensor],
        ref_embeddings: list[torch.Tensor] | None = None,
        assignments: list[torch.Tensor] | None = None,
    ) -> tuple[list[ProposalScores], list[ProposalScores] | None]:
        """The proposal head for every image; DINOv2 runs only where there is work to do.

        Args:
            batch: the batch (its ``references`` give the relation features).
            seg_embeddings: per image ``(R_i, E)``.
            ref_embeddings: per image ``(N_i, E)`` ``<ref>`` states (SegLLM), or ``None``.
            assignments: per image ``(R_i, N_i)`` from :meth:`round_references`.
        Returns:
            ``I`` :class:`ProposalScores` with ``(R_i, K_i)`` fields, and (with
            ``ref_embeddings``) ``I`` with ``(N_i, K_i)`` fields for the references.
        """
        num_refs = [0] * len(seg_embeddings) if ref_embeddings is None else [
            len(r) for r in ref_embeddings
        ]  # fmt: skip
        needed = [
            i
            for i, (segs, masks) in enumerate(zip(seg_embeddings, batch.proposal_masks))
            if (segs.shape[0] > 0 or num_refs[i] > 0) and masks.shape[0] > 0
        ]
        scorer = self.proposal_scorer
        features = [
            masks.new_zeros((masks.shape[0], scorer.config.embed_dim))
            for masks in batch.proposal_masks
        ]  # stays zero where nothing is scored: empty (R_i, K_i) scores
        relations: list[torch.Tensor | None] = [None] * len(seg_embeddings)
        if needed:
            index = torch.tensor(needed, device=batch.dino_pixels.device)
            feature_maps = scorer.project_features(
                self.dino(batch.dino_pixels.index_select(0, index))
            )
            references = None
            if any(num_refs[i] for i in needed):
                references = [
                    batch.references.proposal_maps[batch.references.image_index == i]
                    for i in needed
                ]
            prepared, reference_rows = scorer.prepare(
                feature_maps, [batch.proposal_masks[i] for i in needed], references
            )
            for i, image_features, rows in zip(needed, prepared, reference_rows):
                features[i] = image_features
                if rows is not None:
                    relations[i] = round_relations(rows, assignments[i])
        # One pass of the selection transformer for every image's rounds and references.
        refs = ref_embeddings if ref_embeddings is not None else []
        scores = scorer.score_many(
            features + features[: len(refs)], list(seg_embeddings) + list(refs),
            relations + [None] * len(refs),
        )  # fmt: skip
        scores, ref_scores = scores[: len(features)], scores[len(features) :]
        return scores, (ref_scores if ref_embeddings is not None else None)

    def proposal_losses(
        self, batch: LLMSegBatch, scores: list[ProposalScores]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alignment and IoP losses: mean over rounds per image, then over the images that have
        at least one ``[SEG]`` and one proposal (a graph-connected 0 when there are none)."""
        config = self.loss_config
        align_terms, iop_terms = [], []
        for image_scores, ious, iops in zip(scores, batch.proposal_ious, batch.proposal_iops):
            if image_scores.similarity.numel() == 0:
                continue
            align_terms.append(
                alignment_loss(image_scores.similarity, ious, temperature=config.temperature)
            )
            iop_terms.append(iop_regression_loss(image_scores.iop, iops, scale=config.iop_scale))
        if not align_terms:
            zero = self._connected_zero(batch, scores)
            return zero, zero
        return torch.stack(align_terms).mean(), torch.stack(iop_terms).mean()

    def reference_loss(self, batch: LLMSegBatch, ref_scores: list[ProposalScores]) -> torch.Tensor:
        """Each ``<ref>`` state selects the mask it stands for: the alignment loss against the
        referenced mask's proposal IoUs, mean per image, then over images with references."""
        terms = [
            alignment_loss(s.similarity, ious, temperature=self.loss_config.temperature)
            for s, ious in zip(ref_scores, batch.references.ious)
            if s.similarity.numel() > 0
        ]
        if not terms:
            return self._connected_zero(batch, ref_scores)
        return torch.stack(terms).mean()

    @staticmethod
    def _connected_zero(batch: LLMSegBatch, scores: list[ProposalScores]) -> torch.Tensor:
        zero = batch.dino_pixels.new_zeros((), dtype=torch.float32)
        for image_scores in scores:  # keep the graph connected (e.g. for DeepSpeed)
            zero = zero + image_scores.similarity.sum() * 0 + image_scores.iop.sum() * 0
        return zero

    def _reference_inputs(
        self, batch: LLMSegBatch, vision_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (N', hidden), positions (B, L) bool)`` written over the ``<ref>``
        tokens; in training each is dropped (the token's own embedding kept) with
        ``ref_dropout``."""
        embeddings = self.mask_encoder(vision_features, batch.references, self.backbone)
        positions = (batch.input_ids == self.ref_token_id) & batch.attention_mask.bool()
        if self.training and self.ref_dropout > 0:
            keep = torch.rand(embeddings.shape[0], device=embeddings.device) >= self.ref_dropout
            rows, cols = positions.nonzero(as_tuple=True)
            positions = torch.zeros_like(positions)
            positions[rows[keep], cols[keep]] = True
            embeddings = embeddings[keep]
        return embeddings, positions

    def forward(self, batch: LLMSegBatch) -> LLMSegOutput:
        """Losses (when ``batch`` has labels/targets) and per-image proposal scores.

        Args:
            batch: see :class:`~utils.batch.LLMSegBatch`; ``batch.validate`` runs first.
        Returns:
            :class:`LLMSegOutput`.
        """
        batch.validate(self.seg_token_id)
        batch.validate_references(self.ref_token_id)
        extra_embeddings = extra_mask = vision = None
        if batch.references is not None:
            vision = self.backbone.vision_features(batch.clip_pixels)
            extra_embeddings, extra_mask = self._reference_inputs(batch, vision)
        llava = self.backbone(
            batch.input_ids, batch.attention_mask, batch.clip_pixels, batch.image_index,
            extra_embeddings, extra_mask, vision,
        )  # fmt: skip
        seg_embeddings = self.seg_embeddings(batch, llava.hidden_states)
        ref_embeddings = assignments = None
        if batch.references is not None:
            ref_embeddings = self.reference_embeddings(batch, llava.hidden_states)
            assignments = self.round_references(batch)
        scores = ref_scores = None
        if self.mask_head != "sam":
            scores, ref_scores = self.score_proposals(
                batch, seg_embeddings, ref_embeddings, assignments
            )
        sam_logits = ref_masks = None
        if self.sam_head is not None:
            if batch.sam_pixels is None:
                raise ValueError("the SAM head needs batch.sam_pixels (build the encoder for it)")
            prompts, ref_masks = self._sam_prompts(batch, seg_embeddings, assignments)
            logits = self.sam_head(
                batch.sam_pixels, prompts, batch.sam_resized_hw, batch.image_sizes,
                batch.image_keys,
            )  # fmt: skip
            sam_logits = [lg[: len(segs)] for lg, segs in zip(logits, seg_embeddings)]
            ref_masks = [
                (lg[len(segs) :], rows) for lg, segs, rows in zip(logits, seg_embeddings, ref_masks)
            ]

        config = self.loss_config
        ce = None if batch.labels is None else language_model_loss(llava.logits, batch.labels)
        align = iop = ref = bce = dice = None
        if batch.has_targets and scores is not None:
            align, iop = self.proposal_losses(batch, scores)
            if ref_scores is not None and batch.references.ious is not None:
                ref = self.reference_loss(batch, ref_scores)
        if sam_logits is not None and batch.target_masks is not None:
            bce, dice = self.mask_losses(sam_logits, batch.target_masks)
            if self.sam_prompt_groups is not None and any(len(r) for _, r in ref_masks):
                ref_bce, ref_dice = self.mask_losses(
                    [lg for lg, _ in ref_masks],
                    [t[rows] for (_, rows), t in zip(ref_masks, batch.target_masks)],
                )
                sam_ref = config.bce_weight * ref_bce + config.dice_weight * ref_dice
                ref = sam_ref if ref is None else ref + sam_ref
        terms = [
            (weight, value)
            for weight, value in (
                (config.ce_weight, ce),
                (config.align_weight, align),
                (config.iop_weight, iop),
                (config.ref_weight, ref),
                (config.bce_weight, bce),
                (config.dice_weight, dice),
            )
            if value is not None
        ]
        loss = sum(weight * value for weight, value in terms) if terms else None
        return LLMSegOutput(
            loss=loss,
            ce_loss=ce,
            align_loss=align,
            iop_loss=iop,
            similarities=[s.similarity for s in scores] if scores is not None else [],
            iop_scores=[s.iop for s in scores] if scores is not None else [],
            seg_embeddings=seg_embeddings,
            logits=llava.logits,
            ref_loss=ref,
            ref_similarities=[s.similarity for s in ref_scores] if ref_scores else [],
            sam_logits=sam_logits or [],
            bce_loss=bce,
            dice_loss=dice,
        )

    def _sam_prompts(self, batch, seg_embeddings, assignments):
        """Per image, the SAM head's prompts: the ``[SEG]`` embeddings, or with SegLLM's two
        groups the target prompts followed by the reference prompts of the rounds that refer to
        something; and per image the ground-truth rows those reference prompts must re-detect
        (the first reference of each such round)."""
        empty = torch.zeros(0, dtype=torch.long)
        if self.sam_prompt_groups is None:
            return seg_embeddings, [empty] * len(seg_embeddings)
        prompts, target_rows = [], []
        references = batch.references
        for i, segs in enumerate(seg_embeddings):
            groups = self.sam_prompt_groups(segs.to(self.sam_prompt_groups.weight.dtype))
            reference, target = groups.chunk(2, dim=-1)
            rows = empty.to(segs.device)
            usable = references is not None and references.rows is not None
            if assignments is not None and usable and len(segs):
                owns = assignments[i]
                has = owns.any(dim=1)
                mask_rows = references.rows[references.image_index == i].to(segs.device)
                if has.any() and len(mask_rows):
                    rows = mask_rows[owns.float().argmax(dim=1)[has]]
                    reference = reference[has]
                else:
                    reference = reference[:0]
            else:
                reference = reference[:0]
            prompts.append(torch.cat([target, reference]))
            target_rows.append(rows)
        return prompts, target_rows

    @staticmethod
    def mask_losses(
        logits: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LISA's mask losses: BCE and Dice summed over every mask of the batch, divided by the
        number of masks (a graph-connected 0 without any)."""
        pairs = [(logit, target) for logit, target in zip(logits, targets) if len(target)]
        if not pairs:
            zero = sum(logit.sum() * 0 for logit in logits)
            return zero, zero
        count = sum(len(target) for _, target in pairs)
        bce = sum(sigmoid_bce_loss(logit, target) for logit, target in pairs)
        dice = sum(dice_loss(logit, target) for logit, target in pairs)
        return bce / count, dice / count

    @torch.no_grad()
    def score(self, batch: LLMSegBatch) -> LLMSegOutput:
        """Teacher-forced scoring for evaluation: the prompt already holds ``[SEG]``.

        Runs :meth:`forward` without gradients; labels and targets are optional (their losses
        are reported when present). Switch the model to ``eval()`` first for deterministic
        LoRA dropout.
        """
        return self.forward(batch)

    @torch.no_grad()
    def predict_masks(
        self,
        batch: LLMSegBatch,
        proposal_masks: list[torch.Tensor],
        strategy: str = "iop",
        threshold: float = 0.5,
        top_k: int = 5,
        output_sizes: list[tuple[int, int]] | None = None,
    ) -> list[list[SelectionResult]]:
        """Scores, then one mask per ``[SEG]`` with :func:`~model.heads.selection.select_mask`.

        Args:
            batch: as for :meth:`score`.
            proposal_masks: ``I`` tensors ``(K_i, H_i, W_i)`` bool: the same proposals at their
                stored resolution (``batch.proposal_masks`` are the 256x256 weight maps).
            strategy, threshold, top_k: see :mod:`model.heads.selection`.
            output_sizes: per image ``(H, W)`` to resize the masks to (original image sizes).
        Returns:
            per image, per ``[SEG]`` round, a :class:`~model.heads.selection.SelectionResult`.
        """
        output = self.score(batch)
        results = []
        for i, (similarity, iop) in enumerate(zip(output.similarities, output.iop_scores)):
            size = None if output_sizes is None else output_sizes[i]
            results.append(
                [
                    select_mask(sim, prob, proposal_masks[i], strategy, threshold, top_k, size)
                    for sim, prob in zip(similarity, iop)
                ]
            )
        return results
