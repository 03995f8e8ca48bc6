"""Turning per-proposal scores into one predicted mask, by named strategy.

==============  ============================================================================
strategy        selected proposals
==============  ============================================================================
``argmax``      the single proposal with the highest cosine (upstream ``validate``)
``iop``         every proposal whose IoP > ``threshold`` (upstream ``validate_threshold``, its
                eval default with 0.5; the cosine is unused and the result may be empty)
``hybrid``      ``argmax`` ∪ {IoP > ``threshold``} (upstream ``validate_iou_iop``)
``topk_iop``    the ``top_k`` highest cosines ∩ {IoP > ``threshold``}
                (upstream ``validate_threshold_from_topIoU``)
==============  ============================================================================

The mask is the union of the selected proposals; no proposal or nothing selected gives an
all-false mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELECTION_STRATEGIES = ("argmax", "iop", "hybrid", "topk_iop")


@dataclass
class SelectionResult:
    """One predicted mask and how it was made.

    Attributes:
        mask: ``(H', W')`` bool, at ``output_size`` (else at the proposals' size).
        selected: indices of the proposals in the union, ascending.
        similarity: ``(K,)`` cosine scores the decision saw.
        iop: ``(K,)`` IoP scores the decision saw.
        strategy: the strategy name.
    """

    mask: torch.Tensor
    selected: list[int]
    similarity: torch.Tensor
    iop: torch.Tensor
    strategy: str


def select_proposals(
    similarity: torch.Tensor,
    iop: torch.Tensor,
    strategy: str = "iop",
    threshold: float = 0.5,
    top_k: int = 5,
) -> list[int]:
    """Indices chosen by ``strategy`` (see the module table), ascending.

    Args:
        similarity: ``(K,)`` cosines.
        iop: ``(K,)`` IoP-head scores.
        strategy: one of :data:`SELECTION_STRATEGIES`.
        threshold: IoP threshold (strictly greater is selected).
        top_k: candidates kept by ``topk_iop``.
    """
    if strategy not in SELECTION_STRATEGIES:
        raise ValueError(
            f"unknown selection strategy {strategy!r}; expected one of {SELECTION_STRATEGIES}"
        )
    if similarity.shape != iop.shape or similarity.ndim != 1:
        raise ValueError(
            f"similarity {tuple(similarity.shape)} and iop {tuple(iop.shape)} must both be (K,)"
        )
    if similarity.numel() == 0:
        return []
    above = set((iop > threshold).nonzero().flatten().tolist())
    best = int(similarity.argmax())
    if strategy == "argmax":
        chosen = {best}
    elif strategy == "iop":
        chosen = above
    elif strategy == "hybrid":
        chosen = above | {best}
    else:
        k = min(top_k, similarity.numel())
        chosen = above & set(similarity.topk(k).indices.tolist())
    return sorted(chosen)


def select_mask(
    similarity: torch.Tensor,
    iop: torch.Tensor,
    proposal_masks: torch.Tensor,
    strategy: str = "iop",
    threshold: float = 0.5,
    top_k: int = 5,
    output_size: tuple[int, int] | None = None,
) -> SelectionResult:
    """The union of the proposals chosen by ``strategy``, resized to ``output_size``.

    Args:
        similarity: ``(K,)`` cosines.
        iop: ``(K,)`` IoP-head scores.
        proposal_masks: ``(K, H, W)`` proposals (bool, or weights thresholded at 0.5), at the
            resolution they were stored at.
        strategy: one of :data:`SELECTION_STRATEGIES`.
        threshold: IoP threshold.
        top_k: candidates kept by ``topk_iop``.
        output_size: ``(H', W')``, usually the original image size; nearest-neighbour resize.
    Returns:
        A :class:`SelectionResult`.
    """
    if proposal_masks.ndim != 3 or proposal_masks.shape[0] != similarity.shape[0]:
        raise ValueError(
            f"proposal_masks {tuple(proposal_masks.shape)} must be (K, H, W) with K = "
            f"{similarity.shape[0]} scores"
        )
    selected = select_proposals(similarity, iop, strategy, threshold, top_k)
    masks = proposal_masks if proposal_masks.dtype == torch.bool else proposal_masks > 0.5
    mask = masks[selected].any(dim=0) if selected else masks.new_zeros(masks.shape[1:])
    if output_size is not None and tuple(output_size) != tuple(mask.shape):
        resized = F.interpolate(mask[None, None].float(), size=tuple(output_size), mode="nearest")
        mask = resized[0, 0] > 0.5
    return SelectionResult(
        mask=mask,
        selected=selected,
        similarity=similarity.detach(),
        iop=iop.detach(),
        strategy=strategy,
    )
