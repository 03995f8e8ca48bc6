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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from model.backbones.features import DinoFeatureExtractor
from model.backbones.llava import LlavaBackbone
from model.heads.losses import LossConfig, alignment_loss, iop_regression_loss, language_model_loss
from model.heads.proposal_scorer import ProposalScorer, ProposalScores
from model.heads.selection import SelectionResult, select_mask
from utils.batch import LLMSegBatch


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
        similarities: per image ``(R_i, K_i)`` fp32 cosines.
        iop_scores: per image ``(R_i, K_i)`` fp32 IoP-head outputs.
        seg_embeddings: per image ``(R_i, E)`` projected ``[SEG]`` hidden states.
        logits: ``(B, L, vocab)``.
    """

    loss: torch.Tensor | None
    ce_loss: torch.Tensor | None
    align_loss: torch.Tensor | None
    iop_loss: torch.Tensor | None
    similarities: list[torch.Tensor] = field(default_factory=list)
    iop_scores: list[torch.Tensor] = field(default_factory=list)
    seg_embeddings: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None


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
        dino: frozen DINOv2 feature extractor.
        proposal_scorer: the scorer; its ``embed_dim`` is the text projection's output size.
        seg_token_id: id of ``[SEG]``.
        loss_config: loss weights and constants.
    """

    def __init__(
        self,
        backbone: LlavaBackbone,
        dino: DinoFeatureExtractor,
        proposal_scorer: ProposalScorer,
        seg_token_id: int,
        loss_config: LossConfig | None = None,
    ) -> None:
        super().__init__()
        if proposal_scorer.config.feature_dim != dino.feature_dim:
            raise ValueError(
                f"scorer expects {proposal_scorer.config.feature_dim}-d features but DINOv2 "
                f"gives {dino.feature_dim}"
            )
        self.backbone = backbone
        self.text_projection = build_text_projection(
            backbone.hidden_size, proposal_scorer.config.embed_dim
        )
        self.dino = dino
        self.proposal_scorer = proposal_scorer
        self.seg_token_id = seg_token_id
        self.loss_config = loss_config or LossConfig()

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

    def train(self, mode: bool = True) -> LLMSegModel:
        # The frozen vision encoders never leave eval mode.
        super().train(mode)
        self.backbone.vision_tower.eval()
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
        projection_dtype = self.text_projection[0].weight.dtype
        embeddings = self.text_projection(states.to(projection_dtype))
        image_of_seg = batch.image_index[rows]
        return [embeddings[image_of_seg == i] for i in range(batch.num_images)]

    def score_proposals(
        self, batch: LLMSegBatch, seg_embeddings: list[torch.Tensor]
    ) -> list[ProposalScores]:
        """The proposal head for every image; DINOv2 runs only where there is work to do.

        Returns:
            ``I`` :class:`ProposalScores` with ``(R_i, K_i)`` fields.
        """
        needed = [
            i
            for i, (segs, masks) in enumerate(zip(seg_embeddings, batch.proposal_masks))
            if segs.shape[0] > 0 and masks.shape[0] > 0
        ]
        scores: list[ProposalScores | None] = [None] * len(seg_embeddings)
        if needed:
            index = torch.tensor(needed, device=batch.dino_pixels.device)
            features = self.dino(batch.dino_pixels.index_select(0, index))
            feature_maps = self.proposal_scorer.project_features(features)
            for feature_map, i in zip(feature_maps, needed):
                pooled = self.proposal_scorer.proposal_features(
                    feature_map, batch.proposal_masks[i]
                )
                scores[i] = self.proposal_scorer.score(pooled, seg_embeddings[i])
        for i, masks in enumerate(batch.proposal_masks):
            if scores[i] is None:  # no [SEG] or no proposal: empty (R_i, K_i) scores
                unpooled = masks.new_zeros((masks.shape[0], self.proposal_scorer.config.embed_dim))
                scores[i] = self.proposal_scorer.score(unpooled, seg_embeddings[i])
        return scores

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
            zero = batch.dino_pixels.new_zeros((), dtype=torch.float32)
            for image_scores in scores:  # keep the graph connected (e.g. for DeepSpeed)
                zero = zero + image_scores.similarity.sum() * 0 + image_scores.iop.sum() * 0
            return zero, zero
        return torch.stack(align_terms).mean(), torch.stack(iop_terms).mean()

    def forward(self, batch: LLMSegBatch) -> LLMSegOutput:
        """Losses (when ``batch`` has labels/targets) and per-image proposal scores.

        Args:
            batch: see :class:`~utils.batch.LLMSegBatch`; ``batch.validate`` runs first.
        Returns:
            :class:`LLMSegOutput`.
        """
        batch.validate(self.seg_token_id)
        llava = self.backbone(
            batch.input_ids, batch.attention_mask, batch.clip_pixels, batch.image_index
        )
        seg_embeddings = self.seg_embeddings(batch, llava.hidden_states)
        scores = self.score_proposals(batch, seg_embeddings)

        config = self.loss_config
        ce = None if batch.labels is None else language_model_loss(llava.logits, batch.labels)
        align = iop = None
        if batch.has_targets:
            align, iop = self.proposal_losses(batch, scores)
        terms = [
            (weight, value)
            for weight, value in (
                (config.ce_weight, ce),
                (config.align_weight, align),
                (config.iop_weight, iop),
            )
            if value is not None
        ]
        loss = sum(weight * value for weight, value in terms) if terms else None
        return LLMSegOutput(
            loss=loss,
            ce_loss=ce,
            align_loss=align,
            iop_loss=iop,
            similarities=[s.similarity for s in scores],
            iop_scores=[s.iop for s in scores],
            seg_embeddings=seg_embeddings,
            logits=llava.logits,
        )

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
