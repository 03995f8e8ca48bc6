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
