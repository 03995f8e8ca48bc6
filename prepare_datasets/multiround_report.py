"""The multi-round demo's report: per round and per history mode, beside chance and oracle.

Reads the conversations of a ReasonSeg-format split (``conversation`` fields, written by
``prepare_synthetic.py --conversations``), the proposals the model chose from, and the output of
one ``eval.py --val_dataset "ReasonSegMR|<split>"`` run per history mode (``metrics.json``,
``per_image.csv``, ``vis/``), and writes ``<out_dir>/metrics.json``::

    {"history": {"gt": {"per_round": [...], "referring_giou": .., "referring_ciou": .., ...},
                 "predicted": {...}, "none": {...}},
     "baseline": {...}  (a model trained without references, when given),
     "chance_giou": .., "oracle_giou": .., "referring_chance_giou": .., ...,
     "per_relation": {relation: {history: giou}}, "stage_seconds": {...}}

``referring_*`` are over the rounds whose query refers to an earlier round. ``<out_dir>/vis/``
gets one strip per conversation: its rounds side by side as the evaluator drew them (query on
top; prediction red | ground truth green), the referenced rounds' objects outlined in yellow.

Usage::

    python -m prepare_datasets.multiround_report --dataset_dir D --sam_masks_dir M --split val \\
        --eval_dirs gt=E1,predicted=E2,none=E3 [--baseline_dir E4] --out_dir OUT
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from model.evaluation import MIN_PANEL_SIDE
from prepare_datasets.demo_report import parse_stage_seconds, proposal_ious
from utils.cli import run_cli
from utils.config import save_config, write_json_atomic
from utils.data.images import load_rgb_image
from utils.data.reason_seg import load_reason_seg_split
from utils.masks import labelme_to_mask
from utils.outputs import refuse_to_replace
from utils.proposal_store import top_k_indices

logger = logging.getLogger(__name__)

HISTORIES = ("gt", "predicted", "none")


@dataclass
class RoundInfo:
    """One round of one conversation, as the generator wrote it."""

    name: str  # the evaluator's row name: <image stem>_<round - 1>
    conversation: str
    round: int
    references: list[int]
    relation: str
    chance: float
    oracle: float


@dataclass
class MultiRoundReportConfig:
    """Summarise the multi-round demo's evaluations."""

    dataset_dir: str = field(default="dataset", metadata={"help": "the synthetic dataset"})
    sam_masks_dir: str = field(default="sam_masks", metadata={"help": "its proposal stores"})
    split: str = field(default="val", metadata={"help": "the evaluated split"})
    eval_dirs: str = field(
        default="", metadata={"help": "history=eval.py out_dir, comma-separated"}
    )
    baseline_dir: str = field(
        default="", metadata={"help": "eval.py out_dir of the model trained without references"}
    )
    out_dir: str = field(default=".", metadata={"help": "where metrics.json and vis/ go"})
    top_k_proposals: int = field(default=50, metadata={"help": "proposals the model chose from"})
    stage_seconds: str = field(default="", metadata={"help": "name=seconds,... of the stages"})
    max_strips: int = field(default=20, metadata={"help": "conversation strips drawn"})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace a metrics.json or vis/ in --out_dir this command did not write"},
    )


def conversation_rounds(dataset_dir, sam_masks_dir, split: str, top_k: int) -> list[RoundInfo]:
    """Every round of the split's conversations, with the chance (a random proposal) and oracle
    (the best proposal) IoU of its target."""
    rounds = []
    for item in load_reason_seg_split(dataset_dir, sam_masks_dir, split):
        conversation = item.extra.get("conversation")
        if not conversation:
            continue
        height, width = load_rgb_image(item.image_path).shape[:2]
        proposals = item.proposals.get(item.image_path.name)
        indices = top_k_indices(proposals, top_k)
        decoded = proposals.decode(indices) if len(indices) else None
        for index, round_ in enumerate(conversation):
            label_map = labelme_to_mask(round_["shapes"], height, width)
            ious = proposal_ious(decoded, label_map) if decoded is not None else np.zeros(1)
            rounds.append(
                RoundInfo(
                    name=f"{item.image_path.stem}_{index}",
                    conversation=item.image_path.stem,
                    round=index + 1,
                    references=list(round_.get("references") or []),
                    relation=str(round_.get("relation") or round_.get("query_type") or "none"),
                    chance=float(ious.mean()),
                    oracle=float(ious.max()),
                )  # fmt: skip
            )
    if not rounds:
        raise ValueError(f"{dataset_dir}: no conversations in split {split!r}")
    return rounds


def read_rows(eval_dir: Path) -> dict[str, dict]:
    """``name -> row`` of an evaluation's ``per_image.csv`` (the primary head's rows)."""
    path = eval_dir / "per_image.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-image results (run eval.py first)")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    heads = {row.get("head", "") for row in rows}
    primary = "proposals" if "proposals" in heads else next(iter(heads))
    return {row["name"]: row for row in rows if row.get("head", "") == primary}


def _scores(rounds: list[RoundInfo], rows: dict[str, dict], metrics: dict) -> dict:
    """The evaluator's per-round numbers, plus gIoU/cIoU over the referring rounds."""
    referring = [r for r in rounds if r.references]
    missing = [r.name for r in rounds if r.name not in rows]
    if missing:
        raise ValueError(f"the evaluation has no rows for {missing[:5]} (another split?)")

    def pooled(selected: list[RoundInfo]) -> dict:
        ious = [float(rows[r.name]["iou"]) for r in selected]
        inter = sum(float(rows[r.name]["intersection"]) for r in selected)
        union = sum(float(rows[r.name]["union"]) for r in selected)
        return {
            "giou": float(np.mean(ious)) if ious else 0.0,
            "ciou": inter / union if union else 0.0,
            "count": len(selected),
        }

    referring_scores = pooled(referring)
    return {
        "per_round": metrics.get("per_round", []),
        "overall": pooled(rounds),
        "referring_giou": referring_scores["giou"],
        "referring_ciou": referring_scores["ciou"],
        "referring_count": referring_scores["count"],
    }


def build_report(rounds: list[RoundInfo], evaluations: dict[str, Path], baseline: Path | None):
    """The report dict (see the module docstring)."""
    referring = [r for r in rounds if r.references]
    report: dict = {
        "conversations": len({r.conversation for r in rounds}),
        "rounds": len(rounds),
        "chance_giou": float(np.mean([r.chance for r in rounds])),
        "oracle_giou": float(np.mean([r.oracle for r in rounds])),
        "referring_chance_giou": float(np.mean([r.chance for r in referring])) if referring else 0,
        "referring_oracle_giou": float(np.mean([r.oracle for r in referring])) if referring else 0,
        "history": {},
    }
    per_relation: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    runs = dict(evaluations)
    if baseline is not None:
        runs["baseline"] = baseline
    for history, eval_dir in runs.items():
        rows = read_rows(eval_dir)
        metrics_path = eval_dir / "metrics.json"
        metrics = _read_json(metrics_path)
        scores = _scores(rounds, rows, metrics)
        if history == "baseline":
            report["baseline"] = scores
        else:
            report["history"][history] = scores
        for r in referring:
            per_relation[r.relation][history].append(float(rows[r.name]["iou"]))
    report["per_relation"] = {
        relation: {h: float(np.mean(v)) for h, v in by_history.items()}
        | {"count": len(next(iter(by_history.values())))}
        for relation, by_history in sorted(per_relation.items())
    }
    return report


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (run eval.py first)")
    return json.loads(path.read_text())


def draw_strips(
    rounds: list[RoundInfo], eval_dir: Path, dataset_dir, split: str, out_dir: Path, limit: int
) -> int:
    """One picture per conversation: the evaluator's round panels side by side, each referenced
    round's target outlined in yellow on both halves of the later round's panel."""
    items = {i.image_path.stem: i for i in load_reason_seg_split(dataset_dir, None, split)}
    by_conversation: dict[str, list[RoundInfo]] = defaultdict(list)
    for r in rounds:
        by_conversation[r.conversation].append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for name, convo in sorted(by_conversation.items())[:limit]:
        item = items[name]
        height, width = load_rgb_image(item.image_path).shape[:2]
        factor = max(-(-MIN_PANEL_SIDE // min(height, width)), 1)
        shapes = [round_["shapes"] for round_ in item.extra["conversation"]]
        panels = []
        for r in convo:
            panel = cv2.imread(str(eval_dir / "vis" / f"{r.name}.png"))
            if panel is None:
                continue
            band = panel.shape[0] - height * factor
            for k in r.references:
                mask = labelme_to_mask(shapes[k - 1], height, width) == 1
                big = cv2.resize(mask.astype(np.uint8), (width * factor, height * factor),
                                 interpolation=cv2.INTER_NEAREST)  # fmt: skip
                contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                for offset in (0, width * factor):
                    shifted = [c + np.array([[offset, band]]) for c in contours]
                    cv2.drawContours(panel, shifted, -1, (0, 220, 255), max(factor // 2, 1))
            panels.append(panel)
        if not panels:
            continue
        tallest = max(p.shape[0] for p in panels)
        padded = [cv2.copyMakeBorder(p, 0, tallest - p.shape[0], 0, 6, cv2.BORDER_CONSTANT,
                                     value=(255, 255, 255)) for p in panels]  # fmt: skip
        cv2.imwrite(str(out_dir / f"{name}.png"), np.concatenate(padded, axis=1))
        drawn += 1
    return drawn


def main(config: MultiRoundReportConfig) -> dict:
    """Write ``metrics.json`` and the strips; return the report."""
    evaluations = {}
    for part in (p for p in config.eval_dirs.split(",") if p.strip()):
        history, _, folder = part.partition("=")
        if history not in HISTORIES or not folder:
            raise ValueError(f"--eval_dirs entries are history=folder ({HISTORIES}), got {part!r}")
        evaluations[history] = Path(folder)
    if not evaluations:
        raise ValueError("--eval_dirs is required")
    out_dir = Path(config.out_dir)
    refuse_to_replace(
        [out_dir / "metrics.json", out_dir / "vis"], config.overwrite, "multiround_report",
        "--out_dir", out_dir / "multiround_report_config.json", MultiRoundReportConfig,
    )  # fmt: skip
    rounds = conversation_rounds(
        config.dataset_dir, config.sam_masks_dir, config.split, config.top_k_proposals
    )
    baseline = Path(config.baseline_dir) if config.baseline_dir else None
    report = build_report(rounds, evaluations, baseline)
    if config.stage_seconds:
        report["stage_seconds"] = parse_stage_seconds(config.stage_seconds)
        report["total_seconds"] = round(sum(report["stage_seconds"].values()), 1)
    strip_source = evaluations.get("predicted", next(iter(evaluations.values())))
    report["strips"] = draw_strips(
        rounds, strip_source, config.dataset_dir, config.split, out_dir / "vis", config.max_strips
    )
    write_json_atomic(report, out_dir / "metrics.json")
    save_config(config, out_dir / "multiround_report_config.json")
    sys.stdout.write(format_table(report))
    return report


def format_table(report: dict) -> str:
    """Per round and history (gIoU), referring rounds, chance and oracle, as plain text."""
    runs = dict(report["history"])
    if "baseline" in report:
        runs["baseline"] = report["baseline"]
    rounds = sorted({r["round"] for s in runs.values() for r in s["per_round"]})
    lines = [f"{'':<12}" + "".join(f"{'round ' + str(r):>10}" for r in rounds)
             + f"{'referring':>11}"]  # fmt: skip
    for name, scores in runs.items():
        by_round = {r["round"]: r["giou"] for r in scores["per_round"]}
        cells = "".join(f"{by_round.get(r, float('nan')):>10.3f}" for r in rounds)
        lines.append(f"{name:<12}{cells}{scores['referring_giou']:>11.3f}")
    lines.append(
        f"chance {report['chance_giou']:.3f} (referring {report['referring_chance_giou']:.3f}), "
        f"oracle {report['oracle_giou']:.3f} (referring {report['referring_oracle_giou']:.3f})"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main, MultiRoundReportConfig)
