import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from utils.masks import (
    binary_ground_truth,
    decode_rles,
    encode_rles,
    labelme_to_mask,
    longest_side_size,
    mask_iou_iop,
    pad_to_square,
    proposal_targets,
    proposal_weight_maps,
    resize_longest_side,
    resize_nearest,
)


def test_rle_round_trip_matches_pycocotools_per_mask():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 7, 9)) > 0.5
    counts = encode_rles(masks)
    for mask, c in zip(masks, counts):
        assert c == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
    assert np.array_equal(decode_rles(counts, 7, 9), masks)
    assert np.array_equal(decode_rles([c.decode() for c in counts], 7, 9), masks)
    assert encode_rles(np.zeros((0, 3, 3), bool)) == []
    assert decode_rles([], 3, 4).shape == (0, 3, 4)


def test_labelme_smaller_polygons_overwrite_larger_and_flags_are_skipped():
    big = {"label": "target", "points": [[0, 0], [9, 0], [9, 9], [0, 9]]}
    hole = {"label": "ignore", "points": [[3, 3], [5, 3], [5, 5], [3, 5]]}
    flag = {"label": "flag", "points": [[0, 0], [1, 0], [1, 1]]}
    # The small polygon comes first in the file but is still drawn last.
    label_map = labelme_to_mask([hole, big, flag], 12, 12)
    expected = np.zeros((12, 12), np.uint8)
    expected[0:10, 0:10] = 1
    expected[3:6, 3:6] = 255
    assert np.array_equal(label_map, expected)


def test_longest_side_and_resize():
    assert longest_side_size(600, 8000) == (76, 1024)
    assert longest_side_size(2048, 1000) == (1024, 500)
    assert longest_side_size(1024, 700) == (1024, 700)
    assert longest_side_size(8, 8) == (8, 8)
    image = np.full((40, 3000, 3), 7, np.uint8)
    assert resize_longest_side(image).shape == (13, 1024, 3)
    small = np.zeros((5, 6, 3), np.uint8)
    assert resize_longest_side(small) is small


def test_resize_nearest_aligns_pixel_centres():
    grid = np.arange(16).reshape(4, 4)
    assert np.array_equal(resize_nearest(grid, (2, 2)), [[5, 7], [13, 15]])
    up = resize_nearest(np.array([[1, 2], [3, 4]]), (4, 4))
    assert np.array_equal(up, np.kron([[1, 2], [3, 4]], np.ones((2, 2), int)))
    stack = resize_nearest(np.stack([grid, grid + 100]), (2, 2))
    assert stack.shape == (2, 2, 2)
    assert stack[1, 0, 0] == 105


def test_pad_and_weight_maps():
    mask = torch.ones(1, 2, 4, dtype=torch.bool)
    square = pad_to_square(mask.float())
    assert square.shape == (1, 4, 4)
    assert square[0, :2].eq(1).all()
    assert square[0, 2:].eq(0).all()
    maps = proposal_weight_maps(mask, size=2, antialias=False)
    assert maps.dtype == torch.float32
    assert torch.allclose(maps, torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]))
    tall = np.zeros((1, 4, 2), bool)
    tall[0, :, 0] = True
    maps = proposal_weight_maps(tall, size=4, antialias=True)
    assert torch.allclose(maps[0, :, 0], torch.ones(4))
    assert maps[0, :, 1:].abs().max() == 0
    assert proposal_weight_maps(np.zeros((0, 3, 5), bool)).shape == (0, 256, 256)


def test_iou_iop_by_hand():
    proposals = np.zeros((3, 4, 4), bool)
    proposals[0, :2, :2] = True  # 4 px
    proposals[1, :, :] = True  # 16 px
    # proposal 2 is empty
    gt = np.zeros((2, 4, 4), bool)
    gt[0, :2, :] = True  # 8 px, contains proposal 0
    iou, iop = mask_iou_iop(proposals, gt)
    assert iou.shape == (2, 3)
    assert iou.dtype == torch.float32
    assert torch.allclose(iou, torch.tensor([[4 / 8, 8 / 16, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.allclose(iop, torch.tensor([[1.0, 8 / 16, 0.0], [0.0, 0.0, 0.0]]))


def test_targets_resize_ground_truth_and_treat_ignore_as_background():
    proposals = np.zeros((1, 2, 2), bool)
    proposals[0, 0, :] = True
    gt = np.zeros((1, 4, 4), np.uint8)
    gt[0, :2, :2] = 1  # top-left quadrant -> pixel (0, 0) at 2x2
    gt[0, :2, 2:] = 255  # ignored -> background
    iou, iop = proposal_targets(proposals, gt)
    assert torch.allclose(iou, torch.tensor([[0.5]]))
    assert torch.allclose(iop, torch.tensor([[0.5]]))
    iou2, _ = proposal_targets(proposals, gt[0])  # a single (H, W) mask is one row
    assert iou2.shape == (1, 1)


def test_non_binary_ground_truth_is_rejected():
    with pytest.raises(ValueError, match=r"ground truth: expected values in \{0, 1, 255\}.*3"):
        proposal_targets(np.zeros((1, 2, 2), bool), np.full((1, 2, 2), 3, np.uint8))
    assert binary_ground_truth(np.array([0, 1, 255])).tolist() == [False, True, False]
