"""The one evaluator: teacher-forced scoring, named selection strategy, gIoU/cIoU/ncIoU.

``training.py`` (after each epoch and with ``--eval_only``) and ``eval.py`` call
:func:`evaluate`; ``eval.py --pred_dir`` scores other methods' PNGs with the same metric code
through :func:`score_prediction_folder`. Work is split across ranks (``records[rank::world]``)
and the totals are all-reduced, so any number of processes gives the same numbers.

Multi-round conversations (SegLLM) are also scored per round (``per_round``, ``rounds_2plus``,
``overall`` in ``metrics.json``, :class:`~utils.metrics.MultiRoundMetrics`), with the history
the references read: ``gt`` (the ground-truth masks of the rounds they name, as encoded),
``none`` (references removed; the encoder strips them) or ``predicted`` (SegLLM's ``--ar_eval``:
as many passes as rounds, each writing the previous pass's predicted masks at the ``<ref>``
tokens; attention is causal, so after ``R`` passes every round read only predicted history).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from model.heads.selection import select_mask
from utils.config import write_csv_atomic, write_json_atomic
from utils.data.images import load_rgb_image
from utils.data.rejection import rejection_decisions
from utils.data.samples import EncodedSample, SegmentationRecord, collate
from utils.distributed import barrier, is_main_process, rank, world_size
from utils.grefcoco_metrics import GRefCOCOMetrics
from utils.masks import resize_nearest
from utils.metrics import ImageScore, MultiRoundMetrics, SegmentationMetrics
from utils.prediction_png import STRICT, PredictionReading, read_prediction_png

logger = logging.getLogger(__name__)


@dataclass
class SelectionSettings:
    """How scores become a mask at evaluation time (see ``model.heads.selection``)."""

    strategy: str = "iop"
    threshold: float = 0.5
    top_k: int = 5


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    colour: tuple[int, int, int],
    outline: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """``image`` with ``mask`` blended in ``colour`` at 50% and outlined (RGB uint8, any size);
    ``outline`` is the outline's colour (default: ``colour``)."""
    out = image.copy()
    region = mask.astype(bool)
    out[region] = (0.5 * out[region] + 0.5 * np.array(colour)).astype(np.uint8)
    # The outline keeps the mask readable where the object has the overlay's own colour.
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, outline or colour, 1)
    return out


def outline_masks(
    picture: np.ndarray, masks: list[np.ndarray], colour: tuple[int, int, int] = (255, 220, 0)
) -> np.ndarray:
    """Draw the outer outline of each ``(H, W)`` mask onto ``picture`` in place (the rounds a
    multi-round answer refers to, in yellow by default); returns ``picture``."""
    for mask in masks:
        contours, _ = cv2.findContours(
            mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(picture, contours, -1, colour, 1)
    return picture


def enlarge_small(image: np.ndarray, *masks: np.ndarray) -> tuple[np.ndarray, ...]:
    """``image`` (and ``masks``) enlarged by a whole factor, nearest neighbour, when the short
    side is under :data:`MIN_PANEL_SIDE` (so captions stay legible and masks pixel-exact)."""
    factor = -(-MIN_PANEL_SIDE // min(image.shape[:2]))  # ceil
    if factor <= 1:
        return (image, *masks)
    size = (image.shape[1] * factor, image.shape[0] * factor)
    return tuple(
        cv2.resize(a.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        for a in (image, *masks)
    )


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


def _predicted_masks(sample, similarities, iop_scores, selection: SelectionSettings) -> list:
    """One :class:`~model.heads.selection.SelectionResult` per ``[SEG]`` row, at the image size."""
    return [
        select_mask(
            similarities[r].float().cpu(),
            iop_scores[r].float().cpu(),
            sample.proposal_binary,
            selection.strategy,
            selection.threshold,
            selection.top_k,
            output_size=tuple(sample.masks[r].shape),
        )  # fmt: skip
        for r in range(sample.masks.shape[0])
    ]


# mask head(s) a model has -> the masks evaluated, the first one primary (its numbers are the
# top-level metrics and the history of autoregressive evaluation)
HEAD_MASKS = {
    "proposals": ("proposals",),
    "sam": ("sam",),
    "both": ("proposals", "sam", "combined"),
}


def combine_heads(sam_mask: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """The SAM mask snapped to the proposals that agree with it: the union of the proposals
    lying mostly (IoP > 0.5) inside the SAM mask; the SAM mask itself when none does.

    Args:
        sam_mask: ``(H, W)`` bool at the image size.
        proposals: ``(K, h, w)`` bool at the store resolution.
    """
    if len(proposals) == 0:
        return sam_mask
    small = torch.from_numpy(resize_nearest(sam_mask.numpy(), tuple(proposals.shape[1:])))
    area = proposals.flatten(1).sum(1)
    inside = (proposals & small).flatten(1).sum(1)
    agree = (area > 0) & (inside * 2 > area)
    if not agree.any():
        return sam_mask
    union = proposals[agree].any(0)
    return torch.from_numpy(resize_nearest(union.numpy(), tuple(sam_mask.shape)))


def head_masks(
    sample: EncodedSample,
    output,
    selection: SelectionSettings,
    head: str,
    rejected: list[bool] | None = None,
) -> list:
    """``(mask (H, W) bool, proposals selected)`` per ``[SEG]`` row, from one head; a row in
    ``rejected`` (see :func:`rejection_rows`) gets an empty mask and 0 proposals."""
    if head == "proposals":
        results = _predicted_masks(sample, output.similarities[0], output.iop_scores[0], selection)
        masks = [(result.mask, len(result.selected)) for result in results]
    else:
        sam = [(logits > 0).cpu() for logits in output.sam_logits[0]]
        if head == "sam":
            masks = [(mask, 0) for mask in sam]
        else:
            masks = [(combine_heads(mask, sample.proposal_binary), 0) for mask in sam]
    if rejected is None:
        return masks
    return [
        (torch.zeros_like(mask), 0) if no else (mask, selected)
        for (mask, selected), no in zip(masks, rejected)
    ]


def rejection_rows(model, sample: EncodedSample, output, encoder) -> tuple[list, list] | None:
    """Teacher-forced no-target decisions of a model trained with ``--rejection``: per ``[SEG]``
    row, whether the model would rather begin its answer with the rejection there, and that
    probability (:func:`~utils.data.rejection.rejection_decisions`); ``None`` for a model that
    always answers ``[SEG]``."""
    mode = getattr(model, "rejection", "none")
    if mode == "none":
        return None
    if encoder is None:
        raise ValueError(f"a model trained with --rejection {mode} is evaluated through the "
                         "dataset's sample encoder, and this dataset has none")  # fmt: skip
    probe = encoder.rejection_probe(mode)
    rejected, probabilities = [], []
    for c, conversation in enumerate(sample.conversations):
        ids = conversation.input_ids
        positions = (ids == model.seg_token_id).nonzero().squeeze(1)
        no, probability = rejection_decisions(
            output.logits[c, : len(ids)], positions.to(output.logits.device), probe
        )
        rejected += no.tolist()
        probabilities += probability.tolist()
    return rejected, probabilities


def round_indices(sample: EncodedSample) -> list[int]:
    """The round (1-based turn) of each ``[SEG]`` row of a sample, conversation by conversation."""
    return [turn for conversation in sample.conversations for turn in conversation.seg_turns]


def is_multi_round(sample: EncodedSample) -> bool:
    """Whether some conversation of the sample segments in more than one round."""
    return any(len(set(c.seg_turns)) > 1 for c in sample.conversations)


def score_with_history(model, sample: EncodedSample, encoder, history: str, selection,
                       device, dtype, pad_token_id: int, head: str = "proposals"):  # fmt: skip
    """The model's scores for ``sample`` with its references reading ``history``.

    ``gt`` and ``none`` are one pass (the encoder wrote GT references, or none). ``predicted``
    repeats the pass once per round, each time encoding the previous pass's predicted mask of
    every referenced round into the ``<ref>`` tokens.
    """
    batch, _ = collate([sample], pad_token_id)
    output = model.score(batch.to(device, dtype))
    if history != "predicted" or sample.reference_rows is None:
        return output
    for _ in range(max(round_indices(sample)) - 1):
        decisions = rejection_rows(model, sample, output, encoder)
        masks = head_masks(sample, output, selection, head, decisions and decisions[0])
        predicted = torch.stack([masks[row][0] for row in sample.reference_rows.tolist()])
        image = (
            load_rgb_image(sample.record.image_path) if sample.reference_crops is not None else None
        )
        inputs = encoder.encode_reference_masks(predicted.to(torch.uint8), image)
        sample = dataclasses.replace(sample, **inputs)
        batch, _ = collate([sample], pad_token_id)
        output = model.score(batch.to(device, dtype))
    return output


def score_sample(
    sample: EncodedSample,
    masks_by_head: dict[str, list],
    metrics: dict[str, SegmentationMetrics],
    vis_dir: Path | None,
    round_metrics: MultiRoundMetrics | None = None,
    no_target_metrics: GRefCOCOMetrics | None = None,
    decisions: tuple[list[bool], list[float]] | None = None,
) -> list[dict]:
    rows = []
    record = sample.record
    rounds = round_indices(sample)
    primary = next(iter(masks_by_head))
    for head, masks in masks_by_head.items():
        for r, (mask, selected) in enumerate(masks):
            gt = sample.masks[r]
            name = record.name if sample.masks.shape[0] == 1 else f"{record.name}_{r}"
            score = metrics[head].update(mask, gt, name, record.groups)
            row = {**_row(score, record, r, selected, sample.proposal_masks.shape[0]), "head": head}
            if decisions is not None:
                row["rejected"] = int(decisions[0][r])
                row["rejection_probability"] = round(decisions[1][r], 6)
            rows.append(row)
            if head != primary:
                continue
            if round_metrics is not None:
                round_metrics.update(mask, gt, rounds[r], name)
            if no_target_metrics is not None and record.no_target is not None:
                flag = no_target_flag(record, r, len(masks), gt)
                no_target_metrics.update(mask, gt, flag, name)
            if vis_dir is not None:
                query = record.queries[r] if r < len(record.queries) else ""
                save_visualization(
                    vis_dir / f"{name}.png",
                    load_rgb_image(record.image_path),
                    mask.numpy(),
                    gt.numpy(),
                    f"IoU {score.iou:.2f} | {query}",
                )
    return rows


def no_target_flag(record: SegmentationRecord, r: int, num_rows: int, gt: torch.Tensor) -> bool:
    """Whether mask row ``r`` of a gRefCOCO record has no target. When the encoder dropped a
    conversation (too long), rows no longer line up with ``record.no_target``; an empty ``gt``
    (``(H, W)``) then stands for it."""
    if len(record.no_target) == num_rows:
        return record.no_target[r]
    return not bool((gt == 1).any())


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


def score_unusable(
    record: SegmentationRecord,
    metrics: SegmentationMetrics,
    round_metrics: MultiRoundMetrics,
    per_round: bool = True,
    head: str = "proposals",
    no_target_metrics: GRefCOCOMetrics | None = None,
) -> list[dict]:
    """A record whose prompt did not fit: every target scored against an empty prediction."""
    image = load_rgb_image(record.image_path)
    masks = record.masks(*image.shape[:2])
    rounds = [
        turn
        for turns in record.conversations
        for turn, (_, answer) in enumerate(turns, 1)
        for _ in range((answer or "").count("[SEG]"))
    ]
    multi_round = per_round and len(set(rounds)) > 1
    rows = []
    for r, gt in enumerate(masks):
        score = metrics.update(np.zeros_like(gt), gt, f"{record.name}_{r}", record.groups)
        if multi_round:
            round_metrics.update(np.zeros_like(gt), gt, rounds[r], f"{record.name}_{r}")
        if no_target_metrics is not None and record.no_target is not None:
            no_target_metrics.update(np.zeros_like(gt), gt, record.no_target[r], record.name)
        rows.append({**_row(score, record, r, 0, 0), "head": head})
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
    history: str = "gt",
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
        history: what references read in multi-round conversations: ``gt``, ``none`` (both as
            the dataset's encoder wrote them) or ``predicted`` (see the module docstring).
    Returns:
        The metrics (``giou``, ``ciou``, ``nciou``, ``num_images`` and per-group entries; on
        gRefCOCO also ``n_acc``, ``t_acc``, ``num_no_target`` and ``grefcoco``: every number
        of :class:`~utils.grefcoco_metrics.GRefCOCOMetrics`).
    """
    out_dir = Path(out_dir)
    was_training = model.training
    model.eval()
    heads = HEAD_MASKS[getattr(model, "mask_head", "proposals")]
    metrics = {head: SegmentationMetrics() for head in heads}
    round_metrics = MultiRoundMetrics()
    no_target_metrics = GRefCOCOMetrics()  # used by records that flag no-target rows
    rows: list[dict] = []
    indices = range(rank(), len(dataset), world_size())
    no_proposals = 0
    for index in tqdm(indices, desc="evaluate", disable=not is_main_process(), mininterval=5):
        item = dataset[index]
        if isinstance(item, SegmentationRecord):
            for head in heads:
                primary = head == heads[0]
                rows += score_unusable(
                    item, metrics[head], round_metrics, primary, head,
                    no_target_metrics if primary else None,
                )  # fmt: skip
            continue
        if item.proposal_masks.shape[0] == 0 and "proposals" in heads:
            no_proposals += 1
        output = score_with_history(
            model, item, getattr(dataset, "encoder", None), history, selection, device, dtype,
            pad_token_id, heads[0],
        )  # fmt: skip
        drawn = visualize < 0 or len(rows) < visualize
        vis_dir = out_dir / "vis" if drawn else None
        decisions = rejection_rows(model, item, output, getattr(dataset, "encoder", None))
        rejected = decisions[0] if decisions is not None else None
        masks_by_head = {
            head: head_masks(item, output, selection, head, rejected) for head in heads
        }
        rows += score_sample(
            item, masks_by_head, metrics, vis_dir,
            round_metrics if is_multi_round(item) else None, no_target_metrics, decisions,
        )  # fmt: skip
    if no_proposals:
        logger.warning("%d images had no proposals and were scored as empty masks", no_proposals)
    results = summarize(metrics, no_target_metrics, rows, heads, selection, dataset)
    all_rows = gather_rows(rows)
    if getattr(model, "rejection", "none") != "none":
        results["rejection"] = model.rejection
        results["num_rejected"] = sum(
            row.get("rejected", 0) for row in all_rows if row["head"] == heads[0]
        )
    rounds = gather_union([str(r) for r in round_metrics.rounds])
    if rounds:
        round_metrics.all_reduce(max(int(r) for r in rounds))
        results.update(round_metrics.summary())
        results["history"] = history
    write_results(results, all_rows, out_dir, prefix)
    model.train(was_training)
    return results


def write_results(results: dict, rows: list[dict], out_dir: Path, prefix: str = "") -> None:
    """``<prefix>metrics.json`` and ``<prefix>per_image.csv`` (written by the main process;
    every rank waits for them)."""
    if is_main_process():
        write_json_atomic(results, out_dir / f"{prefix}metrics.json")
        write_rows_csv(rows, out_dir / f"{prefix}per_image.csv")
    barrier()


def summarize(
    metrics: dict[str, SegmentationMetrics],
    no_target_metrics: GRefCOCOMetrics,
    rows: list[dict],
    heads: tuple[str, ...],
    selection: SelectionSettings,
    dataset,
) -> dict:
    """The numbers every evaluation mode reports, reduced over ranks: the primary head's
    metrics (and every head's), the selection, the files ``--skip_missing`` left out and, when
    some record flags no-target rows, gRefCOCO's section with ``n_acc``/``t_acc``."""
    group_names = sorted({"all"} | {g for row in rows for g in row["groups"].split("|") if g})
    group_names = gather_union(group_names)
    for head_metrics in metrics.values():
        head_metrics.all_reduce(group_names)
    results = metrics[heads[0]].compute()
    results["head"] = heads[0]
    if len(heads) > 1:  # every head side by side, the primary one also at the top level
        results["heads"] = {head: metrics[head].compute() for head in heads}
    results["selection"] = selection.strategy if heads[0] != "sam" else "logits > 0"
    results["iop_threshold"] = selection.threshold
    if getattr(dataset, "skipped", None):
        results["skipped_missing"] = list(dataset.skipped)
    if gather_union(["grefcoco"] if no_target_metrics.totals.num_samples else []):
        no_target_metrics.all_reduce()
        results["grefcoco"] = no_target_metrics.compute()
        for key in ("n_acc", "t_acc", "num_no_target"):
            results[key] = results["grefcoco"][key]
    return results


def gather_union(names: list[str]) -> list[str]:
    if world_size() == 1:
        return names
    gathered: list[list[str]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in part})


def gather_rows(rows: list[dict]) -> list[dict]:
    if world_size() == 1:
        return rows
    gathered: list[list[dict]] = [[] for _ in range(world_size())]
    torch.distributed.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def write_rows_csv(rows: list[dict], path: Path) -> None:
    # Every row's keys, in first-seen order: a record that could not be scored has no
    # rejection columns, and it may come first.
    fields = list(dict.fromkeys(key for row in rows for key in row)) if rows else ["name", "iou"]
    write_csv_atomic(sorted(rows, key=lambda row: row["name"]), fields, path)


def score_prediction_folder(
    records: list[SegmentationRecord],
    pred_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    reading: PredictionReading = STRICT,
    skipped: Sequence[str] = (),
) -> dict:
    """Score binary mask PNGs written by any method with the same metric code.

    One PNG per image, named ``<image stem>.png`` (sets with several expressions per image, the
    refer sets: one per expression, ``<sent_id>.png``), read by
    :func:`~utils.prediction_png.read_prediction_png` (its image's size and binary, unless
    ``reading`` allows otherwise). A missing PNG counts as an empty prediction and is listed.
    ``skipped``: the annotation/image files ``--skip_missing`` left out of ``records``, listed
    as ``skipped_missing`` in ``out_json`` (as :func:`evaluate` lists them).
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder {pred_dir} does not exist")
    metrics = SegmentationMetrics()
    missing, rows = [], []
    for record in tqdm(records, desc="score predictions", mininterval=5):
        image = load_rgb_image(record.image_path)
        gts = record.masks(*image.shape[:2])
        names = record.prediction_names or (record.name,) * len(gts)
        for r, gt in enumerate(gts):
            path = pred_dir / f"{names[r]}.png"
            if path.is_file():
                pred = read_prediction_png(path, image.shape[:2], reading)
            else:
                if path.name not in missing[-len(gts) :]:  # a per-image PNG is listed once
                    missing.append(path.name)
                pred = np.zeros(image.shape[:2], np.uint8)
            score = metrics.update(pred, gt, record.name, record.groups)
            rows.append(_row(score, record, r, 0, 0))
    if missing:
        logger.warning("%d predictions missing (scored as empty): %s", len(missing), missing[:10])
    results = metrics.compute()
    results["missing_predictions"] = missing
    if skipped:
        results["skipped_missing"] = list(skipped)
    write_json_atomic(results, out_json)
    write_rows_csv(rows, Path(out_json).with_suffix(".csv"))
    return results
