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

No-target queries (the synthetic data's ``--no_target_queries``): a query with ``"no_target":
true`` (and no target polygon) refers to nothing. Following :mod:`utils.data.rejection`, its
evaluation record answers ``[SEG].`` with an all-zero mask row flagged in ``record.no_target``
(a split without any such query keeps ``no_target=None``, so its reports are unchanged), and a
training round asking it answers :data:`~utils.data.rejection.REJECTION_SENTENCE` with no mask
row. A multi-target query needs nothing of its own: its ``shapes`` hold every target's polygons,
which rasterise to their union. With ``--multi_target_answer per_instance``
(:mod:`utils.data.multi_target`), a training round asking a query with ``"targets": [i, j, ...]``
(two or more; the synthetic data's ``--multi_target_queries``) answers one ``[SEG]`` per target in
``targets`` order, each with the label map of the target shapes whose ``group_id`` is that object
index (ignore regions in every row); a target polygon without such a ``group_id`` stops the build,
naming the json. Queries without ``targets`` (real ReasonSeg) keep their one ``[SEG]``.

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
from utils.data.multi_target import check_multi_target_answer, per_instance_answer
from utils.data.rejection import REJECTION_SENTENCE
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
    no_target: bool = False  # refers to nothing ("no_target": true in the json)
    targets: object = None  # the json's "targets" as written (object indices; None: absent)


@dataclass
class ReasonSegItem:
    """One parsed ReasonSeg image: its file, queries, query kind and polygons (``no_target``:
    the main query refers to nothing)."""

    image_path: Path
    texts: list[str]
    is_sentence: bool
    shapes: list[dict]
    proposals: ProposalReader | None
    extra: dict
    extra_queries: list[ReasonSegQuery] = field(default_factory=list)
    no_target: bool = False
    targets: object = None  # the main query's "targets" (see ReasonSegQuery)

    @property
    def main_query(self) -> ReasonSegQuery:
        return ReasonSegQuery(
            self.texts, self.is_sentence, self.shapes, self.no_target, self.targets
        )

    def masks(self, height: int, width: int, count: int) -> np.ndarray:
        """``(count, H, W)`` copies of the label map (1 target, 255 ignore), one per ``[SEG]``."""
        label_map = labelme_to_mask(self.shapes, height, width)
        return np.repeat(label_map[None], count, axis=0)


def _query_masks(shapes_per_round: list[list[dict]], height: int, width: int) -> np.ndarray:
    """``(R, H, W)`` label maps (1 target, 255 ignore), one per round's polygons (R may be 0)."""
    masks = [labelme_to_mask(shapes, height, width) for shapes in shapes_per_round]
    return np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)


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
    no_target = data.get("no_target", False)
    if not isinstance(no_target, bool):
        raise DatasetFormatError(f"{where}: field 'no_target' must be true or false")
    if no_target and has_target_polygon(shapes):
        raise DatasetFormatError(f"{where}: 'no_target' is true but 'shapes' holds a target")
    targets = data.get("targets")  # checked only where read (per_instance answers)
    return ReasonSegQuery(list(texts), bool(data["is_sentence"]), shapes, no_target, targets)


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
    parsed = ("text", "shapes", "is_sentence", "extra_queries", "no_target")
    other = {k: v for k, v in data.items() if k not in parsed}
    return main_query, extra_queries, other


def is_target_shape(shape: dict) -> bool:
    """Whether a shape is a target: its label, lower-cased, is not ``flag`` and holds no
    ``ignore``."""
    label = str(shape.get("label", "")).lower()
    return label != "flag" and "ignore" not in label


def has_target_polygon(shapes: list[dict]) -> bool:
    """Whether any shape is a target (:func:`is_target_shape`), i.e. whether the rasterised
    target can be non-empty."""
    return any(is_target_shape(shape) for shape in shapes)


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def instance_shapes(query: ReasonSegQuery, where: str) -> list[list[dict]] | None:
    """Per target of a multi-target query (``targets`` of two or more objects), in ``targets``
    order, the shapes of its label map: the target shapes whose ``group_id`` is its object index
    and every non-target (ignore, flag) shape. ``None`` for any other query.

    Raises:
        DatasetFormatError: naming ``where``, when ``targets`` is not a list of distinct object
            indices, a target shape has no ``group_id`` among them, or a target has no shape.
    """
    targets = query.targets
    if query.no_target or targets is None:
        return None
    if (
        not isinstance(targets, list)
        or not all(_is_index(t) for t in targets)
        or len(set(targets)) != len(targets)
    ):
        raise DatasetFormatError(f"{where}: field 'targets' must be a list of distinct indices")
    if len(targets) < 2:
        return None
    for index, shape in enumerate(query.shapes):
        group = shape.get("group_id")
        if is_target_shape(shape) and not (_is_index(group) and group in targets):
            raise DatasetFormatError(
                f"{where}: shapes[{index}] has no group_id naming one of its targets {targets}, "
                "which --multi_target_answer per_instance needs (data written before group_id "
                "was: rerun prepare_datasets.prepare_synthetic)"
            )
    per_target = [
        [s for s in query.shapes if not is_target_shape(s) or s.get("group_id") == target]
        for target in targets
    ]
    for target, shapes in zip(targets, per_target):
        if not has_target_polygon(shapes):
            raise DatasetFormatError(f"{where}: target {target} has no shape (group_id {target})")
    return per_target


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
                    query.no_target,
                    query.targets,
                )
            )
        split_items = items[first:]
        # A query flagged no_target is meant to be empty; only unflagged ones are reported.
        without_target = [
            item
            for item in split_items
            if not item.no_target and not has_target_polygon(item.shapes)
        ]
        _report_empty_targets(split, without_target, len(split_items))
        num_no_target = count_no_target_queries(split_items)
        if num_no_target:
            logger.info("ReasonSeg|%s: %d no-target queries", split, num_no_target)
    return items


def count_no_target_in_split(dataset_dir: str | Path, splits: str) -> int:
    """No-target queries (main and extra) in the jsons of ``splits``, read without building
    items (for the start-up check of :mod:`utils.data.no_target`)."""
    total = 0
    for split in splits.split("_"):
        folder = Path(dataset_dir) / "reason_seg" / "ReasonSeg" / split
        if not folder.is_dir():
            raise FileNotFoundError(f"ReasonSeg split folder {folder} does not exist")
        for path in sorted(folder.glob("*.json")):
            query, extra_queries, _ = parse_reason_seg_json(path)
            total += query.no_target + sum(extra.no_target for extra in extra_queries)
    return total


def count_no_target_queries(items: list[ReasonSegItem]) -> int:
    """Main and extra queries flagged ``no_target`` among ``items``."""
    return sum(
        item.no_target + sum(query.no_target for query in item.extra_queries) for item in items
    )


def _groups(item: ReasonSegItem) -> tuple[str, ...]:
    """``long``/``short`` (ReasonSeg test's breakdown), plus the query type when recorded."""
    groups = ("long" if item.is_sentence else "short",)
    if "query_type" in item.extra:
        groups += (f"type:{item.extra['query_type']}",)
    return groups


def _record(
    item: ReasonSegItem, conversations, queries, masks=None, no_target=None
) -> SegmentationRecord:
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
        no_target=no_target,
    )


def reason_seg_train_record(
    item: ReasonSegItem, rng: random.Random, num_queries: int = 3, multi_target_answer="union"
) -> SegmentationRecord:
    """A training sample of up to ``num_queries`` conversations (rounds) about the image.

    Without ``extra_queries``: that many of the query's phrasings, one per conversation, all with
    the same target. With them: that many *different* queries drawn from the main one and the
    extras (the main one is not always among them), one random phrasing each, every
    conversation with its own query's target. A no-target query's rounds answer
    :data:`~utils.data.rejection.REJECTION_SENTENCE` and have no mask row. With
    ``multi_target_answer="per_instance"`` a multi-target query's rounds answer one ``[SEG]``
    per target, each with its own row (:func:`instance_shapes`); the draws are the same.
    """
    per_instance = check_multi_target_answer(multi_target_answer) == "per_instance"
    where = str(item.image_path.with_suffix(".json"))
    if not item.extra_queries:
        texts = rng.sample(item.texts, min(num_queries, len(item.texts)))
        instances = instance_shapes(item.main_query, where) if per_instance else None
        count = len(instances) if instances else 1
        conversations = [
            _conversation(text, item.is_sentence, rng, item.no_target, count) for text in texts
        ]
        if instances:
            shapes = instances * len(texts)
            return _record(item, conversations, texts, functools.partial(_query_masks, shapes))
        if not item.no_target:
            return _record(item, conversations, texts)
        return _record(item, conversations, texts, functools.partial(_query_masks, []))
    pool = list(enumerate([item.main_query, *item.extra_queries]))
    chosen = rng.sample(pool, min(num_queries, len(pool)))
    texts = [rng.choice(query.texts) for _, query in chosen]
    conversations, shapes = [], []
    for text, (index, query) in zip(texts, chosen):
        instances = None
        if per_instance:
            instances = instance_shapes(query, _query_place(where, index))
        count = len(instances) if instances else 1
        conversations.append(_conversation(text, query.is_sentence, rng, query.no_target, count))
        if not query.no_target:
            shapes += instances or [query.shapes]
    return _record(item, conversations, texts, functools.partial(_query_masks, shapes))


def _count_multi_target(item: ReasonSegItem) -> int:
    """Queries of ``item`` that :func:`instance_shapes` splits (checking every one)."""
    where = str(item.image_path.with_suffix(".json"))
    queries = [item.main_query, *item.extra_queries]
    return sum(
        instance_shapes(q, _query_place(where, i)) is not None for i, q in enumerate(queries)
    )


def _query_place(json_path: str, index: int) -> str:
    """Where query ``index`` of a json (0: the main one, then the extras) is, for errors."""
    return json_path if index == 0 else f"{json_path}: extra_queries[{index - 1}]"


def _conversation(
    text: str, is_sentence: bool, rng: random.Random, no_target: bool = False, num_seg: int = 1
) -> list[tuple[str, str]]:
    """One training round: a random question template around ``text``, a random answer (the
    rejection sentence for a ``no_target`` query; ``num_seg > 1``: its ``[SEG]`` listed that
    many times, :func:`~utils.data.multi_target.per_instance_answer`)."""
    if is_sentence:
        question = rng.choice(LONG_QUESTION_TEMPLATES).format(sent=text)
    else:
        question = rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=text.lower())
    # Drawn for every round, so a rejection does not shift the draws of the rounds after it.
    answer = rng.choice(ANSWER_TEMPLATES)
    return [(question, REJECTION_SENTENCE if no_target else per_instance_answer(answer, num_seg))]


def reason_seg_eval_record(item: ReasonSegItem, flag_no_target: bool = False) -> SegmentationRecord:
    """An evaluation sample: the first text, the fixed validation prompt, answer ``[SEG].``.

    ``flag_no_target`` (for a split holding no-target queries): set ``record.no_target`` to
    ``(item.no_target,)``; a no-target query's mask row is all zero either way.
    """
    text = item.texts[0]
    if item.is_sentence:
        question = VALIDATION_LONG_QUESTION.format(sent=text)
    else:
        question = VALIDATION_SHORT_QUESTION.format(class_name=text)
    no_target = (item.no_target,) if flag_no_target else None
    return _record(item, [[(question, VALIDATION_ANSWER)]], [text], no_target=no_target)


def reason_seg_eval_records(items: list[ReasonSegItem]) -> list[SegmentationRecord]:
    """:func:`reason_seg_eval_record` of every item, flagging no-target rows when any item's
    main query has no target (else ``no_target=None`` everywhere, as before such queries)."""
    flag = any(item.no_target for item in items)
    return [reason_seg_eval_record(item, flag) for item in items]


class ReasonSegSource:
    """Training source: a random ReasonSeg image with up to ``num_queries`` of its queries
    (:func:`reason_seg_train_record`). With ``multi_target_answer="per_instance"`` every
    multi-target query is checked here, so bad data stops the build, not training."""

    name = "reason_seg"

    def __init__(
        self, items: list[ReasonSegItem], num_queries: int = 3, multi_target_answer="union"
    ):
        self.multi_target_answer = check_multi_target_answer(multi_target_answer)
        if not items:
            raise ValueError("ReasonSeg training source has no images")
        self.items = items
        self.num_queries = num_queries
        self.num_no_target = count_no_target_queries(items)
        if self.multi_target_answer == "per_instance":
            count = sum(_count_multi_target(item) for item in items)
            logger.info("ReasonSeg: %d multi-target queries answer one [SEG] per target", count)

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return reason_seg_train_record(
            rng.choice(self.items), rng, self.num_queries, self.multi_target_answer
        )
