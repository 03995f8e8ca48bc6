"""Binary masks: COCO RLE, labelme polygons, resizing, padding, proposal weight maps and targets.

Conventions used across the project:
- a "mask stack" is ``(K, H, W)`` bool (one mask per row), numpy or torch;
- ground-truth label maps use 1 = target, 0 = background, 255 = ignore; for proposal targets the
  ignore label counts as background, as upstream LLM-Seg does;
- proposals live at the store resolution (the image shrunk so its longest side is <= 1024).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

IGNORE_LABEL = 255


# ----------------------------------------------------------------------------- RLE


def encode_rles(masks: np.ndarray) -> list[bytes]:
    """COCO compressed RLE ``counts`` of each mask of a ``(K, H, W)`` stack (one C call for all)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected a (K, H, W) mask stack, got shape {masks.shape}")
    if masks.shape[0] == 0:
        return []
    stacked = np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))
    return [rle["counts"] for rle in mask_utils.encode(stacked)]


def decode_rles(rle_counts: list[bytes], height: int, width: int) -> np.ndarray:
    """Decode RLE ``counts`` (bytes or str) of ``(height, width)`` masks to ``(K, H, W)`` bool."""
    if len(rle_counts) == 0:
        return np.zeros((0, height, width), dtype=bool)
    size = [int(height), int(width)]
    rles = [
        {"size": size, "counts": c.encode("ascii") if isinstance(c, str) else c} for c in rle_counts
    ]
    # pycocotools returns (H, W, K) uint8 0/1 in Fortran order: one copy to (K, H, W), then a
    # free reinterpretation as bool.
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).view(bool)


# ----------------------------------------------------------------------------- polygons


def labelme_to_mask(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """Rasterise ReasonSeg's labelme ``shapes`` to an ``(H, W)`` uint8 label map.

    As ReasonSeg's ``get_mask_from_json``: labels compare lower-cased; ``flag`` shapes are
    skipped; polygons are drawn from the largest filled area to the smallest, so smaller polygons
    overwrite larger ones; a label containing "ignore" draws 255, anything else draws 1 (target);
    background is 0; no shapes give an all-background map. Each polygon
    is drawn filled plus its 1-pixel outline; points are truncated to int32.

    Args:
        shapes: labelme shapes, ``[{"label": str, "points": [[x, y], ...]}, ...]``.
        height, width: size of the image the points refer to.
    """
    polygons = []
    for index, shape in enumerate(shapes):
        label = str(shape.get("label", "")).lower()
        if label == "flag":
            continue
        if "points" not in shape:
            raise ValueError(f"shape {index} ({label!r}) has no 'points'")
        points = np.asarray(shape["points"], dtype=np.float64).astype(np.int32).reshape(-1, 2)
        canvas = np.zeros((height, width), dtype=np.uint8)
        cv2.polylines(canvas, [points], True, 1, 1)
        cv2.fillPoly(canvas, [points], 1)
        value = IGNORE_LABEL if "ignore" in label else 1
        polygons.append((int(canvas.sum()), points, value))
    label_map = np.zeros((height, width), dtype=np.uint8)
    # Python's sort is stable: equal areas keep file order, as upstream.
    for _, points, value in sorted(polygons, key=lambda item: item[0], reverse=True):
        cv2.polylines(label_map, [points], True, value, 1)
        cv2.fillPoly(label_map, [points], value)
    return label_map


# ----------------------------------------------------------------------------- resizing


def longest_side_size(height: int, width: int, max_side: int = 1024) -> tuple[int, int]:
    """``(h, w)`` after shrinking so the longest side is ``max_side`` (unchanged if already <=)."""
    longest = max(height, width)
    if longest <= max_side:
        return height, width
    if height >= width:
        return max_side, max(1, int(width * max_side / height))
    return max(1, int(height * max_side / width)), max_side


def resize_longest_side(image: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """Shrink an ``(H, W, C)`` image with ``cv2.INTER_AREA`` so its longest side is ``max_side``.

    Images already within ``max_side`` are returned unchanged (never enlarged), as upstream.
    """
    height, width = image.shape[:2]
    new_h, new_w = longest_side_size(height, width, max_side)
    if (new_h, new_w) == (height, width):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def resize_nearest(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``(H, W)`` or ``(R, H, W)`` arrays to ``size = (h, w)``.

    Pixel centres are aligned (output pixel i samples input pixel ``floor((i + 0.5) * H / h)``),
    like ``skimage.transform.resize(order=0)`` that upstream uses; values are never mixed.
    """
    masks = np.asarray(masks)
    in_h, in_w = masks.shape[-2:]
    out_h, out_w = int(size[0]), int(size[1])
    if (in_h, in_w) == (out_h, out_w):
        return masks
    rows = np.minimum(((np.arange(out_h) + 0.5) * in_h / out_h).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * in_w / out_w).astype(np.int64), in_w - 1)
    return masks[..., rows[:, None], cols[None, :]]


def pad_to_square(masks: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``(..., H, W)`` bottom/right to ``(..., S, S)`` with ``S = max(H, W)``.

    This matches how the image is padded after its longest side is resized, so weight maps and
    image features stay aligned.
    """
    height, width = masks.shape[-2:]
    side = max(height, width)
    return F.pad(masks, (0, side - width, 0, side - height))


def proposal_weight_maps(
    masks: np.ndarray | torch.Tensor, size: int = 256, antialias: bool = True, chunk: int = 8
) -> torch.Tensor:
    """Soft weight maps of proposals, as the mask-pooling layer consumes them.

    Args:
        masks: ``(K, h, w)`` binary proposals at the store resolution.
        size: output side (256 in LLM-Seg, the upsampled DINOv2 grid).
        antialias: bilinear antialiasing (upstream: True for ReasonSeg/LLM-Seg40K/val, False for
            sem_seg/refer_seg/vqa).
        chunk: masks resized together (memory/speed trade-off only; results do not change).

    Returns:
        ``(K, size, size)`` float32 maps in [0, 1]: padded bottom/right to a square, then
        bilinear-resized (``align_corners=False``).
    """
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"expected (K, h, w) proposals, got shape {tuple(masks.shape)}")
    num, height, width = masks.shape
    out = torch.zeros((num, size, size), dtype=torch.float32, device=masks.device)
    side = max(height, width)
    # Chunks through one reused padded buffer: converting and padding the whole (K, S, S) stack
    # at once costs more in fresh memory than the resize itself.
    buffer = torch.zeros((min(num, chunk), side, side), dtype=torch.float32, device=masks.device)
    for start in range(0, num, chunk):
        part = masks[start : start + chunk]
        square = buffer[: len(part)]
        square[:, :height, :width].copy_(part)
        # (chunk, 1, S, S) runs about twice as fast as (1, chunk, S, S) on the CPU.
        out[start : start + len(part)] = F.interpolate(
            square[:, None], size=(size, size), mode="bilinear", align_corners=False,
            antialias=antialias,
        )[:, 0]  # fmt: skip
    return out


# ----------------------------------------------------------------------------- targets


def binary_ground_truth(masks: np.ndarray | torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Ground truth to bool: 1 -> True; 0 and the ignore label 255 -> False (as upstream).

    Bool input is returned as is. Any other value raises ``ValueError`` naming ``name``, since a
    label map passed by mistake (e.g. ADE class ids) would silently give wrong targets.
    """
    masks = torch.as_tensor(masks)
    if masks.dtype == torch.bool:
        return masks
    bad = (masks != 0) & (masks != 1) & (masks != IGNORE_LABEL)
    if bool(bad.any()):
        values = torch.unique(masks[bad])[:5].tolist()
        raise ValueError(f"{name}: expected values in {{0, 1, 255}}, found {values}")
    return masks == 1


def _count_true(flat: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float32 number of True values in each row of an ``(N, P)`` bool tensor."""
    if flat.device.type == "cpu":
        # numpy's bool sum is ~10x faster than torch's on the CPU (no int64 promotion per pixel).
        return torch.from_numpy(flat.numpy().sum(axis=1, dtype=np.int64)).to(torch.float32)
    return torch.count_nonzero(flat, dim=1).to(torch.float32)


def mask_iou_iop(
    proposals: np.ndarray | torch.Tensor, ground_truth: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and IoP of every proposal against every ground-truth mask, by one matrix product.

    Args:
        proposals: ``(K, h, w)`` bool proposals.
        ground_truth: ``(R, h, w)`` bool masks at the same resolution.

    Returns:
        ``iou`` and ``iop``, each ``(R, K)`` float32 on the proposals' device:
        ``|P & G| / |P | G|`` and ``|P & G| / |P|`` (0 where the denominator is 0).
    """
    proposals = torch.as_tensor(proposals)
    ground_truth = torch.as_tensor(ground_truth).to(proposals.device)
    if proposals.shape[-2:] != ground_truth.shape[-2:]:
        raise ValueError(
            f"proposals {tuple(proposals.shape)} and ground truth {tuple(ground_truth.shape)} "
            "differ in size"
        )
    p = proposals.reshape(proposals.shape[0], -1).to(torch.bool)
    g = ground_truth.reshape(ground_truth.shape[0], -1).to(torch.bool)
    # Intersections only involve pixels inside some ground truth: multiply just those columns
    # (pixel counts are exact in float32 up to 2^24, more than 1024 * 1024).
    inside = g.any(dim=0).nonzero().squeeze(1)
    intersection = g[:, inside].to(torch.float32) @ p[:, inside].to(torch.float32).T
    proposal_area = _count_true(p)[None, :]
    union = _count_true(g)[:, None] + proposal_area - intersection
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))
    iop = torch.where(
        proposal_area > 0, intersection / proposal_area.clamp_min(1), torch.zeros_like(intersection)
    )
    return iou, iop


def proposal_targets(
    proposals: np.ndarray | torch.Tensor, ground_truth: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU/IoP targets of ``(K, h, w)`` proposals against ``(R, H, W)`` original-size ground truth.

    The ground truth (bool, or {0, 1, 255} with 255 counted as background) is resized
    nearest-neighbour to the proposals' ``(h, w)`` first. Returns ``(R, K)`` float32 IoU and IoP.
    """
    proposals = torch.as_tensor(proposals)
    gt = ground_truth.cpu().numpy() if isinstance(ground_truth, torch.Tensor) else ground_truth
    gt = np.asarray(gt)
    if gt.ndim == 2:
        gt = gt[None]
    # Resize first (nearest keeps the values), so the checks run on the smaller array.
    gt = np.ascontiguousarray(resize_nearest(gt, tuple(proposals.shape[-2:])))
    return mask_iou_iop(proposals, binary_ground_truth(gt, "ground truth"))
