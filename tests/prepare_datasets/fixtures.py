"""Shared helpers for the prepare_datasets tests: a generator with known proposals, images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from utils.proposal_store import ImageProposals, ProposalReader


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """``(H, W)`` bool mask of the inclusive box ``(x0, y0, x1, y1)``."""
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return mask


def proposals_from_masks(masks: list[np.ndarray]) -> ImageProposals:
    height, width = masks[0].shape
    records = []
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        records.append(
            {
                "segmentation": mask,
                "area": int(mask.sum()),
                "bbox": [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()],
                "predicted_iou": 0.9 + 0.01 * index,
                "stability_score": 0.96,
                "point_coords": [[xs.mean(), ys.mean()]],
            }
        )
    return ImageProposals.from_amg_records(records, height, width)


class BoxGenerator:
    """Known proposals: the whole image, then one box per ``boxes`` entry (clipped to the image).

    Records the images it was given, so tests can check what the runner fed it.
    """

    def __init__(self, boxes=(), fail_on_shape=None):
        self.boxes = list(boxes)
        self.fail_on_shape = fail_on_shape
        self.seen: list[np.ndarray] = []

    def __call__(self, image: np.ndarray) -> ImageProposals:
        self.seen.append(image)
        height, width = image.shape[:2]
        if self.fail_on_shape is not None and (height, width) == self.fail_on_shape:
            raise RuntimeError("out of memory (simulated)")
        masks = [np.ones((height, width), bool)]
        for x0, y0, x1, y1 in self.boxes:
            box = (x0, y0, min(x1, width - 1), min(y1, height - 1))
            if box[0] < width and box[1] < height:
                masks.append(box_mask(height, width, box))
        return proposals_from_masks(masks)


def write_image(path, height=24, width=32, seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def store_content(path) -> dict:
    """Everything a store holds, for equality checks between runs."""
    reader = ProposalReader(path)
    content = {}
    for name, p in reader.items():
        content[name] = (
            p.height,
            p.width,
            tuple(p.rle_counts),
            p.area.tolist(),
            p.bbox.tolist(),
            p.predicted_iou.tolist(),
            p.stability_score.tolist(),
            p.point_coords.tolist(),
        )
    content["__failures__"] = sorted(reader.failures.items())
    reader.close()
    return content
