"""Evaluation overlays: enlarged small pictures, pixel-exact masks, both panels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.evaluation import MIN_PANEL_SIDE, save_visualization


def test_small_picture_is_enlarged_by_a_whole_factor_with_exact_masks(tmp_path):
    image = np.full((48, 64, 3), 100, np.uint8)
    pred = np.zeros((48, 64), bool)
    pred[10:20, 10:20] = True
    gt = np.zeros((48, 64), np.uint8)
    gt[30:40, 40:50] = 1
    gt[0, 0] = 255  # ignored pixels are not drawn as ground truth
    path = tmp_path / "vis" / "a.png"
    save_visualization(path, image, pred, gt, "IoU 0.00 | the red one")

    picture = np.asarray(Image.open(path).convert("RGB"))
    factor = -(-MIN_PANEL_SIDE // 48)
    assert factor == 6
    panel_height, panel_width = 48 * factor, 64 * factor
    assert picture.shape[1] == 2 * panel_width
    band = picture.shape[0] - panel_height
    assert band > 0
    assert (picture[:band] < 128).any()
    left, right = picture[band:, :panel_width], picture[band:, panel_width:]
    inside = (15 * factor, 15 * factor)
    assert tuple(left[inside]) == (177, 50, 50)  # 50% red over grey, inside the prediction
    assert tuple(right[inside]) == (100, 100, 100)
    gt_inside = (35 * factor, 45 * factor)
    assert tuple(right[gt_inside]) == (50, 150, 50)  # 50% green
    assert tuple(right[factor // 2, factor // 2]) == (100, 100, 100)  # ignore pixel
    # The enlarged prediction keeps its exact extent: red-tinted pixels span 10 x 6 = 60 rows.
    rows = np.flatnonzero((left[:, :, 0] > left[:, :, 1] + 40).any(axis=1))
    assert rows.min() == 10 * factor
    assert rows.max() == 20 * factor - 1


def test_large_picture_keeps_its_size(tmp_path):
    image = np.zeros((300, 400, 3), np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    save_visualization(tmp_path / "b.png", image, mask.astype(bool), mask, "q")
    assert Image.open(tmp_path / "b.png").width == 800
