"""DINOv2 preprocessing and the frozen feature grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.backbones.features import DinoFeatureExtractor
from model.tiny import build_tiny_dinov2
from utils.data.images import PIXEL_MEAN, PIXEL_STD, preprocess_for_dinov2


def test_preprocess_resizes_longest_side_normalises_and_pads_with_zeros():
    colour = (200, 100, 50)
    image = np.empty((20, 10, 3), dtype=np.uint8)
    image[:] = colour
    pixels, resized = preprocess_for_dinov2(image, size=56)
    assert pixels.shape == (3, 56, 56)
    assert pixels.dtype == torch.float32
    assert resized == (56, 28)  # 20 -> 56, 10 -> 28
    for c in range(3):
        expected = (colour[c] - PIXEL_MEAN[c]) / PIXEL_STD[c]
        assert torch.allclose(pixels[c, :, :28], torch.full((56, 28), expected), atol=1e-5)
    assert torch.equal(pixels[:, :, 28:], torch.zeros(3, 56, 28))  # right padding

    wide, resized = preprocess_for_dinov2(np.zeros((30, 60, 3), dtype=np.uint8), size=56)
    assert resized == (28, 56)
    assert torch.equal(wide[:, 28:], torch.zeros(3, 28, 56))  # bottom padding


def test_preprocess_rejects_non_uint8_rgb():
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_for_dinov2(np.zeros((4, 4, 3), dtype=np.float32), 56)
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_for_dinov2(np.zeros((4, 4), dtype=np.uint8), 56)


@pytest.mark.parametrize("size", [112, 70])
def test_feature_grid_is_the_patch_tokens_by_hand(size):
    dinov2 = build_tiny_dinov2()
    extractor = DinoFeatureExtractor(dinov2)
    pixels = torch.randn(2, 3, size, size)
    grid = size // 14
    features = extractor(pixels)
    assert features.shape == (2, 32, grid, grid)
    with torch.no_grad():
        tokens = dinov2(pixel_values=pixels).last_hidden_state
    for y, x in [(0, 0), (grid - 1, 1), (2, grid - 1)]:
        assert torch.allclose(features[1, :, y, x], tokens[1, 1 + y * grid + x], atol=1e-6)


def test_extractor_is_frozen_and_stays_in_eval():
    extractor = DinoFeatureExtractor(build_tiny_dinov2())
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.dinov2.training
    pixels = torch.randn(1, 3, 56, 56, requires_grad=True)
    assert not extractor(pixels).requires_grad
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        extractor(torch.randn(1, 3, 60, 60))
    with pytest.raises(ValueError, match="square"):
        extractor(torch.randn(1, 3, 56, 42))


def test_extractor_follows_the_model_dtype():
    extractor = DinoFeatureExtractor(build_tiny_dinov2().to(torch.bfloat16))
    features = extractor(torch.randn(1, 3, 56, 56))
    assert features.dtype == torch.bfloat16
    assert torch.isfinite(features.float()).all()
