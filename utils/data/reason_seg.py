"""ReasonSeg (LISA's reasoning-segmentation benchmark), read in its native labelme format.

Layout: ``<dataset_dir>/reason_seg/ReasonSeg/<split>/<stem>.jpg`` + ``<stem>.json`` with keys
``text`` (list of queries), ``is_sentence`` (long sentence vs short phrase) and ``shapes``
(labelme polygons labelled ``target`` / ``ignore``). A json may also hold ``extra_queries``: a
list of further queries about the same picture, each an object with its own ``text``,
``is_sentence`` and ``shapes`` (the synthetic demo data writes them; real ReasonSeg has none).
Training then asks a *different* query in each round of a sample (so the rounds of one picture
have different targets); evaluation reads the main query only. Splits may be joined with ``_``
(``train_val``). Proposals come from ``<sam_masks_dir>/reason_seg/ReasonSeg/<split>/``, keyed by
the image file name.

Files are read as released: UTF-8, or cp1252 where the release has it (as upstream's reader
falls back). Shape labels compare lower-cased as upstream (``Flag`` is skipped, ``IGNORE`` is an
ignore region). A json with no target polygon (an empty ``shapes``, as a few released files
have, or only ``flag``/``ignore`` shapes) is kept, as upstream keeps it: its target is empty, and
the split's jsons of that kind are counted and named in one warning when the split is loaded.

Behaviour on bad input: every json is parsed when the dataset is built, so a malformed or missing
json stops the run at once with the file named (before hours of training, not in the middle).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from dataclasses import dataclass, field
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
from utils.text_files import DatasetFormatError, load_dataset_json

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NUM_EXAMPLES = 5


@dataclass
class ReasonSegQuery:
    """One query about a picture: a json's main query or one of its ``extra_queries``."""

    texts: list[str]
    is_sentence: bool
    shapes: list[dict]


@dataclass
class ReasonSegItem:
    """One parsed ReasonSeg image: its file, queries, query kind and polygons."""

    image_path: Path
    texts: list[str]
    is_sentence: bool
    shapes: list[dict]
    proposals: ProposalReader | None
    extra: dict
    extra_queries: list[ReasonSegQuery] = field(default_factory=list)

    def masks(self, height: int, width: int, count: int) -> np.ndarray:
        """``(count, H, W)`` copies of the label map (1 target, 255 ignore), one per ``[SEG]``."""
        label_map = labelme_to_mask(self.shapes, height, width)
        return np.repeat(label_map[None], count, axis=0)


def _query_masks(shapes_per_round: list[list[dict]], height: int, width: int) -> np.ndarray:
    """``(R, H, W)`` label maps (1 target, 255 ignore), one per round's polygons."""
    return np.stack([labelme_to_mask(shapes, height, width) for shapes in shapes_per_round])


def _polygon_problem(points) -> str | None:
    """Why ``points`` is not a usable polygon, or ``None``: a list of at least 3 ``[x, y]``
    pairs of finite numbers (NaN or inf would rasterise to a wrong target, silently)."""
    if not isinstance(points, list) or not all(
        isinstance(point, list)
        and len(point) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)
        for point in points
    ):
        return "must be a list of [x, y] number pairs"
    if len(points) < 3:
        return f"has {len(points)} points; a polygon needs at least 3"
    if not all(math.isfinite(v) for point in points for v in point):
        return "holds a NaN or infinite coordinate"
    return None


def _parse_query(data: dict, where: str) -> ReasonSegQuery:
    """The ``text``/``is_sentence``/``shapes`` of one query object, validated (``where`` names it
    in errors, e.g. ``a.json: extra_queries[2]``)."""
    texts = data.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if (
        not isinstance(texts, list)
        or not texts
        or not all(isinstance(t, str) and t.strip() for t in texts)
    ):
        raise DatasetFormatError(f"{where}: field 'text' must be a non-empty list of strings")
    shapes = data.get("shapes")
    if not isinstance(shapes, list):
        raise DatasetFormatError(f"{where}: field 'shapes' must be a list of polygons")
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict) or "points" not in shape or "label" not in shape:
            raise DatasetFormatError(f"{where}: shapes[{index}] needs 'label' and 'points'")
        problem = _polygon_problem(shape["points"])
        if problem:
            raise DatasetFormatError(f"{where}: shapes[{index}].points {problem}")
    if "is_sentence" not in data:
        raise DatasetFormatError(f"{where}: field 'is_sentence' is missing")
    return ReasonSegQuery(list(texts), bool(data["is_sentence"]), shapes)


def parse_reason_seg_json(path: Path) -> tuple[ReasonSegQuery, list[ReasonSegQuery], dict]:
    """``(main_query, extra_queries, other_fields)`` of one ReasonSeg json, validated."""
    data = load_dataset_json(path)
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a json object, found {type(data).__name__}")
    main_query = _parse_query(data, str(path))
    extra_data = data.get("extra_queries", [])
    if not isinstance(extra_data, list):
        raise DatasetFormatError(f"{path}: field 'extra_queries' must be a list of queries")
    extra_queries = []
    for index, entry in enumerate(extra_data):
        where = f"{path}: extra_queries[{index}]"
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{where} must be an object with 'text', 'shapes', ...")
        extra_queries.append(_parse_query(entry, where))
    other = {
        k: v for k, v in data.items() if k not in ("text", "shapes", "is_sentence", "extra_queries")
    }
    return main_query, extra_queries, other


def has_target_polygon(shapes: list[dict]) -> bool:
    """Whether any shape is a target (its label, lower-cased, is not ``flag`` and holds no
    ``ignore``), i.e. whether the rasterised target can be non-empty."""
    labels = (str(shape.get("label", "")).lower() for shape in shapes)
    return any(label != "flag" and "ignore" not in label for label in labels)


def _report_empty_targets(split: str, items: list[ReasonSegItem], total: int) -> None:
    empty = [item.image_path.with_suffix(".json").name for item in items]
    if empty:
        shown = ", ".join(empty[:NUM_EXAMPLES]) + (", ..." if len(empty) > NUM_EXAMPLES else "")
        logger.warning(
            "ReasonSeg|%s: %d of %d jsons have no target polygon; their target is empty: %s",
            split, len(empty), total, shown,
        )  # fmt: skip


def _unpaired(folder: Path, images: list[Path]) -> list[Path]:
    """Images without their json and jsons without their image (sorted)."""
    stems = {p.stem for p in images}
    jsons = {p.stem: p for p in folder.glob("*.json")}
    lonely_images = [p for p in images if p.stem not in jsons]
    lonely_jsons = [p for stem, p in jsons.items() if stem not in stems]
    return sorted(lonely_images + lonely_jsons)


def load_reason_seg_split(
    dataset_dir: str | Path,
    sam_masks_dir: str | Path | None,
    splits: str,
    skip_missing: bool = False,
    skipped: list[str] | None = None,
):
    """Parse every image of ``splits`` (e.g. ``train`` or ``train_val``) into items.

    ``sam_masks_dir=None`` skips the proposal stores (scoring saved predictions needs none).
    An image without its json or a json without its image stops the run, listing them (a
    dropped pair would silently leave the scores' denominator), unless ``skip_missing``: then
    they are left out, named in a warning and appended to ``skipped``.
    """
    items = []
    for split in splits.split("_"):
        first = len(items)
        folder = Path(dataset_dir) / "reason_seg" / "ReasonSeg" / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ReasonSeg split folder {folder} does not exist")
        proposals = None
        if sam_masks_dir is not None:
            proposals = ProposalReader(Path(sam_masks_dir) / "reason_seg" / "ReasonSeg" / split)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{folder}: no images")
        unpaired = _unpaired(folder, images)
        if unpaired:
            shown = ", ".join(p.name for p in unpaired[:NUM_EXAMPLES])
            shown += ", ..." if len(unpaired) > NUM_EXAMPLES else ""
            if not skip_missing:
                raise DatasetFormatError(
                    f"{folder}: {len(unpaired)} images without their json or jsons without their "
                    f"image ({shown}); --skip_missing scores the rest and lists them"
                )
            logger.warning("ReasonSeg|%s: leaving out %d unpaired files: %s",
                           split, len(unpaired), shown)  # fmt: skip
            if skipped is not None:
                skipped.extend(str(p) for p in unpaired)
        for image_path in images:
            json_path = image_path.with_suffix(".json")
            if not json_path.is_file():
                continue
            query, extra_queries, other = parse_reason_seg_json(json_path)
            items.append(
                ReasonSegItem(
                    image_path,
                    query.texts,
                    query.is_sentence,
                    query.shapes,
                    proposals,
                    other,
                    extra_queries,
                )
            )
        split_items = items[first:]
        without_target = [item for item in split_items if not has_target_polygon(item.shapes)]
        _report_empty_targets(split, without_target, len(split_items))
    return items


def _groups(item: ReasonSegItem) -> tuple[str, ...]:
    """``long``/``short`` (ReasonSeg test's breakdown), plus the query type when recorded."""
    groups = ("long" if item.is_sentence else "short",)
    if "query_type" in item.extra:
        groups += (f"type:{item.extra['query_type']}",)
    return groups


def _record(item: ReasonSegItem, conversations, queries, masks=None) -> SegmentationRecord:
    return SegmentationRecord(
        image_path=item.image_path,
        conversations=conversations,
        masks=masks or functools.partial(item.masks, count=len(conversations)),
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
    """A training sample of up to ``num_queries`` conversations (rounds) about the image.

    Without ``extra_queries``: that many of the query's phrasings, one per conversation, all with
    the same target. With them: that many *different* queries drawn from the main one and the
    extras (the main one is not always among them), one random phrasing each, every
    conversation with its own query's target.
    """
    if not item.extra_queries:
        texts = rng.sample(item.texts, min(num_queries, len(item.texts)))
        conversations = [_conversation(text, item.is_sentence, rng) for text in texts]
        return _record(item, conversations, texts)
    main_query = ReasonSegQuery(item.texts, item.is_sentence, item.shapes)
    pool = [main_query, *item.extra_queries]
    chosen = rng.sample(pool, min(num_queries, len(pool)))
    texts = [rng.choice(query.texts) for query in chosen]
    conversations = [
        _conversation(text, query.is_sentence, rng) for text, query in zip(texts, chosen)
    ]
    masks = functools.partial(_query_masks, [query.shapes for query in chosen])
    return _record(item, conversations, texts, masks)


def _conversation(text: str, is_sentence: bool, rng: random.Random) -> list[tuple[str, str]]:
    """One training round: a random question template around ``text``, a random answer."""
    if is_sentence:
        question = rng.choice(LONG_QUESTION_TEMPLATES).format(sent=text)
    else:
        question = rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=text.lower())
    return [(question, rng.choice(ANSWER_TEMPLATES))]


def reason_seg_eval_record(item: ReasonSegItem) -> SegmentationRecord:
    """An evaluation sample: the first text, the fixed validation prompt, answer ``[SEG].``."""
    text = item.texts[0]
    if item.is_sentence:
        question = VALIDATION_LONG_QUESTION.format(sent=text)
    else:
        question = VALIDATION_SHORT_QUESTION.format(class_name=text)
    return _record(item, [[(question, VALIDATION_ANSWER)]], [text])


class ReasonSegSource:
    """Training source: a random ReasonSeg image with up to ``num_queries`` of its queries
    (:func:`reason_seg_train_record`)."""

    name = "reason_seg"

    def __init__(self, items: list[ReasonSegItem], num_queries: int = 3):
        if not items:
            raise ValueError("ReasonSeg training source has no images")
        self.items = items
        self.num_queries = num_queries

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return reason_seg_train_record(rng.choice(self.items), rng, self.num_queries)
