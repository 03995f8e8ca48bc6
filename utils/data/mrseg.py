"""MRSeg (SegLLM's multi-round segmentation conversations), read from the released files unmodified.

Files: ``<dataset_dir>/mrseg/<stem>.json`` (evaluation: ``mr_refcoco_val``, ``mr_refcoco+_val``,
``mr_refcocog_val``, ``mr_paco_val``; training: ``mr_refcoco{,+,g}``, ``mr_refcoco{,+,g}_hard``,
``mr_paco``, ``mr_lvis``, ``mr_vg``, ``mr_pascal``), a JSON list of
``{"task": "segmentation", "base": ..., "conversations": [turn, ...], "conv_id"?: ...}`` with
turns ``{"from": "human"|"gpt", "value": str, "ind"?: list[int] | int}``. Read as released (UTF-8,
else cp1252). ``base`` is ignored (upstream reads it and uses it nowhere); an entry whose ``task``
is not ``segmentation`` is skipped and counted.

Tags, as upstream parses them: every ``\\[[^\\]]+\\]`` bracket holding ``IMAGE256``,
``MASK-ENCODE``, ``BOX-ENCODE`` or ``MASK-DECODE`` is a tag (any other bracket is text); here it
must read ``[KIND:payload]``.

- ``[IMAGE256:<img>]``: the picture, exactly once, in the first human turn.
- ``[MASK-ENCODE:<img>|<dataset>|<id>]``, ``[BOX-ENCODE:<img>|<dataset>|<id>]`` (human turns):
  a reference to an earlier round's mask.
- ``[MASK-DECODE:...]`` (exactly one per gpt turn, so round k is the k-th turn pair and the k-th
  MASK-DECODE, upstream's round index): the colon form is detected first (``':'`` in the
  payload): ``<task>:<ref>:<tgt>:<img>:<dataset>`` (4 colons) or
  ``<task>:<ref1>:<ref2>:<tgt>:<img>:<dataset>`` (5); else ``<img>|<dataset>|<tgt>``. The ``ref``
  fields are parsed and not used: upstream feeds them only to its reference-re-detection loss,
  and the text's references come from the encode tags.
- Mask ids: ``''``, ``"'"``, ``'none'`` (decode only) -> None; containing ``_`` or ``-`` -> str;
  else int. A round's target must be a known id.

What a record holds (one record per usable conversation, ONE list of turns):

- round 1's question is ``"<image>\\n" + text`` (the IMAGE256 tag removed, stripped);
- a run of encode tags (only whitespace between them) becomes one ``[REF:k1,k2,...]`` marker
  (:func:`~utils.data.references.format_reference`) where the run stands; a MASK-ENCODE followed
  by a BOX-ENCODE of the same id is one reference. Reference id X names round k = the latest
  earlier round whose target id is X (upstream's eval matches references by mask id, not by
  ``ind``). ``ind``, when present (a 1-based round or a list of them; ``-1`` entries, the demos'
  "no reference", are dropped), is cross-checked against the resolved rounds; a mismatch is
  counted in the :class:`MRSegReport`, never fatal. A reference to an id that is not the target of
  an earlier round cannot be written as a marker: the conversation is skipped, counted and named
  in one warning, also when ``strict`` (a property of the file, not missing data);
- each answer is the gpt text with MASK-DECODE replaced by ``[SEG]`` (stripped); an answer that is
  only ``[SEG]`` becomes ``[SEG].`` (LISA's evaluation answer);
- ``masks(H, W)`` gives ``(R, H, W)`` uint8 {0, 1}, row r-1 = round r's target (polygons, RLE or
  lists of RLE, merged), checked against the image size;
- ``name`` is ``<stem>_<index>`` and ``conversation_index`` the conversation's 0-based position in
  the file (``--pred_dir`` folders use it); ``queries`` are the round texts without tags.

Images and annotations: :mod:`utils.data.mrseg_sources` (the layout under ``--dataset_dir``,
upstream's path rewrites, the files of each tag ``<dataset>`` key: COCO-format for refCOCO/+/g,
PACO-LVIS and LVIS, ``key -> RLE`` objects for Visual Genome and PASCAL; train or eval files by
the conversation file's stem). Each COCO target annotation must belong to the conversation's
image (by file name). Proposals come from the image folder's store (``coco2014`` for refCOCO,
``coco2017`` for PACO-LVIS and LVIS, ``vg``, ``voc2010``), keyed by file name.

Behaviour on bad input: a malformed file (not a list, an odd number of turns, a gpt turn without
exactly one MASK-DECODE, an unknown dataset key or image folder, a target id missing from the
annotations or of another image, an RLE key holding no RLE, no IMAGE256 in the first turn) is a
``DatasetFormatError`` naming the file, the conversation index and the turn (0-based index into
``conversations``; an RLE that is not one names the annotation file and the key). Missing
images and images absent from the proposal store stop evaluation (``strict``) or are skipped
(:func:`~utils.data.dataset_files.keep_available`, called once per proposal store).
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from utils.annotations import load_json
from utils.data.coco_masks import annotation_masks
from utils.data.conversation import VALIDATION_ANSWER
from utils.data.dataset_files import keep_available, open_proposal_store
from utils.data.mrseg_sources import ANNOTATION_FILES as ANNOTATION_FILES
from utils.data.mrseg_sources import IMAGE_FOLDERS as IMAGE_FOLDERS
from utils.data.mrseg_sources import MISSING_FILE_FALLBACK as MISSING_FILE_FALLBACK
from utils.data.mrseg_sources import AnnotationSources, annotation_split
from utils.data.mrseg_sources import resolve_image as resolve_image
from utils.data.references import format_reference
from utils.data.samples import SegmentationRecord
from utils.text_files import DatasetFormatError
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN

logger = logging.getLogger(__name__)

TAG = re.compile(r"\[[^\]]+\]")
TAG_KINDS = ("IMAGE256", "MASK-ENCODE", "BOX-ENCODE", "MASK-DECODE")
NO_REFERENCE_IND = -1  # the demos' ``ind`` of a later turn without a reference

SKIP_UNRESOLVED = "reference to a mask no earlier round targets"
SKIP_NOT_SEGMENTATION = "task is not segmentation"


@dataclass(frozen=True)
class MaskTag:
    """A parsed MASK-ENCODE / BOX-ENCODE / MASK-DECODE tag.

    ``reference_ids`` are a colon-form decode's ``ref`` fields (parsed, unused).
    """

    kind: str
    image: str
    dataset: str
    mask_id: int | str | None
    reference_ids: tuple = ()


@dataclass
class MRSegRound:
    """One human + gpt turn pair.

    Attributes:
        question: the human text, ``[REF:k]`` markers where the encode tags stood.
        answer: the gpt text with ``[SEG]``.
        query: the human words only (no tags, no markers), for visualisations.
        target: the round's MASK-DECODE tag.
        references: the rounds (1-based) the question refers to, in marker order.
        turn: index of the gpt turn in the entry's ``conversations``.
    """

    question: str
    answer: str
    query: str
    target: MaskTag
    references: tuple[int, ...]
    turn: int


@dataclass
class MRSegConversation:
    """A usable conversation: its position in the file, its IMAGE256 path and its rounds."""

    index: int
    image: str
    rounds: list[MRSegRound]
    conversation_id: object = None


@dataclass
class MRSegReport:
    """What reading one file left out or found inconsistent (JSON-ready via :meth:`as_dict`).

    Attributes:
        file: the conversation file.
        num_conversations: entries in the file.
        skipped: ``(conversation index, reason, detail)`` of every skipped conversation.
        ind_mismatches: rounds whose ``ind`` disagrees with the rounds resolved by mask id.
    """

    file: str
    num_conversations: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    ind_mismatches: list[dict] = field(default_factory=list)

    def skip_counts(self) -> dict[str, int]:
        """``reason -> number of conversations`` skipped for it."""
        return dict(Counter(reason for _, reason, _ in self.skipped))

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "num_conversations": self.num_conversations,
            "skipped": self.skip_counts(),
            "skipped_conversations": [
                {"conversation": i, "reason": reason, "detail": detail}
                for i, reason, detail in self.skipped
            ],
            "ind_mismatches": self.ind_mismatches,
        }


@dataclass
class MRSegRecord(SegmentationRecord):
    """A :class:`SegmentationRecord` of one MRSeg conversation (``conversations`` has one entry).

    Attributes:
        conversation_index: 0-based position of the conversation in its file.
        conversation_id: the entry's ``conv_id`` (None when absent).
        references: per round, the earlier rounds (1-based) its question refers to.
        target_ids: per round, the target's mask id (a COCO annotation id or an RLE key).
    """

    conversation_index: int = -1
    conversation_id: object = None
    references: list[tuple[int, ...]] = field(default_factory=list)
    target_ids: list = field(default_factory=list)


class _Unresolved(Exception):
    """A reference that no earlier round's target satisfies (the conversation is skipped)."""


def parse_mask_id(value: str, allow_none_word: bool) -> int | str | None:
    """Upstream's mask-id rule: ``''``, ``"'"`` (and ``'none'`` when ``allow_none_word``, as for
    decode ids) -> None; a string with ``_`` or ``-`` stays a string; anything else is an int.

    Raises:
        ValueError: not an integer.
    """
    if value in ("", "'") or (allow_none_word and value == "none"):
        return None
    if "_" in value or "-" in value:
        return value
    return int(value)


def _tag_kind(tag: str, where: str) -> str | None:
    """The kind of a bracket (None: plain text); a bracket naming a kind must be ``[KIND:...]``."""
    content = tag[1:-1]
    if not any(kind in content for kind in TAG_KINDS):
        return None
    kind = content.split(":", 1)[0]
    if kind not in TAG_KINDS or ":" not in content:
        raise DatasetFormatError(f"{where}: malformed tag {tag!r}; expected [KIND:...]")
    return kind


def _mask_id(value: str, allow_none_word: bool, tag: str, where: str) -> int | str | None:
    try:
        return parse_mask_id(value, allow_none_word)
    except ValueError:
        raise DatasetFormatError(f"{where}: mask id {value!r} of {tag!r} is not an id") from None


def _check_dataset(dataset: str, tag: str, where: str) -> None:
    if dataset not in ANNOTATION_FILES:
        raise DatasetFormatError(
            f"{where}: unknown dataset key {dataset!r} in {tag!r}; "
            f"known: {sorted(ANNOTATION_FILES)}"
        )


def parse_mask_tag(tag: str, kind: str, where: str) -> MaskTag:
    """Parse an encode or decode tag (``[KIND:payload]``) into a :class:`MaskTag`."""
    payload = tag[1:-1].split(":", 1)[1]
    references: tuple = ()
    if kind == "MASK-DECODE" and ":" in payload:  # upstream tries the colon form first
        parts = payload.split(":")
        if len(parts) not in (5, 6):
            raise DatasetFormatError(
                f"{where}: {tag!r} has {len(parts) - 1} colons; the colon form needs 4 or 5"
            )
        image, dataset, target = parts[-2], parts[-1], parts[-3]
        references = tuple(_mask_id(v, True, tag, where) for v in parts[1:-3])
    else:
        parts = payload.split("|")
        if len(parts) != 3:
            raise DatasetFormatError(f"{where}: {tag!r} needs <image>|<dataset>|<mask id>")
        image, dataset, target = parts
    _check_dataset(dataset, tag, where)
    mask_id = _mask_id(target, kind == "MASK-DECODE", tag, where)
    return MaskTag(kind, image, dataset, mask_id, references)


def _reference_ids(run: list[MaskTag]) -> list:
    """One mask id per reference of a run of encode tags (a MASK-ENCODE + BOX-ENCODE pair of
    the same id is one reference, as upstream writes one pair per reference)."""
    ids, previous = [], None
    for tag in run:
        paired = (
            tag.kind == "BOX-ENCODE"
            and previous is not None
            and previous.kind == "MASK-ENCODE"
            and previous.mask_id == tag.mask_id
        )
        if paired:
            previous = None
            continue
        ids.append(tag.mask_id)
        previous = tag
    return ids


def _resolve(mask_id, targets: list[MaskTag], round_index: int, unresolved: list[str]) -> int:
    """The latest earlier round (1-based) whose target id is ``mask_id``; 0 (and a note in
    ``unresolved``) when there is none."""
    for k in range(len(targets), 0, -1):
        if mask_id is not None and targets[k - 1].mask_id == mask_id:
            return k
    unresolved.append(f"round {round_index} refers to mask id {mask_id!r}")
    return 0


def _human_turn(
    value: str, round_index: int, targets: list[MaskTag], where: str, unresolved: list[str]
) -> tuple[str, str, str | None, tuple[int, ...]]:
    """``(question with markers, words only, IMAGE256 path or None, referenced rounds)``.

    A reference no earlier target satisfies is noted in ``unresolved`` (the conversation is
    then skipped, after the rest of it has been checked for format errors).
    """
    pieces: list = []  # text strings and encode MaskTags, in order
    image, position = None, 0
    for match in TAG.finditer(value):
        tag = match.group()
        kind = _tag_kind(tag, where)
        if kind is None:
            continue
        pieces.append(value[position : match.start()])
        position = match.end()
        if kind == "IMAGE256":
            if round_index != 1 or image is not None:
                raise DatasetFormatError(f"{where}: IMAGE256 may only appear once, in turn 0")
            image = tag[1:-1].split(":", 1)[1]
        elif kind == "MASK-DECODE":
            raise DatasetFormatError(f"{where}: MASK-DECODE in a human turn")
        else:
            pieces.append(parse_mask_tag(tag, kind, where))
    pieces.append(value[position:])
    question, words, references = [], [], []
    run: list[MaskTag] = []
    held = ""  # whitespace after a tag: dropped if another tag follows (same run)

    def close_run() -> None:
        if run:
            rounds = [_resolve(i, targets, round_index, unresolved) for i in _reference_ids(run)]
            references.extend(rounds)
            question.append(format_reference(rounds))
            run.clear()

    for piece in pieces:
        if isinstance(piece, MaskTag):
            held = ""
            run.append(piece)
        elif run and not piece.strip():
            held += piece
        else:
            close_run()
            question.append(held + piece)
            words.append(piece)
            held = ""
    close_run()
    text = "".join(question).strip()
    query = " ".join(" ".join(words).split())
    return text, query, image, tuple(references)


def _gpt_turn(value: str, where: str) -> tuple[str, MaskTag]:
    """``(answer with [SEG], decode tag)``; exactly one MASK-DECODE and no other tag."""
    if SEG_TOKEN in value:
        raise DatasetFormatError(f"{where}: gpt turn already holds {SEG_TOKEN}: {value!r}")
    found = [(m, _tag_kind(m.group(), where)) for m in TAG.finditer(value)]
    tags = [(m, kind) for m, kind in found if kind is not None]
    if len(tags) != 1 or tags[0][1] != "MASK-DECODE":
        kinds = [kind for _, kind in tags]
        raise DatasetFormatError(f"{where}: a gpt turn needs exactly one MASK-DECODE, has {kinds}")
    match = tags[0][0]
    decode = parse_mask_tag(match.group(), "MASK-DECODE", where)
    if decode.mask_id is None:
        raise DatasetFormatError(f"{where}: MASK-DECODE {match.group()!r} has no target id")
    answer = (value[: match.start()] + SEG_TOKEN + value[match.end() :]).strip()
    return (VALIDATION_ANSWER if answer == SEG_TOKEN else answer), decode


def _ind(turn: dict, where: str) -> tuple[int, ...] | None:
    """A human turn's ``ind`` as 1-based rounds (``-1`` dropped), None when absent."""
    if "ind" not in turn or turn["ind"] is None:
        return None
    values = turn["ind"] if isinstance(turn["ind"], list) else [turn["ind"]]
    try:
        rounds = [int(v) for v in values]
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{where}: ind {turn['ind']!r} is not a round index") from None
    return tuple(r for r in rounds if r != NO_REFERENCE_IND)


def _check_turn(turn, speaker: str, where: str) -> dict:
    if not isinstance(turn, dict) or turn.get("from") != speaker:
        raise DatasetFormatError(f"{where}: expected a {speaker!r} turn, got {turn!r:.80}")
    if not isinstance(turn.get("value"), str):
        raise DatasetFormatError(f"{where}: the turn needs a string 'value'")
    return turn


def _conversation(entry: dict, index: int, path: Path, report: MRSegReport) -> MRSegConversation:
    turns = entry["conversations"]
    if not turns or len(turns) % 2:
        where = f"{path}: conversation {index}"
        raise DatasetFormatError(f"{where}: needs human+gpt turn pairs, has {len(turns)} turns")
    targets: list[MaskTag] = []
    rounds: list[MRSegRound] = []
    mismatches, unresolved, image = [], [], None
    for r in range(1, len(turns) // 2 + 1):
        human_where = f"{path}: conversation {index}, turn {2 * r - 2}"
        gpt_where = f"{path}: conversation {index}, turn {2 * r - 1}"
        human = _check_turn(turns[2 * r - 2], "human", human_where)
        gpt = _check_turn(turns[2 * r - 1], "gpt", gpt_where)
        question, query, found, references = _human_turn(
            human["value"], r, targets, human_where, unresolved
        )
        if r == 1:
            if found is None:
                raise DatasetFormatError(f"{human_where}: the first turn has no IMAGE256 tag")
            image, question = found, f"{IMAGE_TOKEN}\n{question}"
        ind = _ind(human, human_where)
        if ind is not None and ind != references:
            mismatches.append(
                {"conversation": index, "round": r, "ind": list(ind), "resolved": list(references)}
            )
        answer, decode = _gpt_turn(gpt["value"], gpt_where)
        targets.append(decode)
        rounds.append(MRSegRound(question, answer, query, decode, references, 2 * r - 1))
    if unresolved:
        raise _Unresolved(f"conversation {index}: " + "; ".join(unresolved))
    report.ind_mismatches.extend(mismatches)
    return MRSegConversation(index, image, rounds, entry.get("conv_id"))


def parse_mrseg_file(path: str | Path) -> tuple[list[MRSegConversation], MRSegReport]:
    """Parse a conversation file (no images or annotations needed).

    Returns:
        The usable conversations (in file order) and the :class:`MRSegReport`.
    Raises:
        FileNotFoundError: no such file.
        DatasetFormatError: a malformed file (see the module doc).
    """
    path = Path(path)
    data = load_json(path, "MRSeg conversation file")
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path}: expected a JSON list of conversations")
    report = MRSegReport(str(path), len(data))
    conversations = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            raise DatasetFormatError(f"{path}: conversation {index} needs a 'conversations' list")
        if entry.get("task", "segmentation") != "segmentation":
            report.skipped.append((index, SKIP_NOT_SEGMENTATION, str(entry.get("task"))))
            continue
        try:
            conversations.append(_conversation(entry, index, path, report))
        except _Unresolved as error:
            report.skipped.append((index, SKIP_UNRESOLVED, str(error)))
    return conversations, report


def mrseg_path(dataset_dir: str | Path, stem: str) -> Path:
    """``<dataset_dir>/mrseg/<stem>.json`` (``stem`` may carry the ``.json``)."""
    stem = stem[: -len(".json")] if stem.endswith(".json") else stem
    return Path(dataset_dir) / "mrseg" / f"{stem}.json"


def mrseg_report(dataset_dir: str | Path, stem: str) -> MRSegReport:
    """The :class:`MRSegReport` of a file (skipped conversations, ``ind`` mismatches)."""
    return parse_mrseg_file(mrseg_path(dataset_dir, stem))[1]


def _record(
    conversation: MRSegConversation,
    dataset_dir: Path,
    path: Path,
    stem: str,
    sources: AnnotationSources,
) -> tuple[MRSegRecord, str]:
    where = f"{path}: conversation {conversation.index}"
    image_path, store = resolve_image(dataset_dir, conversation.image, f"{where}, turn 0")
    segmentations, sizes = [], set()
    for round_ in conversation.rounds:
        target = round_.target
        segmentation, size = sources.target(
            target.dataset, target.mask_id, image_path.name, f"{where}, turn {round_.turn}"
        )
        segmentations.append(segmentation)
        sizes.add(size)
    if len(sizes) != 1:
        raise DatasetFormatError(f"{where}: its annotation files disagree on the image size")
    record = MRSegRecord(
        image_path=image_path,
        conversations=[[(r.question, r.answer) for r in conversation.rounds]],
        masks=functools.partial(
            annotation_masks, segmentations, sizes.pop(), f"{where} ({image_path.name})"
        ),
        proposals=None,
        proposal_key=image_path.name,
        name=f"{stem}_{conversation.index}",
        dataset="MRSeg",
        queries=[r.query for r in conversation.rounds],
        conversation_index=conversation.index,
        conversation_id=conversation.conversation_id,
        references=[r.references for r in conversation.rounds],
        target_ids=[r.target.mask_id for r in conversation.rounds],
    )
    return record, store


def _warn_skipped(report: MRSegReport) -> None:
    if report.skipped:
        shown = "; ".join(detail for _, _, detail in report.skipped[:5])
        logger.warning(
            "%s: skipping %d of %d conversations (%s): %s%s",
            report.file, len(report.skipped), report.num_conversations, report.skip_counts(),
            shown, "; ..." if len(report.skipped) > 5 else "",
        )  # fmt: skip
    if report.ind_mismatches:
        logger.warning(
            "%s: %d rounds have an 'ind' that differs from the rounds resolved by mask id "
            "(first: %s)", report.file, len(report.ind_mismatches), report.ind_mismatches[0],
        )  # fmt: skip


def load_mrseg(
    dataset_dir: str | Path,
    stem: str,
    sam_masks_dir: str | Path | None,
    strict: bool = True,
    split: str | None = None,
) -> list[MRSegRecord]:
    """One :class:`MRSegRecord` per usable conversation of ``<dataset_dir>/mrseg/<stem>.json``.

    Args:
        dataset_dir: ``--dataset_dir`` (layout: :mod:`utils.data.mrseg_sources`).
        stem: the file's stem, e.g. ``mr_refcoco_val``.
        sam_masks_dir: proposal store root, or ``None`` to skip proposals (scoring PNGs).
        strict: evaluation behaviour for missing images / proposals (stop instead of skip).
        split: ``"train"`` or ``"eval"`` annotation files; None: from the stem
            (:func:`~utils.data.mrseg_sources.annotation_split`).
    Raises:
        FileNotFoundError: the file or an annotation file is missing, or (strict) an image or
            its proposals are.
        DatasetFormatError: a malformed file (naming it, the conversation and the turn).
        ValueError: ``split`` is neither ``"train"`` nor ``"eval"``.
    """
    dataset_dir = Path(dataset_dir)
    path = mrseg_path(dataset_dir, stem)
    stem = path.stem
    sources = AnnotationSources(dataset_dir, split or annotation_split(stem))
    conversations, report = parse_mrseg_file(path)
    _warn_skipped(report)
    by_store: dict[str, list[MRSegRecord]] = {}
    for conversation in conversations:
        record, store = _record(conversation, dataset_dir, path, stem, sources)
        by_store.setdefault(store, []).append(record)
    kept: list[MRSegRecord] = []
    for store, records in by_store.items():
        proposals = open_proposal_store(sam_masks_dir, store)
        for record in records:
            record.proposals = proposals
        kept += keep_available(
            records, f"MRSeg|{stem}", lambda r: r.image_path, proposals,
            lambda r: r.proposal_key, strict=strict,
        )  # fmt: skip
    if not by_store:
        raise FileNotFoundError(f"MRSeg|{stem}: no usable conversations in {path}")
    kept.sort(key=lambda r: r.conversation_index)
    logger.info(
        "MRSeg|%s: %d conversations, %d rounds",
        stem, len(kept), sum(len(r.target_ids) for r in kept),
    )  # fmt: skip
    return kept
