"""Dataclass configs exposed as argparse command lines.

Every entry point declares one dataclass, builds its parser with :func:`build_parser`, and has a
``main(config)`` that tests call directly. Field names become ``--field_name`` flags (dashes are
accepted too, for upstream spellings such as ``--vision-tower``); booleans get both
``--flag`` and ``--no-flag``; help text comes from ``field(metadata={"help": ...})``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """Return ``(inner_type, is_optional)`` for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


class BooleanFlag(argparse.Action):
    """A boolean flag whose every spelling means what it says.

    ``--x`` / ``--x=true`` set it, ``--no-x`` / ``--no_x`` / ``--x=false`` clear it; the spelling
    of the field itself always sets it, so a field named ``no_eval`` is set by ``--no-eval``
    (argparse's ``BooleanOptionalAction`` reads any ``--no-`` spelling as a negation, turning
    ``--no-eval`` into "evaluate"). A value other than true/false words is a usage error.
    """

    def __init__(self, option_strings, dest, negative=(), **kwargs):
        self.negative = set(negative)
        super().__init__(option_strings, dest, nargs="?", metavar="true|false", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if values is None or str(values).lower() in TRUE_WORDS:
            value = True
        elif str(values).lower() in FALSE_WORDS:
            value = False
        else:
            parser.error(f"{option_string}: expected true or false, got {values!r}")
        if option_string in self.negative:
            if values is not None:
                parser.error(f"{option_string} takes no value")
            value = False
        setattr(namespace, self.dest, value)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, config_cls: type, aliases: dict[str, list[str]] | None = None
) -> None:
    """Add one flag per field of ``config_cls`` to ``parser``.

    Args:
        parser: the parser to extend.
        config_cls: a dataclass whose fields have defaults.
        aliases: extra spellings per field name, e.g. ``{"vision_tower": ["--vision-tower"]}``.
    """
    hints = typing.get_type_hints(config_cls)
    aliases = aliases or {}
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        kind, optional = _unwrap_optional(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        flags = [f"--{f.name}"]
        if "_" in f.name:
            flags.append(f"--{f.name.replace('_', '-')}")
        flags += aliases.get(f.name, [])
        help_text = f.metadata.get("help", "")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            negative = [f"--no-{flag[2:]}" for flag in flags] + [
                f"--no_{flag[2:]}" for flag in flags
            ]
            parser.add_argument(
                *flags, *dict.fromkeys(negative), action=BooleanFlag, negative=negative,
                help=help_text or " ", **kwargs,
            )  # fmt: skip
        elif kind in (int, float, str):
            parser.add_argument(
                *flags,
                type=kind,
                help=help_text or " ",
                required=default is None and not optional,
                **kwargs,
            )
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name}: unsupported field type {kind!r}")


def build_parser(config_cls: type, description: str = "", **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one flag per field of ``config_cls``."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_dataclass_arguments(parser, config_cls, **kwargs)
    return parser


def parse_config(config_cls: type[T], argv: list[str] | None = None, **kwargs) -> T:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into an instance of ``config_cls``."""
    parser = build_parser(config_cls, description=config_cls.__doc__ or "", **kwargs)
    namespace = parser.parse_args(argv)
    return config_cls(**vars(namespace))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-serialisable dict of a (possibly nested) dataclass config."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(config)


def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented, key-sorted JSON through a temporary file and one rename, so a
    reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_csv_atomic(rows: list[dict], fields: list[str], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts keyed by ``fields``) as CSV through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def save_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as JSON (atomically), so every run records how it was made."""
    return write_json_atomic(config_to_dict(config), path)


def load_config(config_cls: type[T], path: str | os.PathLike) -> T:
    """Read a config written by :func:`save_config`; unknown fields are an error naming them."""
    data = json.loads(Path(path).read_text())
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {config_cls.__name__} fields {unknown}")
    return config_cls(**data)
