"""Mask-geometry embedding: descriptors by hand, invariances, and the scorer option."""

from __future__ import annotations

import math

import pytest
import torch

from model.builder import LLMSegConfig
from model.heads.mask_geometry import (
    NUM_SCALAR_DESCRIPTORS,
    RADIAL_HARMONICS,
    MaskGeometryEmbedding,
    fourier_features,
    mask_geometry_descriptors,
    radial_shape_descriptors,
)
from model.heads.proposal_scorer import ProposalScorer, ProposalScorerConfig
from utils.config import parse_config


def test_descriptors_of_a_rectangle_by_hand():
    maps = torch.zeros(1, 8, 8)
    maps[0, 2:4, 4:8] = 1.0  # rows 2-3, columns 4-7: 8 pixels
    descriptors = mask_geometry_descriptors(maps, grid=2)[0]
    area, cx, cy, x0, y0, x1, y1 = descriptors[:NUM_SCALAR_DESCRIPTORS].tolist()
    assert area == pytest.approx(math.sqrt(8 / 64))
    assert (cx, cy) == pytest.approx((6 / 8, 3 / 8))  # mean of pixel centres (i + 0.5) / 8
    assert (x0, y0, x1, y1) == pytest.approx((4 / 8, 2 / 8, 8 / 8, 4 / 8))  # whole pixels
    # The box-normalised thumbnail of a full rectangle is all ones.
    torch.testing.assert_close(descriptors[NUM_SCALAR_DESCRIPTORS:], torch.ones(4))


def test_shape_thumbnail_ignores_position_and_scale_but_not_shape():
    small = torch.zeros(32, 32)
    small[2:6, 2:4] = 1.0  # a 4x4 "L": left column pair, then the bottom row pair
    small[4:6, 2:6] = 1.0
    large = torch.zeros(32, 32)  # the same L, twice as big, elsewhere
    large[10:18, 16:20] = 1.0
    large[14:18, 16:24] = 1.0
    square = torch.zeros(32, 32)
    square[20:28, 4:12] = 1.0
    descriptors = mask_geometry_descriptors(torch.stack([small, large, square]), grid=4)
    shapes = descriptors[:, NUM_SCALAR_DESCRIPTORS:]
    torch.testing.assert_close(shapes[0], shapes[1])
    assert shapes[0].sum() == pytest.approx(12.0)  # 12 of the 16 cells are inside the L
    assert (shapes[2] == 1).all()
    assert descriptors[1, 0] == pytest.approx(2 * descriptors[0, 0])  # sqrt(area) doubles


def test_faint_and_empty_maps():
    maps = torch.zeros(2, 8, 8)
    maps[0, 3, 3:5] = 0.25  # a blurred thin proposal: no pixel above 0.5, box from w > 0
    descriptors = mask_geometry_descriptors(maps, grid=2)
    assert descriptors[0, 3:7].tolist() == pytest.approx([3 / 8, 3 / 8, 5 / 8, 4 / 8])
    assert (descriptors[1] == 0).all()
    assert mask_geometry_descriptors(torch.zeros(0, 8, 8), grid=3).shape == (0, 7 + 9)
    with pytest.raises(ValueError, match="square proposal maps"):
        mask_geometry_descriptors(torch.zeros(2, 8, 6))


def test_fourier_features_by_hand():
    values = torch.tensor([[0.25, 0.5]])
    features = fourier_features(values, num_octaves=2)
    angles = torch.tensor([0.25 * math.pi, 0.5 * math.pi, 0.5 * math.pi, math.pi])
    expected = torch.cat([values[0], angles.sin(), angles.cos()])
    torch.testing.assert_close(features[0], expected)
    assert fourier_features(values, 0) is values


def _scorer(geometry: bool) -> ProposalScorer:
    config = ProposalScorerConfig(
        feature_dim=6, embed_dim=8, num_heads=2, mlp_dim=16, map_size=8, geometry_embedding=geometry
    )
    return ProposalScorer(config)


def test_scorer_option_off_by_default_and_added_to_pooled_features():
    plain = _scorer(geometry=False)
    assert plain.geometry_embedding is None
    assert not any("geometry" in name for name in plain.state_dict())
    assert ProposalScorerConfig().geometry_embedding is False
    assert LLMSegConfig().mask_geometry_embedding is False

    scorer = _scorer(geometry=True)
    assert isinstance(scorer.geometry_embedding, MaskGeometryEmbedding)
    feature_map = torch.randn(8, 8, 8)
    masks = (torch.rand(3, 8, 8) > 0.5).float()
    expected = scorer.pool(feature_map, masks) + scorer.geometry_embedding(masks)
    torch.testing.assert_close(scorer.proposal_features(feature_map, masks), expected)
    pooled = plain.pool(feature_map, masks)
    torch.testing.assert_close(plain.proposal_features(feature_map, masks), pooled)


def test_geometry_embedding_learns_through_the_scorer():
    scorer = _scorer(geometry=True)
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1.0
    masks[1, 4:, 2:8] = 1.0
    scores = scorer(torch.randn(1, 6, 2, 2), [masks], [torch.randn(1, 8)])[0]
    scores.similarity.sum().backward()
    gradients = [p.grad for p in scorer.geometry_embedding.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in gradients)


def test_flag_reaches_the_scorer_config():
    config = parse_config(LLMSegConfig, ["--mask_geometry_embedding"])
    assert config.scorer_config(feature_dim=4).geometry_embedding is True
    assert LLMSegConfig().scorer_config(feature_dim=4).geometry_embedding is False


def _polygon_map(corners: int, radius: float, rotation: float, size: int = 64) -> torch.Tensor:
    """``(size, size)`` map of a filled regular polygon centred in the map."""
    angles = rotation + torch.arange(corners) * (2 * math.pi / corners)
    vx, vy = size / 2 + radius * angles.cos(), size / 2 + radius * angles.sin()
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    inside = torch.ones(size, size, dtype=torch.bool)
    for i in range(corners):  # inside every edge's half-plane (the vertices run anticlockwise)
        j = (i + 1) % corners
        cross = (vx[j] - vx[i]) * (y - vy[i]) - (vy[j] - vy[i]) * (x - vx[i])
        inside &= cross >= 0
    return inside.float()


def _disc_map(radius: float, size: int = 64, hole: float = 0.0) -> torch.Tensor:
    centres = torch.arange(size, dtype=torch.float32) + 0.5 - size / 2
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    distance = (x.square() + y.square()).sqrt()
    return ((distance <= radius) & (distance >= hole)).float()


def test_radial_outline_names_the_corners_whatever_the_rotation():
    maps = torch.stack(
        [_polygon_map(n, 14.0, rotation) for n in (3, 4, 6) for rotation in (0.1, 0.9)]
        + [_disc_map(12.0), _disc_map(12.0, hole=6.0), torch.zeros(64, 64)]
    )
    descriptors = radial_shape_descriptors(maps)
    assert descriptors.shape == (9, RADIAL_HARMONICS + 2)
    harmonics = descriptors[:, :RADIAL_HARMONICS]
    for index, corners in enumerate((3, 3, 4, 4, 6, 6)):
        assert int(harmonics[index].argmax()) + 1 == corners  # harmonic h is column h - 1
    # Turning a shape changes its thumbnail but hardly its outline descriptors.
    for first in (0, 2, 4):
        torch.testing.assert_close(descriptors[first], descriptors[first + 1], atol=0.15, rtol=0)
    disc, ring = descriptors[6], descriptors[7]
    assert harmonics[6].max() < 0.1  # a disc has no corners
    assert ring[RADIAL_HARMONICS] > 2 * disc[RADIAL_HARMONICS]  # hollowness
    assert disc[RADIAL_HARMONICS + 1] == pytest.approx(1.0, abs=0.1)  # fills its disc
    assert ring[RADIAL_HARMONICS + 1] == pytest.approx(0.75, abs=0.1)  # 1 - (6 / 12)^2
    assert (descriptors[8] == 0).all()
    assert radial_shape_descriptors(torch.zeros(0, 8, 8)).shape == (0, RADIAL_HARMONICS + 2)
    with pytest.raises(ValueError, match="num_harmonics"):
        radial_shape_descriptors(maps, num_bins=8, num_harmonics=5)


def test_radial_outline_of_tiny_and_thin_maps_stays_in_range():
    dot, line = torch.zeros(64, 64), torch.zeros(64, 64)
    dot[10, 10] = 1.0
    line[20, 5:40] = 1.0  # most directions from its centroid hold no pixel
    descriptors = radial_shape_descriptors(torch.stack([dot, line]))
    harmonics = descriptors[:, :RADIAL_HARMONICS]
    assert harmonics.abs().max() < 0.1  # empty directions read as the mean: no spurious corners
    assert (
        0 <= descriptors[:, RADIAL_HARMONICS].min() <= descriptors[:, RADIAL_HARMONICS].max() <= 1
    )
    assert descriptors[0, RADIAL_HARMONICS + 1] <= 2.0  # one pixel: fill clamped, not 1300
    assert descriptors[1, RADIAL_HARMONICS + 1] < 0.1  # a line fills little of its disc
