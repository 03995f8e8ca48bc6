import cv2
import numpy as np
import pytest

from prepare_datasets.prepare_reason_seg import ReasonSegPrepareConfig
from prepare_datasets.proposals.runner import make_generator
from prepare_datasets.proposals.weightfree import WeightFreeGenerator
from utils.masks import mask_iou_iop


def scene():
    """Four flat shapes over a noisy texture (two of them touching), and their masks."""
    rng = np.random.default_rng(0)
    image = rng.normal(120, 25, (96, 128, 3)).clip(0, 255).astype(np.uint8)
    objects = np.zeros((4, 96, 128), np.uint8)
    cv2.circle(objects[0], (30, 30), 16, 1, -1)
    cv2.rectangle(objects[1], (64, 50), (100, 80), 1, -1)
    cv2.fillPoly(objects[2], [np.array([[10, 90], [40, 60], [50, 90]], np.int32)], 1)
    cv2.rectangle(objects[3], (101, 55), (115, 75), 1, -1)  # touches the green rectangle
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (240, 220, 30)]
    for mask, colour in zip(objects, colours):
        image[mask.astype(bool)] = colour
    return image, objects.astype(bool)


def test_objects_are_found_among_distractors():
    image, objects = scene()
    proposals = WeightFreeGenerator()(image)
    masks = proposals.decode()
    assert masks.shape[1:] == (96, 128)
    assert np.array_equal(masks.reshape(len(masks), -1).sum(1), proposals.area)
    iou, iop = mask_iou_iop(masks, objects)
    assert (iou.max(dim=1).values > 0.9).all()  # every object has a near-exact proposal
    # Distractors: parts (inside an object, IoU well below 1) and merges (an object plus more).
    assert ((iop > 0.95) & (iou < 0.7)).any()
    assert ((iou > 0.2) & (iou < 0.8) & (iop < 0.9)).any()
    assert len(proposals) > 2 * len(objects)
    # SAM-like metadata: boxes x y w h with w = x_max - x_min, prompt points inside their masks.
    first = masks[0]
    ys, xs = np.nonzero(first)
    assert proposals.bbox[0].tolist() == [
        xs.min(),
        ys.min(),
        xs.max() - xs.min(),
        ys.max() - ys.min(),
    ]
    for mask, (x, y) in zip(masks, proposals.point_coords.astype(int)):
        assert mask[y, x]
    assert ((proposals.predicted_iou > 0) & (proposals.predicted_iou <= 1)).all()
    assert ((proposals.stability_score >= 0) & (proposals.stability_score <= 1)).all()


def test_deterministic_and_handles_tiny_images():
    image, _ = scene()
    a, b = WeightFreeGenerator()(image), WeightFreeGenerator()(image)
    assert a.rle_counts == b.rle_counts
    for shape in ((8, 8, 3), (1, 1, 3), (3, 50, 3)):
        pixels = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)
        result = WeightFreeGenerator()(pixels)
        assert (result.height, result.width) == shape[:2]
        assert len(result) >= 1
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB image"):
        WeightFreeGenerator()(np.zeros((4, 4), np.uint8))


def test_backend_flag_builds_it_without_sam():
    config = ReasonSegPrepareConfig(backend="weightfree", min_mask_region_area=50)
    generator = make_generator(config)
    assert isinstance(generator, WeightFreeGenerator)
    assert generator.min_region_area == 50
