"""Training checkpoints: keep the last and the best, resume exactly, load weights for evaluation.

Layout of ``<log_dir>/ckpt_model`` (DeepSpeed's own format, so its tools keep working)::

    global_step<N>/            one tag per save: module (trainable weights only) + ZeRO shards
    latest                     the newest complete tag (written by DeepSpeed after the save)
    best.json                  {"tag": ..., "giou": ...}: the tag with the best validation gIoU

A new tag is fully written before any old one is removed, and only tags that are neither the
latest nor the best are removed, so a crash at any moment leaves a loadable checkpoint.
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
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.checkpoint import CheckpointError, load_state_dict, resolve_weight_files
from utils.distributed import barrier, is_main_process

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "ckpt_model"
MODEL_STATES = "mp_rank_00_model_states.pt"
# ZeRO-3 writes one model-states file per rank instead of MODEL_STATES.
ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
WEIGHT_SOURCES = ("auto", "module", "fp32")


def _rank_files(tag_dir: Path, pattern: re.Pattern) -> list[Path]:
    """Files of ``tag_dir`` matching ``pattern`` (rank in group 1), in rank order."""
    found = [(int(m.group(1)), p) for p in tag_dir.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def model_states_files(tag_dir: Path) -> list[Path]:
    """The module file(s) of one DeepSpeed tag: ``[mp_rank_00...]`` (ZeRO 0-2), or one per rank
    (ZeRO-3); empty when ``tag_dir`` is not a DeepSpeed tag folder."""
    if not tag_dir.is_dir():
        return []
    if (tag_dir / MODEL_STATES).is_file():
        return [tag_dir / MODEL_STATES]
    return _rank_files(tag_dir, ZERO3_MODEL_STATES)


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


def load_trainable_weights(
    model: torch.nn.Module, path: str | os.PathLike, which: str = "best", source: str = "auto"
) -> TrainingWeights:
    """Load the weights a training run saved into ``model``, for evaluation or inference.

    Args:
        model: the model built from the same config (frozen parts already loaded).
        path: a run folder, its ``ckpt_model`` folder, one ``global_step*`` tag folder, or a
            ``zero_to_fp32.py`` output (file or sharded folder).
        which: ``best`` or ``latest`` when ``path`` holds several tags.
        source: see :func:`read_training_weights`.
    Returns:
        What was read (``.path`` is the tag folder or file).
    Raises:
        CheckpointError: nothing to load, or saved keys that the model does not have.
    """
    weights = read_training_weights(path, which, source)
    module = weights.state
    expected = model.state_dict()
    unexpected = sorted(set(module) - set(expected))
    if unexpected:
        raise CheckpointError(f"{weights.path}: keys not in the model: {unexpected[:10]}")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(module))
    if missing:
        raise CheckpointError(f"{weights.path}: trainable weights missing: {missing[:10]}")
    model.load_state_dict(module, strict=False)
    logger.info("loaded %d tensors from %s (%s)", len(module), weights.path, weights.kind)
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


class _DeepSpeedObject:
    """Inert stand-in for a DeepSpeed helper object pickled into a checkpoint (loss scaler,
    fragment address, ...): it only records what it was built from, no DeepSpeed code runs."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def _enum_value(value):
    """Stand-in for a DeepSpeed enum (``ZeroStageEnum(2)``): its plain value."""
    return value


def load_deepspeed_file(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` of a DeepSpeed file, with inert stand-ins for the
    ``deepspeed.*`` classes it pickles; any other non-tensor class is an error naming it."""
    path = Path(path)
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    foreign = sorted(n for n in names if not n.startswith("deepspeed."))
    if foreign:
        raise CheckpointError(f"{path}: holds objects of {foreign}; refusing to unpickle them")
    stand_ins = [
        (_enum_value if n.rsplit(".", 1)[-1].endswith("Enum") else _DeepSpeedObject, n)
        for n in names
    ]
    try:
        with torch.serialization.safe_globals(stand_ins):
            # mmap: a 7B checkpoint's tensors are paged in when used, not all read up front
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # the unpickler raises many types; all mean "unreadable"
        raise CheckpointError(f"{path}: cannot be read safely ({error})") from error


def _merge_zero12(osds: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    # ZeRO 1/2: per parameter group, each rank holds one contiguous slice of the flat fp32
    # vector; parameters lie in it in param_shapes order, each followed by its alignment pad.
    paddings = osds[0].get("param_alignment_paddings")
    state = {}
    for group, shapes in enumerate(param_shapes):
        flat = torch.cat([osd["single_partition_of_fp32_groups"][group] for osd in osds])
        offset = 0
        for index, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            state[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[group][index] if paddings else 0)
        if offset > flat.numel():
            raise CheckpointError(
                f"ZeRO group {group}: {offset} values needed, {flat.numel()} saved"
            )
    return state


def _merge_zero3(osds: list[dict], param_shapes: list[dict]) -> dict[str, torch.Tensor]:
    # ZeRO-3: every parameter is split into world_size equal (zero-padded) pieces, rank r holds
    # piece r of each parameter, laid out one after another in its flat fp32 groups.
    flats = [torch.cat(list(osd["fp32_flat_groups"])) for osd in osds]
    world = len(flats)
    state, offset = {}, 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            piece = math.ceil(numel / world)
            pieces = [flat.narrow(0, offset, piece) for flat in flats]
            state[name] = torch.cat(pieces)[:numel].view(shape).clone()
            offset += piece
    if offset > flats[0].numel():
        raise CheckpointError(f"ZeRO-3 partitions hold {flats[0].numel()} values, {offset} needed")
    return state


def consolidate_zero_weights(tag_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a DeepSpeed ZeRO tag folder, assembled from every rank.

    Equal to ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` with
    ``exclude_frozen_parameters=True`` (the tests check it), read safely.
    """
    tag_dir = Path(tag_dir)
    model_files = model_states_files(tag_dir)
    optim_files = _rank_files(tag_dir, OPTIM_STATES) if tag_dir.is_dir() else []
    if not model_files or not optim_files:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model and optimizer state files")
    param_shapes = load_deepspeed_file(model_files[0])["param_shapes"]
    osds = [load_deepspeed_file(f)["optimizer_state_dict"] for f in optim_files]
    if "zero_stage" not in osds[0]:
        raise CheckpointError(f"{optim_files[0]}: not a ZeRO optimizer state (use the module file)")
    stage = int(osds[0]["zero_stage"])
    world = osds[0]["partition_count"]
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if world != len(osds):
        raise CheckpointError(
            f"{tag_dir}: {len(osds)} optimizer shards for a world of {world} ranks (incomplete?)"
        )
    merge = _merge_zero3 if stage == 3 else _merge_zero12
    return merge(osds, param_shapes)


def _placeholders(states: dict) -> list[str]:
    """Module entries that ZeRO-3 left empty although the parameter has elements."""
    shapes = {k: v for group in states.get("param_shapes") or [] for k, v in group.items()}
    return [
        name
        for name, value in states["module"].items()
        if value.numel() == 0 and math.prod(shapes.get(name, (0,))) > 0
    ]


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
