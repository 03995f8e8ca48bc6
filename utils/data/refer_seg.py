"""Referring segmentation (refCLEF, refCOCO, refCOCO+, refCOCOg), read in the refer format.

Files (LISA's layout): ``<refer_root>/<dataset>/refs(<split_by>).p`` (a data-only pickle, read
without executing code) + ``instances.json`` (COCO format: polygons or RLE); images under
``<refer_root>/images/saiapr_tc-12/<file_name>`` (refCLEF) or
``<refer_root>/images/mscoco/images/train2014/<file_name>`` (the COCO sets). ``split_by`` is
``umd`` for refCOCOg and ``unc`` otherwise. Proposals come from ``<sam_masks_dir>/saiapr``
(refCLEF, keys ``NN/images/x.jpg``) or ``<sam_masks_dir>/coco2014`` (keys = file names).

``refer_root`` is ``<dataset_dir>/refer_seg``. Upstream's validation instead reads
``<dataset_dir>/<dataset>`` directly, so its users point ``--dataset_dir`` at the ``refer_seg``
folder for ``--val_dataset refcoco|unc|val``; both layouts work here (``refer_seg/<dataset>`` is
looked for first, then ``<dataset>``), for training and evaluation alike.

Training: a uniformly chosen dataset, a random image of its ``train`` refs, up to 3 of the
sentences of all its refs pooled, each a conversation with a SHORT question about the
lower-cased sentence; the target is the referred annotation's mask. Evaluation
(``refcoco|unc|val``, ``refcocog|umd|test``, ...): one record per image holding every sentence of
its refs in that split, each its own conversation with the fixed validation prompt.
gRefCOCO (no-target and multi-target refs) is read by :mod:`utils.data.grefcoco` into the same
:class:`ReferImage` records and can join the training family (``--refer_seg_data``).

No-target training rounds (:mod:`utils.data.rejection`): a gRefCOCO no-target sentence, and a
*false premise* (``--false_premise_fraction F``: each sentence of a refCLEF/refCOCO/+/g training
sample is, with probability F, replaced by an expression of another image of the same dataset
whose referred category is not annotated anywhere in this image), answer
:data:`~utils.data.rejection.REJECTION_SENTENCE` and have no mask row. Both need the model's
``--rejection answer`` or ``token`` (checked at start-up, :mod:`utils.data.no_target`).

Multi-target training rounds (gRefCOCO sentences of several annotations): one ``[SEG]`` for the
union, or with ``--multi_target_answer per_instance`` one ``[SEG]`` per annotation in ``ann_id``
order, each with that annotation's mask row (:mod:`utils.data.multi_target`).

Behaviour on bad input: a missing or malformed ``refs(*).p``/``instances.json`` (or a ref that
points to an unknown image or annotation) stops the run when the dataset is built, naming the
file. Missing image files, images absent from the proposal store or with zero proposals are
skipped and counted in training and stop evaluation (:mod:`utils.data.dataset_files`). An image
whose annotated size is not its real size is skipped (logged, counted) in training and stops
evaluation.
"""

from __future__ import annotations

import functools
import logging
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from utils.annotations import coco_images, load_json, load_refs_pickle, saiapr_key
from utils.data.coco_masks import union_masks
from utils.data.conversation import (
    ANSWER_TEMPLATES,
    SHORT_QUESTION_TEMPLATES,
    VALIDATION_ANSWER,
    VALIDATION_SHORT_QUESTION,
)
from utils.data.dataset_files import (
    check_image_size,
    draw_usable,
    keep_available,
    open_proposal_store,
)
from utils.data.multi_target import check_multi_target_answer, per_instance_answer
from utils.data.rejection import REJECTION_SENTENCE
from utils.data.samples import SegmentationRecord
from utils.proposal_store import ProposalReader
from utils.text_files import DatasetFormatError

logger = logging.getLogger(__name__)

SPLIT_BY = {"refclef": "unc", "refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
FALSE_PREMISE_TRIES = 20  # other images' sentences tried per replacement before keeping the query


@dataclass
class ReferImage:
    """One image of a refer split: every sentence of its refs with the referred segmentation.

    ``sentences[i]`` refers to the union of ``segmentations[i]``, a list of COCO
    ``segmentation`` fields annotated at ``(height, width)`` (one for refCOCO; gRefCOCO's
    multi-target refs have several and its no-target refs none); sentences of the same ref
    share one list. ``sentence_ids`` holds each sentence's ``sent_id`` (when the refs give them;
    they name the ``--pred_dir`` PNGs, one per expression); gRefCOCO also fills
    ``no_target`` (whether it refers to nothing). The refer sets fill ``categories`` (every
    category annotated in the image; ``None`` when an annotation has none) and
    ``sentence_categories`` (the referred annotation's category per sentence), which false
    premises are drawn from.
    """

    dataset: str
    image_path: Path
    proposal_key: str
    height: int
    width: int
    sentences: list[str]
    segmentations: list
    proposals: ProposalReader | None
    sentence_ids: list[int] | None = None
    no_target: list[bool] | None = None
    categories: frozenset[int] | None = None
    sentence_categories: list[int | None] | None = None


def refer_root(dataset_dir: str | Path, name: str) -> Path:
    """The folder holding ``<name>/`` and ``images/``: ``<dataset_dir>/refer_seg`` (LISA's
    layout) or ``<dataset_dir>`` itself (upstream validation's layout)."""
    dataset_dir = Path(dataset_dir)
    for root in (dataset_dir / "refer_seg", dataset_dir):
        if (root / name).is_dir():
            return root
    raise FileNotFoundError(
        f"refer dataset {name!r} not found: neither {dataset_dir / 'refer_seg' / name} nor "
        f"{dataset_dir / name} exists (check --dataset_dir)"
    )


def _load_refs(path: Path) -> list[dict]:
    try:
        return load_refs_pickle(path)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFormatError(f"{path}: not a refer refs pickle ({error})") from None


def _ref_sentences(ref: dict, path: Path, index: int) -> list[tuple[int | None, str]]:
    """``(sent_id, text)`` of each non-empty sentence (``sent_id`` ``None`` when absent)."""
    try:
        sentences = [(s.get("sent_id"), str(s["sent"]).strip()) for s in ref["sentences"]]
    except (KeyError, TypeError, AttributeError):
        raise DatasetFormatError(f"{path}: refs[{index}] needs sentences[].sent") from None
    return [(sent_id, text) for sent_id, text in sentences if text]


def _image_categories(annotations: list[dict]) -> dict[int, frozenset[int] | None]:
    """``image id -> the categories annotated in it`` (``None`` for an image with an annotation
    without ``category_id``: what it shows is then unknown)."""
    categories: dict[int, set[int] | None] = {}
    for annotation in annotations:
        image_id = int(annotation["image_id"])
        known = categories.setdefault(image_id, set())
        if known is None:
            continue
        if annotation.get("category_id") is None:
            categories[image_id] = None
        else:
            known.add(int(annotation["category_id"]))
    return {k: (frozenset(v) if v is not None else None) for k, v in categories.items()}


def load_refer_split(
    dataset_dir: str | Path,
    sam_masks_dir: str | Path | None,
    name: str,
    split: str = "train",
    split_by: str | None = None,
    strict: bool = False,
) -> list[ReferImage]:
    """Parse the refs of ``split`` of refer dataset ``name`` into one :class:`ReferImage` each.

    Args:
        dataset_dir: ``--dataset_dir`` (see :func:`refer_root`).
        sam_masks_dir: proposal store root, or ``None`` to skip proposals.
        name: refclef, refcoco, refcoco+ or refcocog.
        split: the refs' ``split`` field (train, val, test, testA, testB).
        split_by: ``unc``/``umd``/``google``; default :data:`SPLIT_BY`.
        strict: evaluation behaviour for missing files (see :mod:`utils.data.dataset_files`).
    """
    split_by = split_by or SPLIT_BY.get(name, "unc")
    root = refer_root(dataset_dir, name)
    refs_path = root / name / f"refs({split_by}).p"
    refs = _load_refs(refs_path)
    instances_path = root / name / "instances.json"
    instances = load_json(instances_path, f"{name} instances")
    try:
        images = coco_images(instances, str(instances_path))
        annotations = {int(a["id"]): a for a in instances["annotations"]}
        image_categories = _image_categories(instances["annotations"])
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetFormatError(f"{instances_path}: not a COCO-format file ({error!r})") from None
    by_image: dict[int, tuple[list, list]] = {}
    sent_ids: dict[int, list] = {}
    sent_categories: dict[int, list] = {}
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or ref.get("split") != split:
            continue
        try:
            image_id, ann_id = int(ref["image_id"]), int(ref["ann_id"])
        except (KeyError, TypeError, ValueError):
            message = f"{refs_path}: refs[{index}] needs image_id and ann_id"
            raise DatasetFormatError(message) from None
        if image_id not in images or ann_id not in annotations:
            raise DatasetFormatError(
                f"{refs_path}: refs[{index}] points to image {image_id} / annotation {ann_id}, "
                f"not both in {instances_path}"
            )
        sentences = _ref_sentences(ref, refs_path, index)
        texts, segs = by_image.setdefault(image_id, ([], []))
        segmentation = annotations[ann_id].get("segmentation") or []
        texts += [text for _, text in sentences]
        sent_ids.setdefault(image_id, []).extend(sent_id for sent_id, _ in sentences)
        category = annotations[ann_id].get("category_id")
        category = None if category is None else int(category)
        sent_categories.setdefault(image_id, []).extend([category] * len(sentences))
        segs += [[segmentation]] * len(sentences)
    if not by_image:
        known = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        raise DatasetFormatError(f"{refs_path}: no refs in split {split!r} (splits: {known})")
    is_clef = name == "refclef"
    image_dir = root / "images" / ("saiapr_tc-12" if is_clef else "mscoco/images/train2014")
    proposals = open_proposal_store(sam_masks_dir, "saiapr" if is_clef else "coco2014")
    items = []
    for image_id, (texts, segs) in sorted(by_image.items()):
        if not texts:
            continue
        info = images[image_id]
        try:
            file_name, height, width = (
                str(info["file_name"]),
                int(info["height"]),
                int(info["width"]),
            )
        except (KeyError, TypeError, ValueError):
            message = f"{instances_path}: image {image_id} needs file_name, height and width"
            raise DatasetFormatError(message) from None
        key = saiapr_key(file_name) if is_clef else Path(file_name).name
        ids = sent_ids[image_id]
        items.append(
            ReferImage(
                name,
                image_dir / file_name,
                key,
                height,
                width,
                texts,
                segs,
                proposals,
                sentence_ids=ids if all(i is not None for i in ids) else None,
                categories=image_categories.get(image_id, frozenset()),
                sentence_categories=sent_categories[image_id],
            )  # fmt: skip
        )
    items = keep_available(
        items, f"{name}|{split_by}|{split}", lambda i: i.image_path, proposals,
        lambda i: i.proposal_key, strict=strict,
    )  # fmt: skip
    logger.info(
        "%s(%s) %s: %d images, %d sentences",
        name, split_by, split, len(items), sum(len(i.sentences) for i in items),
    )  # fmt: skip
    return items


def _record(
    image: ReferImage, conversations, rows: list[int], texts, no_target=None, per_instance=False
) -> SegmentationRecord:
    """The record of ``conversations`` whose ``[SEG]`` answers have the targets of sentences
    ``rows`` (in order; rejecting rounds have none), ``no_target`` flagging those rows;
    ``per_instance``: a sentence of several annotations has one row per annotation."""
    targets = []  # (sentence row, the segmentations its mask row unions)
    for row in rows:
        segmentations = image.segmentations[row]
        if per_instance and len(segmentations) > 1:
            targets += [(row, [segmentation]) for segmentation in segmentations]
        else:
            targets.append((row, segmentations))
    return SegmentationRecord(
        image_path=image.image_path,
        conversations=conversations,
        masks=functools.partial(
            union_masks,
            [segmentations for _, segmentations in targets],
            (image.height, image.width),
            image.image_path,
        ),
        proposals=image.proposals,
        proposal_key=image.proposal_key,
        name=image.image_path.stem,
        dataset=image.dataset,
        queries=list(texts),
        no_target=no_target,
        prediction_names=(
            tuple(str(image.sentence_ids[r]) for r, _ in targets) if image.sentence_ids else None
        ),
    )


FalsePremise = Callable[[ReferImage, random.Random], "str | None"]


def refer_train_record(
    image: ReferImage,
    rng: random.Random,
    num_sentences: int = 3,
    false_premise: FalsePremise | None = None,
    multi_target_answer: str = "union",
) -> SegmentationRecord:
    """Up to ``num_sentences`` of the image's pooled sentences, SHORT template, lower-cased.

    A no-target sentence (gRefCOCO), or one that ``false_premise(image, rng)`` replaces by an
    expression of something absent, answers :data:`~utils.data.rejection.REJECTION_SENTENCE`
    and has no mask row. A sentence of several annotations (gRefCOCO) answers one ``[SEG]``
    (their union), or with ``multi_target_answer="per_instance"`` one per annotation
    (:mod:`utils.data.multi_target`). Raises ``DatasetFormatError`` when the annotation's size
    is not the image's.
    """
    per_instance = check_multi_target_answer(multi_target_answer) == "per_instance"
    check_image_size(image.image_path, (image.height, image.width), image.dataset)
    rows = rng.sample(range(len(image.sentences)), min(num_sentences, len(image.sentences)))
    texts, rejected = [], []
    for row in rows:
        text, no_target = image.sentences[row], bool(image.no_target and image.no_target[row])
        if false_premise is not None and not no_target:
            replacement = false_premise(image, rng)
            text, no_target = (text, False) if replacement is None else (replacement, True)
        texts.append(text)
        rejected.append(no_target)
    conversations = []
    for row, text, no_target in zip(rows, texts, rejected):
        question = rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=text.lower())
        answer = rng.choice(ANSWER_TEMPLATES)  # drawn anyway: later rounds' draws stay put
        if per_instance:
            answer = per_instance_answer(answer, len(image.segmentations[row]))
        conversations.append([(question, REJECTION_SENTENCE if no_target else answer)])
    mask_rows = [row for row, no_target in zip(rows, rejected) if not no_target]
    return _record(image, conversations, mask_rows, texts, per_instance=per_instance)


def refer_eval_record(image: ReferImage) -> SegmentationRecord:
    """Every sentence of the image, each with the validation prompt and answer ``[SEG].``."""
    texts = [s.lower() for s in image.sentences]
    conversations = [
        [(VALIDATION_SHORT_QUESTION.format(class_name=text), VALIDATION_ANSWER)] for text in texts
    ]
    no_target = tuple(image.no_target) if image.no_target else None
    return _record(image, conversations, list(range(len(texts))), texts, no_target)


def check_false_premise_fraction(fraction: float) -> float:
    """``fraction`` if it is in [0, 1], else ``ValueError`` naming the flag."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--false_premise_fraction must be in [0, 1], got {fraction}")
    return fraction


def draw_false_premise(
    fraction: float, images: list[ReferImage], image: ReferImage, rng: random.Random
) -> str | None:
    """With probability ``fraction``, a sentence of another of ``images`` whose referred category
    is not annotated in ``image``; else, or when :data:`FALSE_PREMISE_TRIES` draws find none (or
    ``image``'s categories are unknown), ``None``."""
    if rng.random() >= fraction or image.categories is None:
        return None
    for _ in range(FALSE_PREMISE_TRIES):
        other = images[rng.randrange(len(images))]
        if other is image or not other.sentence_categories:
            continue
        index = rng.randrange(len(other.sentences))
        category = other.sentence_categories[index]
        if category is not None and category not in image.categories:
            return other.sentences[index]
    return None


class ReferSegSource:
    """Training source: a uniformly chosen refer dataset, then a random image of it
    (``false_premise_fraction``, ``multi_target_answer``: see the module docstring)."""

    name = "refer_seg"

    def __init__(
        self,
        datasets: dict[str, list[ReferImage]],
        num_sentences: int = 3,
        false_premise_fraction: float = 0.0,
        multi_target_answer: str = "union",
    ):
        self.multi_target_answer = check_multi_target_answer(multi_target_answer)
        self.datasets = {name: images for name, images in datasets.items() if images}
        if not self.datasets:
            raise ValueError("refer_seg training source has no images (check --refer_seg_data)")
        self.names = list(self.datasets)
        self.num_sentences = num_sentences
        self.false_premise_fraction = check_false_premise_fraction(false_premise_fraction)
        self.skipped: dict[str, int] = {}

    def _draw(self, rng: random.Random) -> SegmentationRecord:
        images = self.datasets[self.names[rng.randrange(len(self.names))]]
        image = images[rng.randrange(len(images))]
        false_premise = None
        if self.false_premise_fraction > 0:  # no draws at 0, so the samples stay as without it
            false_premise = functools.partial(
                draw_false_premise, self.false_premise_fraction, images
            )
        return refer_train_record(
            image, rng, self.num_sentences, false_premise, self.multi_target_answer
        )

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return draw_usable(lambda: self._draw(rng), self.skipped, self.name)


def load_refer_train(
    dataset_dir,
    sam_masks_dir,
    names: str,
    num_sentences: int = 3,
    false_premise_fraction=0.0,
    multi_target_answer: str = "union",
):
    """The :class:`ReferSegSource` of ``--refer_seg_data`` (``"refclef||refcoco||..."``; also
    ``grefcoco``, whose no-target sentences answer the rejection sentence and whose multi-target
    ones as ``multi_target_answer`` says)."""
    check_multi_target_answer(multi_target_answer)  # before any file is read
    from utils.data.grefcoco import GREFCOCO, load_grefcoco_split  # it builds on this module

    datasets = {}
    for name in (n.strip() for n in names.split("||") if n.strip()):
        if name == GREFCOCO:
            datasets[name] = load_grefcoco_split(dataset_dir, sam_masks_dir, "train")
            continue
        if name not in SPLIT_BY:
            raise ValueError(
                f"unknown --refer_seg_data entry {name!r}; expected any of "
                f"{sorted([*SPLIT_BY, GREFCOCO])}"
            )
        datasets[name] = load_refer_split(dataset_dir, sam_masks_dir, name, "train")
    return ReferSegSource(datasets, num_sentences, false_premise_fraction, multi_target_answer)
