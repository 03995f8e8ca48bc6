"""SAM-everything proposals for COCO train2017 (COCO-Stuff, PACO-LVIS, LLaVA-Instruct, LLM-Seg40K).

Reads ``<dataset_dir>/coco/train2017/*.jpg`` and writes ``<sam_masks_dir>/coco2017/masks.h5``
keyed by file name. ``--annotation_files`` (COCO-format JSONs relative to ``--dataset_dir``,
e.g. ``vlpart/paco/annotations/paco_lvis_v1_train.json``) restricts the run to the images they
use and gives the proposal report its ground truth (one row per annotation).

    python -m prepare_datasets.prepare_coco2017 --dataset_dir ./dataset \
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
class Coco2017PrepareConfig(PrepareConfig):
    """SAM-everything proposals for COCO train2017 (see the module doc)."""

    annotation_files: str = field(
        default="",
        metadata={"help": "comma-separated COCO-format JSONs (relative to --dataset_dir)"},
    )


def _annotation_paths(config: Coco2017PrepareConfig) -> list[Path]:
    names = [n.strip() for n in config.annotation_files.split(",") if n.strip()]
    return [Path(config.dataset_dir) / n for n in names]


def split_jobs(config: Coco2017PrepareConfig) -> list[SplitJob]:
    folder = Path(config.dataset_dir) / "coco" / "train2017"
    paths = _annotation_paths(config)
    if not paths:
        items = items_by_name(list_image_files(folder, "*.jpg"))
    else:
        names = set()
        for path in paths:
            images = coco_images(load_json(path, "COCO annotations"), str(path))
            names.update(Path(image["file_name"]).name for image in images.values())
        items = [ImageItem(key=n, path=folder / n) for n in names]
    return [SplitJob(name="coco2017", store_dir="coco2017", images=items)]


def iter_targets(config: Coco2017PrepareConfig) -> Iterator[TargetImage]:
    for path in _annotation_paths(config):
        instances = load_json(path, "COCO annotations")
        yield from coco_targets(instances, "coco2017", str(path), config.limit)


def main(config: Coco2017PrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, Coco2017PrepareConfig)
