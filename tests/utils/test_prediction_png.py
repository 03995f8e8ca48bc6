"""Prediction PNGs of every kind read the same way: colour channels, alpha, palette, 16 bit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils.prediction_png import PredictionReading, read_prediction_png
from utils.text_files import DatasetFormatError

MASK = np.zeros((4, 6), bool)
MASK[1:3, 2:5] = True


def _save(array, path, mode=None, **info):
    image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    image.save(path, **info)
    return path


def test_every_png_kind_gives_the_same_mask(tmp_path):
    grey = _save((MASK * 255).astype(np.uint8), tmp_path / "grey.png")
    deep = _save((MASK * 40000).astype(np.uint16), tmp_path / "deep.png")
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[MASK] = (0, 0, 9)  # a dim blue mask: any nonzero colour channel
    colour = _save(rgb, tmp_path / "rgb.png")
    # opaque black background in RGBA: alpha 255 everywhere, colour only on the mask
    rgba = np.dstack([rgb, np.full((4, 6), 255, np.uint8)])
    opaque = _save(rgba, tmp_path / "opaque.png")
    # white but fully transparent outside the mask: alpha 0 is background
    clear = np.dstack([np.full((4, 6, 3), 255, np.uint8), (MASK * 255).astype(np.uint8)])
    transparent = _save(clear, tmp_path / "transparent.png")
    # a palette whose index 0 is white: foreground is by index, not by colour
    palette = Image.fromarray(MASK.astype(np.uint8), "P")
    palette.putpalette([255, 255, 255, 200, 0, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    for path in (grey, deep, colour, opaque, transparent, tmp_path / "palette.png"):
        np.testing.assert_array_equal(read_prediction_png(path, (4, 6)), MASK, err_msg=path.name)


def test_other_size_and_soft_masks_are_errors_unless_asked(tmp_path):
    small = _save((MASK[::2, ::2] * 255).astype(np.uint8), tmp_path / "small.png")
    with pytest.raises(DatasetFormatError, match="small.png: 3x2 but its image is 6x4.*--resize"):
        read_prediction_png(small, (4, 6))
    resized = read_prediction_png(small, (4, 6), PredictionReading(resize=True))
    assert resized.shape == (4, 6)
    soft = _save(
        np.tile(np.array([0, 60, 120, 200, 250, 255], np.uint8), (4, 1)), tmp_path / "s.png"
    )
    with pytest.raises(DatasetFormatError, match="s.png: holds 6 different values.*--pred_thr"):
        read_prediction_png(soft, (4, 6))
    kept = read_prediction_png(soft, (4, 6), PredictionReading(threshold=0.5))
    np.testing.assert_array_equal(kept[0], [0, 0, 0, 1, 1, 1])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match="bad.png: unreadable PNG"):
        read_prediction_png(tmp_path / "bad.png", (4, 6))
