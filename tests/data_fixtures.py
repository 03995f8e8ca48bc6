"""Small native-format datasets written by tests (ReasonSeg folders + proposal stores)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from utils.masks import encode_rles
from utils.proposal_store import H5StoreWriter, ImageProposals, name_sort_key


def proposals_from_masks(masks: np.ndarray, scores: np.ndarray | None = None) -> ImageProposals:
    """An ``ImageProposals`` holding exactly ``masks`` ``(K, H, W)`` bool."""
    k, height, width = masks.shape
    bboxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        if len(xs):
            bboxes.append([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
        else:
            bboxes.append([0, 0, 0, 0])
    return ImageProposals(
        height=height,
        width=width,
        rle_counts=encode_rles(masks),
        area=masks.reshape(k, -1).sum(1).astype(np.int64),
        bbox=np.asarray(bboxes, np.float32).reshape(k, 4),
        predicted_iou=np.ones(k, np.float32) if scores is None else scores.astype(np.float32),
        stability_score=np.ones(k, np.float32),
        point_coords=np.zeros((k, 2), np.float32),
    )


def _square(points):
    x0, y0, x1, y1 = points
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def write_reason_seg(root: Path, split: str, num_images: int, seed: int = 0, size: int = 48):
    """A ReasonSeg split of ``num_images`` scenes with two coloured squares each.

    The query asks for the red square; proposals are both squares, their union and the
    background, so the right answer is one specific proposal. Returns ``(dataset_dir,
    sam_masks_dir)``.
    """
    rng = np.random.default_rng(seed)
    dataset_dir, masks_dir = root / "dataset", root / "sam_masks"
    folder = dataset_dir / "reason_seg" / "ReasonSeg" / split
    folder.mkdir(parents=True, exist_ok=True)
    stores = []
    for index in range(num_images):
        image = np.full((size, size + 8, 3), 90, np.uint8)
        boxes = []
        for colour in ((230, 20, 20), (20, 20, 230)):
            x0, y0 = rng.integers(0, size - 16, 2)
            while any(abs(x0 - bx) < 14 and abs(y0 - by) < 14 for bx, by, *_ in boxes):
                x0, y0 = rng.integers(0, size - 16, 2)
            boxes.append((int(x0), int(y0), int(x0) + 13, int(y0) + 13))
            image[y0 : y0 + 14, x0 : x0 + 14] = colour
        name = f"img_{index:03d}"
        Image.fromarray(image).save(folder / f"{name}.jpg", quality=95)
        sentence = index % 2 == 0
        text = "the red object that stands out" if sentence else "red square"
        (folder / f"{name}.json").write_text(
            json.dumps(
                {
                    "text": [text, "the square that is red"],
                    "is_sentence": sentence,
                    "shapes": [{"label": "target", "points": _square(boxes[0])}],
                }
            )
        )
        masks = np.zeros((4,) + image.shape[:2], bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            masks[k, y0 : y1 + 1, x0 : x1 + 1] = True
        masks[2] = masks[0] | masks[1]
        masks[3] = ~masks[2]
        stores.append((f"{name}.jpg", proposals_from_masks(masks)))
    store_dir = masks_dir / "reason_seg" / "ReasonSeg" / split
    with H5StoreWriter(store_dir / "masks.h5") as writer:
        for name, proposals in sorted(stores, key=lambda item: name_sort_key(item[0])):
            writer.add(name, proposals)
    return dataset_dir, masks_dir
