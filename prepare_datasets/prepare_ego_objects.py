"""SAM-everything proposals for the EgoObjects images of LLM-Seg40K.

Reads ``<dataset_dir>/ego_objects/images`` and writes ``<sam_masks_dir>/ego_objects/masks.h5``
keyed by file name (upstream wrote its json into the image folder; we use the loaders' layout).
When the LLM-Seg40K split files ``<llmseg40k_dir>/{train,validation,test}.json`` exist, only
their ``from_dataset == "ego_objects"`` images are processed, and their ``rle_seg`` masks are the
report's ground truth (one row per question); otherwise the whole folder is processed.

    python -m prepare_datasets.prepare_ego_objects --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from prepare_datasets.annotations import TargetImage, items_by_name
from prepare_datasets.proposals.runner import (
    ImageItem,
    PrepareConfig,
    SplitJob,
    SplitSummary,
    run_prepare,
)
from utils.annotations import list_image_files, load_json
from utils.cli import run_cli

LLMSEG40K_SPLITS = ("train", "validation", "test")


@dataclass
class EgoObjectsPrepareConfig(PrepareConfig):
    """SAM-everything proposals for EgoObjects (see the module doc)."""

    llmseg40k_dir: str = field(
        default="LLM-Seg40K", metadata={"help": "LLM-Seg40K split JSONs (relative to dataset_dir)"}
    )


def _samples(config: EgoObjectsPrepareConfig) -> dict[str, dict] | None:
    folder = Path(config.dataset_dir) / config.llmseg40k_dir
    files = [folder / f"{split}.json" for split in LLMSEG40K_SPLITS]
    if not any(f.is_file() for f in files):
        return None
    samples = {}
    for path in files:
        if path.is_file():
            for name, sample in load_json(path, "LLM-Seg40K split").items():
                if sample.get("from_dataset") == "ego_objects":
                    samples[name] = sample
    return samples


def split_jobs(config: EgoObjectsPrepareConfig) -> list[SplitJob]:
    folder = Path(config.dataset_dir) / "ego_objects" / "images"
    samples = _samples(config)
    if samples is None:
        items = items_by_name(list_image_files(folder))
    else:
        items = [ImageItem(key=Path(n).name, path=folder / n) for n in samples]
    return [SplitJob(name="ego_objects", store_dir="ego_objects", images=items)]


def iter_targets(config: EgoObjectsPrepareConfig) -> Iterator[TargetImage]:
    samples = _samples(config) or {}
    for count, name in enumerate(sorted(samples)):
        if config.limit and count >= config.limit:
            return
        rles = [qa["rle_seg"] for qa in samples[name].get("qa_pairs", []) if "rle_seg" in qa]
        if rles:
            masks = np.stack([mask_utils.decode(r).astype(np.uint8) for r in rles])
            yield TargetImage("ego_objects", Path(name).name, masks)


def main(config: EgoObjectsPrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, EgoObjectsPrepareConfig)
