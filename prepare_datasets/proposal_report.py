"""How good can LLM-Seg be on a dataset, given its proposals? The oracle upper bounds.

LLM-Seg can only answer with proposals, so for each dataset this measures, against the ground
truth at the store resolution (ignore label 255 counts as background):

- ``single_topk`` / ``single_all``: gIoU (mean per-target IoU) of the best single proposal among
  the top-K the model sees (K = 50 by area, as upstream) / among all stored proposals;
- ``union_topk``: gIoU of the best union of top-K proposals, found greedily (add the proposal
  that raises the IoU most until none does; a lower bound on the true best union);
- ``recall@0.5`` / ``recall@0.75``: share of targets whose best top-K proposal reaches that IoU;
- ``mean_k``: mean number of stored proposals per image;
- ``topk_drops_best``: share of targets whose best proposal overall is outside the top-K
  (strictly better than the best kept one).

It prints a table and writes JSON (``--output``, default ``<sam_masks_dir>/proposal_report.json``).

    python -m prepare_datasets.proposal_report --datasets reason_seg,refcoco \
        --dataset_dir ./dataset --sam_masks_dir ./dataset/sam_masks --limit 500
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prepare_datasets.annotations import TargetImage
from utils.cli import run_cli
from utils.config import build_parser, save_config
from utils.masks import binary_ground_truth, mask_iou_iop, resize_nearest
from utils.outputs import refuse_to_replace
from utils.proposal_store import PROPOSAL_ORDERS, ProposalReader, top_k_indices

logger = logging.getLogger(__name__)

# name -> (module, its config class); each module has split_jobs() and iter_targets().
DATASETS = {
    "reason_seg": ("prepare_datasets.prepare_reason_seg", "ReasonSegPrepareConfig"),
    "refcoco": ("prepare_datasets.prepare_refcoco", "RefCocoPrepareConfig"),
    "refclef": ("prepare_datasets.prepare_refclef", "RefClefPrepareConfig"),
    "ade20k": ("prepare_datasets.prepare_ade20k", "Ade20kPrepareConfig"),
    "coco2017": ("prepare_datasets.prepare_coco2017", "Coco2017PrepareConfig"),
    "voc2010": ("prepare_datasets.prepare_voc2010", "Voc2010PrepareConfig"),
    "mapillary": ("prepare_datasets.prepare_mapillary", "MapillaryPrepareConfig"),
    "ego_objects": ("prepare_datasets.prepare_ego_objects", "EgoObjectsPrepareConfig"),
}
COLUMNS = (
    "images",
    "targets",
    "mean_k",
    "single_topk",
    "single_all",
    "union_topk",
    "recall@0.5",
    "recall@0.75",
    "topk_drops_best",
    "missing_images",
)


@dataclass
class ReportConfig:
    """Oracle upper bounds of the proposals of each dataset."""

    datasets: str = field(
        default="reason_seg", metadata={"help": f"comma list of {list(DATASETS)}"}
    )
    dataset_dir: str = "./dataset"
    sam_masks_dir: str = "./dataset/sam_masks"
    top_k: int = 50
    order: str = field(default="area", metadata={"choices": list(PROPOSAL_ORDERS)})
    limit: int = field(default=0, metadata={"help": "images per dataset (0: all)"})
    output: str = field(default="", metadata={"help": "JSON path (default: under sam_masks_dir)"})
    prepare_args: str = field(
        default="",
        metadata={
            "help": "flags for the datasets' prepare configs, e.g. '--splits val' "
            "(flags a dataset does not know are ignored)"
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace an --output this command did not write"}
    )


def greedy_union_iou(proposals: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of a greedily built union of ``(K, P)`` flattened proposals with a ``(P,)`` target.

    Each step adds the proposal that raises the union's IoU most, computed for all K at once:
    ``|(U | p) & g| = |U & g| + p.(g & ~U)`` and ``|U | p | g| = |U | g| + p.(~U & ~g)``.
    """
    union = torch.zeros_like(target)
    best = 0.0
    while len(proposals):
        gain_inside = proposals @ (target * (1 - union))
        gain_outside = proposals @ ((1 - union) * (1 - target))
        inter = (union * target).sum() + gain_inside
        total = torch.maximum(union, target).sum() + gain_outside
        ious = inter / total.clamp_min(1)
        k = int(torch.argmax(ious))
        if float(ious[k]) <= best + 1e-9:
            return best
        best = float(ious[k])
        union = torch.maximum(union, proposals[k])
    return best


@dataclass
class _Totals:
    images: int = 0
    missing: int = 0
    proposals: int = 0
    single_topk: list[float] = dataclasses.field(default_factory=list)
    single_all: list[float] = dataclasses.field(default_factory=list)
    union_topk: list[float] = dataclasses.field(default_factory=list)
    drops: int = 0

    def row(self) -> dict:
        n = len(self.single_topk)
        best = np.array(self.single_topk)
        return {
            "images": self.images,
            "targets": n,
            "mean_k": self.proposals / max(self.images, 1),
            "single_topk": float(best.mean()) if n else 0.0,
            "single_all": float(np.mean(self.single_all)) if n else 0.0,
            "union_topk": float(np.mean(self.union_topk)) if n else 0.0,
            "recall@0.5": float((best >= 0.5).mean()) if n else 0.0,
            "recall@0.75": float((best >= 0.75).mean()) if n else 0.0,
            "topk_drops_best": self.drops / n if n else 0.0,
            "missing_images": self.missing,
        }


def _add_image(totals: _Totals, target: TargetImage, reader: ProposalReader, config) -> None:
    if target.key not in reader:
        totals.missing += 1
        return
    proposals = reader.get(target.key)
    totals.images += 1
    totals.proposals += len(proposals)
    gt = binary_ground_truth(target.masks, f"{target.store_dir}/{target.key}").numpy()
    gt = resize_nearest(gt, (proposals.height, proposals.width))
    keep = gt.reshape(len(gt), -1).any(1)  # targets empty after ignore/resize have no oracle
    gt = torch.from_numpy(np.ascontiguousarray(gt[keep]))
    if len(gt) == 0:
        return
    masks = torch.from_numpy(proposals.decode())
    if len(proposals) == 0:
        zeros = [0.0] * len(gt)
        totals.single_topk += zeros
        totals.single_all += zeros
        totals.union_topk += zeros
        return
    iou, _ = mask_iou_iop(masks, gt)  # (R, K)
    top = torch.from_numpy(top_k_indices(proposals, config.top_k, config.order))
    best_all = iou.max(dim=1).values
    best_top = iou[:, top].max(dim=1).values
    totals.single_all += best_all.tolist()
    totals.single_topk += best_top.tolist()
    totals.drops += int((best_all > best_top + 1e-9).sum())
    flat_top = masks[top].reshape(len(top), -1).float()
    for row in gt.reshape(len(gt), -1).float():
        totals.union_topk.append(greedy_union_iou(flat_top, row))


def report_dataset(name: str, config: ReportConfig) -> dict:
    """The report row of one dataset (see the module doc)."""
    module_name, class_name = DATASETS[name]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, class_name)
    argv = shlex.split(config.prepare_args) + [
        "--dataset_dir", config.dataset_dir, "--sam_masks_dir", config.sam_masks_dir,
        "--limit", str(config.limit),
    ]  # fmt: skip
    namespace, _ = build_parser(config_cls).parse_known_args(argv)
    prepare_config = config_cls(**vars(namespace))
    totals = _Totals()
    readers: dict[str, ProposalReader] = {}
    for target in module.iter_targets(prepare_config):
        if target.store_dir not in readers:
            readers[target.store_dir] = ProposalReader(
                Path(config.sam_masks_dir) / target.store_dir
            )
        _add_image(totals, target, readers[target.store_dir], config)
    for reader in readers.values():
        reader.close()
    return totals.row()


def format_table(rows: dict[str, dict]) -> str:
    """A fixed-width text table, one row per dataset."""
    header = f"{'dataset':<12}" + "".join(f"{c:>16}" for c in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = "".join(
            f"{row[c]:>16d}" if isinstance(row[c], int) else f"{row[c]:>16.4f}" for c in COLUMNS
        )
        lines.append(f"{name:<12}{cells}")
    return "\n".join(lines)


def main(config: ReportConfig) -> dict[str, dict]:
    names = [n.strip() for n in config.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; expected some of {list(DATASETS)}")
    output = Path(config.output or Path(config.sam_masks_dir) / "proposal_report.json")
    config_path = output.with_name(output.stem + "_config.json")
    refuse_to_replace(
        [output], config.overwrite, "proposal_report", "--output", config_path, ReportConfig
    )
    rows = {name: report_dataset(name, config) for name in names}
    save_config(config, config_path)
    tmp = output.with_name(f"{output.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps({"top_k": config.top_k, "order": config.order, "datasets": rows}, indent=2)
        + "\n"
    )
    os.replace(tmp, output)
    logger.info(
        "proposal upper bounds (top_k=%d by %s):\n%s",
        config.top_k,
        config.order,
        format_table(rows),
    )
    return rows


if __name__ == "__main__":
    run_cli(main, ReportConfig)
