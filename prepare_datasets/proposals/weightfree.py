"""A weight-free proposal backend, for machines without SAM weights (the demo and tests).

This is **not SAM** and not a substitute for it in real experiments: it is a classical
segmenter that makes the rest of the pipeline (store, readers, training, evaluation) runnable
anywhere, with proposals that look like SAM-everything output on simple pictures (flat-coloured
shapes over textured backgrounds). It writes the same `ImageProposals`, hence the same store.

How it works, deterministically:
1. median-filter the image (texture flattens, borders stay sharp) and quantise its colours with
   k-means in Lab space (farthest-point initialisation, no randomness), merging cluster centres
   closer than ``merge_distance`` (k-means splits one noisy colour into several);
2. split every colour into 8-connected regions; regions larger than ``min_area_fraction`` of the
   image are *segments* (objects and pieces of background alike);
3. emit every segment plus deliberate distractors, so picking the right proposal is not trivial:
   *parts* (each segment cut in two through its centroid across its longer side), *merges* (the
   union of two touching segments) and *filled* versions of segments with holes;
4. score like SAM: ``predicted_iou`` grows with solidity (area / convex-hull area) and is lower
   for distractors, ``stability_score`` is |eroded| / |dilated| (how much the mask moves when its
   boundary shifts by a pixel), ``point_coords`` is the point deepest inside the mask, ``bbox``
   is x y w h with SAM's convention (w = x_max - x_min);
5. drop near-duplicates (mask IoU > ``dedup_iou``) and keep at most ``max_proposals``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from utils.masks import encode_rles
from utils.proposal_store import ImageProposals

logger = logging.getLogger(__name__)


@dataclass
class WeightFreeSettings:
    """Knobs of the weight-free segmenter (defaults suit 128-1024 px synthetic scenes)."""

    num_colours: int = 8
    median_kernel: int = 5
    merge_distance: float = 20.0  # Lab units; centres closer than this are one colour
    min_area_fraction: float = 0.002
    max_proposals: int = 100
    max_merges: int = 24
    dedup_iou: float = 0.95
    fit_pixels: int = 20000  # k-means is fitted on at most this many pixels (strided sample)
    kmeans_iterations: int = 15


def _nearest(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each ``(N, 3)`` point: |c|^2 - 2 x.c, no (N, C, 3) array."""
    return ((centres**2).sum(1)[None, :] - 2.0 * points @ centres.T).argmin(1)


def _merge_close(centres: np.ndarray, distance: float) -> np.ndarray:
    """``(C,)`` group id per centre: centres closer than ``distance`` (transitively) share one."""
    group = np.arange(len(centres))
    close = ((centres[:, None] - centres[None]) ** 2).sum(-1) < distance**2
    for _ in range(len(centres)):  # propagate the smallest id through chains of close centres
        group = np.where(close, group[None, :], len(centres)).min(1)
    return group


def _quantise(image: np.ndarray, settings: WeightFreeSettings) -> np.ndarray:
    """``(H, W)`` label map of colour groups (deterministic k-means in Lab)."""
    height, width = image.shape[:2]
    # A median filter flattens fine texture but, unlike a blur, creates no in-between colours at
    # object borders (which k-means would turn into rings around every object).
    smooth = cv2.medianBlur(image, settings.median_kernel) if min(height, width) >= 8 else image
    lab = cv2.cvtColor(smooth, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float32)
    stride = max(1, len(lab) // settings.fit_pixels)
    sample = lab[::stride]
    # Lab values of a uint8 image are whole numbers below 256: one integer key per colour makes
    # counting distinct colours a 1-D unique (a row-wise unique sorts 3-vectors, 20x slower).
    keys = sample.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int64)
    num = int(min(settings.num_colours, len(np.unique(keys))))
    # Farthest-point initialisation: the first centre is the mean colour.
    centres = [sample.mean(0)]
    distances = np.full(len(sample), np.inf, dtype=np.float32)
    for _ in range(1, num):
        distances = np.minimum(distances, ((sample - centres[-1]) ** 2).sum(1))
        centres.append(sample[int(np.argmax(distances))])
    centres = np.stack(centres)
    for _ in range(settings.kmeans_iterations):
        assign = _nearest(sample, centres)
        counts = np.bincount(assign, minlength=num)
        sums = np.stack([np.bincount(assign, sample[:, k], minlength=num) for k in range(3)], 1)
        used = counts > 0  # an empty cluster keeps its centre
        centres[used] = (sums[used] / counts[used, None]).astype(np.float32)
    # k-means always uses every centre, splitting one noisy colour into several: merge them.
    groups = _merge_close(centres, settings.merge_distance)
    return groups[_nearest(lab, centres)].reshape(height, width)


def _segments(labels: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Connected regions of each colour, largest first, as ``(H, W)`` bool masks."""
    segments = []
    for colour in np.unique(labels):
        count, components, stats, _ = cv2.connectedComponentsWithStats(
            (labels == colour).astype(np.uint8), connectivity=8
        )
        for index in range(1, count):
            if stats[index, cv2.CC_STAT_AREA] >= min_area:
                segments.append(components == index)
    segments.sort(key=lambda m: -int(m.sum()))
    return segments


def _halves(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """The mask cut in two through its centroid, across its longer bbox side."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 2 * min_area:
        return []
    if xs.max() - xs.min() >= ys.max() - ys.min():
        first = mask & (np.arange(mask.shape[1])[None, :] < xs.mean())
    else:
        first = mask & (np.arange(mask.shape[0])[:, None] < ys.mean())
    second = mask & ~first
    return [m for m in (first, second) if m.sum() >= min_area]


def _filled(mask: np.ndarray) -> np.ndarray | None:
    """The mask with its holes filled, or None when it has none."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    filled = filled.astype(bool)
    return filled if filled.sum() > mask.sum() * 1.02 else None


def _merges(segments: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """Unions of touching segments, the pairs with the longest shared border first."""
    if len(segments) < 2:
        return []
    ids = np.full(segments[0].shape, -1, dtype=np.int64)
    for index, mask in enumerate(segments):
        ids[mask] = index
    # Count 4-neighbour pixel pairs that belong to two different segments.
    left, right = ids[:, :-1].ravel(), ids[:, 1:].ravel()
    top, bottom = ids[:-1, :].ravel(), ids[1:, :].ravel()
    a = np.concatenate([left, top])
    b = np.concatenate([right, bottom])
    touching = (a >= 0) & (b >= 0) & (a != b)
    low, high = np.minimum(a, b)[touching], np.maximum(a, b)[touching]
    codes, contacts = np.unique(low * len(segments) + high, return_counts=True)
    order = np.lexsort((codes, -contacts))[:limit]
    return [
        segments[int(codes[k]) // len(segments)] | segments[int(codes[k]) % len(segments)]
        for k in order
    ]


def _solidity(mask: np.ndarray) -> float:
    # The hull of the outer contours equals the hull of all pixels, at a fraction of the cost.
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    hull_area = cv2.contourArea(cv2.convexHull(np.concatenate(contours))) if contours else 0.0
    return float(min(1.0, mask.sum() / hull_area)) if hull_area > 0 else 1.0


def _stability(mask: np.ndarray) -> float:
    kernel = np.ones((3, 3), np.uint8)
    as_u8 = mask.astype(np.uint8)
    inner = cv2.erode(as_u8, kernel, borderType=cv2.BORDER_REPLICATE).sum()
    outer = cv2.dilate(as_u8, kernel, borderType=cv2.BORDER_REPLICATE).sum()
    return float(inner / outer) if outer else 0.0


def _deepest_point(mask: np.ndarray) -> tuple[float, float]:
    distance = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def _bbox_xywh(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() - xs.min()),
        float(ys.max() - ys.min()),
    ]


class WeightFreeGenerator:
    """Callable ``(H, W, 3) uint8 RGB -> ImageProposals`` without any network weights.

    Args:
        config: ignored apart from ``min_mask_region_area`` (a floor on the proposal area); it
            is accepted so `build_generator` can pass its `GeneratorConfig`.
        settings: the segmenter's own knobs.
    """

    def __init__(self, config=None, settings: WeightFreeSettings | None = None):
        self.settings = settings or WeightFreeSettings()
        self.min_region_area = int(getattr(config, "min_mask_region_area", 0) or 0)

    def __call__(self, image: np.ndarray) -> ImageProposals:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        height, width = image.shape[:2]
        s = self.settings
        min_area = max(1, self.min_region_area, int(s.min_area_fraction * height * width))
        segments = _segments(_quantise(image, s), min_area)
        candidates: list[tuple[np.ndarray, float]] = []  # (mask, base score)
        for mask in segments:
            candidates.append((mask, 0.93))
            filled = _filled(mask)
            if filled is not None:
                candidates.append((filled, 0.9))
        for mask in segments:
            candidates.extend((part, 0.89) for part in _halves(mask, min_area))
        candidates.extend((merged, 0.88) for merged in _merges(segments, s.max_merges))
        kept: list[np.ndarray] = []
        scores: list[float] = []
        # Near-duplicates are found on a strided pixel sample: one matrix-vector product each.
        step = max(1, int(np.sqrt(height * width / 65536)))
        sample_size = len(range(0, height, step)) * len(range(0, width, step))
        sampled = np.zeros((s.max_proposals, sample_size), np.float32)
        for mask, base in candidates:
            if len(kept) >= s.max_proposals:
                break
            flat = mask[::step, ::step].ravel().astype(np.float32)
            if len(kept):
                inter = sampled[: len(kept)] @ flat
                union = sampled[: len(kept)].sum(1) + flat.sum() - inter
                if np.any(inter > s.dedup_iou * np.maximum(union, 1)):
                    continue
            sampled[len(kept)] = flat
            kept.append(mask)
            scores.append(base + 0.06 * _solidity(mask))
        if not kept:
            return ImageProposals.empty(height, width)
        stack = np.stack(kept)
        return ImageProposals(
            height=height,
            width=width,
            rle_counts=encode_rles(stack),
            area=stack.reshape(len(kept), -1).sum(1),
            bbox=np.array([_bbox_xywh(m) for m in kept], dtype=np.float32),
            predicted_iou=np.array(scores, dtype=np.float32),
            stability_score=np.array([_stability(m) for m in kept], dtype=np.float32),
            point_coords=np.array([_deepest_point(m) for m in kept], dtype=np.float32),
        )
