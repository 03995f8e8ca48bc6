"""Scoring saved gRefCOCO predictions (``eval.py --pred_dir`` on ``grefcoco|unc|val``).

Layout: one PNG per sentence, ``<pred_dir>/<sent_id>.png``, at the image size (another size is
resized nearest to it). A pixel is foreground when any *colour* channel is nonzero (an alpha
channel is not a label; a palette PNG is judged by its colours); an all-zero PNG is a rejection
("nothing is referred to"), and so is a missing PNG, which is also listed in
``missing_predictions``. Metrics: :class:`utils.grefcoco_metrics.GRefCOCOMetrics`.

Writes ``out_json`` (``giou``, ``ciou``, ``n_acc``, ``t_acc``, ``num_samples``,
``num_no_target``, ``num_target``, ``missing_predictions``: sent_ids) and ``<out_json stem>.csv``
(one row per sentence).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from utils.annotations import oriented_size
from utils.config import write_csv_atomic, write_json_atomic
from utils.data.coco_masks import union_masks
from utils.grefcoco_metrics import GRefCOCOMetrics
from utils.prediction_png import STRICT, PredictionReading, read_prediction_png

logger = logging.getLogger(__name__)

CSV_FIELDS = [
    "sent_id", "image", "query", "no_target", "rejected", "iou", "intersection", "union",
]  # fmt: skip


def score_grefcoco_predictions(
    images: list,
    pred_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    reading: PredictionReading = STRICT,
) -> dict:
    """Score ``<pred_dir>/<sent_id>.png`` against every sentence of ``images``.

    Args:
        images: :class:`~utils.data.refer_seg.ReferImage` s of gRefCOCO (with ``sentence_ids``
            and ``no_target``), as :func:`~utils.data.grefcoco.load_grefcoco_split` gives them.
        pred_dir: the prediction folder.
        out_json: where the metrics JSON goes (the CSV is written beside it).
        reading: how PNGs of another size or soft masks are read (default: an error).
    Returns:
        :meth:`GRefCOCOMetrics.compute` plus ``missing_predictions`` (sent_ids, ascending).
    Raises:
        FileNotFoundError: no such folder. DatasetFormatError: an unreadable PNG, or annotations
            made for another image size.
    """
    pred_dir, out_json = Path(pred_dir), Path(out_json)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    metrics = GRefCOCOMetrics()
    missing: list[int] = []
    rows: list[dict] = []
    for image in images:
        height, width = oriented_size(image.image_path)  # as the image loader orients it
        targets = union_masks(
            image.segmentations, (image.height, image.width), image.image_path, height, width
        )
        for sent_id, text, no_target, gt in zip(
            image.sentence_ids, image.sentences, image.no_target, targets
        ):
            path = pred_dir / f"{sent_id}.png"
            if path.is_file():
                pred = read_prediction_png(path, (height, width), reading)
            else:
                missing.append(sent_id)
                pred = np.zeros((height, width), np.uint8)
            score = metrics.update(pred, gt, no_target, str(sent_id))
            rows.append(
                {
                    "sent_id": sent_id, "image": str(image.image_path), "query": text,
                    "no_target": int(score.no_target), "rejected": int(score.rejected),
                    "iou": round(score.iou, 6), "intersection": score.intersection,
                    "union": score.union,
                }
            )  # fmt: skip
    if missing:
        logger.warning(
            "%d predictions missing (scored as rejections): %s", len(missing), missing[:10]
        )
    results = metrics.compute()
    results["missing_predictions"] = sorted(missing)
    write_json_atomic(results, out_json)
    write_csv_atomic(rows, CSV_FIELDS, out_json.with_suffix(".csv"))
    logger.info(
        "grefcoco: gIoU %s  cIoU %s  N-acc %s  T-acc %s  (%d sentences, %d no-target)",
        *(_as_text(results[k]) for k in ("giou", "ciou", "n_acc", "t_acc")),
        results["num_samples"], results["num_no_target"],
    )  # fmt: skip
    return results


def _as_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
