"""Ground-truth masks from COCO-format segmentations (polygons, RLE) and mask PNGs.

Used by the refer_seg (and gRefCOCO), part (PACO-LVIS, PASCAL-Part) and LLM-Seg40K loaders as
the ``masks`` callable of a :class:`~utils.data.samples.SegmentationRecord` (through
``functools.partial``, so records stay picklable). Each checks that the annotation's size is the
image's size, since a mismatch (e.g. an EXIF-rotated photo) would silently misplace every target.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from utils.annotations import annotation_mask
from utils.text_files import DatasetFormatError


def _check_size(source, ann_size: tuple[int, int], height: int, width: int) -> None:
    if tuple(int(v) for v in ann_size) != (height, width):
        raise DatasetFormatError(
            f"{source}: annotated as {ann_size[0]}x{ann_size[1]} but the image is {height}x{width}"
        )


def annotation_masks(
    segmentations: list, ann_size: tuple[int, int], source, height: int, width: int
) -> np.ndarray:
    """``(R, H, W)`` uint8 {0, 1} masks of COCO ``segmentation`` fields annotated at ``ann_size``.

    Polygons (or refCLEF's list of RLEs) of one annotation are merged (union, not upstream's
    sum, which could give 2 where they overlap); an empty segmentation gives an empty mask.
    """
    _check_size(source, ann_size, height, width)
    try:
        masks = [annotation_mask({"segmentation": s}, height, width) for s in segmentations]
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise DatasetFormatError(
            f"{source}: a segmentation is neither polygons nor COCO RLE ({error!r})"
        ) from None
    return np.stack(masks)


def union_masks(
    rows: list[list], ann_size: tuple[int, int], source, height: int, width: int
) -> np.ndarray:
    """``(R, H, W)`` uint8 {0, 1}: row ``r`` is the union of the COCO ``segmentation`` fields in
    ``rows[r]`` (a referring target: one annotation for refCOCO, several for gRefCOCO's
    multi-target refs, none for a no-target ref, which gives an all-zero mask).

    Raises ``DatasetFormatError`` naming ``source`` for a size mismatch or a bad segmentation.
    """
    _check_size(source, ann_size, height, width)
    masks = np.zeros((len(rows), height, width), np.uint8)
    for r, segmentations in enumerate(rows):
        if segmentations:
            masks[r] = annotation_masks(segmentations, ann_size, source, height, width).max(0)
    return masks


def rle_mask(rle: dict | list, source) -> np.ndarray:
    """``(H, W)`` uint8 {0, 1} mask of a COCO RLE (``{"size": [H, W], "counts": str|bytes|list}``)
    or a list of them (merged)."""
    rles = rle if isinstance(rle, list) else [rle]
    try:
        decoded = []
        for item in rles:
            height, width = (int(v) for v in item["size"])
            counts = item["counts"]
            if isinstance(counts, list):  # uncompressed RLE
                item = mask_utils.frPyObjects(item, height, width)
            elif isinstance(counts, str):
                item = {"size": [height, width], "counts": counts.encode("ascii")}
            decoded.append(mask_utils.decode(item).astype(np.uint8))
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetFormatError(f"{source}: not a COCO RLE ({error!r})") from None
    return np.maximum.reduce(decoded)


def rle_masks(rle: dict | list, source, height: int, width: int) -> np.ndarray:
    """``(1, H, W)`` uint8 mask of a COCO RLE, checked against the image size."""
    mask = rle_mask(rle, source)
    _check_size(source, mask.shape, height, width)
    return mask[None]


def png_masks(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """``(1, H, W)`` uint8 mask from a PNG: any nonzero value (any channel) is foreground."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            # A palette PNG is judged by its colours, as upstream's grayscale read does.
            array = np.asarray(image.convert("RGB") if image.mode == "P" else image)
    except OSError as error:
        raise DatasetFormatError(f"{path}: unreadable mask PNG ({error})") from None
    if array.ndim == 3:  # colour masks: any colour channel; alpha is not a label
        array = (array[..., :1] if array.shape[2] == 2 else array[..., :3]).max(axis=2)
    _check_size(path, array.shape, height, width)
    return (array > 0).astype(np.uint8)[None]
