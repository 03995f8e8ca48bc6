"""The demo's closing step: put the model's scores beside chance and the proposal ceiling.

``scripts/demo.sh`` runs it after ``eval.py``. It reads the evaluation (``metrics.json``,
``per_image.csv``, ``vis/``) and the very proposals the model chose from, and writes
``<out_dir>/metrics.json``:

* ``giou`` / ``ciou``: the model (from ``eval.py``);
* ``chance_giou``: the expected gIoU of picking one of the image's top-K proposals uniformly at
  random (what a model that learned nothing scores with ``--selection argmax``);
* ``oracle_giou``: the gIoU of always picking the best single proposal (the ceiling of
  ``argmax`` selection over these proposals);
* ``per_query_type`` (and ``per_query_length``: short/long): the same four numbers per group;
* ``stage_seconds``: wall time of each demo stage, when given;
* with no-target queries (``prepare_synthetic --no_target_queries``): ``n_acc`` / ``t_acc`` (the
  gRefCOCO measures, from ``eval.py``); such a query's chance is 0 (every proposal is an answer)
  and its oracle 1 (the right answer, nothing, is a rejection, not a proposal);
* with ``--free_eval_dir`` (``eval.py --mode free``): ``free``, the same numbers when the model
  writes its own answers, and the share of answers with no / one / several ``[SEG]``.

The overlays are copied to ``<out_dir>/vis/`` and :func:`format_table` renders the summary that
the demo prints. Per-image IoUs follow :mod:`utils.metrics` exactly (prediction resized nearest
to the ground truth, ignore pixels left out, an empty union counts 1).

    python -m prepare_datasets.demo_report --dataset_dir D --sam_masks_dir M \\
        --eval_dir OUT/eval --out_dir OUT
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.cli import run_cli
from utils.config import save_config, write_json_atomic
from utils.data.images import load_rgb_image
from utils.data.reason_seg import load_reason_seg_split
from utils.masks import mask_iou_iop
from utils.metrics import IGNORE_LABEL, resize_nearest
from utils.outputs import refuse_to_replace
from utils.proposal_store import top_k_indices

logger = logging.getLogger(__name__)


@dataclass
class DemoReportConfig:
    """Chance and oracle gIoU of the proposals, beside the model's scores, per query type."""

    dataset_dir: str = field(default="./dataset", metadata={"help": "dataset root"})
    sam_masks_dir: str = field(default="./sam_masks", metadata={"help": "proposal store root"})
    split: str = field(default="val", metadata={"help": "ReasonSeg split that was evaluated"})
    eval_dir: str = field(
        default="", metadata={"help": "eval.py --out_dir (metrics.json, per_image.csv, vis/)"}
    )
    out_dir: str = field(default="./demo_out", metadata={"help": "where metrics.json goes"})
    top_k_proposals: int = field(default=50, metadata={"help": "proposals the model chose from"})
    proposal_order: str = field(
        default="area", metadata={"help": "which proposals", "choices": ["area", "predicted_iou"]}
    )
    stage_seconds: str = field(
        default="", metadata={"help": "wall time per stage, e.g. 'generate=3,train=250'"}
    )
    free_eval_dir: str = field(
        default="", metadata={"help": "eval.py --mode free --out_dir of the same split (optional)"}
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace a metrics.json or vis/ in --out_dir this command did not write"},
    )


@dataclass
class ProposalBaseline:
    """Chance and oracle IoU of one evaluated image (one query)."""

    name: str
    query_type: str
    length: str  # "short" or "long"
    chance_iou: float
    oracle_iou: float
    num_proposals: int


def proposal_ious(proposals: np.ndarray, label_map: np.ndarray) -> np.ndarray:
    """IoU of each proposal as the evaluator scores it, against one ground-truth label map.

    Args:
        proposals: ``(K, h, w)`` bool proposals (any size; resized nearest to the GT).
        label_map: ``(H, W)`` uint8 in {0, 1, 255}.
    Returns:
        ``(K,)`` float64; 1.0 where prediction and target are both empty (as in ``utils.metrics``).
    """
    height, width = label_map.shape
    masks = torch.as_tensor(proposals)
    if tuple(masks.shape[-2:]) != (height, width):
        masks = torch.stack([resize_nearest(m, (height, width)) for m in masks]).bool()
    keep = torch.from_numpy(label_map != IGNORE_LABEL)
    target = torch.from_numpy(label_map == 1)
    iou, _ = mask_iou_iop(masks & keep, target[None])
    iou = iou[0].double().numpy()
    empty = (masks & keep).flatten(1).sum(1).numpy() == 0
    if not target.any():
        iou = np.where(empty, 1.0, 0.0)  # an empty target: only an empty prediction is right
    return iou


def proposal_baselines(
    dataset_dir: str, sam_masks_dir: str, split: str, top_k: int = 50, order: str = "area"
) -> list[ProposalBaseline]:
    """Chance and oracle IoU of every image of a ReasonSeg split, over its top-K proposals.

    The evaluated query is the image's first text (as ``reason_seg_eval_record``); an image
    without proposals scores 0 for both.
    """
    baselines = []
    for item in load_reason_seg_split(dataset_dir, sam_masks_dir, split):
        height, width = load_rgb_image(item.image_path).shape[:2]
        label_map = item.masks(height, width, 1)[0]
        proposals = item.proposals.get(item.image_path.name)
        indices = top_k_indices(proposals, top_k, order)
        ious = proposal_ious(proposals.decode(indices), label_map) if len(indices) else None
        chance = float(ious.mean()) if ious is not None else 0.0
        oracle = float(ious.max()) if ious is not None else 0.0
        if item.no_target:  # the right answer, nothing, is a rejection rather than a proposal
            oracle = 1.0
        baselines.append(
            ProposalBaseline(
                name=item.image_path.stem,
                query_type=str(item.extra.get("query_type", "unknown")),
                length="long" if item.is_sentence else "short",
                chance_iou=chance,
                oracle_iou=oracle,
                num_proposals=len(indices),
            )
        )
    return baselines


def _group_rows(baselines: list[ProposalBaseline], key: str) -> dict[str, list[ProposalBaseline]]:
    groups: dict[str, list[ProposalBaseline]] = defaultdict(list)
    for baseline in baselines:
        groups[getattr(baseline, key)].append(baseline)
    return dict(sorted(groups.items()))


def _summary(rows: list[ProposalBaseline], metrics: dict, prefix: str) -> dict:
    return {
        "giou": metrics.get(f"{prefix}giou"),
        "ciou": metrics.get(f"{prefix}ciou"),
        "chance_giou": float(np.mean([r.chance_iou for r in rows])),
        "oracle_giou": float(np.mean([r.oracle_iou for r in rows])),
        "num_images": len(rows),
    }


def parse_stage_seconds(text: str) -> dict[str, float]:
    """``"generate=3.5,train=250"`` -> ``{"generate": 3.5, "train": 250.0}``."""
    stages = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            stages[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"--stage_seconds: expected name=seconds, got {part!r}")
    return stages


def _check_count(metrics: dict, baselines: list[ProposalBaseline], flag: str) -> None:
    if metrics.get("num_images") != len(baselines):
        raise ValueError(
            f"the evaluation scored {metrics.get('num_images')} images but the split has "
            f"{len(baselines)}: {flag} and --split do not match"
        )


def _free_summary(free_metrics: dict, baselines: list[ProposalBaseline]) -> dict:
    summary = {key: free_metrics.get(key) for key in ("giou", "ciou", "answers")}
    summary.update({k: free_metrics[k] for k in ("n_acc", "t_acc") if k in free_metrics})
    summary["per_query_type"] = {
        name: free_metrics.get(f"type:{name}/giou") for name in _group_rows(baselines, "query_type")
    }
    summary["per_query_length"] = {
        name: free_metrics.get(f"{name}/giou") for name in _group_rows(baselines, "length")
    }
    return summary


def build_report(
    eval_metrics: dict,
    baselines: list[ProposalBaseline],
    stage_seconds: dict | None = None,
    free_metrics: dict | None = None,
) -> dict:
    """The demo's ``metrics.json``: the model's scores beside chance and oracle, per group.

    Args:
        eval_metrics: ``eval.py``'s ``metrics.json`` (groups ``short``/``long``/``type:<t>``).
        baselines: :func:`proposal_baselines` of the same split.
        stage_seconds: optional wall time per demo stage.
        free_metrics: optional ``eval.py --mode free`` ``metrics.json`` of the same split.
    """
    _check_count(eval_metrics, baselines, "--eval_dir")
    report = _summary(baselines, eval_metrics, "")
    report.update(
        nciou=eval_metrics.get("nciou"),
        selection=eval_metrics.get("selection"),
        per_query_type={
            name: _summary(rows, eval_metrics, f"type:{name}/")
            for name, rows in _group_rows(baselines, "query_type").items()
        },
        per_query_length={
            name: _summary(rows, eval_metrics, f"{name}/")
            for name, rows in _group_rows(baselines, "length").items()
        },
    )
    for key in ("n_acc", "t_acc", "num_no_target", "num_rejected"):
        if key in eval_metrics:
            report[key] = eval_metrics[key]
    if free_metrics is not None:
        _check_count(free_metrics, baselines, "--free_eval_dir")
        report["free"] = _free_summary(free_metrics, baselines)
    if "heads" in eval_metrics:  # several mask heads: each one's overall numbers
        report["heads"] = {
            head: {"giou": values["giou"], "ciou": values["ciou"]}
            for head, values in eval_metrics["heads"].items()
        }
    if stage_seconds:
        report["stage_seconds"] = dict(stage_seconds)
        report["total_seconds"] = round(sum(stage_seconds.values()), 1)
    return report


def format_table(report: dict) -> str:
    """A short plain-text table: one row overall, one per query type and length (and the free
    mode's gIoU beside, when it was evaluated)."""
    free = report.get("free")
    lines = [
        f"{'':<16}{'images':>7}{'gIoU':>8}{'cIoU':>8}{'chance':>8}{'oracle':>8}"
        + (f"{'free gIoU':>11}" if free else ""),
    ]

    def number(value) -> float:
        return value if value is not None else float("nan")

    def row(label: str, entry: dict, free_giou=None) -> str:
        line = (
            f"{label:<16}{entry['num_images']:>7}{number(entry['giou']):>8.3f}"
            f"{number(entry['ciou']):>8.3f}{entry['chance_giou']:>8.3f}{entry['oracle_giou']:>8.3f}"
        )
        return line + (f"{number(free_giou):>11.3f}" if free else "")

    lines.append(row("all", report, free and free["giou"]))
    for name, entry in report["per_query_type"].items():
        lines.append(row(f"  {name}", entry, free and free["per_query_type"].get(name)))
    for name, entry in report["per_query_length"].items():
        lines.append(row(f"  {name}", entry, free and free["per_query_length"].get(name)))
    if "n_acc" in report:
        line = f"N-acc {report['n_acc']:.3f} ({report['num_no_target']} no-target), "
        line += f"T-acc {report['t_acc']:.3f}"
        if free and "n_acc" in free:
            line += f"; free: N-acc {free['n_acc']:.3f}, T-acc {free['t_acc']:.3f}"
        lines.append(line)
    if free and free.get("answers"):
        shares = ", ".join(f"{k} {v:.2f}" for k, v in free["answers"].items())
        lines.append(f"free answers: {shares}")
    if "stage_seconds" in report:
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in report["stage_seconds"].items())
        lines.append(f"wall time {report['total_seconds']:.0f}s ({stages})")
    return "\n".join(lines)


def _copy_visualizations(eval_dir: Path, out_dir: Path) -> int:
    """Copy ``eval_dir/vis/*.png`` to ``out_dir/vis`` (replacing an older copy whole)."""
    source = eval_dir / "vis"
    pictures = sorted(source.glob("*.png")) if source.is_dir() else []
    target = out_dir / "vis"
    staging = out_dir / "vis.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for picture in pictures:
        shutil.copy2(picture, staging / picture.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return len(pictures)


def _check_per_image(eval_dir: Path, baselines: list[ProposalBaseline]) -> None:
    """The evaluation and the baselines must describe the same images."""
    path = eval_dir / "per_image.csv"
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        evaluated = {row["name"] for row in csv.DictReader(handle)}
    expected = {b.name for b in baselines}
    if evaluated != expected:
        missing = sorted(expected - evaluated)[:5]
        extra = sorted(evaluated - expected)[:5]
        raise ValueError(
            f"{path}: images differ from the {len(expected)} of the split "
            f"(not evaluated: {missing}, not in the split: {extra})"
        )


def main(config: DemoReportConfig) -> dict:
    """Write ``<out_dir>/metrics.json`` and ``<out_dir>/vis/``; return the report."""
    eval_dir = Path(config.eval_dir)
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"--eval_dir {eval_dir}: no metrics.json (run eval.py first)")
    out_dir = Path(config.out_dir)
    refuse_to_replace(
        [out_dir / "metrics.json", out_dir / "vis"], config.overwrite, "demo_report", "--out_dir",
        out_dir / "report_config.json", DemoReportConfig,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / "report_config.json")
    baselines = proposal_baselines(
        config.dataset_dir,
        config.sam_masks_dir,
        config.split,
        config.top_k_proposals,
        config.proposal_order,
    )
    _check_per_image(eval_dir, baselines)
    free_metrics = None
    if config.free_eval_dir:
        free_path = Path(config.free_eval_dir) / "metrics.json"
        if not free_path.is_file():
            raise FileNotFoundError(f"--free_eval_dir {config.free_eval_dir}: no metrics.json")
        free_metrics = json.loads(free_path.read_text())
    report = build_report(
        json.loads(metrics_path.read_text()), baselines, parse_stage_seconds(config.stage_seconds),
        free_metrics,
    )  # fmt: skip
    report["num_pictures"] = _copy_visualizations(eval_dir, out_dir)
    write_json_atomic(report, out_dir / "metrics.json")
    logger.info("wrote %s and %d pictures", out_dir / "metrics.json", report["num_pictures"])
    return report


def _main_with_table(config: DemoReportConfig) -> dict:
    result = main(config)
    sys.stdout.write(format_table(result) + "\n")  # the demo's closing summary, for the user
    return result


if __name__ == "__main__":
    run_cli(_main_with_table, DemoReportConfig)
