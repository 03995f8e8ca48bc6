"""Ground truth for the proposal report, and the image lists the prepare scripts hand the runner.

Only what proposal preprocessing needs beyond the shared readers of :mod:`utils.annotations`:
items keyed by file name (what the loaders look up), and ground-truth masks at the original image
resolution for `prepare_datasets.proposal_report`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from prepare_datasets.proposals.runner import ImageItem
from utils.annotations import annotation_mask, coco_images, require_file


@dataclass
class TargetImage:
    """Ground truth of one image: ``masks`` is ``(R, H, W)`` uint8 (1 target, 0/255 not)."""

    store_dir: str
    key: str
    masks: np.ndarray


def items_by_name(paths: Iterable[Path]) -> list[ImageItem]:
    """Items keyed by file name (what upstream's loaders look up)."""
    return [ImageItem(key=p.name, path=p) for p in paths]


def coco_targets(instances: dict, store_dir: str, source: str, limit: int = 0):
    """One `TargetImage` per image of a COCO-format dict, a row per annotation (file-name keys)."""
    images = coco_images(instances, source)
    by_image: dict[int, list[dict]] = {}
    for annotation in instances.get("annotations", []):
        by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
    for count, image_id in enumerate(sorted(by_image)):
        if limit and count >= limit:
            return
        image = images[image_id]
        height, width = int(image["height"]), int(image["width"])
        masks = np.stack([annotation_mask(a, height, width) for a in by_image[image_id]])
        yield TargetImage(store_dir, Path(image["file_name"]).name, masks)


def class_targets(label_map: np.ndarray, ignore: set[int]) -> np.ndarray:
    """``(R, H, W)`` uint8 masks, one per class id in ``label_map`` that is not in ``ignore``."""
    classes = [int(c) for c in np.unique(label_map) if int(c) not in ignore]
    if not classes:
        return np.zeros((0, *label_map.shape), np.uint8)
    return np.stack([(label_map == c).astype(np.uint8) for c in classes])


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """A segmentation annotation PNG as an ``(H, W)`` integer array of class ids."""
    path = require_file(path, "annotation")
    with Image.open(path) as image:
        return np.asarray(image)
