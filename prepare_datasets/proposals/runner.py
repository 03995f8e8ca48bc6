"""The core every ``prepare_<dataset>.py`` shares: list, shard, resume, generate, stage, merge.

A prepare script lists its images as `SplitJob`s (a store directory under ``--sam_masks_dir``
and ``(key, path)`` pairs, the key being the name the data loaders look up) and calls
`run_prepare`. For each split:

- images are sorted by key and shard ``i`` of ``n`` takes every n-th one. ``--num_shards`` /
  ``--shard_id`` choose the shard; left at 0 / -1 they come from a launcher's environment
  (``WORLD_SIZE``/``RANK`` of torchrun or deepspeed, or Slurm's ``SLURM_NTASKS``/``SLURM_PROCID``),
  so 8 GPUs or 4 nodes split one dataset with no extra flags;
- images already in ``masks.h5`` or in a staging log are skipped (resume); images that failed
  before are retried;
- each image is read with its EXIF orientation, converted to 8-bit RGB, shrunk so its longest
  side is <= ``--max_side`` (1024, ``INTER_AREA``), then given to the generator; the result, or
  the reason it failed, is appended to this shard's crash-safe log
  (`prepare_datasets.proposals.staging`);
- the shard that finds every listed image finished merges the logs into ``masks.h5``; until
  then ``--merge_only`` builds a store from whatever is finished;
- a summary lists every failed image and why; nothing is skipped silently.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prepare_datasets.proposals.staging import StagedImage, StagingLog, merge_split, split_state
from utils.config import save_config
from utils.data.images import ImageReadError, load_rgb_image
from utils.masks import resize_longest_side
from utils.proposal_store import H5_NAME, ImageProposals

logger = logging.getLogger(__name__)

# Test hook: sleep after this many images so a test can SIGKILL a run at a known point.
PAUSE_ENV = "LLM_SEG_PREPARE_PAUSE_AFTER"

Generator = Callable[[np.ndarray], ImageProposals]


@dataclass
class PrepareConfig:
    """Settings shared by every prepare_<dataset>.py (SAM settings default to upstream's)."""

    dataset_dir: str = field(default="./dataset", metadata={"help": "root of the datasets"})
    sam_masks_dir: str = field(
        default="./dataset/sam_masks", metadata={"help": "output root, as the loaders read it"}
    )
    vision_pretrained: str | None = field(
        default=None, metadata={"help": "SAM checkpoint, e.g. sam_vit_h_4b8939.pth"}
    )
    model_type: str = field(default="vit_h", metadata={"choices": ["vit_h", "vit_l", "vit_b"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    backend: str = field(
        default="sam",
        metadata={
            "choices": ["sam", "sam_reference", "weightfree"],
            "help": "sam: our fast generator; sam_reference: segment_anything's; weightfree: "
            "no SAM weights (demo only)",
        },
    )
    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    max_side: int = field(default=1024, metadata={"help": "shrink longer images to this side"})
    num_shards: int = field(default=0, metadata={"help": "0: from WORLD_SIZE/SLURM_NTASKS or 1"})
    shard_id: int = field(default=-1, metadata={"help": "-1: from RANK/SLURM_PROCID or 0"})
    limit: int = field(default=0, metadata={"help": "only the first N images per split (0: all)"})
    merge_only: bool = field(
        default=False, metadata={"help": "only merge finished images into masks.h5"}
    )
    fsync: bool = field(default=True, metadata={"help": "fsync each staged image"})


@dataclass
class ImageItem:
    """An image to process: ``key`` is the name stored (and looked up by the loaders)."""

    key: str
    path: Path


@dataclass
class SplitJob:
    """One store to fill: ``store_dir`` is relative to ``--sam_masks_dir``."""

    name: str
    store_dir: str
    images: list[ImageItem]


@dataclass
class SplitSummary:
    """Outcome of one split after this process's run."""

    name: str
    store_path: Path
    num_images: int
    num_done: int
    failures: dict[str, str]
    num_pending: int
    merged: bool
    processed_here: int = 0


def resolve_shard(num_shards: int = 0, shard_id: int = -1) -> tuple[int, int]:
    """``(shard_id, num_shards)`` from the flags, else a launcher's environment, else (0, 1)."""
    env = os.environ
    if num_shards <= 0:
        for world_var, rank_var in (("WORLD_SIZE", "RANK"), ("SLURM_NTASKS", "SLURM_PROCID")):
            if world_var in env and rank_var in env:
                num_shards, shard_id = int(env[world_var]), int(env[rank_var])
                break
        else:
            num_shards = 1
    if shard_id < 0:
        shard_id = int(env.get("RANK", env.get("SLURM_PROCID", 0))) if num_shards > 1 else 0
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is outside [0, {num_shards})")
    return shard_id, num_shards


def generator_settings(config: PrepareConfig) -> dict:
    """The settings recorded in ``masks.h5`` (what made these proposals)."""
    keys = (
        "backend",
        "model_type",
        "points_per_side",
        "pred_iou_thresh",
        "stability_score_thresh",
        "stability_score_offset",
        "box_nms_thresh",
        "min_mask_region_area",
        "max_side",
    )
    settings = {k: getattr(config, k) for k in keys}
    settings["checkpoint"] = Path(config.vision_pretrained).name if config.vision_pretrained else ""
    if config.backend == "weightfree":
        for key in keys[1:-1]:
            settings.pop(key)
    return settings


def make_generator(config: PrepareConfig) -> Generator:
    """The proposal generator the config asks for (``build_generator`` of
    `prepare_datasets.proposals.generator`; the weight-free backend is built directly, so it never
    imports SAM code)."""
    if config.backend == "weightfree":
        from prepare_datasets.proposals.weightfree import WeightFreeGenerator

        return WeightFreeGenerator(config)
    from prepare_datasets.proposals.generator import GeneratorConfig, build_generator

    return build_generator(
        GeneratorConfig(
            backend=config.backend,
            vision_pretrained=config.vision_pretrained,
            model_type=config.model_type,
            device=config.device,
            points_per_side=config.points_per_side,
            points_per_batch=config.points_per_batch,
            pred_iou_thresh=config.pred_iou_thresh,
            stability_score_thresh=config.stability_score_thresh,
            stability_score_offset=config.stability_score_offset,
            box_nms_thresh=config.box_nms_thresh,
            min_mask_region_area=config.min_mask_region_area,
        )
    )


def prepare_image(path: Path, max_side: int = 1024) -> np.ndarray:
    """Read an image as ``(h, w, 3)`` uint8 RGB (EXIF applied) with its longest side <= max_side.

    Raises:
        ImageReadError: missing, empty, corrupt or unreadable files (the message says which).
    """
    return resize_longest_side(load_rgb_image(path), max_side)


def _unique_sorted(job: SplitJob) -> list[ImageItem]:
    by_key: dict[str, ImageItem] = {}
    for item in job.images:
        other = by_key.setdefault(item.key, item)
        if Path(other.path) != Path(item.path):
            raise ValueError(
                f"{job.name}: key {item.key!r} names two images: {other.path} and {item.path}"
            )
    return [by_key[k] for k in sorted(by_key, key=lambda k: k.encode("utf-8"))]


def _process_image(item: ImageItem, generator: Generator, max_side: int) -> StagedImage:
    try:
        image = prepare_image(item.path, max_side)
    except ImageReadError as error:
        return StagedImage(item.key, failure=str(error))
    try:
        proposals = generator(image)
    except Exception as error:  # noqa: BLE001 (recorded and reported, never silent)
        logger.exception("%s: proposal generation failed", item.path)
        return StagedImage(item.key, failure=f"{item.path}: generator error: {error!r}")
    if (proposals.height, proposals.width) != image.shape[:2]:
        return StagedImage(
            item.key,
            failure=f"{item.path}: generator returned {proposals.height}x{proposals.width} "
            f"masks for a {image.shape[0]}x{image.shape[1]} image",
        )
    return StagedImage(item.key, proposals=proposals)


def run_split(
    config: PrepareConfig, job: SplitJob, generator: Callable[[], Generator], shard: tuple[int, int]
) -> SplitSummary:
    """Process this shard's part of one split, then merge if the whole split is finished."""
    shard_id, num_shards = shard
    split_dir = Path(config.sam_masks_dir) / job.store_dir
    split_dir.mkdir(parents=True, exist_ok=True)
    items = _unique_sorted(job)
    if config.limit > 0:
        items = items[: config.limit]
    settings = generator_settings(config)
    processed = 0
    if not config.merge_only:
        if shard_id == 0:
            save_config(config, split_dir / "prepare_config.json")
        state = split_state(split_dir)
        mine = items[shard_id::num_shards]
        todo = [item for item in mine if item.key not in state.done]
        logger.info(
            "%s: %d images, %d already done; shard %d/%d has %d to do -> %s",
            job.name,
            len(items),
            sum(item.key in state.done for item in items),
            shard_id,
            num_shards,
            len(todo),
            split_dir,
        )
        pause_after = int(os.environ.get(PAUSE_ENV, "0"))
        if todo:
            make = generator()
            with StagingLog(split_dir, shard_id, num_shards, fsync=config.fsync) as log:
                for item in tqdm(todo, desc=f"{job.name} [{shard_id}/{num_shards}]", unit="img"):
                    log.append(_process_image(item, make, config.max_side))
                    processed += 1
                    if pause_after and processed >= pause_after:
                        logger.warning("%s=%d: pausing (test hook)", PAUSE_ENV, pause_after)
                        time.sleep(3600)
    state = split_state(split_dir)
    listed = {item.key for item in items}
    pending = listed - state.done - set(state.failures)
    merged = False
    if config.merge_only or not pending:
        state = merge_split(split_dir, settings)
        merged = True
    else:
        logger.info(
            "%s: %d images still pending in other shards; the last shard to finish merges "
            "(or rerun with --merge_only)",
            job.name,
            len(pending),
        )
    failures = {k: v for k, v in state.failures.items() if k in listed}
    return SplitSummary(
        name=job.name,
        store_path=split_dir / H5_NAME,
        num_images=len(items),
        num_done=len(listed & state.done),
        failures=failures,
        num_pending=len(pending),
        merged=merged,
        processed_here=processed,
    )


def log_summary(summaries: list[SplitSummary]) -> None:
    """Log one line per split and one line per failed image."""
    for s in summaries:
        logger.info(
            "%s: %d/%d images have proposals, %d failed, %d pending%s (processed here: %d)",
            s.name,
            s.num_done,
            s.num_images,
            len(s.failures),
            s.num_pending,
            f"; store {s.store_path}" if s.merged else "",
            s.processed_here,
        )
        for key, reason in sorted(s.failures.items()):
            logger.warning("  failed %s: %s", key, reason)


def run_prepare(
    config: PrepareConfig, jobs: list[SplitJob], generator: Generator | None = None
) -> list[SplitSummary]:
    """Run every split job (see the module doc); ``generator`` overrides `make_generator`.

    Returns one `SplitSummary` per job; the generator is built only if some image needs it.
    """
    shard = resolve_shard(config.num_shards, config.shard_id)
    built: list[Generator] = [] if generator is None else [generator]

    def lazy_generator() -> Generator:
        if not built:
            built.append(make_generator(config))
        return built[0]

    summaries = [run_split(config, job, lazy_generator, shard) for job in jobs]
    log_summary(summaries)
    return summaries


def summaries_to_dict(summaries: list[SplitSummary]) -> list[dict]:
    """JSON-friendly form of the summaries."""
    return [dict(asdict(s), store_path=str(s.store_path)) for s in summaries]
