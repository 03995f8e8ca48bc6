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

* the *outline*, rotation-invariantly (:func:`radial_shape_descriptors`): the distance from the
  centroid to the outline in each of ``B`` directions, relative to its mean, summarised by the
  amplitudes of its first ``H`` angular harmonics (a triangle has a strong 3rd, a square a 4th,
  a star a 5th, a circle none), plus how hollow it is (inner over outer radius: a ring's is about
  one half) and how much of its mean-radius disc it fills. The thumbnail changes as a shape turns;
  these do not, so "three corners" is learnt from a few dozen triangles at random angles.

The seven scalars are expanded into Fourier features (``sin``/``cos`` at ``F`` octaves, as
positional encodings are: an MLP learns comparisons of positions and sizes far faster from them
than from raw coordinates), and a two-layer MLP turns the ``7 * (1 + 2F) + G^2 + H + 2`` numbers
into an ``E``-vector; a linear map of the centred scalars is added to it (so "further left" and
"larger" are directions of the embedding from the start), and the sum is added to the pooled
feature of the proposal, before the selection transformer (which can then compare proposals:
"largest", "leftmost", "above the star").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NUM_SCALAR_DESCRIPTORS = 7  # sqrt(area), centroid (2), bounding box (4)
RADIAL_BINS = 32  # directions of the radial outline profile
RADIAL_HARMONICS = 8  # its angular harmonics kept (a hexagon needs the 6th)
_MAX_PROFILE = 3.0  # radius over mean radius, clamped (a thin sliver would reach ~B / 2)
_MAX_FILL = 2.0  # area over the mean-radius disc, clamped (about 1 for compact shapes)


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


def radial_shape_descriptors(
    proposal_masks: torch.Tensor,
    num_bins: int = RADIAL_BINS,
    num_harmonics: int = RADIAL_HARMONICS,
) -> torch.Tensor:
    """Rotation-invariant outline of each proposal weight map.

    The pixels with ``w > 0.5`` are binned by their direction from the map's centroid. Per
    direction, the outer radius (farthest pixel) and the inner radius (nearest pixel) are taken
    (radii to pixel edges, so a one-pixel map has radius 0.5).

    Args:
        proposal_masks: ``(K, M, M)`` weight maps in ``[0, 1]``.
        num_bins: ``B`` directions.
        num_harmonics: ``H`` harmonics kept, ``H <= B // 2``.
    Returns:
        ``(K, H + 2)`` float32: ``4 * |harmonic h| / mean`` of the outer-radius profile for
        ``h = 1..H`` (4x the cosine amplitude relative to the mean radius; at 28 pixels across,
        about 1.2 for a triangle's 3rd, 0.7 for a square's 4th, 0.3 for a hexagon's 6th, 0 for a
        disc; the radius over the mean is clamped to 3), then the mean inner over the mean outer
        radius (about 0.5 for a ring; for solid shapes the nearest pixel centre in a narrow
        direction is a pixel or two out: about 0.2 at 28 pixels across, 0.3 at 14), then the area
        over the disc of the mean outer radius, clamped to 2 (about 1 for a disc, 0.7 for a
        ring). Directions with no pixel are left out of both means and read as the mean radius.
        All zero for an empty map.
    """
    if not 1 <= num_harmonics <= num_bins // 2:
        raise ValueError(f"need 1 <= num_harmonics <= num_bins // 2, got {num_harmonics}")
    num, size = proposal_masks.shape[0], proposal_masks.shape[-1]
    inside = proposal_masks.float() > 0.5
    if num == 0:
        return torch.zeros((0, num_harmonics + 2), device=proposal_masks.device)
    coords = torch.arange(size, device=inside.device, dtype=torch.float32) + 0.5
    mass = inside.flatten(1).sum(dim=1).float()  # (K,)
    safe_mass = mass.clamp_min(1.0)
    centroid_x = (inside.sum(dim=1) * coords).sum(dim=1) / safe_mass
    centroid_y = (inside.sum(dim=2) * coords).sum(dim=1) / safe_mass
    dx = coords[None, None, :] - centroid_x[:, None, None]  # (K, 1, M)
    dy = coords[None, :, None] - centroid_y[:, None, None]  # (K, M, 1)
    radius = (dx.square() + dy.square()).sqrt() + 0.5  # (K, M, M), to the pixel's far edge
    angle = torch.atan2(dy.expand_as(radius), dx.expand_as(radius))
    bins = ((angle + math.pi) * (num_bins / (2 * math.pi))).long().clamp(0, num_bins - 1)
    bins, inside, radius = bins.flatten(1), inside.flatten(1), radius.flatten(1)
    outer = radius.new_zeros((num, num_bins)).scatter_reduce(
        1, bins, radius.masked_fill(~inside, 0.0), "amax", include_self=True
    )
    far = float(2 * size)  # more than any radius: marks "no pixel in this direction"
    inner = radius.new_full((num, num_bins), far).scatter_reduce(
        1, bins, (radius - 1.0).clamp_min(0.0).masked_fill(~inside, far), "amin", include_self=True
    )
    # Directions without a pixel (a tiny or thin map) are left out of the means and read as the
    # mean radius, so they add no spurious corners; the clamps keep degenerate maps in range.
    occupied = outer > 0
    count = occupied.sum(dim=1).clamp_min(1)
    mean_outer = (outer.sum(dim=1) / count).clamp_min(0.5)
    profile = torch.where(occupied, outer / mean_outer[:, None], torch.ones_like(outer))
    profile = profile.clamp(max=_MAX_PROFILE)
    harmonics = torch.fft.rfft(profile, dim=1).abs()[:, 1 : num_harmonics + 1] * (8.0 / num_bins)
    mean_inner = inner.masked_fill(~occupied, 0.0).sum(dim=1) / count
    hollowness = (mean_inner / mean_outer).clamp(0.0, 1.0)
    fill = (mass / (math.pi * mean_outer.square())).clamp(max=_MAX_FILL)
    descriptors = torch.cat([harmonics, hollowness[:, None], fill[:, None]], dim=1)
    return torch.where((mass > 0)[:, None], descriptors, torch.zeros_like(descriptors))


class MaskGeometryEmbedding(nn.Module):
    """MLP over :func:`mask_geometry_descriptors` and :func:`radial_shape_descriptors`, plus a
    linear map of the centred scalars: ``(K, M, M)`` maps -> ``(K, E)`` embeddings.

    Its parameters changed on 2026-12-01 (outline inputs, ``linear.*``): weights trained with
    ``--mask_geometry_embedding`` before then do not load into it.

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
            nn.Linear(num_scalars + grid * grid + RADIAL_HARMONICS + 2, embed_dim),
            nn.ReLU(),
            nn.Linear(embed_dim, embed_dim),
        )
        # A linear path from the centred scalars: "further left", "lower" and "larger" are a
        # direction of the embedding from the first step. Through the MLP's Fourier features
        # alone they are not (high octaves dominate a random projection), so the [SEG]
        # embeddings of "leftmost" and "rightmost" got no consistent push apart and stayed equal.
        self.linear = nn.Linear(NUM_SCALAR_DESCRIPTORS, embed_dim)

    def forward(
        self, proposal_masks: torch.Tensor, outline: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(K, M, M)`` weight maps -> ``(K, E)`` in the MLP's dtype.

        ``outline``, the maps' :func:`radial_shape_descriptors` ``(K, H + 2)``, when the caller
        has them already (the scorer shares them with the reference relations).
        """
        descriptors = mask_geometry_descriptors(proposal_masks, self.grid)
        scalars = fourier_features(descriptors[:, :NUM_SCALAR_DESCRIPTORS], self.num_octaves)
        if outline is None:
            outline = radial_shape_descriptors(proposal_masks)
        features = torch.cat([scalars, descriptors[:, NUM_SCALAR_DESCRIPTORS:], outline], dim=1)
        dtype = self.mlp[0].weight.dtype
        centred = 2.0 * descriptors[:, :NUM_SCALAR_DESCRIPTORS] - 1.0
        return self.mlp(features.to(dtype)) + self.linear(centred.to(dtype))
