"""ReasonSeg (LISA's reasoning-segmentation benchmark), read in its native labelme format.

Layout: ``<dataset_dir>/reason_seg/ReasonSeg/<split>/<stem>.jpg`` + ``<stem>.json`` with keys
``text`` (list of queries), ``is_sentence`` (long sentence vs short phrase) and ``shapes``
(labelme polygons labelled ``target`` / ``ignore``). Splits may be joined with ``_``
(``train_val``). Proposals come from ``<sam_masks_dir>/reason_seg/ReasonSeg/<split>/``, keyed by
the image file name.

Behaviour on bad input: every json is parsed when the dataset is built, so a malformed or missing
json stops the run at once with the file named (before hours of training, not in the middle).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.data.conversation import (
    ANSWER_TEMPLATES,
    LONG_QUESTION_TEMPLATES,
    SHORT_QUESTION_TEMPLATES,
    VALIDATION_ANSWER,
    VALIDATION_LONG_QUESTION,
    VALIDATION_SHORT_QUESTION,
)
from utils.data.samples import SegmentationRecord
from utils.masks import labelme_to_mask
from utils.proposal_store import ProposalReader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetFormatError(ValueError):
    """A dataset file that does not have the expected format; the message names it."""


@dataclass
class ReasonSegItem:
    """One parsed ReasonSeg image: its file, queries, query kind and polygons."""

    image_path: Path
    texts: list[str]
    is_sentence: bool
    shapes: list[dict]
    proposals: ProposalReader | None
    extra: dict

    def masks(self, height: int, width: int, count: int) -> np.ndarray:
        """``(count, H, W)`` copies of the label map (1 target, 255 ignore), one per ``[SEG]``."""
        label_map = labelme_to_mask(self.shapes, height, width)
        return np.repeat(label_map[None], count, axis=0)


def parse_reason_seg_json(path: Path) -> tuple[list[str], bool, list[dict], dict]:
    """``(texts, is_sentence, shapes, other_fields)`` of one ReasonSeg json, validated."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFormatError(f"{path}: not a readable json file ({error})") from None
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a json object, found {type(data).__name__}")
    texts = data.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise DatasetFormatError(f"{path}: field 'text' must be a non-empty list of strings")
    shapes = data.get("shapes")
    if not isinstance(shapes, list) or not shapes:
        raise DatasetFormatError(f"{path}: field 'shapes' must be a non-empty list of polygons")
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or "points" not in shape or "label" not in shape:
            raise DatasetFormatError(f"{path}: shapes[{index}] needs 'label' and 'points'")
    if "is_sentence" not in data:
        raise DatasetFormatError(f"{path}: field 'is_sentence' is missing")
    extra = {k: v for k, v in data.items() if k not in ("text", "shapes", "is_sentence")}
    return list(texts), bool(data["is_sentence"]), shapes, extra


def load_reason_seg_split(dataset_dir: str | Path, sam_masks_dir: str | Path | None, splits: str):
    """Parse every image of ``splits`` (e.g. ``train`` or ``train_val``) into items.

    ``sam_masks_dir=None`` skips the proposal stores (scoring saved predictions needs none).
    """
    items = []
    for split in splits.split("_"):
        folder = Path(dataset_dir) / "reason_seg" / "ReasonSeg" / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ReasonSeg split folder {folder} does not exist")
        proposals = None
        if sam_masks_dir is not None:
            proposals = ProposalReader(Path(sam_masks_dir) / "reason_seg" / "ReasonSeg" / split)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{folder}: no images")
        for image_path in images:
            json_path = image_path.with_suffix(".json")
            if not json_path.is_file():
                raise DatasetFormatError(f"{image_path}: no annotation {json_path.name} beside it")
            texts, is_sentence, shapes, extra = parse_reason_seg_json(json_path)
            items.append(ReasonSegItem(image_path, texts, is_sentence, shapes, proposals, extra))
    return items


def _groups(item: ReasonSegItem) -> tuple[str, ...]:
    """``long``/``short`` (ReasonSeg test's breakdown), plus the query type when recorded."""
    groups = ("long" if item.is_sentence else "short",)
    if "query_type" in item.extra:
        groups += (f"type:{item.extra['query_type']}",)
    return groups


def _record(item: ReasonSegItem, conversations, queries) -> SegmentationRecord:
    return SegmentationRecord(
        image_path=item.image_path,
        conversations=conversations,
        masks=functools.partial(item.masks, count=len(conversations)),
        proposals=item.proposals,
        proposal_key=item.image_path.name,
        name=item.image_path.stem,
        dataset="ReasonSeg",
        groups=_groups(item),
        queries=queries,
    )


def reason_seg_train_record(
    item: ReasonSegItem, rng: random.Random, num_queries: int = 3
) -> SegmentationRecord:
    """A training sample: up to ``num_queries`` of the image's texts, each its own conversation."""
    texts = rng.sample(item.texts, min(num_queries, len(item.texts)))
    conversations = []
    for text in texts:
        if item.is_sentence:
            question = rng.choice(LONG_QUESTION_TEMPLATES).format(sent=text)
        else:
            question = rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=text.lower())
        conversations.append([(question, rng.choice(ANSWER_TEMPLATES))])
    return _record(item, conversations, texts)


def reason_seg_eval_record(item: ReasonSegItem) -> SegmentationRecord:
    """An evaluation sample: the first text, the fixed validation prompt, answer ``[SEG].``."""
    text = item.texts[0]
    if item.is_sentence:
        question = VALIDATION_LONG_QUESTION.format(sent=text)
    else:
        question = VALIDATION_SHORT_QUESTION.format(class_name=text)
    return _record(item, [[(question, VALIDATION_ANSWER)]], [text])


class ReasonSegSource:
    """Training source: a random ReasonSeg image with up to ``num_queries`` of its texts."""

    name = "reason_seg"

    def __init__(self, items: list[ReasonSegItem], num_queries: int = 3):
        if not items:
            raise ValueError("ReasonSeg training source has no images")
        self.items = items
        self.num_queries = num_queries

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return reason_seg_train_record(rng.choice(self.items), rng, self.num_queries)
