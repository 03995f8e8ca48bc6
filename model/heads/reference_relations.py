"""How each proposal relates to the masks a round refers to (SegLLM's mask-aware decoding).

"The cup left of instance 1" is a statement about a proposal *and* the referenced mask; the
proposal scorer sees it through six numbers per (proposal, reference), added to the proposal's
tokens through a learned projection:

    [1, IoU, IoP, dx, dy, log(area_p / area_r) / 5]

``1`` marks that a reference exists; IoU and IoP (``|P ∩ R| / |P|``) of the binarised maps; the
offset of the centroids (proposal minus reference, in the padded square frame, so ``dx < 0`` is
"left of"); the log area ratio, scaled to about [-1, 1]. A round with several references averages
their rows; a round without any gets zeros, so single-round scoring is unchanged.
"""

from __future__ import annotations

import torch

RELATION_FEATURES = 6
AREA_LOG_SCALE = 5.0
_EPS = 1e-6


def _centroids(maps: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` weighted ``(x, y)`` centroids of ``(N, M, M)`` maps, in [0, 1]."""
    size = maps.shape[-1]
    coords = (torch.arange(size, device=maps.device, dtype=torch.float32) + 0.5) / size
    x = (maps.sum(dim=1) * coords).sum(dim=1)
    y = (maps.sum(dim=2) * coords).sum(dim=1)
    return torch.stack([x, y], dim=1) / (mass.unsqueeze(1) + _EPS)


def reference_relations(proposal_maps: torch.Tensor, reference_maps: torch.Tensor) -> torch.Tensor:
    """``(N, K, 6)`` relation features of ``K`` proposals to each of ``N`` references.

    Args:
        proposal_maps: ``(K, M, M)`` proposal weight maps in [0, 1].
        reference_maps: ``(N, M, M)`` reference masks in the same frame.
    """
    proposals = (proposal_maps.float() > 0.5).flatten(1).float()  # (K, M*M)
    references = (reference_maps.float() > 0.5).flatten(1).float()  # (N, M*M)
    intersection = references @ proposals.T  # (N, K)
    area_p, area_r = proposals.sum(dim=1), references.sum(dim=1)
    union = area_r.unsqueeze(1) + area_p.unsqueeze(0) - intersection
    iou = intersection / (union + _EPS)
    iop = intersection / (area_p.unsqueeze(0) + _EPS)
    centre_p = _centroids(proposal_maps.float(), proposal_maps.float().flatten(1).sum(1))
    centre_r = _centroids(reference_maps.float(), reference_maps.float().flatten(1).sum(1))
    offset = centre_p.unsqueeze(0) - centre_r.unsqueeze(1)  # (N, K, 2)
    ratio = torch.log((area_p.unsqueeze(0) + 1) / (area_r.unsqueeze(1) + 1)) / AREA_LOG_SCALE
    ones = torch.ones_like(iou)
    return torch.stack([ones, iou, iop, offset[..., 0], offset[..., 1], ratio], dim=-1)


def round_relations(relations: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """``(R, K, 6)``: for each round (``[SEG]``), the mean relation rows of its references.

    Args:
        relations: ``(N, K, 6)`` from :func:`reference_relations`.
        assignment: ``(R, N)`` bool, which references each round has; a round with none gets
            zeros.
    """
    weights = assignment.float()
    counts = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.einsum("rn,nkf->rkf", weights / counts, relations)
