"""Reading and writing weight files safely, and strict loading with errors that name keys.

Only safetensors and ``torch.load(weights_only=True)`` are used: a checkpoint downloaded from the
internet cannot run code on the reader's machine.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn

# Single-file names first, then sharded index files, in the order Hugging Face writes them.
_FOLDER_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the model it is loaded into."""


def _load_single_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as error:  # SafetensorError, OSError, ...: all mean "unreadable"
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises many types; all mean "unreadable"
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only checkpoint ({error})"
        ) from error
    if isinstance(loaded, Mapping) and "state_dict" in loaded and len(loaded) <= 4:
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    return dict(loaded)


def resolve_weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files behind ``path``: a file, or a Hugging Face folder (sharded or not)."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise CheckpointError(f"{path}: not a checkpoint index ({error!r})") from error
            return [path.parent / name for name in sorted(set(weight_map.values()))]
        return [path]
    if path.is_dir():
        for name in _FOLDER_WEIGHT_FILES:
            if (path / name).is_file():
                return resolve_weight_files(path / name)
        raise CheckpointError(
            f"{path}: no weight file found (looked for {list(_FOLDER_WEIGHT_FILES)})"
        )
    raise CheckpointError(f"{path}: no such checkpoint file or folder")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load all tensors of a checkpoint file or folder onto the CPU.

    Accepts ``.safetensors``, ``.bin``/``.pth``/``.pt`` (weights only) and Hugging Face folders,
    including sharded ones with an ``*.index.json``.
    """
    state: dict[str, torch.Tensor] = {}
    for file in resolve_weight_files(path):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the checkpoint index but missing")
        state.update(_load_single_file(file))
    return state


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` atomically: safetensors for ``*.safetensors``, else a ``torch.save`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_safetensors(tensors, str(tmp))
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' load reports while *we* check the loading info strictly.

    Its report lists keys we deliberately skip (e.g. CLIP's text tower) as warnings, which would
    teach users to ignore warnings; our own checks raise on anything that is really wrong.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


def _format_keys(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """Load ``state`` into ``module``, failing on any missing, unexpected or mis-shaped key.

    Args:
        module: the model to fill.
        state: parameter name -> tensor, already mapped to ``module``'s names.
        source: where ``state`` came from, used in error messages.
    Raises:
        CheckpointError: naming every offending key (the first few when there are many).
    """
    expected = module.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_format_keys(unexpected)}")
    if not problems:
        try:  # a module may adapt an older layout in its _load_from_state_dict
            module.load_state_dict(state, strict=True)
            return
        except RuntimeError as error:
            problems.append(str(error).splitlines()[-1].strip())
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if mismatched:  # named by file and shapes, instead of torch's message
        problems = [p for p in problems if "size mismatch" not in p]
        problems.append(f"shape mismatch: {_format_keys(mismatched)}")
    raise CheckpointError(
        f"{source} does not match {type(module).__name__}: " + "; ".join(problems)
    )
