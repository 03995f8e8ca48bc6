"""The ``multi_round`` training family: SegLLM-style conversations whose later rounds refer to
earlier ones (``[REF:k]`` markers, :mod:`utils.data.references`).

Sources are named by ``--multi_round_data``: MRSeg conversation files (:mod:`utils.data.mrseg`;
``"mr_refcoco||mr_refcoco+||mr_refcocog"``, stems under ``<dataset_dir>/mrseg/``) and
conversations kept in ReasonSeg-format jsons (:mod:`utils.data.conversation_split`;
``"ReasonSeg|train"``, the synthetic demo's, with each json's ``extra_conversations``). A training
sample is one conversation of a uniformly chosen file, cut to its first ``--max_rounds`` rounds
(SegLLM's ``--limit_rounds``, 6): a reference only ever names an earlier round, so a cut never
leaves one dangling. Proposals come from the existing stores (``coco2014`` for refCOCO images).

With ``--conversations_per_sample N > 1`` a sample is instead a uniformly chosen picture of the
file with up to ``N`` of its conversations, as the single-round families ask several queries of
one picture (``--num_classes_per_sample``): the picture is decoded, its proposals pooled and their
geometry computed once for all of them, and each conversation keeps its own references.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np

from utils.data.conversation_split import load_conversation_split
from utils.data.dataset_files import check_proposal_coverage
from utils.data.mrseg import load_mrseg
from utils.data.samples import SegmentationRecord

DEFAULT_MAX_ROUNDS = 6


def _first_rows(masks, count: int, height: int, width: int) -> np.ndarray:
    return masks(height, width)[:count]


def _stacked_rows(masks: list, height: int, width: int) -> np.ndarray:
    return np.concatenate([rows(height, width) for rows in masks])


def truncate_rounds(record: SegmentationRecord, max_rounds: int) -> SegmentationRecord:
    """``record`` with its (single) conversation cut to the first ``max_rounds`` rounds and the
    masks cut alike (one ``[SEG]`` per round); unchanged when it is no longer."""
    (turns,) = record.conversations
    if len(turns) <= max_rounds:
        return record
    return dataclasses.replace(
        record,
        conversations=[turns[:max_rounds]],
        masks=functools.partial(_first_rows, record.masks, max_rounds),
        queries=record.queries[:max_rounds],
    )


def merge_conversations(records: list[SegmentationRecord]) -> SegmentationRecord:
    """One record asking all ``records``' conversations of their (shared) picture, in order;
    the masks are stacked in the same order, so every ``[SEG]`` keeps its mask and every
    reference its round (references are resolved per conversation)."""
    first = records[0]
    if any(r.image_path != first.image_path for r in records):
        raise ValueError("merge_conversations needs records of one picture")
    if any(r.no_target is not None or r.prediction_names is not None for r in records):
        # Per-row evaluation fields; no training source sets them, so none are merged.
        raise ValueError("merge_conversations cannot merge no_target or prediction_names rows")
    if len(records) == 1:
        return first
    return dataclasses.replace(
        first,
        conversations=[turns for r in records for turns in r.conversations],
        masks=functools.partial(_stacked_rows, [r.masks for r in records]),
        queries=[query for r in records for query in r.queries],
    )


class MultiRoundSource:
    """Training source: a uniformly chosen conversation file, then a random conversation of it,
    cut to ``max_rounds`` rounds; with ``conversations_per_sample > 1``, a random picture of the
    file and up to that many of its conversations, each cut alike."""

    name = "multi_round"

    def __init__(
        self,
        files: dict[str, list[SegmentationRecord]],
        max_rounds: int,
        conversations_per_sample: int = 1,
    ):
        self.files = {name: records for name, records in files.items() if records}
        if not self.files:
            raise ValueError("multi_round training source has no conversations")
        if max_rounds < 1:
            raise ValueError(f"--max_rounds must be at least 1, got {max_rounds}")
        if conversations_per_sample < 1:
            raise ValueError(
                f"--conversations_per_sample must be at least 1, got {conversations_per_sample}"
            )
        self.names = sorted(self.files)
        self.max_rounds = max_rounds
        self.conversations_per_sample = conversations_per_sample
        self.pictures = {name: _by_picture(records) for name, records in self.files.items()}

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        name = self.names[rng.randrange(len(self.names))]
        if self.conversations_per_sample == 1:
            records = self.files[name]
            return truncate_rounds(records[rng.randrange(len(records))], self.max_rounds)
        pictures = self.pictures[name]
        records = pictures[rng.randrange(len(pictures))]
        chosen = rng.sample(records, min(self.conversations_per_sample, len(records)))
        return merge_conversations([truncate_rounds(r, self.max_rounds) for r in chosen])


def _by_picture(records: list[SegmentationRecord]) -> list[list[SegmentationRecord]]:
    """The records grouped by picture, in order of first appearance."""
    groups: dict = {}
    for record in records:
        groups.setdefault(record.image_path, []).append(record)
    return list(groups.values())


def load_multi_round_train(
    dataset_dir,
    sam_masks_dir,
    names: str,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    conversations_per_sample: int = 1,
) -> MultiRoundSource:
    """The :class:`MultiRoundSource` of ``--multi_round_data`` (``"mr_refcoco||..."``); missing
    images or proposals are skipped and counted, as for every training family."""
    files = {}
    for name in (n.strip() for n in names.split("||") if n.strip()):
        if name.lower().startswith("reasonseg|"):
            split = name.split("|", 1)[1] or "train"
            files[name] = load_conversation_split(
                dataset_dir, sam_masks_dir, split, extra_conversations=True
            )
            records = files[name]
            check_proposal_coverage(
                [r.proposal_key for r in records], records[0].proposals, f"ReasonSeg|{split}"
            )
        else:
            files[name] = load_mrseg(dataset_dir, name, sam_masks_dir, strict=False)
    return MultiRoundSource(files, max_rounds, conversations_per_sample)
