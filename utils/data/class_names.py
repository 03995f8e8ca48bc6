"""Class names of the semantic-segmentation datasets, and which label values are ignored.

Each label-map dataset gets a lookup table ``(65536,)`` uint8 from the raw PNG value to a class
index (into its name list) or 255 (ignore), with the rules of LISA / LLM-Seg:

- ADE20K (``ade20k_classes.json``, the 150 SceneParsing classes): 0 (unlabelled) -> 255, then
  every value shifts down by one, so PNG value 1 is ``wall``.
- COCO-Stuff (``cocostuff_classes.json``, 182 names, index = PNG value of the
  ``stuffthingmaps`` PNGs, 255 = unlabelled): every class whose name contains ``-`` (the
  ``*-other``/``*-stuff``/material classes such as ``wall-brick``) -> 255. Index 156 is named
  ``sky`` as in upstream's list (COCO-Stuff's own name is ``sky-other``), so sky is kept.
- Mapillary Vistas v2.0: names are the lower-cased ``readable`` fields of ``config_v2.0.json``.
  Labels named ``*unlabeled`` -> 255 (upstream asks for "the unlabeled" as a class; we don't).

Part datasets (PACO-LVIS, PASCAL-Part) name a category ``obj:part``; :func:`part_category` and
:func:`part_phrase` turn that into "obj part" or "the part of the obj" (50/50), as upstream.
Values outside a name list map to 255.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

from utils.text_files import DatasetFormatError, load_dataset_json

IGNORE_LABEL = 255
_DATA_DIR = Path(__file__).resolve().parent


def _name_list(file_name: str) -> list[str]:
    return json.loads((_DATA_DIR / file_name).read_text())


def ade20k_classes() -> list[str]:
    """The 150 ADE20K class names, index = PNG value - 1."""
    return _name_list("ade20k_classes.json")


def cocostuff_classes() -> list[str]:
    """The 182 COCO-Stuff names, index = PNG value (0 person ... 181 wood)."""
    return _name_list("cocostuff_classes.json")


def _lookup(class_of_value: dict[int, int]) -> np.ndarray:
    table = np.full(65536, IGNORE_LABEL, np.uint8)
    for value, class_index in class_of_value.items():
        table[value] = class_index
    return table


def ade20k_lookup(num_classes: int = 150) -> np.ndarray:
    """``(65536,)`` uint8: 0 -> 255, v -> v - 1 for 1..150, anything else -> 255."""
    return _lookup({v: v - 1 for v in range(1, num_classes + 1)})


def cocostuff_lookup(names: list[str]) -> np.ndarray:
    """``(65536,)`` uint8: v -> v unless ``names[v]`` contains ``-`` (-> 255)."""
    return _lookup({v: v for v, name in enumerate(names) if "-" not in name})


def mapillary_classes(config_path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Readable names and lookup table from Mapillary's ``config_v2.0.json``.

    Raises:
        ValueError: the file is not a Mapillary config (the message names it).
    """
    path = Path(config_path)
    try:
        labels = load_dataset_json(path)["labels"]
        names = [str(label["readable"]).lower() for label in labels]
        ignored = {i for i, label in enumerate(labels) if "unlabeled" in str(label.get("name"))}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetFormatError(
            f"{path}: not a Mapillary config with labels[].readable ({error!r})"
        ) from None
    if len(names) > IGNORE_LABEL:
        raise ValueError(f"{path}: {len(names)} labels; at most {IGNORE_LABEL} are supported")
    return names, _lookup({v: v for v in range(len(names)) if v not in ignored})


def part_category(name: str) -> str | tuple[str, str]:
    """A PACO-LVIS / PASCAL-Part category name as upstream reads it.

    ``"car_(automobile):wheel"`` -> ``("car", "wheel")`` (LVIS ``_(...)`` qualifiers dropped);
    a name without ``:`` -> the plain object name, e.g. ``"trash_can"`` (underscores kept, as
    upstream).
    """
    pieces = name.strip().split(":")
    if len(pieces) == 1:
        return pieces[0].split("_(")[0]
    obj, part = pieces[0], ":".join(pieces[1:])
    return obj.split("_(")[0], part.split("_(")[0]


def part_phrase(category: str | tuple[str, str], rng: random.Random) -> str:
    """``("dog", "head")`` -> ``"dog head"`` or ``"the head of the dog"`` (50/50)."""
    if isinstance(category, str):
        return category
    obj, part = category
    return f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}"
