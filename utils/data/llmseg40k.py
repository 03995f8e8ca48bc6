"""LLM-Seg40K (the LLM-Seg paper's dataset): reasoning questions on COCO and EgoObjects images.

Files: ``<dataset_dir>/<--llmseg40k_dir>/{train,validation,test}.json`` (default folder
``LLM-Seg40K``; upstream's ``LLMSeg-40K`` is found too), each a json object keyed by image file
name::

    {"000000123.jpg": {"from_dataset": "coco" | "ego_objects",
                       "qa_pairs": [{"question": str, "answer": str,
                                     "rle_seg": {"size": [H, W], "counts": str}}   # or
                                    {..., "segmentation_path": "masks/x.png"}]}}

Both target keys are accepted in every split (upstream's train files carry ``rle_seg`` and its
validation files ``segmentation_path``). A PNG's nonzero pixels are the target; a relative
``segmentation_path`` is looked up next to the json first, then under ``--dataset_dir``; a path
that is not found there (the release holds the authors' absolute paths) falls back to its file
name beside the json.
``answer`` is not used (the model answers ``[SEG]``), as upstream. Images:
``<dataset_dir>/coco/train2017/<name>`` or ``<dataset_dir>/ego_objects/images/<name>``;
proposals: ``<sam_masks_dir>/coco2017`` or ``<sam_masks_dir>/ego_objects`` (keys = file names).

Samples are questions, as upstream: training draws a random question (so images with more
questions are seen more often) with a LONG template; evaluation (``LLMSeg40K|validation``,
``LLMSeg40K|test``; ``val`` means ``validation``) scores every question once, as a record named
``<image stem>_<question index>`` in the groups ``coco`` / ``ego_objects``.

Behaviour on bad input: a missing or malformed split json (wrong structure, unknown
``from_dataset``, a question without a target, an RLE that does not decode) stops the run when
the dataset is built, naming the file and the entry. Missing images or mask PNGs, images absent
from the proposal store or with zero proposals are skipped and counted in training and stop
evaluation (:mod:`utils.data.dataset_files`). A target whose size is not its image's (or an
unreadable mask PNG) is skipped (logged, counted) in training and stops evaluation.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.annotations import load_json
from utils.data.coco_masks import png_masks, rle_masks
from utils.data.conversation import (
    ANSWER_TEMPLATES,
    LONG_QUESTION_TEMPLATES,
    VALIDATION_ANSWER,
    VALIDATION_LONG_QUESTION,
)
from utils.data.dataset_files import (
    check_image_size,
    draw_usable,
    keep_available,
    open_proposal_store,
)
from utils.data.samples import SegmentationRecord
from utils.proposal_store import ProposalReader
from utils.text_files import DatasetFormatError

logger = logging.getLogger(__name__)

LLMSEG40K_SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"val": "validation"}
# from_dataset -> (image folder under --dataset_dir, proposal store under --sam_masks_dir)
SOURCES = {
    "coco": ("coco/train2017", "coco2017"),
    "ego_objects": ("ego_objects/images", "ego_objects"),
}
UPSTREAM_FOLDER = "LLMSeg-40K"


@dataclass
class LLMSeg40KQuestion:
    """One question about one image and where its target mask is.

    ``target`` is a COCO RLE dict (from ``rle_seg``) or the path of a mask PNG.
    """

    image_path: Path
    from_dataset: str
    question: str
    target: dict | list | Path
    index: int
    source: str  # "<json> entry <image>" for messages
    proposals: ProposalReader | None

    @property
    def name(self) -> str:
        return f"{self.image_path.stem}_{self.index}"

    def annotated_size(self) -> tuple[int, int]:
        """``(H, W)`` the target was made for (RLE ``size`` or the PNG header)."""
        if isinstance(self.target, Path):
            try:
                with Image.open(self.target) as image:
                    return image.height, image.width
            except (OSError, SyntaxError, ValueError) as error:
                raise DatasetFormatError(f"{self.target}: unreadable mask PNG ({error})") from None
        first = self.target[0] if isinstance(self.target, list) else self.target
        try:
            height, width = (int(v) for v in first["size"])
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{self.source}: rle_seg size must be [H, W]") from None
        return height, width

    def masks(self, height: int, width: int) -> np.ndarray:
        """``(1, H, W)`` uint8 target mask."""
        if isinstance(self.target, Path):
            return png_masks(self.target, height, width)
        return rle_masks(self.target, self.source, height, width)


def split_file(dataset_dir: str | Path, folder: str, split: str) -> Path:
    """``<dataset_dir>/<folder>/<split>.json`` (or upstream's ``LLMSeg-40K`` folder)."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in LLMSEG40K_SPLITS:
        raise ValueError(f"unknown LLM-Seg40K split {split!r}; expected one of {LLMSEG40K_SPLITS}")
    candidates = [Path(dataset_dir) / f / f"{split}.json" for f in (folder, UPSTREAM_FOLDER)]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"LLM-Seg40K {split} file not found at {candidates[0]} (check --dataset_dir and "
        "--llmseg40k_dir)"
    )


def _target(qa: dict, json_path: Path, dataset_dir: Path, source: str):
    if "rle_seg" in qa and qa["rle_seg"] is not None:
        rle = qa["rle_seg"]
        items = rle if isinstance(rle, list) else [rle]
        if not items or not all(
            isinstance(r, dict) and {"size", "counts"} <= r.keys() for r in items
        ):
            raise DatasetFormatError(f"{source}: rle_seg must be a COCO RLE with size and counts")
        return rle
    if isinstance(qa.get("segmentation_path"), str):
        return _mask_png_path(Path(qa["segmentation_path"]), json_path, dataset_dir)
    raise DatasetFormatError(f"{source}: needs 'rle_seg' or 'segmentation_path'")


def _mask_png_path(path: Path, json_path: Path, dataset_dir: Path) -> Path:
    """Where a ``segmentation_path`` is on this machine.

    Tried in order: the path itself when absolute, else beside the split's json, else under
    ``--dataset_dir``; then the file *name* beside the json (the released files hold the
    authors' absolute paths, e.g. ``/mnt/data/.../masks/x.png``). When none exists the first
    candidate is returned, so the missing-file report names the path as written.
    """
    candidates = [path] if path.is_absolute() else [json_path.parent / path, dataset_dir / path]
    candidates.append(json_path.parent / path.name)
    return next((c for c in candidates if c.is_file()), candidates[0])


def parse_llmseg40k(json_path: Path, dataset_dir: Path) -> list[LLMSeg40KQuestion]:
    """Every question of one split json, validated (errors name the file and the entry)."""
    data = load_json(json_path, "LLM-Seg40K split")
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{json_path}: expected an object keyed by image name")
    questions = []
    for image_name, sample in data.items():
        source = f"{json_path} entry {image_name!r}"
        if not isinstance(sample, dict) or sample.get("from_dataset") not in SOURCES:
            raise DatasetFormatError(f"{source}: 'from_dataset' must be one of {sorted(SOURCES)}")
        qa_pairs = sample.get("qa_pairs")
        if not isinstance(qa_pairs, list):
            raise DatasetFormatError(f"{source}: 'qa_pairs' must be a list")
        from_dataset = sample["from_dataset"]
        image_path = dataset_dir / SOURCES[from_dataset][0] / image_name
        for index, qa in enumerate(qa_pairs):
            where = f"{source} qa_pairs[{index}]"
            if not isinstance(qa, dict) or not str(qa.get("question") or "").strip():
                raise DatasetFormatError(f"{where}: needs a non-empty 'question'")
            target = _target(qa, json_path, dataset_dir, where)
            questions.append(
                LLMSeg40KQuestion(
                    image_path, from_dataset, qa["question"].strip(), target, index, where, None
                )  # fmt: skip
            )
    if not questions:
        raise DatasetFormatError(f"{json_path}: no questions")
    return questions


def load_llmseg40k_split(
    dataset_dir: str | Path,
    sam_masks_dir: str | Path | None,
    split: str,
    folder: str = "LLM-Seg40K",
    strict: bool = False,
) -> list[LLMSeg40KQuestion]:
    """Parse one split and keep the questions whose files and proposals exist."""
    dataset_dir = Path(dataset_dir)
    json_path = split_file(dataset_dir, folder, split)
    questions = parse_llmseg40k(json_path, dataset_dir)
    by_source: dict[str, list[LLMSeg40KQuestion]] = {}
    for question in questions:
        by_source.setdefault(question.from_dataset, []).append(question)
    kept = []
    for from_dataset, group in sorted(by_source.items()):  # only the stores in use are opened
        proposals = open_proposal_store(sam_masks_dir, SOURCES[from_dataset][1])
        for question in group:
            question.proposals = proposals
        kept += keep_available(
            group, f"LLM-Seg40K {split} ({from_dataset})", lambda q: q.image_path,
            proposals, lambda q: q.image_path.name, strict=strict,
            extra_files=lambda q: [q.target] if isinstance(q.target, Path) else [],
        )  # fmt: skip
    logger.info("LLM-Seg40K %s: %d questions on %d images", split, len(kept),
                len({q.image_path for q in kept}))  # fmt: skip
    return kept


def _record(question: LLMSeg40KQuestion, text: str, answer: str) -> SegmentationRecord:
    return SegmentationRecord(
        image_path=question.image_path,
        conversations=[[(text, answer)]],
        masks=question.masks,
        proposals=question.proposals,
        proposal_key=question.image_path.name,
        name=question.name,
        dataset="LLM-Seg40K",
        groups=(question.from_dataset,),
        queries=[question.question],
    )


def llmseg40k_train_record(question: LLMSeg40KQuestion, rng: random.Random) -> SegmentationRecord:
    """The question with a random LONG template and a random answer.

    Raises ``DatasetFormatError`` when the target's size is not the image's.
    """
    check_image_size(question.image_path, question.annotated_size(), question.source)
    text = rng.choice(LONG_QUESTION_TEMPLATES).format(sent=question.question)
    return _record(question, text, rng.choice(ANSWER_TEMPLATES))


def llmseg40k_eval_record(question: LLMSeg40KQuestion) -> SegmentationRecord:
    """The question with the fixed validation prompt and answer ``[SEG].``."""
    return _record(
        question, VALIDATION_LONG_QUESTION.format(sent=question.question), VALIDATION_ANSWER
    )


class LLMSeg40KSource:
    """Training source: a uniformly random question of the split."""

    name = "llmseg40k"

    def __init__(self, questions: list[LLMSeg40KQuestion]):
        if not questions:
            raise ValueError("LLM-Seg40K training source has no questions")
        self.questions = questions
        self.skipped: dict[str, int] = {}

    def _draw(self, rng: random.Random) -> SegmentationRecord:
        return llmseg40k_train_record(self.questions[rng.randrange(len(self.questions))], rng)

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return draw_usable(lambda: self._draw(rng), self.skipped, self.name)
