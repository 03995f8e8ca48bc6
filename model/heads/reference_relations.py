"""How each proposal relates to the masks a round refers to (SegLLM's mask-aware decoding).

"The cup left of instance 1" is a statement about a proposal *and* the referenced mask; the
proposal scorer sees it through ten numbers per (proposal, reference), added to the proposal's
tokens through a learned projection:

    [1, IoU, IoP, dx, dy, log(area_p / area_r) / 5, distance, contact, appearance, shape]

``1`` marks that a reference exists; IoU and IoP (``|P ∩ R| / |P|``) of the binarised maps; the
offset of the centroids (proposal minus reference, in the padded square frame, so ``dx < 0`` is
"left of"); the log area ratio, scaled to about [-1, 1]; the centroid distance (``|(dx, dy)|``,
"the one closest to"); contact, the IoP with the reference grown by :data:`CONTACT_PIXELS` map
pixels (about 0 for a proposal apart from it, above 0 for one touching it, where IoU and IoP are
0 too); appearance, the cosine of the two masks' pooled image features ("the same colour as");
shape, ``exp(-L1)`` of their rotation-invariant outline descriptors
(:func:`~model.heads.mask_geometry.radial_shape_descriptors`; "the same kind as"). A round with
several references averages their rows; a round without any gets zeros, so single-round scoring
is unchanged.

The first six were the first version's; a save of that version (a ``(E, 6)`` relation projection)
loads with the projection's last four columns zero, which scores exactly as it did
(:meth:`model.heads.proposal_scorer.ProposalScorer._load_from_state_dict`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.heads.mask_geometry import radial_shape_descriptors

RELATION_FEATURES = 10
FIRST_VERSION_FEATURES = 6
AREA_LOG_SCALE = 5.0
CONTACT_PIXELS = 2  # a gap of up to 2 map pixels (of 64 in the demo, 256 in the paper) touches
_EPS = 1e-6


def _centroids(maps: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` weighted ``(x, y)`` centroids of ``(N, M, M)`` maps, in [0, 1]."""
    size = maps.shape[-1]
    coords = (torch.arange(size, device=maps.device, dtype=torch.float32) + 0.5) / size
    x = (maps.sum(dim=1) * coords).sum(dim=1)
    y = (maps.sum(dim=2) * coords).sum(dim=1)
    return torch.stack([x, y], dim=1) / (mass.unsqueeze(1) + _EPS)


def reference_relations(
    proposal_maps: torch.Tensor,
    reference_maps: torch.Tensor,
    proposal_features: torch.Tensor,
    reference_features: torch.Tensor,
    proposal_outlines: torch.Tensor | None = None,
    reference_outlines: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, K, 10)`` relation features of ``K`` proposals to each of ``N`` references.

    Args:
        proposal_maps: ``(K, M, M)`` proposal weight maps in [0, 1].
        reference_maps: ``(N, M, M)`` reference masks in the same frame.
        proposal_features: ``(K, E)`` pooled image features of the proposals.
        reference_features: ``(N, E)`` the same pooling of the references.
        proposal_outlines, reference_outlines: the maps' ``radial_shape_descriptors``
            (``(K, D)``, ``(N, D)``) when the caller has them already; computed otherwise.
    """
    proposal_maps, reference_maps = proposal_maps.float(), reference_maps.float()
    proposals = (proposal_maps > 0.5).flatten(1).float()  # (K, M*M)
    references = (reference_maps > 0.5).flatten(1).float()  # (N, M*M)
    intersection = references @ proposals.T  # (N, K)
    area_p, area_r = proposals.sum(dim=1), references.sum(dim=1)
    union = area_r.unsqueeze(1) + area_p.unsqueeze(0) - intersection
    iou = intersection / (union + _EPS)
    iop = intersection / (area_p.unsqueeze(0) + _EPS)
    centre_p = _centroids(proposal_maps, proposal_maps.flatten(1).sum(1))
    centre_r = _centroids(reference_maps, reference_maps.flatten(1).sum(1))
    offset = centre_p.unsqueeze(0) - centre_r.unsqueeze(1)  # (N, K, 2)
    ratio = torch.log((area_p.unsqueeze(0) + 1) / (area_r.unsqueeze(1) + 1)) / AREA_LOG_SCALE
    grown = F.max_pool2d(
        (reference_maps > 0.5).float().unsqueeze(1), 2 * CONTACT_PIXELS + 1, 1, CONTACT_PIXELS
    ).flatten(1)  # (N, M*M)
    contact = (grown @ proposals.T) / (area_p.unsqueeze(0) + _EPS)
    appearance = F.cosine_similarity(
        reference_features.float().unsqueeze(1), proposal_features.float().unsqueeze(0), dim=-1
    )
    shape_p = proposal_outlines
    if shape_p is None:
        shape_p = radial_shape_descriptors(proposal_maps)  # (K, D)
    shape_r = reference_outlines
    if shape_r is None:
        shape_r = radial_shape_descriptors(reference_maps)  # (N, D)
    shape = torch.exp(-(shape_r.unsqueeze(1) - shape_p.unsqueeze(0)).abs().sum(dim=-1))
    ones = torch.ones_like(iou)
    return torch.stack(
        [ones, iou, iop, offset[..., 0], offset[..., 1], ratio, offset.norm(dim=-1), contact,
         appearance, shape],
        dim=-1,
    )  # fmt: skip


def round_relations(relations: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """``(R, K, 10)``: for each round (``[SEG]``), the mean relation rows of its references.

    Args:
        relations: ``(N, K, 10)`` from :func:`reference_relations`.
        assignment: ``(R, N)`` bool, which references each round has; a round with none gets
            zeros.
    """
    weights = assignment.float()
    counts = weights.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.einsum("rn,nkf->rkf", weights / counts, relations)
