"""Our SAM-everything generator against segment-anything's, plus its building blocks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor

from model.backbones.sam import build_sam
from model.tiny import tiny_sam_architecture
from prepare_datasets.proposals.batched_mask_decoder import BatchedMaskDecoder
from prepare_datasets.proposals.generator import (
    FastSamGenerator,
    GeneratorConfig,
    ReferenceSamGenerator,
    build_generator,
    point_grid,
)
from prepare_datasets.proposals.postprocess import (
    encode_masks,
    masks_to_boxes_xyxy,
    remove_small_regions,
    stability_scores,
    upscale_logits,
)
from utils.config import parse_config
from utils.proposal_store import ImageProposals

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tiny_sam():
    """Tiny random SAM (image size 256) whose mask logits are scaled x50.

    Random logits stay within +-0.2, so every stability score would be 0 at SAM's +-1 offset;
    scaled, they spread over (0, 1) and the stability filter has something to decide.
    """
    torch.manual_seed(0)
    sam = build_sam(tiny_sam_architecture())
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(50.0)
            mlp.layers[-1].bias.mul_(50.0)
    return sam


def shapes_image(height: int, width: int, seed: int) -> np.ndarray:
    """Flat circles and boxes on a gradient, ``(H, W, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(60, 180, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    for index in range(6):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(min(height, width) // 10, min(height, width) // 3))
        if index % 2:
            cv2.circle(image, (x, y), size, colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + size, y + size), colour, -1)
    return image


# 256 x 256 (no padding), 200 x 256 (padded encoder input), 96 x 128 (smaller than the encoder
# input, so SAM's second interpolation back to the image size runs).
IMAGES = [(256, 256, 0), (200, 256, 1), (96, 128, 2)]


def assert_same_proposals(ours: ImageProposals, ref: ImageProposals) -> None:
    assert (ours.height, ours.width) == (ref.height, ref.width)
    assert len(ours) == len(ref) > 0
    ours_masks, ref_masks = ours.decode(), ref.decode()
    # Reassociated float32 sums may move a logit lying within ~1e-6 of 0 across it: a pixel
    # here and there, never more.
    identical = (ours_masks == ref_masks).all(axis=(1, 2))
    assert identical.mean() >= 0.95
    assert (ours_masks != ref_masks).mean() < 1e-4
    ious = np.diag(np.asarray(mask_utils.iou(ours.rles(), ref.rles(), [0] * len(ref))))
    assert ious.min() >= 0.99
    np.testing.assert_allclose(ours.predicted_iou, ref.predicted_iou, atol=1e-5)
    np.testing.assert_allclose(ours.stability_score, ref.stability_score, atol=1e-3)
    np.testing.assert_array_equal(ours.point_coords, ref.point_coords)
    np.testing.assert_array_equal(ours.bbox[identical], ref.bbox[identical])
    np.testing.assert_array_equal(ours.area[identical], ref.area[identical])


@pytest.mark.parametrize(("height", "width", "seed"), IMAGES)
def test_equals_reference_with_thresholds_off(tiny_sam, height, width, seed):
    # Thresholds 0 switch the IoU and stability filters off (as in the reference); with NMS off
    # too, all 8 x 8 x 3 masks are compared, in order.
    config = GeneratorConfig(
        points_per_side=8,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        device="cpu",
    )
    image = shapes_image(height, width, seed)
    ours = FastSamGenerator(tiny_sam, config)(image)
    ref = ReferenceSamGenerator(tiny_sam, config)(image)
    assert len(ref) == 8 * 8 * 3
    assert_same_proposals(ours, ref)


def between_quantile(values: np.ndarray, fraction: float) -> float:
    """A threshold halfway between two sorted values, about ``fraction`` of them below it.

    Halfway, so no score sits within float rounding of the threshold.
    """
    ordered = np.sort(values[np.isfinite(values)])
    index = int(fraction * (len(ordered) - 1))
    return float(ordered[index] + ordered[index + 1]) / 2


def median_thresholds(sam, image: np.ndarray, points_per_side: int, **settings) -> GeneratorConfig:
    """Settings whose IoU and stability thresholds each drop about half of this image's masks."""
    everything = GeneratorConfig(
        points_per_side=points_per_side,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
    )
    scores = FastSamGenerator(sam, everything)(image)
    iou_thresh = between_quantile(scores.predicted_iou, 0.5)
    stable = scores.stability_score[scores.predicted_iou > iou_thresh]
    return GeneratorConfig(
        points_per_side=points_per_side,
        pred_iou_thresh=iou_thresh,
        stability_score_thresh=between_quantile(stable, 0.5),
        **settings,
    )


@pytest.mark.parametrize(("height", "width", "seed"), IMAGES)
def test_equals_reference_with_filters_and_nms(tiny_sam, height, width, seed):
    image = shapes_image(height, width, seed)
    config = median_thresholds(tiny_sam, image, 8, box_nms_thresh=0.9)
    ours = FastSamGenerator(tiny_sam, config)(image)
    ref = ReferenceSamGenerator(tiny_sam, config)(image)
    assert 0 < len(ref) < 8 * 8 * 3 // 4
    assert_same_proposals(ours, ref)
    assert (ours.predicted_iou > config.pred_iou_thresh).all()
    assert (ours.stability_score >= config.stability_score_thresh).all()
    assert (np.diff(ours.predicted_iou) <= 0).all()  # NMS order: best predicted IoU first


def test_equals_reference_with_small_region_cleanup(tiny_sam):
    image = shapes_image(200, 256, 3)
    config = median_thresholds(tiny_sam, image, 6, box_nms_thresh=0.95, min_mask_region_area=40)
    ours = FastSamGenerator(tiny_sam, config)(image)
    assert_same_proposals(ours, ReferenceSamGenerator(tiny_sam, config)(image))
    config.min_mask_region_area = 0
    raw = FastSamGenerator(tiny_sam, config)(image)
    assert len(raw) != len(ours) or not np.array_equal(raw.area, ours.area)  # it did clean up


def test_cpu_thread_pool_gives_the_same_result(tiny_sam):
    # With several torch threads, blocks of prompts run in parallel on single-threaded ops.
    config = GeneratorConfig(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    image = shapes_image(200, 256, 9)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = FastSamGenerator(tiny_sam, config)(image)
        torch.set_num_threads(2)
        pooled = FastSamGenerator(tiny_sam, config)(image)
        assert torch.get_num_threads() == 2  # restored after the pool
    finally:
        torch.set_num_threads(previous)
    assert pooled.rle_counts == sequential.rle_counts
    np.testing.assert_array_equal(pooled.predicted_iou, sequential.predicted_iou)
    np.testing.assert_array_equal(pooled.point_coords, sequential.point_coords)


def test_record_fields_are_consistent(tiny_sam):
    config = GeneratorConfig(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.5)
    proposals = FastSamGenerator(tiny_sam, config)(shapes_image(96, 128, 4))
    masks = proposals.decode()
    assert masks.shape == (len(proposals), 96, 128)
    assert len(proposals) > 0
    assert proposals.area.dtype == np.int64
    assert proposals.bbox.dtype == np.float32
    np.testing.assert_array_equal(proposals.area, masks.sum(axis=(1, 2)))
    for mask, (x, y, w, h) in zip(masks, proposals.bbox):
        ys, xs = np.nonzero(mask)
        # SAM's xywh: w and h are max - min (one less than the pixel extent).
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min())
    grid = point_grid(6, 96, 128)  # every prompt point is a cell centre of the 6 x 6 grid
    assert all(np.abs(grid - p).max(axis=1).min() < 1e-4 for p in proposals.point_coords)
    assert (proposals.stability_score >= 0.5).all()


def test_tiny_image_gives_masks_of_its_size(tiny_sam):
    # The encoder sees the 8 x 8 image enlarged to 256; masks come back at 8 x 8.
    config = GeneratorConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    proposals = FastSamGenerator(tiny_sam, config)(shapes_image(8, 8, 8))
    assert (proposals.height, proposals.width) == (8, 8)
    assert proposals.decode().shape == (len(proposals), 8, 8)
    assert len(proposals) > 0


def test_iou_filter_runs_before_mask_upscaling(tiny_sam, monkeypatch):
    calls = []
    original = BatchedMaskDecoder.mask_logits

    def counting(self, decoded, image, prompt_index, mask_tokens):
        calls.append(len(prompt_index))
        return original(self, decoded, image, prompt_index, mask_tokens)

    monkeypatch.setattr(BatchedMaskDecoder, "mask_logits", counting)
    image = shapes_image(96, 128, 5)
    nothing = FastSamGenerator(tiny_sam, GeneratorConfig(points_per_side=4, pred_iou_thresh=0.99))
    assert len(nothing(image)) == 0
    assert calls == []
    some = FastSamGenerator(tiny_sam, GeneratorConfig(points_per_side=4, pred_iou_thresh=0.03))
    some(image)
    assert 0 < sum(calls) < 16  # only prompts with a mask above the threshold were upscaled


def test_batched_decoder_matches_mask_decoder(tiny_sam):
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(shapes_image(200, 256, 6))
    # Two points per prompt (a positive and a negative one): the decoder takes any prompt tokens.
    coords = torch.rand(5, 2, 2, dtype=torch.float64) * 256
    labels = torch.tensor([[1, 0]] * 5, dtype=torch.int)
    with torch.inference_mode():
        sparse, dense = tiny_sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        ref_logits, ref_iou = tiny_sam.mask_decoder(
            predictor.features, tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
    decoder = BatchedMaskDecoder(tiny_sam)
    tokens = decoder.encode(predictor.features)
    decoded = decoder.decode(tokens, sparse)
    logits = decoder.mask_logits(decoded, tokens, torch.tensor([3, 0]), [1, 2, 3])
    assert logits.shape == (2, 3, 64, 64)
    torch.testing.assert_close(decoded.iou_predictions[:, 1:], ref_iou, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_logits[[3, 0]], atol=1e-4, rtol=1e-4)
    # Decoding only mask token 2 gives the same IoU predictions and that token's masks.
    only = decoder.decode(tokens, sparse, mask_tokens=[2])
    assert only.token_outputs.shape == (5, 2, 32)  # IoU token + mask token 2
    torch.testing.assert_close(only.iou_predictions, decoded.iou_predictions)
    logits = decoder.mask_logits(only, tokens, torch.arange(5), [2])
    torch.testing.assert_close(logits[:, 0], ref_logits[:, 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_upscale_logits_equals_sam_postprocess(tiny_sam, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # CPU kernels vectorise differently with one thread
    try:
        low_res = torch.randn(4, 3, 64, 64)
        expected = tiny_sam.postprocess_masks(low_res, (192, 256), (96, 128)).flatten(0, 1)
        subset = torch.tensor([0, 4, 5, 7, 11])  # any subset, e.g. the IoU survivors
        got = upscale_logits(low_res.flatten(0, 1)[subset], 256, (192, 256), (96, 128))
        assert torch.equal(got, expected[subset])  # bit-identical, not just close
        same = upscale_logits(low_res[0], 256, (200, 256), (200, 256))
        assert torch.equal(same, tiny_sam.postprocess_masks(low_res, (200, 256), (200, 256))[0])
    finally:
        torch.set_num_threads(previous)


def test_mask_helpers_by_hand():
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True  # rows 1-2, columns 2-4
    masks[1, 4, 0] = True
    boxes = masks_to_boxes_xyxy(masks)
    assert boxes.tolist() == [[2, 1, 4, 2], [0, 4, 0, 4], [0, 0, 0, 0]]  # empty -> zeros

    logits = torch.full((1, 2, 5), -3.0)
    logits[0, 0, :4] = torch.tensor([2.0, 1.5, 0.5, -0.5])  # 2 above +1, 4 above -1
    assert stability_scores(logits, 0.0, 1.0).tolist() == [0.5]
    assert torch.isnan(stability_scores(torch.full((1, 2, 2), -5.0), 0.0, 1.0)).all()

    counts = encode_masks(masks)
    decoded = mask_utils.decode([{"size": [5, 6], "counts": c} for c in counts])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks.numpy())


def test_small_region_cleanup_by_hand():
    mask = np.zeros((20, 20), bool)
    mask[2:15, 2:15] = True
    mask[7, 7] = False  # a 1-pixel hole
    mask[18, 18] = True  # a 1-pixel island
    big = np.zeros((20, 20), bool)
    big[0:20, 0:10] = True  # needs no change, overlaps the first one's box
    counts = encode_masks(torch.from_numpy(np.stack([mask, big])))
    keep, changed = remove_small_regions(counts, 20, 20, min_area=5, nms_threshold=0.99)
    assert keep.tolist() == [1, 0]  # unchanged masks win NMS ties
    new_counts, box, area = changed[0]
    cleaned = mask_utils.decode({"size": [20, 20], "counts": new_counts}).astype(bool)
    expected = np.zeros((20, 20), bool)
    expected[2:15, 2:15] = True
    assert np.array_equal(cleaned, expected)
    assert box.tolist() == [2, 2, 14, 14]
    assert area == 13 * 13


def test_build_generator_backends_and_errors(tiny_checkpoints):
    config = GeneratorConfig(backend="sam", model_type="vit_b", device="cpu", points_per_side=4)
    with pytest.raises(ValueError, match="--vision_pretrained"):
        build_generator(config)
    config.vision_pretrained = str(tiny_checkpoints.sam)
    generator = build_generator(config)
    assert isinstance(generator, FastSamGenerator)
    result = generator(shapes_image(64, 80, 7))
    assert isinstance(result, ImageProposals)
    assert (result.height, result.width) == (64, 80)
    config.backend = "sam_reference"
    assert isinstance(build_generator(config), ReferenceSamGenerator)
    config.backend = "sam2"
    with pytest.raises(ValueError, match="unknown proposal backend 'sam2'"):
        build_generator(config)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB image, got \(64, 80\) uint8"):
        generator(np.zeros((64, 80), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        generator(np.zeros((64, 80, 3), np.float32))


def test_weightfree_backend_is_built_lazily():
    from prepare_datasets.proposals.weightfree import WeightFreeGenerator

    assert isinstance(build_generator(GeneratorConfig(backend="weightfree")), WeightFreeGenerator)


def test_config_command_line_defaults_are_upstreams():
    config = parse_config(GeneratorConfig, ["--model_type", "vit_l", "--points-per-side", "16"])
    assert (config.model_type, config.points_per_side) == ("vit_l", 16)
    defaults = GeneratorConfig()
    assert (defaults.pred_iou_thresh, defaults.stability_score_thresh) == (0.88, 0.95)
    assert (defaults.box_nms_thresh, defaults.points_per_batch) == (0.7, 64)


def test_benchmark_smoke(capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_proposals", REPO / "benchmarks/bench_proposals.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_proposals"] = bench  # dataclasses look their module up here
    spec.loader.exec_module(bench)
    result = bench.main(["--model_type", "tiny", "--num_images", "1", "--points_per_side", "4"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (
        f"speedup={result['speedup']:.2f} matched={result['matched']:.4f} "
        f"encoder_ratio={result['encoder_ratio']:.2f}"
    )
    assert result["matched"] == 1.0
