"""SAM-everything proposals for ReasonSeg (train / val / test).

Reads ``<dataset_dir>/reason_seg/ReasonSeg/<split>/*.jpg`` (each with a labelme ``.json``) and
writes ``<sam_masks_dir>/reason_seg/ReasonSeg/<split>/masks.h5``, keyed by file name.

    python -m prepare_datasets.prepare_reason_seg --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prepare_datasets.annotations import TargetImage, items_by_name
from prepare_datasets.proposals.runner import PrepareConfig, SplitJob, SplitSummary, run_prepare
from utils.annotations import list_image_files, load_json, oriented_size
from utils.cli import run_cli
from utils.masks import labelme_to_mask


@dataclass
class ReasonSegPrepareConfig(PrepareConfig):
    """SAM-everything proposals for ReasonSeg (see the module doc)."""

    splits: str = field(default="train,val,test", metadata={"help": "comma-separated splits"})


def _split_names(config: ReasonSegPrepareConfig) -> list[str]:
    return [s.strip() for s in config.splits.split(",") if s.strip()]


def _split_folder(config: ReasonSegPrepareConfig, split: str) -> Path:
    return Path(config.dataset_dir) / "reason_seg" / "ReasonSeg" / split


def split_jobs(config: ReasonSegPrepareConfig) -> list[SplitJob]:
    """One job per split: every ``*.jpg`` of the split folder."""
    return [
        SplitJob(
            name=f"reason_seg/{split}",
            store_dir=f"reason_seg/ReasonSeg/{split}",
            images=items_by_name(list_image_files(_split_folder(config, split), "*.jpg")),
        )
        for split in _split_names(config)
    ]


def iter_targets(config: ReasonSegPrepareConfig) -> Iterator[TargetImage]:
    """The labelme mask of each image (1 target, 255 ignore), one row per image."""
    for split in _split_names(config):
        images = list_image_files(_split_folder(config, split), "*.jpg")
        for count, image_path in enumerate(images):
            if config.limit and count >= config.limit:
                break
            annotation = load_json(image_path.with_suffix(".json"), "ReasonSeg annotation")
            height, width = oriented_size(image_path)
            mask = labelme_to_mask(annotation.get("shapes", []), height, width)
            yield TargetImage(f"reason_seg/ReasonSeg/{split}", image_path.name, mask[None])


def main(config: ReasonSegPrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, ReasonSegPrepareConfig)
