"""SAM-everything proposals for Mapillary Vistas.

Reads ``<dataset_dir>/mapillary/<split>/images/*.jpg`` and writes
``<sam_masks_dir>/mapillary/masks.h5`` keyed by file name. The report reads the v2.0 labels
(``<split>/v2.0/labels/<stem>.png``), one row per class present, leaving out the classes
``config_v2.0.json`` names "unlabeled".

    python -m prepare_datasets.prepare_mapillary --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prepare_datasets.annotations import TargetImage, class_targets, items_by_name, read_label_map
from prepare_datasets.proposals.runner import PrepareConfig, SplitJob, SplitSummary, run_prepare
from utils.annotations import list_image_files, load_json
from utils.cli import run_cli


@dataclass
class MapillaryPrepareConfig(PrepareConfig):
    """SAM-everything proposals for Mapillary Vistas (see the module doc)."""

    splits: str = field(default="training", metadata={"help": "comma-separated splits"})


def _images(config: MapillaryPrepareConfig) -> list[tuple[str, Path]]:
    root = Path(config.dataset_dir) / "mapillary"
    return [
        (split, path)
        for split in (s.strip() for s in config.splits.split(",") if s.strip())
        for path in list_image_files(root / split / "images", "*.jpg")
    ]


def split_jobs(config: MapillaryPrepareConfig) -> list[SplitJob]:
    items = items_by_name(path for _, path in _images(config))
    return [SplitJob(name="mapillary", store_dir="mapillary", images=items)]


def _unlabeled_ids(config: PrepareConfig) -> set[int]:
    path = Path(config.dataset_dir) / "mapillary" / "config_v2.0.json"
    if not path.is_file():
        return set()
    labels = load_json(path, "Mapillary config").get("labels", [])
    return {i for i, label in enumerate(labels) if "unlabeled" in str(label.get("name", ""))}


def iter_targets(config: MapillaryPrepareConfig) -> Iterator[TargetImage]:
    root = Path(config.dataset_dir) / "mapillary"
    ignore = _unlabeled_ids(config)
    for count, (split, path) in enumerate(_images(config)):
        if config.limit and count >= config.limit:
            return
        label_map = read_label_map(root / split / "v2.0" / "labels" / f"{path.stem}.png")
        yield TargetImage("mapillary", path.name, class_targets(label_map, ignore))


def main(config: MapillaryPrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, MapillaryPrepareConfig)
