"""Training checkpoints: keep the last and the best, resume exactly, load weights for evaluation.

Layout of ``<log_dir>/ckpt_model`` (DeepSpeed's own format, so its tools keep working)::

    global_step<N>/            one tag per save: module (trainable weights only) + ZeRO shards
    latest                     the newest complete tag (written by DeepSpeed after the save)
    best.json                  {"tag": ..., "giou": ...}: the tag with the best validation gIoU

A new tag is fully written, checked (every file complete, ``latest`` naming it) before any old one
is removed, and only tags that are neither the latest nor the best are removed, so a crash at any
moment leaves a loadable checkpoint. A resume verifies the save it is about to load (every file
complete and pickling nothing but tensors and DeepSpeed's own classes) before DeepSpeed's loader,
which unpickles everything, reads it; a broken or unsafe save stops the run and deletes nothing.
Frozen weights (LLaMA base, CLIP, DINOv2) are not saved: they come from their own folders.

:func:`read_training_weights` reads the trainable weights back from any ZeRO stage: from the module
file when it holds them (ZeRO 0-2), else from the optimizer's fp32 partitions (ZeRO-3, whose module
file holds empty placeholders), or from a folder/file that ``zero_to_fp32.py`` consolidated (one
file or the sharded layout newer DeepSpeed versions write). Every file is read with
``weights_only=True``; DeepSpeed's own helper objects inside optimizer files are replaced by inert
stand-ins (DeepSpeed's ``zero_to_fp32`` unpickles them with ``weights_only=False``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.checkpoint import CheckpointError, load_state_dict, resolve_weight_files
from utils.deepspeed_files import (
    _placeholders,
    check_tag_dir,
    consolidate_zero_weights,
    load_deepspeed_file,
    model_states_files,
)
from utils.distributed import barrier, is_main_process, world_size

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "ckpt_model"
WEIGHT_SOURCES = ("auto", "module", "fp32")


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named in ``latest`` if its folder exists, else ``None``."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if model_states_files(ckpt_dir / tag) else None


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
        # prune nothing until the new save is complete and readable and `latest` names it
        check_tag_dir(ckpt_dir / tag, world_size())
        if (ckpt_dir / "latest").read_text().strip() != tag:
            raise CheckpointError(f"{ckpt_dir / 'latest'}: does not name the new save {tag}")
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


def _way_out(ckpt_dir: Path) -> str:
    return (
        f"; resume another save with --resume <run, ckpt_model or global_step folder>, or move "
        f"{ckpt_dir} away to start afresh (nothing was deleted)"
    )


def resumable_tag(ckpt_dir: Path) -> str | None:
    """The tag a resume from ``ckpt_dir`` would load, verified (:func:`check_tag_dir`) before
    DeepSpeed's loader, which unpickles everything, touches it.

    Returns:
        ``None`` when ``ckpt_dir`` holds no save at all (a fresh run).
    Raises:
        CheckpointError: saves exist but ``latest`` is missing, empty, garbled or dangling, or
            the save it names is incomplete, truncated or unsafe; the message names the path
            and the ways out. Nothing is deleted.
    """
    latest = ckpt_dir / "latest"
    tags = sorted(p.name for p in ckpt_dir.glob("global_step*") if p.is_dir())
    if not latest.exists():
        if tags:
            raise CheckpointError(
                f"{ckpt_dir}: holds saves {tags} but no 'latest'" + _way_out(ckpt_dir)
            )
        return None
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{latest}: unreadable ({error})" + _way_out(ckpt_dir)) from error
    if not re.fullmatch(r"[\w.\-]+", tag):
        raise CheckpointError(f"{latest}: empty or garbled ({tag[:40]!r})" + _way_out(ckpt_dir))
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest}: names {tag}, which does not exist" + _way_out(ckpt_dir))
    try:
        check_tag_dir(ckpt_dir / tag, world_size())
    except CheckpointError as error:
        raise CheckpointError(str(error) + _way_out(ckpt_dir)) from error
    return tag


def resume_training_checkpoint(engine, ckpt_dir: Path) -> dict | None:
    """Restore model, optimizer, scheduler and counters from the latest tag, if there is one.

    Returns:
        The saved ``client_state`` (or ``None`` when there is nothing to resume).
    Raises:
        CheckpointError: see :func:`resumable_tag`.
    """
    tag = resumable_tag(ckpt_dir)
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


def holds_saves(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds anything a fresh run would overwrite or prune."""
    return (ckpt_dir / "latest").exists() or any(p.is_dir() for p in ckpt_dir.glob("global_step*"))


@dataclass(frozen=True)
class AddedParts:
    """What a model adds to the run it starts from (``training.py --init_weights``).

    Attributes:
        prefixes: name prefixes of parts the saved run may lack (SegLLM's mask encoder on a
            single-round LLM-Seg run); they keep their initialisation.
        token_rows: trailing rows of the token matrices (``embed_tokens``, ``lm_head``) the saved
            run may lack: tokens added after the saved run's (``<ref>``); they keep theirs.
    """

    prefixes: tuple[str, ...] = ()
    token_rows: int = 0


def load_trainable_weights(
    model: torch.nn.Module,
    path: str | os.PathLike,
    which: str = "best",
    source: str = "auto",
    added: AddedParts | None = None,
) -> TrainingWeights:
    """Load the weights a training run saved into ``model``, for evaluation or inference.

    Args:
        model: the model built from the same config (frozen parts already loaded).
        path: a run folder, its ``ckpt_model`` folder, one ``global_step*`` tag folder, or a
            ``zero_to_fp32.py`` output (file or sharded folder).
        which: ``best`` or ``latest`` when ``path`` holds several tags.
        source: see :func:`read_training_weights`.
        added: parts ``model`` may have beyond the saved run's (a fine-tuning start); ``None``:
            the save must hold every trainable weight, in the model's shapes.
    Returns:
        What was read (``.path`` is the tag folder or file).
    Raises:
        CheckpointError: nothing to load, saved keys that the model does not have, trainable
            weights missing, or a shape that differs from the model's.
    """
    added = added or AddedParts()
    weights = read_training_weights(path, which, source)
    module = dict(weights.state)
    expected = model.state_dict()
    unexpected = sorted(set(module) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights.path}: keys not in the model: {unexpected[:10]}")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    absent = sorted(trainable - set(module))
    fresh = [name for name in absent if name.startswith(added.prefixes)] if added.prefixes else []
    missing = sorted(set(absent) - set(fresh))
    if missing:
        raise CheckpointError(f"{weights.path}: trainable weights missing: {missing[:10]}")
    grown = []
    for name, saved in module.items():
        target = expected[name]
        short = target.shape[0] - saved.shape[0] if saved.dim() and target.dim() else 0
        if added.token_rows and short == added.token_rows and saved.shape[1:] == target.shape[1:]:
            merged = target.detach().clone()  # the added tokens keep their initial rows
            merged[: saved.shape[0]] = saved.to(merged.dtype)
            module[name] = merged
            grown.append(name)
    try:  # modules may adapt older layouts in their _load_from_state_dict
        model.load_state_dict(module, strict=False)
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"{weights.path}: {'; '.join(details) or error}") from None
    logger.info("loaded %d tensors from %s (%s)", len(module), weights.path, weights.kind)
    if fresh or grown:
        logger.info(
            "parts the saved run lacks keep their initialisation: %d tensors (%s)%s",
            len(fresh), ", ".join(sorted({name.rsplit(".", 1)[0] for name in fresh})) or "none",
            f"; new token rows in {', '.join(grown)}" if grown else "",
        )  # fmt: skip
    return weights


# ---------------------------------------------------------------------------------------------
# Reading DeepSpeed checkpoints of any ZeRO stage safely.
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingWeights:
    """Weights read back from a training checkpoint.

    Attributes:
        state: parameter name -> tensor (the model's own names; trainable weights only when the
            run excluded frozen ones).
        path: the tag folder or consolidated file/folder that was read.
        kind: ``module`` (the module file), ``zero_fp32`` (the optimizer's fp32 partitions,
            consolidated) or ``consolidated`` (a ``zero_to_fp32.py`` output).
        client_state: what the run stored beside the weights (``global_step``, ...), if known.
    """

    state: dict[str, torch.Tensor]
    path: Path
    kind: str
    client_state: dict = field(default_factory=dict)


def _client_state(states: dict) -> dict:
    # Counters such as global_step / epoch (DeepSpeed's and the run's client_state).
    numbers = {k: v for k, v in states.items() if isinstance(v, (int, float))}
    return {k: v for k, v in numbers.items() if not isinstance(v, bool)}


def resolve_tag_dir(path: str | os.PathLike, which: str = "best") -> Path:
    """The DeepSpeed tag folder behind a run, ``ckpt_model`` or tag folder (or model file)."""
    path = Path(path)
    if path.is_file() and path.name.endswith("model_states.pt"):
        return path.parent
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    if model_states_files(path):
        return path
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    best = best_record(path) if which == "best" and path.is_dir() else None
    tag = best["tag"] if best else latest_tag(path)
    if tag is None:
        raise CheckpointError(f"{path}: no training checkpoint (no 'latest' or best.json)")
    return path / tag


def read_training_weights(
    path: str | os.PathLike, which: str = "best", source: str = "auto"
) -> TrainingWeights:
    """Read the weights of a training checkpoint, whatever ZeRO stage wrote it.

    Args:
        path: a run folder, ``ckpt_model``, a ``global_step*`` tag folder, a model-states file,
            or a consolidated state dict (a file, or a folder of shards with an index).
        which: ``best`` or ``latest`` tag when ``path`` holds several.
        source: ``module`` (the module file; exactly what the engine ran, e.g. bf16),
            ``fp32`` (the optimizer's fp32 master weights) or ``auto`` (the module file unless
            ZeRO-3 left it empty).
    Raises:
        CheckpointError: nothing readable, incomplete shards, or unsafe pickled objects.
    """
    if source not in WEIGHT_SOURCES:
        raise ValueError(f"unknown weight source {source!r}; expected one of {WEIGHT_SOURCES}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    is_deepspeed = (
        (path.is_file() and path.name.endswith("model_states.pt"))
        or model_states_files(path)
        or (path / CHECKPOINT_DIR).is_dir()
        or (path / "latest").is_file()
        or (path / "best.json").is_file()
    )
    if not is_deepspeed:
        resolve_weight_files(path)  # a clear error when this is not a weights file/folder either
        return TrainingWeights(load_state_dict(path), path, "consolidated")
    tag_dir = resolve_tag_dir(path, which)
    states = load_deepspeed_file(model_states_files(tag_dir)[0])
    empty = _placeholders(states)
    if source == "module" and empty:
        raise CheckpointError(
            f"{tag_dir}: the module file holds no values for {empty[:3]}... (ZeRO-3); "
            "read the fp32 partitions instead (source='fp32')"
        )
    if source == "fp32" or empty:
        state = consolidate_zero_weights(tag_dir)
        return TrainingWeights(state, tag_dir, "zero_fp32", _client_state(states))
    return TrainingWeights(dict(states["module"]), tag_dir, "module", _client_state(states))
