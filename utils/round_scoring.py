"""Scoring saved multi-round predictions (``eval.py --pred_dir`` on ``MRSeg|<stem>``).

Layout: ``<pred_dir>/<conversation index>/round_<k>.png``, the index being the conversation's
0-based position in its MRSeg file (``MRSegRecord.conversation_index``, not its position among
the usable records) and k the 1-based round. A PNG is read as ``eval.py --pred_dir`` reads
single-round masks (any bit depth, the maximum over channels, nonzero = foreground, resized
nearest to the image if another size); a missing PNG is an empty prediction and is listed in the
output. Metrics: :class:`utils.metrics.MultiRoundMetrics`.

Writes ``out_json`` (the summary, ``missing`` and, when given, the file's skipped conversations
and ``ind`` mismatches), ``<out_json stem>.csv`` (one row per round, then ``2+`` and ``all``) and
``<out_json stem>_per_mask.csv`` (one row per conversation round).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from utils.annotations import oriented_size
from utils.config import write_csv_atomic, write_json_atomic
from utils.metrics import MultiRoundMetrics
from utils.prediction_png import STRICT, PredictionReading, read_prediction_png

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ["round", "giou", "ciou", "p_at_05", "count"]


def prediction_path(conversation_index: int, round_index: int) -> str:
    """``<conversation index>/round_<k>.png``, relative to the prediction folder."""
    return f"{conversation_index}/round_{round_index}.png"


def score_multi_round_predictions(
    records: list,
    pred_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    report=None,
    reading: PredictionReading = STRICT,
) -> dict:
    """Score ``<pred_dir>/<index>/round_<k>.png`` against the records' per-round targets.

    Args:
        records: ``MRSegRecord`` s (``conversation_index``, ``masks`` with one row per round).
        pred_dir: the prediction folder.
        out_json: where the metrics JSON goes (the CSVs are written beside it).
        report: the file's ``MRSegReport`` (its skipped conversations go into the JSON).
        reading: how PNGs of another size or soft masks are read (default: an error).
    Returns:
        The summary of :meth:`MultiRoundMetrics.summary` plus ``missing`` (paths relative to
        ``pred_dir``) and ``num_conversations``.
    """
    pred_dir, out_json = Path(pred_dir), Path(out_json)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    metrics = MultiRoundMetrics()
    missing: list[str] = []
    for record in records:
        height, width = oriented_size(record.image_path)  # as the image loader orients it
        targets = record.masks(height, width)
        for round_index, gt in enumerate(targets, start=1):
            relative = prediction_path(record.conversation_index, round_index)
            if (pred_dir / relative).is_file():
                pred = read_prediction_png(pred_dir / relative, (height, width), reading)
            else:
                missing.append(relative)
                pred = np.zeros((height, width), np.uint8)
            metrics.update(pred, gt, round_index, record.name)
    if missing:
        logger.warning("%d predictions missing (scored as empty): %s", len(missing), missing[:10])
    results = metrics.summary()
    results["missing"] = missing
    results["num_conversations"] = len(records)
    if report is not None:
        results["conversation_file"] = report.as_dict()
    write_json_atomic(results, out_json)
    totals = [{"round": "2+", **results["rounds_2plus"]}, {"round": "all", **results["overall"]}]
    write_csv_atomic(results["per_round"] + totals, SUMMARY_FIELDS, out_json.with_suffix(".csv"))
    per_mask = [
        {
            "name": s.name, "round": s.round, "iou": round(s.iou, 6),
            "intersection": s.intersection, "union": s.union, "pred_box": list(s.pred_box),
            "gt_box": list(s.gt_box), "box_iou": round(s.box_iou, 6), "hit": int(s.hit),
        }
        for s in metrics.scores
    ]  # fmt: skip
    fields = list(per_mask[0]) if per_mask else ["name", "round"]
    write_csv_atomic(per_mask, fields, out_json.with_name(out_json.stem + "_per_mask.csv"))
    return results
