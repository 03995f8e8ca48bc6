"""Reasoning-segmentation metrics exactly as LISA / LLM-Seg define them, in one implementation.

Per image, with GT pixels labelled 0 (background), 1 (target) and 255 (ignore):

* the prediction is resized (nearest) to the GT size and set to "ignore" wherever the GT is 255;
* foreground intersection ``I`` and union ``U`` are counted over the remaining pixels;
* per-image IoU is ``I / (U + 1e-8)``, and **1.0 when the union is empty** (an empty prediction for
  an empty target is a perfect answer).

Over a split:

* **gIoU** is the mean per-image IoU;
* **cIoU** is ``ΣI / (ΣU + 1e-10)`` (cumulative, so large images weigh more);
* **ncIoU** is cIoU after resizing both masks to 1024x1024 (nearest) so every image weighs the
  same; upstream reports it as a separate README column and we name it as such.

Accumulators can be split by group (e.g. ReasonSeg test ``short``/``long``) and summed across
distributed ranks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from utils.device import collective_device

IGNORE_LABEL = 255
NORMALIZED_SIZE = 1024
_IOU_EPS = 1e-8
_CIOU_EPS = 1e-10


def _as_tensor(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    return mask.to(torch.uint8) if mask.dtype == torch.bool else mask


def resize_nearest(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a ``(H, W)`` label mask to ``size = (h, w)`` (as upstream)."""
    mask = _as_tensor(mask)
    if tuple(mask.shape) == tuple(size):
        return mask
    resized = F.interpolate(mask[None, None].float(), size=size, mode="nearest")
    return resized[0, 0].to(mask.dtype)


def intersection_union(
    pred: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor
) -> tuple[int, int]:
    """Foreground intersection and union of one prediction against one GT mask.

    Args:
        pred: ``(h, w)`` binary prediction (any nonzero = foreground), resized to the GT size.
        gt: ``(H, W)`` labels in {0, 1, 255}; 255 pixels are left out of both counts.
    Returns:
        ``(I, U)`` pixel counts.
    """
    gt = _as_tensor(gt)
    pred = resize_nearest(_as_tensor(pred) != 0, tuple(gt.shape)).bool()
    valid = gt != IGNORE_LABEL
    pred = pred & valid
    target = (gt == 1) & valid
    intersection = int((pred & target).sum())
    union = int(pred.sum()) + int(target.sum()) - intersection
    return intersection, union


def image_iou(intersection: int, union: int) -> float:
    """Per-image IoU with LISA's convention that an empty union scores 1."""
    return intersection / (union + _IOU_EPS) + (1.0 if union == 0 else 0.0)


@dataclass
class _Totals:
    iou_sum: float = 0.0
    num_images: float = 0.0
    intersection: float = 0.0
    union: float = 0.0
    normalized_intersection: float = 0.0
    normalized_union: float = 0.0

    def as_list(self) -> list[float]:
        return [
            self.iou_sum,
            self.num_images,
            self.intersection,
            self.union,
            self.normalized_intersection,
            self.normalized_union,
        ]


@dataclass
class ImageScore:
    """The numbers recorded for one image (written to the per-image CSV)."""

    name: str
    groups: str
    iou: float
    intersection: int
    union: int


@dataclass
class SegmentationMetrics:
    """Accumulates gIoU / cIoU / ncIoU over a split, overall and per group."""

    groups: dict[str, _Totals] = field(default_factory=lambda: defaultdict(_Totals))
    images: list[ImageScore] = field(default_factory=list)

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        name: str = "",
        groups: tuple[str, ...] | str = (),
    ) -> ImageScore:
        """Score one image. ``pred`` is binary at any size; ``gt`` is ``(H, W)`` in {0,1,255}.

        The image counts in the total and in each of ``groups`` (e.g. ``("long",)``).
        """
        groups = (groups,) if isinstance(groups, str) else tuple(groups)
        intersection, union = intersection_union(pred, gt)
        size = (NORMALIZED_SIZE, NORMALIZED_SIZE)
        norm_i, norm_u = intersection_union(
            resize_nearest(_as_tensor(pred) != 0, size), resize_nearest(gt, size)
        )
        score = ImageScore(
            name, "|".join(groups), image_iou(intersection, union), intersection, union
        )
        for key in ("all", *groups):
            totals = self.groups[key]
            totals.iou_sum += score.iou
            totals.num_images += 1
            totals.intersection += intersection
            totals.union += union
            totals.normalized_intersection += norm_i
            totals.normalized_union += norm_u
        self.images.append(score)
        return score

    def all_reduce(self, group_names: list[str] | None = None) -> None:
        """Sum the totals across ranks (a no-op when ``torch.distributed`` is not initialised).

        Every rank must pass the same ``group_names`` (default: ``all`` plus the local groups),
        so the reduced tensors line up.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        names = group_names or sorted(self.groups)
        packed = torch.tensor(
            [self.groups[name].as_list() for name in names],
            dtype=torch.float64,
            device=collective_device(),
        )
        torch.distributed.all_reduce(packed)
        for name, row in zip(names, packed.cpu().tolist()):
            self.groups[name] = _Totals(*row)

    def compute(self) -> dict[str, float]:
        """``giou``, ``ciou``, ``nciou`` and ``num_images`` overall, plus ``<group>/<metric>``."""
        results: dict[str, float] = {}
        for name in sorted(self.groups):
            totals = self.groups[name]
            prefix = "" if name == "all" else f"{name}/"
            results[f"{prefix}giou"] = totals.iou_sum / max(totals.num_images, 1)
            results[f"{prefix}ciou"] = totals.intersection / (totals.union + _CIOU_EPS)
            results[f"{prefix}nciou"] = totals.normalized_intersection / (
                totals.normalized_union + _CIOU_EPS
            )
            results[f"{prefix}num_images"] = int(totals.num_images)
        return results


# --- Multi-round (SegLLM / MRSeg) metrics -------------------------------------------------------

Box = tuple[int, int, int, int]
EMPTY_BOX: Box = (0, 0, 0, 0)
BOX_HIT_THRESHOLD = 0.5  # a hit needs box IoU strictly above it (SegLLM's P@0.5)


def mask_box(mask: np.ndarray | torch.Tensor) -> Box:
    """Tight box ``(xmin, ymin, xmax + 1, ymax + 1)`` of a ``(H, W)`` mask's nonzero pixels
    (detectron2's ``BitMasks.get_bounding_boxes``, as SegLLM boxes its GT); empty -> ``(0,0,0,0)``.
    """
    mask = _as_tensor(mask) != 0
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if len(rows) == 0:
        return EMPTY_BOX
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_iou(first: Box, second: Box) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes; 0 when either is empty (so never a hit)."""
    area_first = max(first[2] - first[0], 0) * max(first[3] - first[1], 0)
    area_second = max(second[2] - second[0], 0) * max(second[3] - second[1], 0)
    if area_first == 0 or area_second == 0:
        return 0.0
    width = max(min(first[2], second[2]) - max(first[0], second[0]), 0)
    height = max(min(first[3], second[3]) - max(first[1], second[1]), 0)
    intersection = width * height
    return intersection / (area_first + area_second - intersection)


@dataclass
class RoundScore:
    """The numbers recorded for one round of one conversation (a row of the per-mask CSV)."""

    name: str
    round: int
    iou: float
    intersection: int
    union: int
    pred_box: Box
    gt_box: Box
    box_iou: float
    hit: bool


@dataclass
class _RoundTotals:
    iou_sum: float = 0.0
    count: float = 0.0
    intersection: float = 0.0
    union: float = 0.0
    hits: float = 0.0

    def add(self, other: _RoundTotals) -> None:
        self.iou_sum += other.iou_sum
        self.count += other.count
        self.intersection += other.intersection
        self.union += other.union
        self.hits += other.hits

    def as_dict(self) -> dict[str, float]:
        return {
            "giou": self.iou_sum / max(self.count, 1),
            "ciou": self.intersection / (self.union + _CIOU_EPS),
            "p_at_05": self.hits / max(self.count, 1),
            "count": int(self.count),
        }


@dataclass
class MultiRoundMetrics:
    """Per-round gIoU / cIoU / P@0.5 of multi-round conversations (SegLLM's evaluation, at the
    original resolution as a LISA-style model predicts; see ``reference/segllm-format.md`` §b).

    Per round index r (1-based): gIoU is the mean per-mask IoU with :func:`image_iou` (so an
    empty union scores 1, the convention of :class:`SegmentationMetrics`; SegLLM never has an
    empty target), cIoU is ``ΣI / ΣU``, P@0.5 the fraction of rounds whose predicted mask's tight
    box has box IoU strictly above 0.5 with the GT mask's tight box (an empty prediction has box
    ``(0, 0, 0, 0)`` and never hits). Pixels labelled 255 in the GT are left out of I, U and the
    predicted box. Totals are given over rounds >= 2 (those with history) and over all rounds.
    """

    rounds: dict[int, _RoundTotals] = field(default_factory=lambda: defaultdict(_RoundTotals))
    scores: list[RoundScore] = field(default_factory=list)

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        round_index: int,
        name: str = "",
    ) -> RoundScore:
        """Score round ``round_index`` (1-based): ``pred`` binary at any size (resized nearest),
        ``gt`` ``(H, W)`` in {0, 1, 255}."""
        if round_index < 1:
            raise ValueError(f"round indices are 1-based, got {round_index}")
        gt = _as_tensor(gt)
        valid = gt != IGNORE_LABEL
        pred = resize_nearest(_as_tensor(pred) != 0, tuple(gt.shape)).bool() & valid
        intersection, union = intersection_union(pred, gt)
        pred_box, gt_box = mask_box(pred), mask_box((gt == 1) & valid)
        overlap = box_iou(pred_box, gt_box)
        score = RoundScore(
            name, round_index, image_iou(intersection, union), intersection, union,
            pred_box, gt_box, overlap, overlap > BOX_HIT_THRESHOLD,
        )  # fmt: skip
        totals = self.rounds[round_index]
        totals.iou_sum += score.iou
        totals.count += 1
        totals.intersection += intersection
        totals.union += union
        totals.hits += score.hit
        self.scores.append(score)
        return score

    def all_reduce(self, num_rounds: int) -> None:
        """Sum rounds ``1..num_rounds`` across ranks (no-op without ``torch.distributed``);
        every rank must pass the same ``num_rounds``."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        names = ("iou_sum", "count", "intersection", "union", "hits")
        packed = torch.tensor(
            [[getattr(self.rounds[r], n) for n in names] for r in range(1, num_rounds + 1)],
            dtype=torch.float64,
            device=collective_device(),
        )
        torch.distributed.all_reduce(packed)
        for r, row in enumerate(packed.cpu().tolist(), start=1):
            self.rounds[r] = _RoundTotals(*row)

    def summary(self) -> dict:
        """``{"per_round": [{"round", "giou", "ciou", "p_at_05", "count"}, ...],
        "rounds_2plus": {...}, "overall": {...}}``; fractions in [0, 1], rounds ascending
        (rounds no conversation reaches are left out)."""
        per_round, later, overall = [], _RoundTotals(), _RoundTotals()
        for r in sorted(self.rounds):
            totals = self.rounds[r]
            if totals.count == 0:
                continue
            per_round.append({"round": r, **totals.as_dict()})
            overall.add(totals)
            if r >= 2:
                later.add(totals)
        return {
            "per_round": per_round,
            "rounds_2plus": later.as_dict(),
            "overall": overall.as_dict(),
        }
