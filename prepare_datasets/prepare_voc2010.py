"""SAM-everything proposals for PASCAL-Part (VOC2010 images).

Reads ``<dataset_dir>/vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages`` and writes
``<sam_masks_dir>/voc2010/masks.h5`` keyed by file name. When
``vlpart/pascal_part/train.json`` exists only its images are processed (and it is the report's
ground truth, one row per part annotation); ``--all_images`` takes the whole folder.

    python -m prepare_datasets.prepare_voc2010 --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prepare_datasets.annotations import TargetImage, coco_targets, items_by_name
from prepare_datasets.proposals.runner import (
    ImageItem,
    PrepareConfig,
    SplitJob,
    SplitSummary,
    run_prepare,
)
from utils.annotations import coco_images, list_image_files, load_json
from utils.cli import run_cli


@dataclass
class Voc2010PrepareConfig(PrepareConfig):
    """SAM-everything proposals for PASCAL-Part / VOC2010 (see the module doc)."""

    all_images: bool = field(
        default=False, metadata={"help": "every VOC2010 image, not only PASCAL-Part's"}
    )


def _annotation_path(config: PrepareConfig) -> Path:
    return Path(config.dataset_dir) / "vlpart" / "pascal_part" / "train.json"


def split_jobs(config: Voc2010PrepareConfig) -> list[SplitJob]:
    folder = Path(config.dataset_dir) / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"
    annotation = _annotation_path(config)
    if config.all_images or not annotation.is_file():
        items = items_by_name(list_image_files(folder, "*.jpg"))
    else:
        images = coco_images(load_json(annotation, "PASCAL-Part annotations"), str(annotation))
        names = {Path(image["file_name"]).name for image in images.values()}
        items = [ImageItem(key=n, path=folder / n) for n in names]
    return [SplitJob(name="voc2010", store_dir="voc2010", images=items)]


def iter_targets(config: Voc2010PrepareConfig) -> Iterator[TargetImage]:
    path = _annotation_path(config)
    yield from coco_targets(
        load_json(path, "PASCAL-Part annotations"), "voc2010", str(path), config.limit
    )


def main(config: Voc2010PrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, Voc2010PrepareConfig)
