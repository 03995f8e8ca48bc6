"""Proposal store: SAM "segment everything" masks of a dataset split, on disk and in memory.

`ImageProposals` is the in-memory form of one image's proposals, shared by the generators
(`prepare_datasets/proposals.py`) and the store/readers below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class ImageProposals:
    """SAM-everything proposals of one image, at the resolution they were generated (<=1024 side).

    Attributes:
        height, width: size of the masks (the image after shrinking its longest side to 1024).
        rle_counts: K COCO compressed RLE ``counts`` bytes, each of a ``(height, width)`` mask.
        area: ``(K,)`` int64 pixel counts.
        bbox: ``(K, 4)`` float32 boxes, x y w h.
        predicted_iou: ``(K,)`` float32 SAM predicted IoU.
        stability_score: ``(K,)`` float32 SAM stability score.
        point_coords: ``(K, 2)`` float32 x y of the prompt point that produced each mask.
    """

    height: int
    width: int
    rle_counts: list[bytes]
    area: np.ndarray
    bbox: np.ndarray
    predicted_iou: np.ndarray
    stability_score: np.ndarray
    point_coords: np.ndarray

    def __post_init__(self) -> None:
        num = len(self.rle_counts)
        self.area = np.asarray(self.area, dtype=np.int64).reshape(num)
        self.bbox = np.asarray(self.bbox, dtype=np.float32).reshape(num, 4)
        self.predicted_iou = np.asarray(self.predicted_iou, dtype=np.float32).reshape(num)
        self.stability_score = np.asarray(self.stability_score, dtype=np.float32).reshape(num)
        self.point_coords = np.asarray(self.point_coords, dtype=np.float32).reshape(num, 2)

    def __len__(self) -> int:
        return len(self.rle_counts)

    def rles(self, indices=None) -> list[dict]:
        """pycocotools RLE dicts ``{"size": [h, w], "counts": bytes}`` of the chosen proposals."""
        chosen = range(len(self)) if indices is None else np.asarray(indices).reshape(-1)
        size = [int(self.height), int(self.width)]
        return [{"size": size, "counts": self.rle_counts[int(i)]} for i in chosen]

    def decode(self, indices=None) -> np.ndarray:
        """Decode masks to a ``(K', height, width)`` bool array (all K, or ``indices`` in order)."""
        rles = self.rles(indices)
        if not rles:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool))

    def select(self, indices) -> ImageProposals:
        """A new `ImageProposals` holding only ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageProposals(
            height=self.height,
            width=self.width,
            rle_counts=[self.rle_counts[int(i)] for i in idx],
            area=self.area[idx],
            bbox=self.bbox[idx],
            predicted_iou=self.predicted_iou[idx],
            stability_score=self.stability_score[idx],
            point_coords=self.point_coords[idx],
        )

    @classmethod
    def empty(cls, height: int, width: int) -> ImageProposals:
        """No proposals for an image of ``(height, width)``."""
        return cls.from_amg_records([], height, width)

    @classmethod
    def from_amg_records(cls, records: list[dict], height: int, width: int) -> ImageProposals:
        """Build from `SamAutomaticMaskGenerator` records (``binary_mask`` or ``coco_rle`` output).

        Each record has ``segmentation`` (an ``(H, W)`` bool array or a COCO RLE dict whose counts
        may be str or bytes), ``area``, ``bbox`` (xywh), ``predicted_iou``, ``stability_score`` and
        ``point_coords`` (``[[x, y]]``).
        """
        counts = []
        for index, record in enumerate(records):
            seg = record["segmentation"]
            if isinstance(seg, dict):
                if list(seg["size"]) != [height, width]:
                    raise ValueError(
                        f"record {index}: RLE size {seg['size']} != image size {[height, width]}"
                    )
                raw = seg["counts"]
                counts.append(raw.encode("ascii") if isinstance(raw, str) else bytes(raw))
            else:
                seg = np.asarray(seg, dtype=bool)
                if seg.shape != (height, width):
                    raise ValueError(
                        f"record {index}: mask shape {seg.shape} != image size {(height, width)}"
                    )
                counts.append(mask_utils.encode(np.asfortranarray(seg.astype(np.uint8)))["counts"])
        num = len(records)
        return cls(
            height=int(height),
            width=int(width),
            rle_counts=counts,
            area=np.array([r["area"] for r in records], dtype=np.int64).reshape(num),
            bbox=np.array([r["bbox"] for r in records], dtype=np.float32).reshape(num, 4),
            predicted_iou=np.array([r["predicted_iou"] for r in records], dtype=np.float32),
            stability_score=np.array([r["stability_score"] for r in records], dtype=np.float32),
            point_coords=np.array(
                [np.asarray(r["point_coords"], dtype=np.float32).reshape(-1)[:2] for r in records],
                dtype=np.float32,
            ).reshape(num, 2),
        )
