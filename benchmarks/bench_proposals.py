"""Benchmark: our SAM-everything generator against ``segment_anything.SamAutomaticMaskGenerator``.

Both generators get the same SAM weights, the same images and the same settings (upstream's:
32 x 32 points, batches of 64 prompts, no crops; see below for the thresholds). For every image
the table gives the reference's seconds, ours, their ratio, the fraction of masks matched (a
reference mask matches one of ours, one to one, at mask IoU >= 0.99; unmatched masks on either
side count against it) and the seconds of the image encoder alone (one pass, measured inside our
run: the floor of any SAM-everything generator). Seconds are this process's CPU seconds (user +
system, all threads) by default, because other jobs on a shared machine change wall-clock times
by several times between two runs; ``--clock wall`` uses wall-clock seconds, and the other clock
is printed beside. The last line reads
``speedup=<reference / ours> matched=<fraction> encoder_ratio=<ours total / encoder>``.

No real SAM weights exist on this machine, so the model is a randomly initialised SAM of the
real size (``vit_b`` by default: the cost of the encoder pass, of the decoder's work per prompt
and of upsampling does not depend on the weight values). Two things a random
decoder gets unrealistically wrong are corrected so that the data-dependent work (how many masks
survive each filter, how many runs each RLE has) looks like real SAM's:

- *mask shape*: random transposed-convolution kernels paint a 4 x 4-pixel checkerboard into every
  mask (hundreds of thousands of RLE runs, which would make the reference's Python RLE loop, and
  so our speedup, look far larger than on real masks). The benchmark gives each kernel the same
  weights at its 4 sub-pixel offsets, so masks are smooth blobs following the image, and scales
  the mask logits x100 (random logits have a spread of ~0.1, SAM's ~10, so that the stability
  score's +-1 offset means what it means for SAM);
- *thresholds*: a random IoU head predicts ~0.0 +- 0.05, never SAM's 0.88, so
  ``pred_iou_thresh`` and ``stability_score_thresh`` are loosened to the quantiles that keep
  ``--iou_keep`` (35 %) of the masks and ``--stability_keep`` (60 %) of those (our guess at
  what SAM ViT-H keeps of the 3072 masks of a natural image at 0.88 / 0.95; the fewer survive,
  the larger our advantage). They are calibrated once, with our generator, on 64 prompts of the
  first image.

Images are synthetic (flat shapes on smooth backgrounds) in three sizes: 1024 x 768, 768 x 1024
(longest side 1024, as the prepare scripts feed) and 640 x 480 (a COCO-sized image, which adds
SAM's second interpolation back to the image size).

Box NMS is off by default (``--box_nms_thresh 1.0``): a random decoder's masks all span the
image, so at 0.7 a single mask would survive and the comparison would say little; NMS takes
milliseconds either way.

Usage: ``python benchmarks/bench_proposals.py [--model_type vit_b] [--num_images 1]
[--points_per_side 32] [--device cpu] [--clock cpu|wall] [--threads N]``; about 7 minutes per
image for vit_b on 2 CPU cores, 5 of them in the reference (``--points_per_side 16`` takes a
third of that, with a smaller ratio since the encoder pass weighs more).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.backbones.sam import SAM_PRESETS, build_sam  # noqa: E402
from model.tiny import tiny_sam_architecture  # noqa: E402
from prepare_datasets.proposals.generator import (  # noqa: E402
    MULTIMASK_TOKENS,
    FastSamGenerator,
    GeneratorConfig,
    ReferenceSamGenerator,
    point_grid,
)
from prepare_datasets.proposals.postprocess import stability_scores, upscale_logits  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.proposal_store import ImageProposals  # noqa: E402

# "tiny" (image size 256) only serves the benchmark's own smoke test.
MODEL_SIZES = {
    "tiny": tiny_sam_architecture,
    **{k: (lambda a=a: a) for k, a in SAM_PRESETS.items()},
}
IMAGE_SIZES = [(768, 1024), (1024, 768), (480, 640)]
LOGIT_SCALE = 100.0
MATCH_IOU = 0.99


def benchmark_sam(model_type: str, seed: int, device: torch.device):
    """A random SAM (``tiny``: the tests' 256 px one) with smooth masks and SAM-like logits."""
    torch.manual_seed(seed)
    sam = build_sam(MODEL_SIZES[model_type]())
    with torch.no_grad():
        for layer in (sam.mask_decoder.output_upscaling[0], sam.mask_decoder.output_upscaling[3]):
            layer.weight.copy_(layer.weight[:, :, :1, :1].expand_as(layer.weight))
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
    return sam.to(device).eval()


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Flat-coloured circles and boxes over a smooth two-colour gradient, ``(H, W, 3)`` uint8."""
    ramp = (
        np.linspace(0.0, 1.0, width)[None, :, None] * np.linspace(0.5, 1.0, height)[:, None, None]
    )
    low, high = rng.integers(40, 120, 3), rng.integers(120, 220, 3)
    image = (low + (high - low) * ramp).astype(np.uint8)
    for index in range(14):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(min(height, width) // 20, min(height, width) // 4))
        if index % 2:
            cv2.circle(image, (x, y), size, colour, -1)
        else:
            cv2.rectangle(image, (x, y), (x + size, y + int(size * 0.7)), colour, -1)
    return image


@torch.inference_mode()
def calibrate_thresholds(
    generator: FastSamGenerator, image: np.ndarray, iou_keep: float, stability_keep: float
) -> tuple[float, float]:
    """``(pred_iou_thresh, stability_score_thresh)`` keeping the given fractions of 64 prompts."""
    cfg = generator.config
    embedding, input_size = generator.embed(image)
    tokens = generator.decoder.encode(embedding)
    size = image.shape[:2]
    points = point_grid(cfg.points_per_side, *size)
    chosen = np.linspace(0, len(points) - 1, min(64, len(points))).round().astype(int)
    coords = torch.as_tensor(generator.resize.apply_coords(points[chosen], size))[:, None]
    coords = coords.to(generator.device)
    labels = torch.ones(coords.shape[:2], dtype=torch.int, device=generator.device)
    sparse, _ = generator.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    decoded = generator.decoder.decode(tokens, sparse, MULTIMASK_TOKENS)
    iou = decoded.iou_predictions[:, MULTIMASK_TOKENS].flatten()
    iou_thresh = float(torch.quantile(iou, 1.0 - iou_keep))
    everything = torch.arange(len(chosen), device=generator.device)
    low_res = generator.decoder.mask_logits(decoded, tokens, everything, MULTIMASK_TOKENS)
    low_res = low_res.flatten(0, 1)[iou > iou_thresh]
    logits = upscale_logits(low_res, generator.encoder_size, input_size, size)
    stability = stability_scores(logits, generator.sam.mask_threshold, cfg.stability_score_offset)
    stability = torch.nan_to_num(stability, nan=0.0)
    return iou_thresh, float(torch.quantile(stability, 1.0 - stability_keep))


def matched_fraction(ours: ImageProposals, reference: ImageProposals) -> float:
    """Masks matched one to one at IoU >= 0.99, over the larger of the two counts."""
    total = max(len(ours), len(reference))
    if total == 0:
        return 1.0
    if min(len(ours), len(reference)) == 0:
        return 0.0
    ious = np.asarray(mask_utils.iou(ours.rles(), reference.rles(), [0] * len(reference)))
    matched = 0
    free = np.ones(len(ours), dtype=bool)
    for ref_index in range(len(reference)):
        candidates = np.where(free & (ious[:, ref_index] >= MATCH_IOU))[0]
        if len(candidates):
            free[candidates[np.argmax(ious[candidates, ref_index])]] = False
            matched += 1
    return matched / total


@dataclass
class Seconds:
    """Wall-clock and CPU (user + system, all threads of this process) seconds."""

    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall + other.wall, self.cpu + other.cpu)

    def on(self, clock: str) -> float:
        return getattr(self, clock)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(function, *args) -> tuple[object, Seconds]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args)
    return result, Seconds(time.perf_counter() - wall, cpu_seconds() - cpu)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_type", default="vit_b", choices=sorted(MODEL_SIZES))
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--points_per_side", type=int, default=32)
    parser.add_argument("--points_per_batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--clock",
        default="cpu",
        choices=["cpu", "wall"],
        help="cpu: this process's CPU seconds, which other jobs on a shared machine hardly "
        "change; wall: wall-clock seconds (both are printed)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--iou_keep", type=float, default=0.35)
    parser.add_argument("--stability_keep", type=float, default=0.6)
    parser.add_argument("--box_nms_thresh", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    sam = benchmark_sam(args.model_type, args.seed, device)
    rng = np.random.default_rng(args.seed)
    images = [
        synthetic_image(rng, *IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i in range(args.num_images)
    ]
    config = GeneratorConfig(
        device=str(device),
        model_type=args.model_type,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        box_nms_thresh=args.box_nms_thresh,
    )
    ours = FastSamGenerator(sam, config)
    iou_thresh, stability_thresh = calibrate_thresholds(
        ours, images[0], args.iou_keep, args.stability_keep
    )
    config.pred_iou_thresh, config.stability_score_thresh = iou_thresh, stability_thresh
    reference = ReferenceSamGenerator(sam, config)
    print(
        f"SAM {args.model_type} (random, see docstring) on {device}, "
        f"{args.points_per_side}x{args.points_per_side} points, batches of "
        f"{args.points_per_batch}, pred_iou_thresh={iou_thresh:.4f}, "
        f"stability_score_thresh={stability_thresh:.4f}, box_nms_thresh={config.box_nms_thresh}, "
        f"torch threads={torch.get_num_threads()}, {args.clock} seconds"
    )
    other = "wall" if args.clock == "cpu" else "cpu"
    print(
        f"{'image':>10} {'masks':>6} {'reference s':>12} {'ours s':>8} {'ratio':>6} "
        f"{'matched':>8} {'encoder s':>10} | {other}: {'reference s':>11} {'ours s':>7} "
        f"{'ratio':>6}"
    )

    def row(name: str, masks: int, ref: Seconds, ours_s: Seconds, matched: float, enc: Seconds):
        main_ref, main_ours = ref.on(args.clock), ours_s.on(args.clock)
        print(
            f"{name:>10} {masks:>6} {main_ref:>12.1f} {main_ours:>8.1f} "
            f"{main_ref / main_ours:>6.2f} {matched:>8.4f} {enc.on(args.clock):>10.1f} | "
            f"{'':>{len(other)}}  {ref.on(other):>11.1f} {ours_s.on(other):>7.1f} "
            f"{ref.on(other) / ours_s.on(other):>6.2f}"
        )

    total_ref, total_ours, total_enc = Seconds(), Seconds(), Seconds()
    matched_masks, num_masks = 0.0, 0
    for image in images:
        height, width = image.shape[:2]
        expected, ref_s = timed(reference, image)
        (embedding, input_size), enc_s = timed(ours.embed, image)
        candidates, rest_s = timed(ours.candidates, embedding, input_size, (height, width))
        result, select_s = timed(ours.select, candidates, height, width)
        ours_s = enc_s + rest_s + select_s
        matched = matched_fraction(result, expected)
        num = max(len(result), len(expected))
        total_ref, total_ours, total_enc = total_ref + ref_s, total_ours + ours_s, total_enc + enc_s
        matched_masks += matched * num
        num_masks += num
        row(f"{width}x{height}", len(expected), ref_s, ours_s, matched, enc_s)
    matched = matched_masks / max(num_masks, 1)
    row("total", num_masks, total_ref, total_ours, matched, total_enc)
    speedup = total_ref.on(args.clock) / total_ours.on(args.clock)
    encoder_ratio = total_ours.on(args.clock) / total_enc.on(args.clock)
    print(f"speedup={speedup:.2f} matched={matched:.4f} encoder_ratio={encoder_ratio:.2f}")
    return {"speedup": speedup, "matched": matched, "encoder_ratio": encoder_ratio}


if __name__ == "__main__":
    main()
