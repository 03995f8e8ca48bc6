"""Never replacing a file a command did not write: the check every writing CLI makes first.

A command may replace its own outputs from an earlier run (a rerun of the same command), and
resume into a store of the kind it writes (the proposal stores, ``<out>.partial``). Anything
else already at one of its output paths (a released file, another tool's results, a real
checkpoint) stops the command before it writes anything, naming the paths, unless
``--overwrite`` is given. An earlier run is recognised by the config file the command saves
beside its outputs (:func:`utils.config.save_config`): a JSON object whose keys are all fields
of the command's config class, which a foreign file of the same name (a Hugging Face
``config.json``, another tool's ``metrics.json``) is not.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path


def written_by(marker: str | os.PathLike, config_cls: type) -> bool:
    """Whether ``marker`` is a config that ``config_cls``'s command saved.

    Args:
        marker: the config file the command writes beside its outputs.
        config_cls: the command's config dataclass.
    """
    try:
        data = json.loads(Path(marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    fields = {f.name for f in dataclasses.fields(config_cls)}
    return isinstance(data, dict) and bool(data) and set(data) <= fields


def _occupied(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def refuse_to_replace(
    paths: Iterable[str | os.PathLike],
    overwrite: bool,
    command: str = "",
    flag: str = "",
    marker: str | os.PathLike | None = None,
    config_cls: type | None = None,
) -> None:
    """Stop before writing when one of ``paths`` holds something this command did not write.

    Args:
        paths: the files and folders the command is about to replace (an empty folder or a
            missing path is free).
        overwrite: ``--overwrite`` was given: replace whatever is there.
        command: the command's name, for the message (empty: any existing path is refused).
        flag: the flag that chooses the output place, offered as a way out.
        marker: the config file an earlier run of the command left beside its outputs; when
            :func:`written_by` recognises it, the paths are the command's own and may be
            replaced.
        config_cls: the command's config class (with ``marker``).
    Raises:
        FileExistsError: naming the occupied paths and the ways out.
    """
    if overwrite:
        return
    if marker is not None and config_cls is not None and written_by(marker, config_cls):
        return
    occupied = [str(p) for p in map(Path, paths) if _occupied(p)]
    if not occupied:
        return
    more = len(occupied) - 5
    shown = ", ".join(occupied[:5]) + (f" and {more} more" if more > 0 else "")
    origin = f"not written by {command}" if command else "already exists"
    ways = f"choose another {flag} or give --overwrite" if flag else "give --overwrite"
    raise FileExistsError(
        f"{shown}: {origin} and would be replaced; {ways}: {flag or '--overwrite'}"
    )
