"""From low-resolution SAM mask logits to filtered, encoded proposals.

The functions here reproduce the decisions of ``segment_anything.SamAutomaticMaskGenerator``
(upsampling, stability score, binarisation, boxes, box NMS, small-region cleanup) on exactly the
same numbers, but only for the masks that are still candidates: the reference upsamples every
low-resolution mask to the image size before looking at its predicted IoU, and walks RLE runs in
Python, while we upsample survivors only and encode all masks of a batch in one pycocotools call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms


def upscale_logits(
    low_res: torch.Tensor,
    encoder_size: int,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
    group: int = 3,
) -> torch.Tensor:
    """Mask logits at image resolution, computed exactly as ``Sam.postprocess_masks``.

    Bilinear interpolation works plane by plane, but PyTorch's CPU kernels choose how to
    vectorise by the number of channels, and different choices round differently. The reference
    interpolates ``(B, 3, h, w)`` (a prompt's 3 masks), so the masks are regrouped 3 to a sample
    (zero-padded) and get bit-identical values whatever subset is upsampled. Resizing to the same
    size is the identity and is skipped.

    Args:
        low_res: ``(M, h, w)`` low-resolution logits (256 x 256 for SAM at 1024 px).
        encoder_size: the square input size of the image encoder (1024).
        input_size: ``(H', W')`` of the resized image inside the padded encoder input.
        image_size: ``(H, W)`` of the image given to the generator.
        group: channels per sample, as the reference has them.

    Returns:
        ``(M, H, W)`` float logits.
    """
    num, height, width = low_res.shape
    padding = low_res.new_zeros((-num) % group, height, width)
    grouped = torch.cat([low_res, padding]).view(-1, group, height, width)
    logits = F.interpolate(
        grouped, (encoder_size, encoder_size), mode="bilinear", align_corners=False
    )
    logits = logits[..., : input_size[0], : input_size[1]]
    if tuple(input_size) != tuple(image_size):
        logits = F.interpolate(logits, image_size, mode="bilinear", align_corners=False)
    return logits.flatten(0, 1)[:num]


def count_true(masks: torch.Tensor) -> torch.Tensor:
    """``(M,)`` int32 number of True pixels of ``(M, H, W)`` bool masks.

    Row sums in int16 first (as SAM's generator does): several times faster on CPUs than one
    reduction over both axes, and exact for rows shorter than 32768 pixels.
    """
    return masks.sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)


def stability_scores(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold +- offset``: ``(M, H, W)`` -> ``(M,)``.

    The high-threshold mask lies inside the low-threshold one, so the IoU is a ratio of counts.
    An empty low-threshold mask gives NaN, as in the reference (and fails any threshold).
    """
    inner = count_true(logits > mask_threshold + offset)
    outer = count_true(logits > mask_threshold - offset)
    return inner / outer


def masks_to_boxes_xyxy(masks: torch.Tensor) -> torch.Tensor:
    """Inclusive ``(x0, y0, x1, y1)`` pixel boxes of ``(M, H, W)`` bool masks; zeros when empty.

    ``x1``/``y1`` are the last covered column/row (not one past it), as SAM's generator reports.
    """
    num, height, width = masks.shape
    if num == 0:
        return torch.zeros(0, 4, dtype=torch.int64, device=masks.device)
    # max over uint8 is a much faster "any" than Tensor.any on CPUs.
    as_bytes = masks.contiguous().view(torch.uint8)
    rows = as_bytes.amax(dim=2) > 0  # (M, H)
    cols = as_bytes.amax(dim=1) > 0  # (M, W)

    def first_last(present: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(length, device=present.device)
        first = torch.where(present, index, length).amin(dim=1)
        last = torch.where(present, index, -1).amax(dim=1)
        return first, last

    y0, y1 = first_last(rows, height)
    x0, x1 = first_last(cols, width)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(rows.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def encode_masks(masks: torch.Tensor) -> list[bytes]:
    """COCO compressed RLE ``counts`` of ``(M, H, W)`` bool masks, in one pycocotools call.

    pycocotools wants a Fortran-ordered ``(H, W, M)`` uint8 array, i.e. each mask stored column
    by column: that is a C-ordered ``(M, W, H)`` array, one transpose-copy of the stack.
    """
    if masks.shape[0] == 0:
        return []
    columns = masks.transpose(1, 2).contiguous().cpu().numpy().view(np.uint8)  # (M, W, H)
    return [rle["counts"] for rle in mask_utils.encode(columns.transpose(2, 1, 0))]


@dataclass
class CandidateMasks:
    """Masks that passed the per-mask filters, accumulated over prompt batches (M rows, on CPU).

    Attributes:
        rle_counts: COCO compressed RLE counts of each binary mask.
        boxes: ``(M, 4)`` int64 inclusive xyxy boxes.
        area: ``(M,)`` int64 pixel counts.
        predicted_iou, stability_score: ``(M,)`` float32.
        point_coords: ``(M, 2)`` float64 x y prompt points in image pixels.
    """

    rle_counts: list[bytes] = field(default_factory=list)
    boxes: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.int64))
    area: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    predicted_iou: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    stability_score: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    point_coords: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, 2, dtype=torch.float64)
    )

    def __len__(self) -> int:
        return len(self.rle_counts)

    @classmethod
    def concatenate(cls, parts: list[CandidateMasks]) -> CandidateMasks:
        """All rows of ``parts``, in order."""
        return cls(
            rle_counts=[counts for part in parts for counts in part.rle_counts],
            boxes=torch.cat([cls().boxes] + [part.boxes for part in parts]),
            area=torch.cat([cls().area] + [part.area for part in parts]),
            predicted_iou=torch.cat([cls().predicted_iou] + [part.predicted_iou for part in parts]),
            stability_score=torch.cat(
                [cls().stability_score] + [part.stability_score for part in parts]
            ),
            point_coords=torch.cat([cls().point_coords] + [part.point_coords for part in parts]),
        )

    def add(
        self,
        masks: torch.Tensor,
        predicted_iou: torch.Tensor,
        stability_score: torch.Tensor,
        point_coords: torch.Tensor,
    ) -> None:
        """Append ``(M, H, W)`` bool masks with their ``(M,)`` scores and ``(M, 2)`` points."""
        self.rle_counts.extend(encode_masks(masks))
        self.boxes = torch.cat([self.boxes, masks_to_boxes_xyxy(masks).cpu()])
        self.area = torch.cat([self.area, count_true(masks).long().cpu()])
        self.predicted_iou = torch.cat([self.predicted_iou, predicted_iou.float().cpu()])
        self.stability_score = torch.cat([self.stability_score, stability_score.float().cpu()])
        self.point_coords = torch.cat([self.point_coords, point_coords.double().cpu()])


def box_nms_order(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by box NMS, best score first (torchvision ``batched_nms``, one category)."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64)
    categories = torch.zeros(boxes.shape[0], dtype=torch.int64)
    return batched_nms(boxes.float(), scores, categories, iou_threshold=iou_threshold)


def _fill_small_regions(mask: np.ndarray, min_area: int, holes: bool) -> tuple[np.ndarray, bool]:
    """Fill holes (``holes=True``) or drop islands smaller than ``min_area`` pixels.

    Connected components use 8-connectivity; if every island is small, the largest one stays.
    Returns the new mask and whether it changed.
    """
    working = (mask ^ holes).astype(np.uint8)
    num_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = np.flatnonzero(sizes < min_area) + 1
    if small.size == 0:
        return mask, False
    if holes:
        # Background-of-holes (label 0) and the small holes become part of the mask.
        return np.isin(labels, np.concatenate([[0], small])), True
    keep = np.setdiff1d(np.arange(1, num_labels), small)
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True


def remove_small_regions(
    rle_counts: list[bytes], height: int, width: int, min_area: int, nms_threshold: float
) -> tuple[torch.Tensor, dict[int, tuple[bytes, torch.Tensor, int]]]:
    """SAM's optional clean-up: fill small holes, drop small islands, re-run box NMS.

    Masks that needed no change are preferred by the NMS (score 1 against 0).

    Args:
        rle_counts: RLE counts of the masks, in their current order.
        height, width: mask size.
        min_area: regions (holes or islands) below this many pixels are removed.
        nms_threshold: box IoU threshold of the second NMS.

    Returns:
        ``keep``: indices kept, in NMS order; ``changed``: for kept masks that changed, their
        new ``(rle_counts, xyxy box, area)``.
    """
    masks, scores = [], []
    for counts in rle_counts:
        mask = mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)
        mask, filled = _fill_small_regions(mask, min_area, holes=True)
        mask, dropped = _fill_small_regions(mask, min_area, holes=False)
        masks.append(mask)
        scores.append(0.0 if filled or dropped else 1.0)
    stack = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width).bool()
    boxes = masks_to_boxes_xyxy(stack)
    keep = box_nms_order(boxes, torch.tensor(scores, dtype=torch.float32), nms_threshold)
    changed = {}
    for index in keep.tolist():
        if scores[index] == 0.0:
            mask = stack[index : index + 1]
            changed[index] = (encode_masks(mask)[0], boxes[index], int(mask.sum()))
    return keep, changed
