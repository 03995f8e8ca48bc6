"""Mask-geometry embedding: where a proposal is, how big it is and what outline it has.

An optional addition to the proposal scorer (``ProposalScorerConfig.geometry_embedding``, the
``--mask_geometry_embedding`` flag; **off in the paper's configuration**). Mask-average pooling
keeps what the features say about a region *on average* and throws away its geometry: the
pooled vector of a uniformly coloured triangle and of a square of the same colour are the same,
and so are those of a small and a large one, or of the leftmost and the rightmost one. DINOv2-L's
features carry some of that through their context; random tiny encoders (the built-in demo)
carry none of it, so queries such as "the largest object", "the leftmost object" or "the shape
with three corners" cannot be answered from pooled features alone.

For each proposal weight map ``w`` (``(M, M)`` in the padded-square image frame, values in
``[0, 1]``) the descriptor holds, all computed without parameters:

* ``sqrt(area)``: ``sqrt(sum w / M^2)``, the side of a square of the same area (in image sides);
* the centroid ``(x, y)`` in ``[0, 1]``;
* the bounding box ``(x0, y0, x1, y1)`` in ``[0, 1]`` of the pixels with ``w > 0.5``;
* the *shape*: the map resampled to ``G x G`` inside its own bounding box (position and scale
  removed, so a triangle looks like a triangle whatever its size and place).

The seven scalars are expanded into Fourier features (``sin``/``cos`` at ``F`` octaves, as
positional encodings are: an MLP learns comparisons of positions and sizes far faster from them
than from raw coordinates), and a two-layer MLP turns the ``7 * (1 + 2F) + G^2`` numbers into an
``E``-vector that is added to the pooled feature of the proposal, before the selection
transformer (which can then compare proposals: "largest", "leftmost", "above the star").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_SCALAR_DESCRIPTORS = 7  # sqrt(area), centroid (2), bounding box (4)


def fourier_features(values: torch.Tensor, num_octaves: int) -> torch.Tensor:
    """``(..., D)`` values -> ``(..., D * (1 + 2F))``: each value, then its ``sin(2^f pi v)`` and
    ``cos(2^f pi v)`` for ``f < F`` (all sines first, then all cosines)."""
    if num_octaves == 0:
        return values
    scales = math.pi * 2.0 ** torch.arange(num_octaves, device=values.device, dtype=values.dtype)
    angles = (values[..., None] * scales).flatten(-2)  # (..., D * F)
    return torch.cat([values, angles.sin(), angles.cos()], dim=-1)


def mask_geometry_descriptors(proposal_masks: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Parameter-free geometry of each proposal weight map.

    Args:
        proposal_masks: ``(K, M, M)`` weight maps in ``[0, 1]``.
        grid: side ``G`` of the bounding-box-normalised shape thumbnail.
    Returns:
        ``(K, 7 + G * G)`` float32: ``[sqrt(area), cx, cy, x0, y0, x1, y1, shape...]``; all zero
        for an empty map.
    """
    if proposal_masks.ndim != 3 or proposal_masks.shape[1] != proposal_masks.shape[2]:
        raise ValueError(
            f"expected (K, M, M) square proposal maps, got {tuple(proposal_masks.shape)}"
        )
    num, size = proposal_masks.shape[0], proposal_masks.shape[-1]
    weights = proposal_masks.float()
    if num == 0:
        return weights.new_zeros((0, NUM_SCALAR_DESCRIPTORS + grid * grid))
    # Pixel centres in [0, 1] (pixel i covers [i / M, (i + 1) / M]).
    coords = (torch.arange(size, device=weights.device, dtype=torch.float32) + 0.5) / size
    mass = weights.sum(dim=(1, 2))  # (K,)
    safe_mass = mass.clamp_min(1e-6)
    centroid_x = (weights.sum(dim=1) * coords).sum(dim=1) / safe_mass
    centroid_y = (weights.sum(dim=2) * coords).sum(dim=1) / safe_mass
    # Bounding box of the confidently inside pixels; a map that is faint everywhere (a thin
    # proposal blurred by the resize) falls back to its nonzero pixels.
    inside = weights > 0.5
    faint = ~inside.flatten(1).any(dim=1)
    inside[faint] = weights[faint] > 0
    columns, rows = inside.any(dim=1), inside.any(dim=2)  # (K, M) each
    x0, x1 = _first_last(columns, coords)
    y0, y1 = _first_last(rows, coords)
    half_pixel = 0.5 / size  # the box spans whole pixels, not pixel centres
    box = torch.stack([x0 - half_pixel, y0 - half_pixel, x1 + half_pixel, y1 + half_pixel], 1)
    shape = _box_thumbnails(weights, box, grid)
    scalars = torch.stack([(mass / size**2).sqrt(), centroid_x, centroid_y], dim=1)
    descriptors = torch.cat([scalars, box, shape.flatten(1)], dim=1)
    return torch.where((mass > 0)[:, None], descriptors, torch.zeros_like(descriptors))


def _first_last(occupied: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of the first and last occupied pixel of each ``(K, M)`` row (0 when empty)."""
    large = torch.full_like(coords, 2.0)
    first = torch.where(occupied, coords, large).amin(dim=1)
    last = torch.where(occupied, coords, -large).amax(dim=1)
    empty = ~occupied.any(dim=1)
    return first.masked_fill(empty, 0.0), last.masked_fill(empty, 0.0)


def _box_thumbnails(weights: torch.Tensor, box: torch.Tensor, grid: int) -> torch.Tensor:
    """``(K, G, G)``: each ``(M, M)`` map bilinearly resampled inside its ``[0, 1]`` box."""
    # affine_grid works in [-1, 1] coordinates: map the output square onto the box.
    scale_x = box[:, 2] - box[:, 0]
    scale_y = box[:, 3] - box[:, 1]
    centre_x = (box[:, 0] + box[:, 2]) - 1.0
    centre_y = (box[:, 1] + box[:, 3]) - 1.0
    zeros = torch.zeros_like(scale_x)
    theta = torch.stack(
        [
            torch.stack([scale_x, zeros, centre_x], dim=1),
            torch.stack([zeros, scale_y, centre_y], dim=1),
        ],
        dim=1,
    )  # (K, 2, 3)
    sample_grid = F.affine_grid(theta, [weights.shape[0], 1, grid, grid], align_corners=False)
    sampled = F.grid_sample(
        weights[:, None], sample_grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled[:, 0]


class MaskGeometryEmbedding(nn.Module):
    """MLP over :func:`mask_geometry_descriptors`: ``(K, M, M)`` maps -> ``(K, E)`` embeddings.

    Args:
        embed_dim: ``E``, the scorer width.
        grid: side of the shape thumbnail.
        num_octaves: Fourier octaves of the scalar descriptors (0: raw values only).
    """

    def __init__(self, embed_dim: int, grid: int = 8, num_octaves: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.num_octaves = num_octaves
        num_scalars = NUM_SCALAR_DESCRIPTORS * (1 + 2 * num_octaves)
        self.mlp = nn.Sequential(
            nn.Linear(num_scalars + grid * grid, embed_dim),
            nn.ReLU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, proposal_masks: torch.Tensor) -> torch.Tensor:
        """``(K, M, M)`` weight maps -> ``(K, E)`` in the MLP's dtype."""
        descriptors = mask_geometry_descriptors(proposal_masks, self.grid)
        scalars = fourier_features(descriptors[:, :NUM_SCALAR_DESCRIPTORS], self.num_octaves)
        features = torch.cat([scalars, descriptors[:, NUM_SCALAR_DESCRIPTORS:]], dim=1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))
