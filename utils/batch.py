"""The typed batch the data pipeline hands to :class:`model.llm_seg.LLMSegModel`.

A batch holds ``B`` conversation rows showing ``I`` distinct images (several rows may share one
image, which is then encoded once). Each image brings its own ``K_i`` mask proposals and, for
training, one row of IoU/IoP targets per ``[SEG]`` token that its rows contain.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ReferenceInputs:
    """SegLLM references: the earlier rounds' masks a batch's ``<ref>`` tokens stand for.

    ``N`` references in the order of their ``<ref>`` tokens (row by row, then by position), so
    the model writes embedding ``n`` at the ``n``-th ``<ref>``.

    Attributes:
        clip_maps: ``(N, g, g)`` fraction of each CLIP patch the mask covers (CLIP's own frame:
            shortest side resized, centre crop), for pooling the patch grid LLaVA computes.
        geometry: ``(N, 5)`` the mask's box ``x0, y0, x1, y1`` and area, each normalised to the
            image (width, height, pixels).
        proposal_maps: ``(N, M, M)`` the mask in the proposal weight maps' frame (padded
            square), for relating each proposal to it.
        image_index: ``(N,)`` long: the image (batch index) each reference belongs to.
        ious: per image ``(N_i, K_i)`` IoU of each of its references with its proposals, the
            target of the reference-selection loss; ``None`` without targets.
        crop_pixels: ``(N, 3, S, S)`` CLIP inputs of each masked crop (the ``crop_cls`` mask
            encoder's view); ``None`` for the ``pooled`` encoder.
        rows: ``(N,)`` long: the ``[SEG]`` row (within its image) whose ground truth each
            reference is, for the SAM head's reference-mask loss; ``None`` without targets.
    """

    clip_maps: torch.Tensor
    geometry: torch.Tensor
    proposal_maps: torch.Tensor
    image_index: torch.Tensor
    ious: list[torch.Tensor] | None = None
    crop_pixels: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.image_index.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None):
        """Moved to ``device``; the maps and geometry cast to ``dtype`` (IoU targets stay fp32)."""
        cast = {"clip_maps", "geometry", "proposal_maps", "crop_pixels"}
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                moved[f.name] = [v.to(device) for v in value]
            elif isinstance(value, torch.Tensor):
                to_dtype = dtype if f.name in cast and dtype is not None else None
                moved[f.name] = value.to(device=device, dtype=to_dtype)
            else:
                moved[f.name] = value
        return ReferenceInputs(**moved)


@dataclass
class LLMSegBatch:
    """One training or evaluation batch.

    Attributes:
        input_ids: ``(B, L)`` long; ``<image>`` already expanded to ``num_image_tokens`` ids.
        attention_mask: ``(B, L)``, 1 for real tokens.
        labels: ``(B, L)`` long, ``-100`` where there is no LM loss (instruction, padding,
            image); ``None`` for scoring without a language-model loss.
        clip_pixels: ``(I, 3, S, S)`` CLIP-preprocessed, one per distinct image.
        dino_pixels: ``(I, 3, D, D)`` ImageNet-normalised, ResizeLongestSide(D) + zero pad.
        image_index: ``(B,)`` long: which image each conversation row shows.
        proposal_masks: ``I`` tensors ``(K_i, M, M)``, float weight maps in ``[0, 1]``
            (``M = 256``); ``K_i`` may be 0.
        proposal_ious: ``I`` tensors ``(R_i, K_i)``: IoU of every proposal with each target,
            where ``R_i`` is the number of ``[SEG]`` tokens in image ``i``'s rows, ordered by
            row then position. ``None`` when scoring without targets.
        proposal_iops: ``I`` tensors ``(R_i, K_i)``: ``|P ∩ G| / |P|``; ``None`` likewise.
        references: the masks behind the ``<ref>`` tokens (SegLLM), ``None`` without any.
        sam_pixels: ``(I, 3, S, S)`` SAM inputs (ResizeLongestSide(S), normalised, padded), for
            the SAM mask-decoder head; ``None`` without it.
        sam_resized_hw: per image, its size inside the SAM input.
        image_sizes: per image, its original ``(H, W)`` (where SAM's masks are compared).
        target_masks: per image ``(R_i, H_i, W_i)`` uint8 {0, 1} ground truth of its ``[SEG]``
            rows (ignore pixels count as background, as in LISA); ``None`` without targets.
        image_keys: per image, its file (the SAM head's embedding cache key).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    clip_pixels: torch.Tensor
    dino_pixels: torch.Tensor
    image_index: torch.Tensor
    proposal_masks: list[torch.Tensor]
    proposal_ious: list[torch.Tensor] | None = None
    proposal_iops: list[torch.Tensor] | None = None
    references: ReferenceInputs | None = None
    sam_pixels: torch.Tensor | None = None
    sam_resized_hw: list[tuple[int, int]] | None = None
    image_sizes: list[tuple[int, int]] | None = None
    target_masks: list[torch.Tensor] | None = None
    image_keys: list[str] | None = None

    @property
    def num_images(self) -> int:
        return self.clip_pixels.shape[0]

    @property
    def has_targets(self) -> bool:
        return self.proposal_ious is not None and self.proposal_iops is not None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LLMSegBatch:
        """Move every tensor to ``device``; cast pixels and proposal maps to ``dtype``.

        IoU/IoP targets stay fp32 whatever ``dtype`` is: the losses are computed in fp32 and
        bf16 would round the targets to 2-3 significant digits (x20 by the temperature).
        """

        def move(value, cast: bool):
            if isinstance(value, ReferenceInputs):
                return value.to(device, dtype)
            if isinstance(value, list):
                return [move(v, cast) for v in value]
            if not isinstance(value, torch.Tensor):
                return value
            if cast and dtype is not None and value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device=device)

        keep_fp32 = {"proposal_ious", "proposal_iops"}
        return LLMSegBatch(
            **{f.name: move(getattr(self, f.name), f.name not in keep_fp32) for f in fields(self)}
        )

    def seg_counts(self, seg_token_id: int) -> list[int]:
        """``R_i``: the number of ``[SEG]`` tokens (in attended positions) per image."""
        seg = (self.input_ids == seg_token_id) & self.attention_mask.bool()
        per_row = seg.sum(dim=1)
        counts = torch.zeros(self.num_images, dtype=torch.long, device=per_row.device)
        counts.index_add_(0, self.image_index, per_row)
        return counts.tolist()

    def validate_references(self, ref_token_id: int | None) -> None:
        """Check that there is one reference per attended ``<ref>`` token, each about the image
        of its row.

        Raises:
            ValueError: a count or image mismatch (both counts, or the references, named).
        """
        ref_mask = None
        if ref_token_id is not None:
            ref_mask = (self.input_ids == ref_token_id) & self.attention_mask.bool()
        found = 0 if ref_mask is None else int(ref_mask.sum())
        given = 0 if self.references is None else self.references.count
        if found != given:
            raise ValueError(f"the batch has {found} <ref> tokens but {given} references")
        if not given:
            return
        refs = self.references
        rows = ref_mask.nonzero()[:, 0]
        wrong = (self.image_index[rows] != refs.image_index).nonzero().flatten().tolist()
        if wrong:
            raise ValueError(f"references {wrong} are about another image than their <ref> row")
        for name in ("clip_maps", "geometry", "proposal_maps"):
            if getattr(refs, name).shape[0] != given:
                raise ValueError(f"references.{name} has {getattr(refs, name).shape[0]} rows")

    def validate(self, seg_token_id: int) -> list[int]:
        """Check every shape and count; return ``R_i`` per image.

        Raises:
            ValueError: naming the field (and image) that is inconsistent.
        """
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got {tuple(self.input_ids.shape)}")
        shape = tuple(self.input_ids.shape)
        for name in ("attention_mask", "labels"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} is {tuple(value.shape)} but input_ids is {shape}")
        if tuple(self.image_index.shape) != shape[:1]:
            raise ValueError(
                f"image_index is {tuple(self.image_index.shape)}; expected ({shape[0]},)"
            )
        num_images = self.num_images
        if self.dino_pixels.shape[0] != num_images:
            raise ValueError(
                f"dino_pixels holds {self.dino_pixels.shape[0]} images but clip_pixels {num_images}"
            )
        if shape[0] and (self.image_index.min() < 0 or self.image_index.max() >= num_images):
            raise ValueError(
                f"image_index {self.image_index.tolist()} points outside the {num_images} images"
            )
        if len(self.proposal_masks) != num_images:
            raise ValueError(
                f"proposal_masks has {len(self.proposal_masks)} entries for {num_images} images"
            )
        counts = self.seg_counts(seg_token_id)
        for i, masks in enumerate(self.proposal_masks):
            if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
                raise ValueError(
                    f"image {i}: proposal_masks must be (K, M, M), got {tuple(masks.shape)}"
                )
        if self.has_targets:
            for name in ("proposal_ious", "proposal_iops"):
                targets = getattr(self, name)
                if len(targets) != num_images:
                    raise ValueError(f"{name} has {len(targets)} entries for {num_images} images")
                for i, (target, masks) in enumerate(zip(targets, self.proposal_masks)):
                    if target.ndim != 2:
                        raise ValueError(
                            f"image {i}: {name} must be (R, K), got {tuple(target.shape)}"
                        )
                    if target.shape[0] != counts[i]:
                        raise ValueError(
                            f"image {i} has {counts[i]} [SEG] tokens but {name} has "
                            f"{target.shape[0]} rows"
                        )
                    if target.shape[1] != masks.shape[0]:
                        raise ValueError(
                            f"image {i} has {masks.shape[0]} proposals but {name} has "
                            f"{target.shape[1]} columns"
                        )
        return counts
