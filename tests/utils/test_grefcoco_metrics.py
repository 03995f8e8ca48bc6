"""gRefCOCO's gIoU / cIoU / N-acc / T-acc against hand computations, edge cases included."""

import numpy as np
import pytest
import torch

from utils.grefcoco_metrics import GRefCOCOMetrics, is_rejection
from utils.metrics import SegmentationMetrics


def mask(*cells: tuple[int, int], size: int = 4) -> np.ndarray:
    """``(size, size)`` uint8 with 1 at the ``(row, col)`` cells."""
    out = np.zeros((size, size), np.uint8)
    for row, col in cells:
        out[row, col] = 1
    return out


EMPTY = mask()
SQUARE = mask((0, 0), (0, 1), (1, 0), (1, 1))  # 4 pixels


def mixed_set() -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """``(pred, gt, no_target)``: I/U = 2/6, a rejected target (0/4), a correct rejection, and a
    3-pixel mask on a no-target query."""
    return [
        (mask((0, 0), (0, 1), (2, 2), (3, 3)), SQUARE, False),
        (EMPTY, SQUARE, False),
        (EMPTY, EMPTY, True),
        (mask((3, 0), (3, 1), (3, 2)), EMPTY, True),
    ]


def run(samples) -> dict:
    metrics = GRefCOCOMetrics()
    for i, (pred, gt, no_target) in enumerate(samples):
        metrics.update(pred, gt, no_target, str(i))
    return metrics.compute()


def test_hand_computation():
    metrics = GRefCOCOMetrics()
    scores = [metrics.update(p, g, n, str(i)) for i, (p, g, n) in enumerate(mixed_set())]
    assert [(s.iou, s.intersection, s.union, s.rejected) for s in scores] == [
        (pytest.approx(2 / 6), 2, 6, False),
        (0.0, 0, 4, True),
        (1.0, 0, 0, True),  # a correct rejection scores 1 and adds nothing to U
        (0.0, 0, 3, False),  # a mask on a no-target query adds its area to U
    ]
    assert metrics.compute() == {
        "giou": pytest.approx((2 / 6 + 0 + 1 + 0) / 4),
        "ciou": pytest.approx(2 / 13),
        "n_acc": 0.5,
        "t_acc": 0.5,
        "num_samples": 4,
        "num_no_target": 2,
        "num_target": 2,
    }


def test_all_empty_predictions():
    """Everything rejected: every no-target query right, every target missed."""
    samples = [(EMPTY, gt, n) for _, gt, n in mixed_set()]
    assert run(samples) == {
        "giou": 0.5, "ciou": 0.0, "n_acc": 1.0, "t_acc": 0.0,
        "num_samples": 4, "num_no_target": 2, "num_target": 2,
    }  # fmt: skip


def test_all_rejected_without_targets():
    """Only no-target queries, all rejected: perfect, and cIoU has no union to divide by."""
    result = run([(EMPTY, EMPTY, True)] * 3)
    assert result["giou"] == 1.0
    assert result["n_acc"] == 1.0
    assert result["ciou"] is None
    assert result["t_acc"] is None
    assert (result["num_samples"], result["num_no_target"], result["num_target"]) == (3, 3, 0)


def test_no_no_target_samples_agree_with_lisa_metrics():
    """Without no-target queries N-acc is undefined and gIoU/cIoU are LISA's numbers."""
    samples = [(p, g, False) for p, g, _ in mixed_set()[:2]] + [(SQUARE, SQUARE, False)]
    result = run(samples)
    assert result["n_acc"] is None
    assert result["num_no_target"] == 0
    assert result["t_acc"] == pytest.approx(2 / 3)
    lisa = SegmentationMetrics()
    for pred, gt, _ in samples:
        lisa.update(pred, gt)
    expected = lisa.compute()
    assert result["giou"] == pytest.approx(expected["giou"])
    assert result["ciou"] == pytest.approx(expected["ciou"])
    assert result["giou"] == pytest.approx((1 / 3 + 0 + 1) / 3)


def test_no_target_and_mixed_set_agree_with_lisa_gIoU():
    """LISA's empty-union-scores-1 convention gives the same gIoU/cIoU whenever every target
    sample has a non-empty GT (so ReasonSeg-style reports stay comparable)."""
    lisa = SegmentationMetrics()
    for pred, gt, _ in mixed_set():
        lisa.update(pred, gt)
    result = run(mixed_set())
    assert result["giou"] == pytest.approx(lisa.compute()["giou"])
    assert result["ciou"] == pytest.approx(lisa.compute()["ciou"])


def test_empty_target_gt_scores_zero_as_the_authors():
    """A target sample with an empty GT (all its annotations crowd) and an empty prediction:
    the authors' ``0 if U == 0`` (LISA would score 1), and a miss for T-acc."""
    result = run([(EMPTY, EMPTY, False)])
    assert result["giou"] == 0.0
    assert result["t_acc"] == 0.0
    assert result["ciou"] is None


def test_ignore_pixels_resizing_and_tensor_inputs():
    gt = SQUARE.copy()
    gt[3, 3] = 255  # ignored: a prediction there is neither I nor U
    metrics = GRefCOCOMetrics()
    score = metrics.update(mask((0, 0), (3, 3)), gt, False)
    assert (score.intersection, score.union) == (1, 4)
    big = np.kron(SQUARE, np.ones((2, 2), np.uint8))  # (8, 8): resized nearest to (4, 4)
    assert metrics.update(torch.from_numpy(big).bool(), SQUARE, False).iou == 1.0
    assert is_rejection(torch.zeros(3, 3))
    assert not is_rejection(np.eye(2))
    # a no-target GT is scored on its rejection alone, whatever the mask's size
    assert metrics.update(np.zeros((9, 9)), EMPTY, True).iou == 1.0
