"""SAM-everything proposals for ADE20K.

Reads ``<dataset_dir>/ade20k/images/<split>/*.jpg`` (annotations in
``ade20k/annotations/<split>/<stem>.png``, class ids 1-150, 0 = unlabelled) and writes
``<sam_masks_dir>/ade20k/masks.h5`` keyed by file name. Upstream trains on ``training`` only.

    python -m prepare_datasets.prepare_ade20k --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prepare_datasets.annotations import TargetImage, class_targets, items_by_name, read_label_map
from prepare_datasets.proposals.runner import PrepareConfig, SplitJob, SplitSummary, run_prepare
from utils.annotations import list_image_files
from utils.cli import run_cli


@dataclass
class Ade20kPrepareConfig(PrepareConfig):
    """SAM-everything proposals for ADE20K (see the module doc)."""

    splits: str = field(
        default="training", metadata={"help": "comma-separated: training, validation"}
    )


def _images(config: Ade20kPrepareConfig) -> list[tuple[str, Path]]:
    root = Path(config.dataset_dir) / "ade20k"
    return [
        (split, path)
        for split in (s.strip() for s in config.splits.split(",") if s.strip())
        for path in list_image_files(root / "images" / split, "*.jpg")
    ]


def split_jobs(config: Ade20kPrepareConfig) -> list[SplitJob]:
    items = items_by_name(path for _, path in _images(config))
    return [SplitJob(name="ade20k", store_dir="ade20k", images=items)]


def iter_targets(config: Ade20kPrepareConfig) -> Iterator[TargetImage]:
    """A row per class present in the annotation (0, unlabelled, is not a target)."""
    root = Path(config.dataset_dir) / "ade20k" / "annotations"
    for count, (split, path) in enumerate(_images(config)):
        if config.limit and count >= config.limit:
            return
        label_map = read_label_map(root / split / f"{path.stem}.png")
        yield TargetImage("ade20k", path.name, class_targets(label_map, ignore={0}))


def main(config: Ade20kPrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, Ade20kPrepareConfig)
