"""gRefCOCO metrics (gIoU, cIoU, N-acc, T-acc) exactly as its authors' evaluator computes them.

gRefCOCO has *no-target* queries (the ref's ``ann_id`` is ``[-1]``) besides one- and
multi-target ones, so a method may answer "nothing": here an empty predicted mask is a
*rejection*. Per sample (one per sentence), with ``I``/``U`` the foreground intersection and
union of :func:`utils.metrics.intersection_union` (the prediction resized nearest to the GT):

=====================  ===========================  ====  ========  ===========
sample                 prediction                   IoU   adds I    adds U
=====================  ===========================  ====  ========  ===========
no target              empty (correct rejection)    1     0         0
no target              non-empty                    0     0         its area
target                 any (empty = rejection)      I/U   I         U
=====================  ===========================  ====  ========  ===========

A target sample whose union is empty (its GT is empty, e.g. every annotation of the ref is a
crowd region, and the prediction is empty) scores 0, as the authors' ``0 if U == 0``. Over the
split:

* **gIoU** = mean per-sample IoU over *all* samples;
* **cIoU** = ``ΣI / ΣU`` over all samples (``None`` when ``ΣU = 0``: nothing predicted and
  nothing to find);
* **N-acc** = correct rejections / no-target samples (``None`` without no-target samples);
* **T-acc** = non-rejections / target samples (``None`` without target samples).

All are fractions in [0, 1] (the authors print percentages). Differences to
:class:`utils.metrics.SegmentationMetrics` (LISA's convention): no epsilon in the divisions, and
an empty union of a *target* sample scores 0 there where LISA scores 1; everything else agrees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from utils.device import collective_device
from utils.metrics import intersection_union


@dataclass
class SentenceScore:
    """The numbers recorded for one sentence (a row of the per-sentence CSV)."""

    name: str
    no_target: bool
    rejected: bool
    iou: float
    intersection: int
    union: int


@dataclass
class _GRefTotals:
    iou_sum: float = 0.0
    num_samples: float = 0.0
    intersection: float = 0.0
    union: float = 0.0
    num_no_target: float = 0.0
    correct_rejections: float = 0.0  # no-target samples with an empty prediction
    num_target: float = 0.0
    non_rejections: float = 0.0  # target samples with a non-empty prediction


def is_rejection(pred: np.ndarray | torch.Tensor) -> bool:
    """Whether a predicted mask (any size; nonzero = foreground) has no foreground at all."""
    if isinstance(pred, torch.Tensor):
        return not bool(pred.any())
    return not np.asarray(pred).any()


@dataclass
class GRefCOCOMetrics:
    """Accumulates gRefCOCO's gIoU / cIoU / N-acc / T-acc over a split (see the module doc)."""

    totals: _GRefTotals = field(default_factory=_GRefTotals)
    scores: list[SentenceScore] = field(default_factory=list)

    def update(
        self,
        pred: np.ndarray | torch.Tensor,
        gt: np.ndarray | torch.Tensor,
        no_target: bool,
        name: str = "",
    ) -> SentenceScore:
        """Score one sample.

        Args:
            pred: ``(h, w)`` predicted mask at any size (nonzero = foreground, resized nearest
                to the GT); all zero is a rejection.
            gt: ``(H, W)`` labels in {0, 1, 255} (255 left out of I and U).
            no_target: whether the query refers to nothing (``ann_id == [-1]``).
            name: the sample's name (its ``sent_id``) for the per-sentence rows.
        """
        rejected = is_rejection(pred)
        intersection, union = intersection_union(pred, gt)
        totals = self.totals
        if no_target:
            intersection = 0
            union = 0 if rejected else union
            iou = 1.0 if rejected else 0.0
            totals.num_no_target += 1
            totals.correct_rejections += rejected
        else:
            iou = intersection / union if union else 0.0
            totals.num_target += 1
            totals.non_rejections += not rejected
        totals.iou_sum += iou
        totals.num_samples += 1
        totals.intersection += intersection
        totals.union += union
        score = SentenceScore(name, bool(no_target), rejected, iou, intersection, union)
        self.scores.append(score)
        return score

    def all_reduce(self) -> None:
        """Sum the totals across ranks (a no-op when ``torch.distributed`` is not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        values = asdict(self.totals)
        packed = torch.tensor(
            list(values.values()), dtype=torch.float64, device=collective_device()
        )
        torch.distributed.all_reduce(packed)
        self.totals = _GRefTotals(*packed.cpu().tolist())

    def compute(self) -> dict:
        """``giou``, ``ciou``, ``n_acc``, ``t_acc`` (fractions, ``None`` when undefined: see the
        module doc), ``num_samples``, ``num_no_target`` and ``num_target``."""
        totals = self.totals

        def fraction(numerator: float, denominator: float) -> float | None:
            return numerator / denominator if denominator else None

        return {
            "giou": fraction(totals.iou_sum, totals.num_samples),
            "ciou": fraction(totals.intersection, totals.union),
            "n_acc": fraction(totals.correct_rejections, totals.num_no_target),
            "t_acc": fraction(totals.non_rejections, totals.num_target),
            "num_samples": int(totals.num_samples),
            "num_no_target": int(totals.num_no_target),
            "num_target": int(totals.num_target),
        }
