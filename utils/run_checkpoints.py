"""Training checkpoints: keep the last and the best, resume exactly, load weights for evaluation.

Layout of ``<log_dir>/ckpt_model`` (DeepSpeed's own format, so its tools keep working)::

    global_step<N>/            one tag per save: module (trainable weights only) + ZeRO shards
    latest                     the newest complete tag (written by DeepSpeed after the save)
    best.json                  {"tag": ..., "giou": ...}: the tag with the best validation gIoU

A new tag is fully written before any old one is removed, and only tags that are neither the
latest nor the best are removed, so a crash at any moment leaves a loadable checkpoint.
Frozen weights (LLaMA base, CLIP, DINOv2) are not saved: they come from their own folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from utils.checkpoint import CheckpointError
from utils.distributed import barrier, is_main_process

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "ckpt_model"
MODEL_STATES = "mp_rank_00_model_states.pt"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named in ``latest`` if its folder exists, else ``None``."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag / MODEL_STATES).is_file() else None


def best_record(ckpt_dir: Path) -> dict | None:
    path = ckpt_dir / "best.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_training_checkpoint(engine, ckpt_dir: Path, client_state: dict, giou: float | None) -> str:
    """Save a new tag, update ``best.json`` when ``giou`` improves, then prune old tags.

    Args:
        engine: the DeepSpeed engine.
        ckpt_dir: ``<log_dir>/ckpt_model``.
        client_state: step counters to restore on resume.
        giou: this save's validation gIoU (``None`` when not evaluated).
    Returns:
        The new tag.
    """
    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state=client_state, exclude_frozen_parameters=True
    )
    barrier()
    if is_main_process():
        best = best_record(ckpt_dir)
        if giou is not None and (best is None or giou > best["giou"]):
            tmp = ckpt_dir / "best.json.tmp"
            counters = {k: v for k, v in client_state.items() if isinstance(v, (int, float))}
            tmp.write_text(json.dumps({"tag": tag, "giou": giou, **counters}) + "\n")
            os.replace(tmp, ckpt_dir / "best.json")
            best = {"tag": tag}
        keep = {tag, (best or {}).get("tag")}
        for old in ckpt_dir.glob("global_step*"):
            if old.is_dir() and old.name not in keep:
                shutil.rmtree(old)
    barrier()
    return tag


def resume_training_checkpoint(engine, ckpt_dir: Path) -> dict | None:
    """Restore model, optimizer, scheduler and counters from the latest tag, if there is one.

    Returns:
        The saved ``client_state`` (or ``None`` when there is nothing to resume).
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_module_strict=False, load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )  # fmt: skip
    if client_state is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    logger.info("resumed from %s (step %s)", ckpt_dir / tag, client_state.get("global_step"))
    return client_state


def load_trainable_weights(model: torch.nn.Module, path: str | os.PathLike, which: str = "best"):
    """Load the weights a training run saved into ``model``, for evaluation or inference.

    Args:
        model: the model built from the same config (frozen parts already loaded).
        path: a run folder, its ``ckpt_model`` folder, or one ``global_step*`` tag folder.
        which: ``best`` or ``latest`` when ``path`` holds several tags.
    Returns:
        The tag folder that was loaded.
    Raises:
        CheckpointError: nothing to load, or saved keys that the model does not have.
    """
    path = Path(path)
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    if not (path / MODEL_STATES).is_file():
        best = best_record(path) if which == "best" else None
        tag = best["tag"] if best else latest_tag(path)
        if tag is None:
            raise CheckpointError(f"{path}: no training checkpoint (no 'latest' or best.json)")
        path = path / tag
    states = torch.load(path / MODEL_STATES, map_location="cpu", weights_only=True)
    module = states["module"]
    expected = model.state_dict()
    unexpected = sorted(set(module) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: keys not in the model: {unexpected[:10]}")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(module))
    if missing:
        raise CheckpointError(f"{path}: trainable weights missing: {missing[:10]}")
    model.load_state_dict(module, strict=False)
    logger.info("loaded %d tensors from %s", len(module), path)
    return path
