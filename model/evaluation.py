"""The one evaluator: teacher-forced scoring, named selection strategy, gIoU/cIoU/ncIoU.

``training.py`` (after each epoch and with ``--eval_only``) and ``eval.py`` call
:func:`evaluate`; ``eval.py --pred_dir`` scores other methods' PNGs with the same metric code
through :func:`score_prediction_folder`. Work is split across ranks (``records[rank::world]``)
and the totals are all-reduced, so any number of processes gives the same numbers.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.heads.selection import select_mask
from utils.config import write_json_atomic
from utils.data.images import load_rgb_image
from utils.data.samples import EncodedSample, SegmentationRecord, collate
from utils.distributed import barrier, is_main_process, rank, world_size
from utils.metrics import ImageScore, SegmentationMetrics

logger = logging.getLogger(__name__)


@dataclass
class SelectionSettings:
    """How scores become a mask at evaluation time (see ``model.heads.selection``)."""

    strategy: str = "iop"
    threshold: float = 0.5
    top_k: int = 5


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` with ``mask`` blended in ``colour`` at 50% and outlined (RGB uint8, any size)."""
    out = image.copy()
    region = mask.astype(bool)
    out[region] = (0.5 * out[region] + 0.5 * np.array(colour)).astype(np.uint8)
    # The outline keeps the mask readable where the object has the overlay's own colour.
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


MIN_PANEL_SIDE = 256  # small pictures (the demo's 128 px scenes) are enlarged to this


def save_visualization(
    path: Path, image: np.ndarray, pred: np.ndarray, gt: np.ndarray, caption: str
) -> None:
    """Write ``[prediction (red) | ground truth (green)]`` side by side with the query on top.

    Pictures whose short side is under ``MIN_PANEL_SIDE`` are enlarged by a whole factor with
    nearest-neighbour sampling first, so masks stay pixel-exact and the caption stays legible.
    """
    factor = -(-MIN_PANEL_SIDE // min(image.shape[:2]))  # ceil
    if factor > 1:
        size = (image.shape[1] * factor, image.shape[0] * factor)
        image = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
        pred = cv2.resize(pred.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        gt = cv2.resize(gt.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    gt_fg = gt == 1
    panel = np.concatenate(
        [overlay(image, pred, (255, 0, 0)), overlay(image, gt_fg, (0, 200, 0))], axis=1
    )
    scale = max(panel.shape[1] / 800, 0.5)
    band = np.full((int(28 * scale) + 8, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(
        band, caption[:120], (4, int(20 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale,
        (0, 0, 0), max(int(scale), 1), cv2.LINE_AA,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate([band, panel]), cv2.COLOR_RGB2BGR))


def _score_sample(
    sample: EncodedSample,
    similarities: torch.Tensor,
    iop_scores: torch.Tensor,
    selection: SelectionSettings,
    metrics: SegmentationMetrics,
    vis_dir: Path | None,
) -> list[dict]:
    rows = []
    record = sample.record
    for r in range(sample.masks.shape[0]):
        gt = sample.masks[r]
        result = select_mask(
            similarities[r].float().cpu(),
            iop_scores[r].float().cpu(),
            sample.proposal_binary,
            selection.strategy,
            selection.threshold,
            selection.top_k,
            output_size=tuple(gt.shape),
        )
        name = record.name if sample.masks.shape[0] == 1 else f"{record.name}_{r}"
        score = metrics.update(result.mask, gt, name, record.groups)
        rows.append(_row(score, record, r, len(result.selected), sample.proposal_masks.shape[0]))
        if vis_dir is not None:
            query = record.queries[r] if r < len(record.queries) else ""
            save_visualization(
                vis_dir / f"{name}.png",
                load_rgb_image(record.image_path),
                result.mask.numpy(),
                gt.numpy(),
                f"IoU {score.iou:.2f} | {query}",
            )
    return rows


def _row(score: ImageScore, record: SegmentationRecord, r: int, selected: int, k: int) -> dict:
    return {
        "name": score.name,
        "image": str(record.image_path),
        "query": record.queries[r] if r < len(record.queries) else "",
        "groups": score.groups,
        "iou": round(score.iou, 6),
        "intersection": score.intersection,
        "union": score.union,
        "num_selected": selected,
        "num_proposals": k,
    }


def _score_unusable(record: SegmentationRecord, metrics: SegmentationMetrics) -> list[dict]:
    """A record whose prompt did not fit: every target scored against an empty prediction."""
    image = load_rgb_image(record.image_path)
    masks = record.masks(*image.shape[:2])
    rows = []
    for r, gt in enumerate(masks):
        score = metrics.update(np.zeros_like(gt), gt, f"{record.name}_{r}", record.groups)
        rows.append(_row(score, record, r, 0, 0))
    return rows


@torch.no_grad()
def evaluate(
    model,
    dataset,
    selection: SelectionSettings,
    device: torch.device,
    dtype: torch.dtype,
    pad_token_id: int,
    out_dir: str | os.PathLike,
    visualize: int = 0,
    prefix: str = "",
) -> dict[str, float]:
    """Score ``dataset`` (an ``EvaluationDataset``) and write ``metrics.json`` + ``per_image.csv``.

    Args:
        model: an ``LLMSegModel`` (unwrapped) exposing ``score(batch)``.
        dataset: evaluation dataset; this rank takes ``rank::world_size``.
        selection: strategy, threshold and top-k.
        device, dtype: where and in which precision to run.
        pad_token_id: padding id for collation.
        out_dir: where ``<prefix>metrics.json``, ``<prefix>per_image.csv`` and ``vis/`` go.
        visualize: how many overlay PNGs this rank writes to ``vis/`` (-1: all).
    Returns:
        The metrics (``giou``, ``ciou``, ``nciou``, ``num_images`` and per-group entries).
    """
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics()
    rows: list[dict] = []
    indices = range(rank(), len(dataset), world_size())
    no_proposals = 0
    for index in tqdm(indices, desc="evaluate", disable=not is_main_process(), mininterval=5):
        item = dataset[index]
        if isinstance(item, SegmentationRecord):
            rows += _score_unusable(item, metrics)
            continue
        if item.proposal_masks.shape[0] == 0:
            no_proposals += 1
        batch, _ = collate([item], pad_token_id)
        output = model.score(batch.to(device, dtype))
        drawn = visualize < 0 or len(rows) < visualize
        vis_dir = out_dir / "vis" if drawn else None
        rows += _score_sample(
            item, output.similarities[0], output.iop_scores[0], selection, metrics, vis_dir
        )
    if no_proposals:
        logger.warning("%d images had no proposals and were scored as empty masks", no_proposals)
    group_names = sorted({"all"} | {g for row in rows for g in row["groups"].split("|") if g})
    group_names = _gather_union(group_names)
    metrics.all_reduce(group_names)
    all_rows = _gather_rows(rows)
    results = metrics.compute()
    results["selection"] = selection.strategy
    results["iop_threshold"] = selection.threshold
    if is_main_process():
        write_json_atomic(results, out_dir / f"{prefix}metrics.json")
        _write_csv(all_rows, out_dir / f"{prefix}per_image.csv")
    barrier()
    model.train(was_training)
    return results


def _gather_union(names: list[str]) -> list[str]:
    if world_size() == 1:
        return names
    gathered: list[list[str]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in part})


def _gather_rows(rows: list[dict]) -> list[dict]:
    if world_size() == 1:
        return rows
    gathered: list[list[dict]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def _write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fields = list(rows[0]) if rows else ["name", "iou"]
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["name"]))
    os.replace(tmp, path)


def score_prediction_folder(
    records: list[SegmentationRecord], pred_dir: str | os.PathLike, out_json: str | os.PathLike
) -> dict:
    """Score binary mask PNGs written by any method with the same metric code.

    One PNG per image, named ``<image stem>.png`` (nonzero = foreground, any size: resized
    nearest to the GT). A missing PNG counts as an empty prediction and is listed in the output.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    metrics = SegmentationMetrics()
    missing, rows = [], []
    for record in tqdm(records, desc="score predictions", mininterval=5):
        image = load_rgb_image(record.image_path)
        gts = record.masks(*image.shape[:2])
        path = pred_dir / f"{record.name}.png"
        if path.is_file():
            pred = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if pred is None:
                raise ValueError(f"{path}: unreadable PNG")
            pred = pred if pred.ndim == 2 else pred.max(axis=2)
        else:
            missing.append(path.name)
            pred = np.zeros(image.shape[:2], np.uint8)
        for r, gt in enumerate(gts):
            score = metrics.update(pred, gt, record.name, record.groups)
            rows.append(_row(score, record, r, 0, 0))
    if missing:
        logger.warning("%d predictions missing (scored as empty): %s", len(missing), missing[:10])
    results = metrics.compute()
    results["missing_predictions"] = missing
    write_json_atomic(results, out_json)
    _write_csv(rows, Path(out_json).with_suffix(".csv"))
    return results
