"""SAM "segment everything" proposal generators: ours (fast) and segment-anything's (reference).

Both take an ``(H, W, 3)`` uint8 RGB image (already shrunk to a longest side <= 1024 by the
caller) and return `utils.proposal_store.ImageProposals` at that size.

`FastSamGenerator` returns the masks ``segment_anything.SamAutomaticMaskGenerator`` returns for
the same weights and settings (no crops), in the same order, and skips the work whose result the
reference throws away or recomputes:

1. every prompt-independent part of the mask decoder (image tokens, positional encoding,
   first-block projections) is computed once per image instead of once per prompt, and the
   decoder's image-side attention is regrouped so that no per-prompt projection of the 4096 image
   tokens is formed (`prepare_datasets.proposals.batched_mask_decoder`);
2. the predicted IoU comes from the decoder's tokens, so masks below ``pred_iou_thresh`` are
   dropped *before* the transposed-convolution upscaling and before upsampling to image size
   (the reference upscales and upsamples all 3 masks of every prompt, then filters);
3. the stability score, thresholds and boxes are computed on the survivors only, with the
   reference's exact interpolation (bit-identical values, `prepare_datasets.proposals.postprocess`);
4. a batch's masks are RLE-encoded in one pycocotools call instead of run by run in Python.

What remains is the encoder pass (the same call as the reference's, so the same embedding),
about 0.35 G multiply-adds of decoder work per prompt, 0.4 G more for each prompt with a mask
above the IoU threshold, and the survivors' upsampling. ``benchmarks/bench_proposals.py``
measures both generators and the encoder alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from model.backbones.sam import load_sam
from prepare_datasets.proposals.batched_mask_decoder import BatchedMaskDecoder, ImageTokens
from prepare_datasets.proposals.postprocess import (
    CandidateMasks,
    box_nms_order,
    remove_small_regions,
    stability_scores,
    upscale_logits,
)
from utils.device import resolve_device
from utils.proposal_store import ImageProposals

logger = logging.getLogger(__name__)

BACKENDS = ("sam", "sam_reference", "weightfree")
# SAM's multimask output: mask tokens 1..3 (token 0 is the single-mask output).
MULTIMASK_TOKENS = [1, 2, 3]
# The reference's crop-NMS threshold, used (as max with box_nms_thresh) after region clean-up.
CROP_NMS_THRESH = 0.7
# CPU threads that take blocks of prompts at once (each holds a few hundred MB of blocks).
MAX_CPU_WORKERS = 16


@dataclass(frozen=True)
class WorkBlocks:
    """How many prompts / masks go through each stage at a time.

    Attributes:
        prompts: prompts decoded together (the (B, 4096, 256) image-token tensors).
        upscaled_prompts: prompts upscaled together (8 MB of feature maps each).
        upsampled_masks: masks upsampled to image size together (4 MB each at 1024 x 1024; a
            multiple of 3, see `upscale_logits`).
    """

    prompts: int
    upscaled_prompts: int
    upsampled_masks: int


def work_blocks(device: torch.device, points_per_batch: int) -> WorkBlocks:
    """Block sizes for ``device``.

    On a GPU every stage takes ``points_per_batch`` prompts (more is faster while memory lasts).
    On a CPU (where each thread runs its own blocks, see `FastSamGenerator.candidates`) blocks
    stay below glibc's largest mmap threshold (32 MB), so freed blocks are reused instead of
    being mapped afresh and page-faulted in 4 KB at a time, which costs about a third of the time
    with blocks of 16 prompts.
    """
    if device.type != "cpu":
        return WorkBlocks(points_per_batch, points_per_batch, 15)
    return WorkBlocks(min(points_per_batch, 7), 2, 6)


@dataclass
class GeneratorConfig:
    """Proposal generator settings; the SAM settings default to upstream's (ViT-H, 32x32 points).

    ``crop_n_layers`` is 0 (no crops) as upstream; masks have the size of the given image.
    """

    backend: str = field(
        default="sam",
        metadata={
            "choices": list(BACKENDS),
            "help": "sam: our fast generator; sam_reference: segment_anything's "
            "SamAutomaticMaskGenerator; weightfree: no SAM weights (demo only)",
        },
    )
    vision_pretrained: str | None = field(
        default=None, metadata={"help": "SAM checkpoint, e.g. sam_vit_h_4b8939.pth"}
    )
    model_type: str = field(default="vit_h", metadata={"choices": ["vit_h", "vit_l", "vit_b"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    points_per_side: int = field(default=32, metadata={"help": "prompt grid is N x N points"})
    points_per_batch: int = field(
        default=64, metadata={"help": "prompts decoded together (ours: more is fine on a GPU)"}
    )
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = field(
        default=0, metadata={"help": "fill holes / drop islands below this area (0: off)"}
    )


class ProposalGenerator(Protocol):
    """``(H, W, 3)`` uint8 RGB image -> `ImageProposals` of masks of size ``(H, W)``."""

    def __call__(self, image: np.ndarray) -> ImageProposals: ...


def point_grid(points_per_side: int, height: int, width: int) -> np.ndarray:
    """``(N*N, 2)`` float64 x y prompt points: cell centres of an N x N grid over the image.

    Row-major (x varies fastest), as SAM's generator orders them.
    """
    offset = 1.0 / (2 * points_per_side)
    side = np.linspace(offset, 1.0 - offset, points_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1) * np.array([[width, height]])


@contextlib.contextmanager
def single_threaded_ops() -> Iterator[None]:
    """Torch ops run on the calling thread only, inside the block (the setting is global)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def check_image(image: np.ndarray) -> np.ndarray:
    """The image as an ``(H, W, 3)`` uint8 array, or a ValueError saying what is wrong."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


class FastSamGenerator:
    """Our SAM-everything generator (see the module docstring for what it skips).

    Args:
        sam: a ``segment_anything`` SAM in eval mode, on the device to run on.
        config: thresholds and grid; ``backend``/``vision_pretrained``/``device`` are not used.
    """

    def __init__(self, sam: Sam, config: GeneratorConfig) -> None:
        if config.points_per_side < 1 or config.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        self.sam = sam.eval()
        self.config = config
        self.decoder = BatchedMaskDecoder(sam)
        self.encoder_size = sam.image_encoder.img_size
        self.resize = ResizeLongestSide(self.encoder_size)

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.inference_mode()
    def embed(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder output ``(1, C, h, w)`` and the resized size ``(H', W')``, as SamPredictor."""
        resized = self.resize.apply_image(image)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
        embedding = self.sam.image_encoder(self.sam.preprocess(pixels[None]))
        return embedding, (resized.shape[0], resized.shape[1])

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> ImageProposals:
        image = check_image(image)
        height, width = image.shape[:2]
        embedding, input_size = self.embed(image)
        candidates = self.candidates(embedding, input_size, (height, width))
        return self.select(candidates, height, width)

    @torch.inference_mode()
    def candidates(
        self, embedding: torch.Tensor, input_size: tuple[int, int], image_size: tuple[int, int]
    ) -> CandidateMasks:
        """Masks of every prompt that pass the predicted-IoU and stability filters (before NMS).

        Args:
            embedding: ``(1, C, h, w)`` image-encoder output.
            input_size: ``(H', W')`` of the resized image the encoder saw.
            image_size: ``(H, W)`` of the original image (the masks' size).
        """
        cfg = self.config
        tokens = self.decoder.encode(embedding)
        points = point_grid(cfg.points_per_side, *image_size)
        prompts = self.resize.apply_coords(points, image_size)  # float64, as the reference feeds
        blocks = work_blocks(self.device, cfg.points_per_batch)

        def run(start: int) -> CandidateMasks:
            chunk = slice(start, start + blocks.prompts)
            with torch.inference_mode():  # thread-local, so set again in pool threads
                return self._prompt_block(
                    tokens, points[chunk], prompts[chunk], input_size, image_size, blocks
                )

        starts = range(0, len(points), blocks.prompts)
        workers = min(torch.get_num_threads(), MAX_CPU_WORKERS) if self.device.type == "cpu" else 1
        if workers <= 1:
            return CandidateMasks.concatenate([run(start) for start in starts])
        # On a CPU, each thread takes whole blocks with single-threaded ops: no thread ever waits
        # for another at the end of each of the thousands of small ops (which, on a shared
        # machine, made two intra-op threads slower than one).
        with single_threaded_ops(), ThreadPoolExecutor(workers) as pool:
            return CandidateMasks.concatenate(list(pool.map(run, starts)))

    def _prompt_block(
        self,
        tokens: ImageTokens,
        points: np.ndarray,
        prompts: np.ndarray,
        input_size: tuple[int, int],
        image_size: tuple[int, int],
        blocks: WorkBlocks,
    ) -> CandidateMasks:
        """Candidates of B prompts: ``(B, 2)`` points in image pixels and in encoder pixels."""
        cfg = self.config
        found = CandidateMasks()
        coords = torch.as_tensor(prompts, device=self.device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
        sparse, _ = self.sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        decoded = self.decoder.decode(tokens, sparse, MULTIMASK_TOKENS)
        iou = decoded.iou_predictions[:, MULTIMASK_TOKENS]  # (B, 3)
        if cfg.pred_iou_thresh > 0:
            keep = iou > cfg.pred_iou_thresh
        else:
            keep = torch.ones_like(iou, dtype=torch.bool)
        kept_prompts = keep.any(dim=1).nonzero()[:, 0]
        if len(kept_prompts) == 0:
            return found
        points = torch.as_tensor(points)[:, None, :].expand(-1, len(MULTIMASK_TOKENS), -1)
        for prompt_index in kept_prompts.split(blocks.upscaled_prompts):
            low_res = self.decoder.mask_logits(decoded, tokens, prompt_index, MULTIMASK_TOKENS)
            chosen = keep[prompt_index]
            self._add_survivors(
                found,
                low_res[chosen],
                iou[prompt_index][chosen],
                points[prompt_index.cpu()][chosen.cpu()],
                input_size,
                image_size,
                blocks.upsampled_masks,
            )
        return found

    def _add_survivors(
        self,
        found: CandidateMasks,
        low_res: torch.Tensor,
        iou: torch.Tensor,
        points: torch.Tensor,
        input_size: tuple[int, int],
        image_size: tuple[int, int],
        block: int,
    ) -> None:
        """Upsample ``(M, h, w)`` logits, filter by stability, binarise and add to ``found``.

        ``block`` masks at a time bound the memory of the 1024 x 1024 intermediate.
        """
        cfg = self.config
        threshold = self.sam.mask_threshold
        for start in range(0, low_res.shape[0], block):
            chunk = slice(start, start + block)
            logits = upscale_logits(low_res[chunk], self.encoder_size, input_size, image_size)
            stability = stability_scores(logits, threshold, cfg.stability_score_offset)
            if cfg.stability_score_thresh > 0:
                stable = stability >= cfg.stability_score_thresh
                logits, stability = logits[stable], stability[stable]
                chunk_iou, chunk_points = iou[chunk][stable], points[chunk][stable.cpu()]
            else:
                chunk_iou, chunk_points = iou[chunk], points[chunk]
            found.add(logits > threshold, chunk_iou, stability, chunk_points)

    def select(self, found: CandidateMasks, height: int, width: int) -> ImageProposals:
        """Box NMS over all candidates (then the optional region clean-up), best IoU first."""
        cfg = self.config
        order = box_nms_order(found.boxes, found.predicted_iou, cfg.box_nms_thresh)
        rle_counts = [found.rle_counts[i] for i in order.tolist()]
        boxes, area = found.boxes[order], found.area[order]
        if cfg.min_mask_region_area > 0 and len(order) > 0:
            keep, changed = remove_small_regions(
                rle_counts,
                height,
                width,
                cfg.min_mask_region_area,
                max(cfg.box_nms_thresh, CROP_NMS_THRESH),
            )
            boxes, area = boxes.clone(), area.clone()
            for index, (counts, box, new_area) in changed.items():
                rle_counts[index], boxes[index], area[index] = counts, box, new_area
            rle_counts = [rle_counts[i] for i in keep.tolist()]
            boxes, area, order = boxes[keep], area[keep], order[keep]
        xywh = boxes.clone()
        xywh[:, 2:] -= boxes[:, :2]  # SAM's convention: w = x1 - x0 with inclusive x1
        return ImageProposals(
            height=height,
            width=width,
            rle_counts=rle_counts,
            area=area.numpy(),
            bbox=xywh.numpy(),
            predicted_iou=found.predicted_iou[order].numpy(),
            stability_score=found.stability_score[order].numpy(),
            point_coords=found.point_coords[order].numpy(),
        )


class ReferenceSamGenerator:
    """``segment_anything.SamAutomaticMaskGenerator`` with the same settings (for comparison).

    Args:
        sam: a ``segment_anything`` SAM in eval mode.
        config: thresholds and grid.
    """

    def __init__(self, sam: Sam, config: GeneratorConfig) -> None:
        from segment_anything import SamAutomaticMaskGenerator

        self.generator = SamAutomaticMaskGenerator(
            sam.eval(),
            points_per_side=config.points_per_side,
            points_per_batch=config.points_per_batch,
            pred_iou_thresh=config.pred_iou_thresh,
            stability_score_thresh=config.stability_score_thresh,
            stability_score_offset=config.stability_score_offset,
            box_nms_thresh=config.box_nms_thresh,
            min_mask_region_area=config.min_mask_region_area,
            output_mode="coco_rle",
        )

    def __call__(self, image: np.ndarray) -> ImageProposals:
        image = check_image(image)
        records = self.generator.generate(image)
        return ImageProposals.from_amg_records(records, image.shape[0], image.shape[1])


def build_generator(config: GeneratorConfig, sam: Sam | None = None) -> ProposalGenerator:
    """The generator ``config.backend`` names.

    Args:
        config: settings; ``vision_pretrained`` (and ``model_type``) load SAM unless ``sam`` is
            given; ``device`` says where it runs.
        sam: an already built SAM to use instead of loading ``vision_pretrained``.
    """
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown proposal backend {config.backend!r}; expected {BACKENDS}")
    if config.backend == "weightfree":
        from prepare_datasets.proposals.weightfree import WeightFreeGenerator

        return WeightFreeGenerator(config)
    device = resolve_device(config.device)
    if sam is None:
        if not config.vision_pretrained:
            raise ValueError(
                f"backend {config.backend!r} needs SAM weights: pass --vision_pretrained "
                "(e.g. sam_vit_h_4b8939.pth), or use --backend weightfree without weights"
            )
        sam = load_sam(config.vision_pretrained, config.model_type, device)
        logger.info(
            "loaded SAM %s from %s on %s", config.model_type, config.vision_pretrained, device
        )
    else:
        sam = sam.to(device)
    if config.backend == "sam_reference":
        return ReferenceSamGenerator(sam, config)
    return FastSamGenerator(sam, config)
