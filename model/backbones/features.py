"""Frozen DINOv2 patch features: the image side of the proposal scorer.

Upstream LLM-Seg resizes the image so its longest side is 896, normalises it with the ImageNet
mean/std on the 0-255 scale, zero-pads it bottom/right to 896 x 896 and keeps DINOv2's normalised
patch tokens as a ``(1024, 64, 64)`` grid. Here the grid size is derived from the input size and
the patch size (``896 / 14 = 64``), so any DINOv2 and any input size that is a multiple of the
patch size work.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Model


class DinoFeatureExtractor(nn.Module):
    """A frozen ``Dinov2Model`` returning its normalised patch tokens as a spatial grid.

    As in the paper, the wrapped model does not train: its parameters are frozen, it stays in
    eval mode whatever ``train()`` is called with, and the forward pass runs under ``no_grad``.
    :meth:`set_trainable` is an option for tiny random encoders (the built-in demo), whose
    features carry nothing useful unless they learn; it keeps eval mode (no dropout).
    """

    def __init__(self, dinov2: Dinov2Model) -> None:
        super().__init__()
        self.dinov2 = dinov2.eval()
        self.trainable = False
        self.dinov2.requires_grad_(False)

    def set_trainable(self, enabled: bool) -> None:
        """Let gradients reach the DINOv2 weights (``enabled``) or freeze them (the default)."""
        self.trainable = enabled
        self.dinov2.requires_grad_(enabled)

    @property
    def patch_size(self) -> int:
        return self.dinov2.config.patch_size

    @property
    def feature_dim(self) -> int:
        """Channels of the feature grid (1024 for ViT-L/14)."""
        return self.dinov2.config.hidden_size

    def grid_size(self, image_size: int) -> int:
        """Side of the feature grid for a square input of ``image_size`` pixels."""
        if image_size % self.patch_size:
            raise ValueError(
                f"DINOv2 input size {image_size} is not a multiple of the patch size "
                f"{self.patch_size}"
            )
        return image_size // self.patch_size

    def train(self, mode: bool = True) -> DinoFeatureExtractor:
        # Frozen feature extractor: keep dropout/drop-path off even when the model trains.
        super().train(mode)
        self.dinov2.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features of square, preprocessed images (without gradients unless trainable).

        Args:
            pixels: ``(I, 3, D, D)`` from :func:`preprocess_for_dinov2`.
        Returns:
            ``(I, C, G, G)`` with ``C`` the DINOv2 width and ``G = D / patch_size``, in the
            DINOv2 parameters' dtype.
        """
        if pixels.ndim != 4 or pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"expected (I, 3, D, D) square inputs, got {tuple(pixels.shape)}")
        grid = self.grid_size(pixels.shape[-1])
        dtype = self.dinov2.embeddings.patch_embeddings.projection.weight.dtype
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tokens = self.dinov2(pixel_values=pixels.to(dtype)).last_hidden_state
        patches = tokens[:, 1:]  # drop CLS: upstream's x_norm_patchtokens
        return patches.transpose(1, 2).reshape(pixels.shape[0], -1, grid, grid)
