"""Reading another method's mask PNGs (``eval.py --pred_dir``) the same way everywhere.

What is foreground, by PNG kind: a palette image by its index (index 0 = background, whatever
colour the palette gives it); a grey image (8 or 16 bit) by a nonzero value; a colour image by a
nonzero colour channel; alpha 0 is background (an opaque RGBA PNG with a black background is
not all foreground). A prediction must have its image's size and be binary (at most two
values); a resized or soft mask is an error naming the file, unless asked for:
``--resize_preds`` resizes (nearest) to the image, ``--pred_threshold T`` keeps values above
``T`` times the format's maximum (255, or 65535 for 16 bit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.text_files import DatasetFormatError


@dataclass(frozen=True)
class PredictionReading:
    """How lenient :func:`read_prediction_png` is (default: strict)."""

    threshold: float | None = None  # soft masks: foreground above threshold x the maximum
    resize: bool = False  # another size: resized nearest to the image


STRICT = PredictionReading()


def _values(path: Path) -> tuple[np.ndarray, int]:
    """``(h, w)`` values that are zero on background, and the format's maximum value."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode == "P":  # by index: the palette's colour of index 0 is irrelevant
                if "transparency" in image.info:
                    image = image.convert("RGBA")
                    mode = "RGBA"
                else:
                    return np.asarray(image, dtype=np.int64), 255
            if mode in ("1", "L"):
                return np.asarray(image, dtype=np.int64) * (255 if mode == "1" else 1), 255
            if mode.startswith("I"):  # 16/32-bit grey
                array = np.asarray(image, dtype=np.int64)
                return array, 65535 if array.max(initial=0) <= 65535 else int(array.max())
            if mode not in ("RGB", "RGBA", "LA"):
                image = image.convert("RGBA")
                mode = "RGBA"
            array = np.asarray(image, dtype=np.int64)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DatasetFormatError(f"{path}: unreadable PNG ({error})") from None
    if mode == "LA":
        colour, alpha = array[..., 0], array[..., 1]
    else:
        colour = array[..., :3].max(axis=2)
        alpha = array[..., 3] if mode == "RGBA" else None
    if alpha is not None:
        colour = np.where(alpha > 0, colour, 0)
    return colour, 255


def read_prediction_png(
    path: str | os.PathLike,
    size: tuple[int, int],
    reading: PredictionReading = STRICT,
) -> np.ndarray:
    """The ``(H, W)`` uint8 0/1 mask of a prediction PNG for an image of ``size`` ``(H, W)``.

    Raises:
        DatasetFormatError: unreadable; another size without ``reading.resize``; more than two
            values without ``reading.threshold``. The message names the file and the flag.
    """
    path = Path(path)
    values, maximum = _values(path)
    if reading.threshold is not None:
        mask = values > reading.threshold * maximum
    else:
        distinct = np.unique(values)
        if len(distinct) > 2:
            raise DatasetFormatError(
                f"{path}: holds {len(distinct)} different values, not a binary mask (a soft "
                "mask?); give --pred_threshold T to keep values above T x the maximum"
            )
        mask = values > 0
    mask = mask.astype(np.uint8)
    if mask.shape != tuple(size):
        if not reading.resize:
            raise DatasetFormatError(
                f"{path}: {mask.shape[1]}x{mask.shape[0]} but its image is {size[1]}x{size[0]}; "
                "give --resize_preds to resize it (nearest)"
            )
        mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return mask
