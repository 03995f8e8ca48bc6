"""Finding a dataset's images and proposals before training starts, and reporting what is missing.

Shared by the refer_seg, sem_seg, vqa and LLM-Seg40K loaders, so every family treats incomplete
data the same way:

- **Training** (``strict=False``): an image whose file is missing, that is not in its proposal
  store, or that has zero proposals is left out when the dataset is built; one warning per
  dataset gives the counts and the first few file names. Only an empty result stops the run.
- **Evaluation** (``strict=True``): a missing image file or an image absent from the proposal
  store stops the run with an error listing them (a partial set would give numbers that cannot
  be compared). An image with zero proposals is kept and scored as an empty prediction, with
  a warning naming it.

Checks read each image folder once (``os.scandir``) and the store's index only, so they cost
seconds even for COCO's 118k images.

While training, a drawn annotation that turns out to be broken (an unreadable label PNG, or made
for a different image size, e.g. an EXIF-rotated photo) is skipped, logged with its file and
counted, and another image is drawn (:func:`draw_usable`); in evaluation the same error stops the
run, naming the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from utils.annotations import oriented_size
from utils.proposal_store import ProposalReader
from utils.text_files import DatasetFormatError

logger = logging.getLogger(__name__)

T = TypeVar("T")
NUM_EXAMPLES = 5


# store folder under --sam_masks_dir -> the prepare script that writes it
PREPARE_SCRIPTS = {
    "ade20k": "prepare_ade20k",
    "coco2017": "prepare_coco2017",
    "coco2014": "prepare_refcoco",
    "saiapr": "prepare_refclef",
    "voc2010": "prepare_voc2010",
    "mapillary": "prepare_mapillary",
    "ego_objects": "prepare_ego_objects",
}


def open_proposal_store(sam_masks_dir: str | os.PathLike | None, store: str):
    """The proposal reader of ``<sam_masks_dir>/<store>``, or ``None`` when proposals are not
    wanted (``sam_masks_dir=None``, e.g. when scoring saved predictions).

    Raises:
        FileNotFoundError: the store folder has no ``masks.h5``/``masks.json`` (the message says
            which prepare script writes it).
    """
    if sam_masks_dir is None:
        return None
    try:
        return ProposalReader(Path(sam_masks_dir) / store)
    except FileNotFoundError as error:
        script = PREPARE_SCRIPTS.get(store)
        how = (
            f"write it with python -m prepare_datasets.{script}"
            if script
            else f"no prepare script writes the {store!r} store yet"
        )
        raise FileNotFoundError(f"{error}; {how} (check --sam_masks_dir)") from None


# A training split whose proposal store holds fewer of its images than this stops at start-up
# (a store of another split, or an unfinished prepare run), instead of after many skipped draws.
MIN_PROPOSAL_COVERAGE = 0.5


def check_proposal_coverage(
    keys: Sequence[str], reader: ProposalReader | None, label: str
) -> float:
    """The fraction of ``keys`` (a training split's proposal keys) that ``reader`` holds.

    Raises:
        DatasetFormatError: under :data:`MIN_PROPOSAL_COVERAGE`, stating the coverage and the
            store ("covers 0 of 1000 images of ReasonSeg|train: <file>").
    """
    if reader is None or not keys:
        return 1.0
    covered = sum(key in reader for key in keys)
    fraction = covered / len(keys)
    if fraction < MIN_PROPOSAL_COVERAGE:
        raise DatasetFormatError(
            f"the proposal store covers {covered} of {len(keys)} images of {label} (under "
            f"{MIN_PROPOSAL_COVERAGE:.0%}; a store of another split, or an unfinished prepare "
            f"run?): {reader.path}"
        )
    if covered < len(keys):
        logger.warning("%s: the proposal store covers %d of %d images: %s",
                       label, covered, len(keys), reader.path)  # fmt: skip
    return fraction


class _FolderIndex:
    """Which files exist, one directory listing per folder (a stat per file is slow on NFS)."""

    def __init__(self):
        self._listings: dict[str, set[str]] = {}

    def exists(self, path: str | os.PathLike) -> bool:
        folder, name = os.path.split(os.fspath(path))  # str ops: pathlib costs seconds at 100k
        if folder not in self._listings:
            try:
                with os.scandir(folder or ".") as entries:
                    self._listings[folder] = {e.name for e in entries}
            except (FileNotFoundError, NotADirectoryError):
                self._listings[folder] = set()
        return name in self._listings[folder]


def _examples(paths: list) -> str:
    shown = ", ".join(str(p) for p in paths[:NUM_EXAMPLES])
    return shown + (", ..." if len(paths) > NUM_EXAMPLES else "")


def keep_available(
    items: Sequence[T],
    dataset: str,
    image_path: Callable[[T], Path],
    proposals: ProposalReader | None,
    proposal_key: Callable[[T], str] | None = None,
    strict: bool = False,
    extra_files: Callable[[T], list[Path]] | None = None,
) -> list[T]:
    """The items whose image (and extra files) exist and whose proposals are usable.

    Args:
        items: parsed dataset entries (one per image, or per question).
        dataset: name used in messages.
        image_path: the image file of an item.
        proposals: the dataset's proposal store (``None``: proposals are not checked).
        proposal_key: an item's key in the store.
        strict: evaluation behaviour (see the module doc) instead of skip-and-count.
        extra_files: other files an item needs (a label PNG, a mask PNG).
    Returns:
        The usable items, in their original order.
    Raises:
        FileNotFoundError: strict and something is missing, or nothing usable is left.
    """
    index = _FolderIndex()
    missing_files: list[Path] = []
    not_in_store: list[str] = []
    no_proposals: list[str] = []
    kept = []
    for item in items:
        needed = [image_path(item)] + (extra_files(item) if extra_files else [])
        absent = [p for p in needed if not index.exists(p)]
        if absent:
            missing_files += absent
            continue
        if proposals is not None and proposal_key is not None:
            key = proposal_key(item)
            try:
                count = proposals.num_proposals(key)
            except KeyError:
                not_in_store.append(key)
                continue
            if count == 0:
                no_proposals.append(key)
                if not strict:
                    continue
        kept.append(item)
    store = proposals.path if proposals is not None else None
    problems = []
    if missing_files:
        problems.append(f"{len(missing_files)} files missing ({_examples(missing_files)})")
    if not_in_store:
        problems.append(
            f"{len(not_in_store)} images not in the proposal store {store} "
            f"({_examples(not_in_store)}; run the prepare script for them)"
        )
    if strict and problems:
        raise FileNotFoundError(f"{dataset}: " + "; ".join(problems))
    if no_proposals:
        what = "scored as empty predictions" if strict else "skipped"
        logger.warning(
            "%s: %d images have zero proposals in %s and are %s: %s",
            dataset, len(no_proposals), store, what, _examples(no_proposals),
        )  # fmt: skip
    if problems:
        logger.warning(
            "%s: skipping %d of %d entries: %s",
            dataset, len(items) - len(kept), len(items), "; ".join(problems),
        )  # fmt: skip
    if not kept:
        raise FileNotFoundError(f"{dataset}: no usable entries ({'; '.join(problems) or 'empty'})")
    return kept


MAX_REDRAWS = 50


def check_image_size(image_path: Path, size: tuple[int, int], annotation) -> None:
    """Raise ``DatasetFormatError`` when ``annotation`` (made for ``size = (H, W)``) does not fit
    the image as :func:`~utils.data.images.load_rgb_image` will return it (EXIF rotation
    applied). Reads the image header only; an unreadable image passes (the encoder reports it).
    """
    try:
        actual = oriented_size(image_path)
    except (OSError, SyntaxError, ValueError):
        return
    if tuple(int(v) for v in size) != tuple(actual):
        raise DatasetFormatError(
            f"{annotation}: annotated as {size[0]}x{size[1]} but the image {image_path} is "
            f"{actual[0]}x{actual[1]}"
        )


def draw_usable(draw: Callable[[], T | None], skipped: dict[str, int], family: str) -> T:
    """Call ``draw`` until it returns a record, skipping bad annotations.

    ``draw`` returns ``None`` for an image without any usable target and raises
    ``DatasetFormatError`` for a broken annotation (an unreadable label PNG, a size that is not
    the image's); both are counted in ``skipped`` and the latter logged with its file.
    """
    for _ in range(MAX_REDRAWS):
        try:
            record = draw()
        except DatasetFormatError as error:
            skipped["bad annotation"] = skipped.get("bad annotation", 0) + 1
            logger.warning("%s: skipping a training image: %s", family, error)
            continue
        if record is not None:
            return record
        skipped["no target"] = skipped.get("no target", 0) + 1
    raise RuntimeError(
        f"{family}: {MAX_REDRAWS} images in a row were unusable ({skipped}); check the annotations"
    )
