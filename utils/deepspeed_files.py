"""DeepSpeed's checkpoint files, read without running code from them.

A DeepSpeed tag folder (``global_step<N>/``) holds the module file(s) and, for ZeRO, one optimizer
file per rank. Every file is read with ``torch.load(weights_only=True)``; DeepSpeed's own helper
objects inside them (loss scaler, fragment addresses, enums) are replaced by inert stand-ins, and
a file that pickles anything else is refused. :func:`check_deepspeed_file` inspects a file's
pickle without loading it, so a save can be verified before DeepSpeed's own loader (which
unpickles everything) touches it. :func:`consolidate_zero_weights` assembles the fp32 master
weights from the ZeRO shards.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from utils.checkpoint import CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"
# ZeRO-3 writes one model-states file per rank instead of MODEL_STATES.
ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_model_states\.pt$")
OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


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


def _pickled_globals(path: Path) -> list[str]:
    """The classes/functions ``path``'s pickle refers to beyond plain tensors and containers,
    read from the pickle's opcodes without running it.

    Raises:
        CheckpointError: the file is missing, empty, truncated or not a torch zip file, or it
            refers to anything outside ``deepspeed.*`` (a pickle that would run other code).
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: missing") from error
    except Exception as error:  # zipfile/unpickler raise many types; all mean "unreadable"
        raise CheckpointError(f"{path}: truncated or corrupt ({error})") from error
    foreign = sorted(n for n in names if not n.startswith("deepspeed."))
    if foreign:
        raise CheckpointError(f"{path}: holds objects of {foreign}; refusing to unpickle them")
    return names


def check_deepspeed_file(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete torch file whose pickle refers
    only to tensors, containers and ``deepspeed.*`` classes."""
    _pickled_globals(Path(path))


def check_tag_dir(tag_dir: str | os.PathLike, world_size: int | None = None) -> None:
    """Verify a DeepSpeed tag folder before anything loads it: the module file(s) exist, every
    ``.pt`` file is complete and safe (:func:`check_deepspeed_file`), and the optimizer shards
    are ranks ``0..n-1`` with ``n == world_size`` (when given and the save has shards).

    Raises:
        CheckpointError: naming the folder or file and what is wrong.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise CheckpointError(f"{tag_dir}: no such save folder")
    if not model_states_files(tag_dir):
        raise CheckpointError(f"{tag_dir}: no module file ({MODEL_STATES} or per-rank ZeRO-3 ones)")
    for path in sorted(tag_dir.glob("*.pt")):
        check_deepspeed_file(path)
    ranks = [int(m.group(1)) for p in tag_dir.iterdir() if (m := OPTIM_STATES.match(p.name))]
    if ranks and sorted(ranks) != list(range(len(ranks))):
        raise CheckpointError(
            f"{tag_dir}: optimizer shards of ranks {sorted(ranks)} (some missing)"
        )
    if ranks and world_size is not None and len(ranks) != world_size:
        raise CheckpointError(
            f"{tag_dir}: {len(ranks)} optimizer shards for a run of {world_size} processes"
        )


def load_deepspeed_file(path: str | os.PathLike) -> dict:
    """``torch.load(weights_only=True)`` of a DeepSpeed file, with inert stand-ins for the
    ``deepspeed.*`` classes it pickles; any other non-tensor class is an error naming it."""
    path = Path(path)
    names = _pickled_globals(path)
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
