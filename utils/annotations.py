"""Reading the datasets' released annotation files, for the loaders and the prepare scripts alike.

Which images a folder holds, COCO-format ``instances.json`` (images, and masks from polygons, RLE
or refCLEF's lists of RLEs), the refer ``refs(*).p`` pickles (read without executing code), the
proposal-store key of a refCLEF image, and an image's displayed size. Errors name the file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from utils.text_files import load_dataset_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_image_files(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """Image files matching ``pattern`` (a glob relative to ``folder``), sorted.

    Raises ``FileNotFoundError`` naming the folder when it does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (check --dataset_dir)")
    return sorted(
        p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it exists, else ``FileNotFoundError`` saying what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path} (check --dataset_dir)")
    return path


def load_json(path: str | os.PathLike, what: str):
    """Parse a released JSON file (UTF-8, or cp1252 as some releases are), errors naming it.

    Raises:
        FileNotFoundError: no such file (``what`` says what it should hold).
        DatasetFormatError: not UTF-8/cp1252 text, or invalid JSON.
    """
    return load_dataset_json(require_file(path, what))


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler for data-only pickles (refer ``refs(*).p``): no classes or functions at all."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: data-only pickle expected")


def load_refs_pickle(path: str | os.PathLike) -> list[dict]:
    """Load a refer ``refs(unc).p`` file (a list of dicts) without executing any code."""
    path = require_file(path, "refer annotations")
    with open(path, "rb") as handle:
        refs = _PlainDataUnpickler(handle, encoding="latin1").load()
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def coco_images(instances: dict, source: str) -> dict[int, dict]:
    """``image id -> image record`` of a COCO-format annotation dict."""
    try:
        return {int(image["id"]): image for image in instances["images"]}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{source}: not a COCO-format file (missing {error})") from None


def annotation_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """``(H, W)`` uint8 {0, 1} mask of a COCO annotation's ``segmentation``.

    Accepts what the released files hold: a list of polygons (COCO), one RLE dict (compressed
    ``counts`` as str or bytes, or uncompressed as a list), or a *list of RLE dicts* (refCLEF's
    ``instances.json``; the refer API decodes each and sums them, here they are merged as a
    union so overlaps stay 1).
    """
    segmentation = annotation.get("segmentation")
    if not segmentation:
        return np.zeros((height, width), np.uint8)
    if isinstance(segmentation, dict):
        return _decode_rle(segmentation, height, width)
    if all(isinstance(part, dict) for part in segmentation):
        return np.maximum.reduce([_decode_rle(part, height, width) for part in segmentation])
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    return mask_utils.decode(rle).astype(np.uint8)


def _decode_rle(rle: dict, height: int, width: int) -> np.ndarray:
    """``(H, W)`` uint8 mask of one COCO RLE dict (compressed str/bytes or uncompressed list)."""
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects(rle, height, width)
    elif isinstance(counts, str):
        rle = {"size": rle["size"], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(np.uint8)


def oriented_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image as displayed (EXIF orientation applied), header only."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def saiapr_key(file_name: str) -> str:
    """refCLEF's proposal-store key ``NN/images/x.jpg`` from any path ending in it."""
    parts = Path(file_name).parts
    return "/".join(parts[-3:])
