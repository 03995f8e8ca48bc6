"""Multi-round conversations stored in ReasonSeg-format jsons (the synthetic demo's data).

A json of a ReasonSeg-layout split (``<dataset_dir>/reason_seg/ReasonSeg/<split>/``) may hold a
``conversation``: a list of rounds, each ``{"text", "is_sentence", "shapes", "references", ...}``
(``prepare_datasets/prepare_synthetic.py --conversations`` writes them). A later round's text
names earlier rounds with ``[REF:k]`` markers (:mod:`utils.data.references`). A json may also
hold ``extra_conversations``: further conversations about the same picture (``--extra_conversations
N``), which training reads as records of their own and evaluation ignores. Each conversation
becomes one record of one conversation:

- round 1 asks with LISA's validation prompt (``<image>`` first: a sentence, or "What is {x} in
  this image?" for a phrase), later rounds with the same prompts without the image;
- every answer is ``[SEG].``, teacher-forced as in evaluation;
- ``masks(H, W)`` gives each round's target rasterised from its polygons (1 target, 255 ignore);
- proposals come from the split's ReasonSeg store.

Used as a training source (``--multi_round_data "ReasonSeg|train"``) and as an evaluation set
(``--val_dataset "ReasonSegMR|val"``). A json without a ``conversation`` is skipped (and
counted in one log line); a malformed round is a format error naming the json and the round.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from utils.data.conversation import VALIDATION_ANSWER
from utils.data.reason_seg import ReasonSegItem, load_reason_seg_split
from utils.data.samples import SegmentationRecord
from utils.masks import labelme_to_mask
from utils.text_files import DatasetFormatError
from utils.tokenizer import IMAGE_TOKEN

logger = logging.getLogger(__name__)

LONG_PROMPT = "{sent} Please output segmentation mask."
SHORT_PROMPT = "What is {class_name} in this image? Please output segmentation mask."


def _round_masks(shapes_per_round: list[list[dict]], height: int, width: int) -> np.ndarray:
    """``(R, H, W)`` label maps (1 target, 255 ignore), one per round."""
    return np.stack([labelme_to_mask(shapes, height, width) for shapes in shapes_per_round])


def _question(round_: dict, index: int, where: str) -> str:
    text = round_.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DatasetFormatError(f"{where}: conversation[{index}] needs a non-empty 'text'")
    template = LONG_PROMPT if round_.get("is_sentence") else SHORT_PROMPT
    question = template.format(sent=text.strip(), class_name=text.strip())
    return f"{IMAGE_TOKEN}\n {question}" if index == 0 else question


def conversation_record(
    item: ReasonSegItem, split: str, rounds=None, where: str | None = None
) -> SegmentationRecord | None:
    """The record of one image's conversation (``rounds``, by default the json's
    ``conversation``), or ``None`` when its json has none."""
    if rounds is None:
        rounds = item.extra.get("conversation")
    if rounds is None:
        return None
    where = where or str(item.image_path.with_suffix(".json"))
    if not isinstance(rounds, list) or not rounds:
        raise DatasetFormatError(f"{where}: 'conversation' must be a non-empty list of rounds")
    shapes = []
    for index, round_ in enumerate(rounds):
        if not isinstance(round_, dict) or not isinstance(round_.get("shapes"), list):
            raise DatasetFormatError(f"{where}: conversation[{index}] needs a list 'shapes'")
        shapes.append(round_["shapes"])
    turns = [(_question(r, i, where), VALIDATION_ANSWER) for i, r in enumerate(rounds)]
    return SegmentationRecord(
        image_path=item.image_path,
        conversations=[turns],
        masks=functools.partial(_round_masks, shapes),
        proposals=item.proposals,
        proposal_key=item.image_path.name,
        name=item.image_path.stem,
        dataset=f"ReasonSegMR|{split}",
        queries=[r["text"] for r in rounds],
    )


def _extra_records(item: ReasonSegItem, split: str) -> list[SegmentationRecord]:
    """Records of a json's ``extra_conversations``."""
    where = str(item.image_path.with_suffix(".json"))
    extra = item.extra.get("extra_conversations", [])
    if not isinstance(extra, list):
        raise DatasetFormatError(f"{where}: 'extra_conversations' must be a list of conversations")
    records = []
    for index, rounds in enumerate(extra):
        here = f"{where}: extra_conversations[{index}]"
        if not isinstance(rounds, list) or not rounds:  # (None would mean the main one)
            raise DatasetFormatError(f"{here} must be a non-empty list of rounds")
        records.append(conversation_record(item, split, rounds, here))
    return records


def load_conversation_split(
    dataset_dir: str | Path,
    sam_masks_dir: str | Path | None,
    split: str,
    extra_conversations: bool = False,
) -> list[SegmentationRecord]:
    """One record per image of ``split`` that holds a conversation; with
    ``extra_conversations`` (training) also one per conversation of ``extra_conversations``."""
    records = []
    items = load_reason_seg_split(dataset_dir, sam_masks_dir, split)
    for item in items:
        record = conversation_record(item, split)
        if record is not None:
            records.append(record)
            if extra_conversations:
                records.extend(_extra_records(item, split))
    if len(records) < len(items):
        logger.info(
            "ReasonSeg|%s: %d of %d jsons hold a conversation", split, len(records), len(items)
        )
    if not records:
        raise DatasetFormatError(
            f"ReasonSeg|{split}: no json holds a 'conversation' (write them with "
            "python -m prepare_datasets.prepare_synthetic --conversations)"
        )
    return records
