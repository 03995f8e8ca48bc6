"""Semantic and part segmentation (ADE20K, COCO-Stuff, Mapillary, PACO-LVIS, PASCAL-Part), native.

Each training sample picks one of the configured datasets uniformly, a random image, and up to
``num_classes_per_sample`` of its classes (label maps) or annotations (part datasets); each
becomes its own conversation with a SHORT question about the lower-cased class name, and its
ground truth is that class's pixels (binary, as upstream: ignored pixels are simply not the
class). Class-name and ignore rules are in :mod:`utils.data.class_names`.

Layout under ``--dataset_dir`` (LISA's) and the proposal store each dataset reads (keys are
image file names):

==============  ===================================================================  ===========
dataset         files                                                                store
==============  ===================================================================  ===========
ade20k          ``ade20k/images/training/X.jpg`` + ``ade20k/annotations/training/X.png``  ade20k
cocostuff       ``cocostuff/train2017/X.png`` + ``coco/train2017/X.jpg``             coco2017
mapillary       ``mapillary/training/v2.0/labels/X.png`` + ``.../training/images/X.jpg``,
                ``mapillary/config_v2.0.json``                                       mapillary
paco_lvis       ``vlpart/paco/annotations/paco_lvis_v1_train.json``, ``coco/<file_name>``  coco2017
pascal_part     ``vlpart/pascal_part/train.json``,
                ``vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<file_name>``      voc2010
==============  ===================================================================  ===========

Behaviour on bad input: a missing folder or a malformed annotation json stops the run when the
dataset is built, naming the file. Images whose picture or label PNG is missing, that are not in
the proposal store or have zero proposals are skipped and counted in one warning per dataset
(:mod:`utils.data.dataset_files`). A label PNG that cannot be read, or whose size differs from
its image, is logged with its file, counted and another image is drawn; so is an image with no
labelled class.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.annotations import list_image_files, load_json
from utils.data.class_names import (
    IGNORE_LABEL,
    ade20k_classes,
    ade20k_lookup,
    cocostuff_classes,
    cocostuff_lookup,
    mapillary_classes,
    part_category,
    part_phrase,
)
from utils.data.coco_masks import annotation_masks
from utils.data.conversation import ANSWER_TEMPLATES, SHORT_QUESTION_TEMPLATES
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


@dataclass
class LabelMapImage:
    """An image with a class-index label PNG of the same size."""

    image_path: Path
    label_path: Path
    proposal_key: str


@dataclass
class LabelMapDataset:
    """ADE20K, COCO-Stuff or Mapillary: images, class names and the raw-value lookup table."""

    name: str
    images: list[LabelMapImage]
    class_names: list[str]
    lookup: np.ndarray  # (65536,) uint8: raw PNG value -> class index or 255
    proposals: ProposalReader | None

    def class_map(self, image: LabelMapImage) -> np.ndarray:
        """``(H, W)`` uint8 class indices (255 = ignore) of ``image``'s label PNG."""
        try:
            with Image.open(image.label_path) as label:
                raw = np.asarray(label)
        except OSError as error:
            raise DatasetFormatError(
                f"{image.label_path}: unreadable label PNG ({error})"
            ) from None
        if raw.ndim != 2 or raw.dtype not in (np.uint8, np.uint16):
            raise DatasetFormatError(
                f"{image.label_path}: expected a single-channel 8/16-bit class-index PNG, "
                f"got shape {raw.shape} {raw.dtype}"
            )
        return self.lookup[raw]


@dataclass
class PartImage:
    """An image of a COCO-format part dataset with its annotations ``(category_id, seg)``."""

    image_path: Path
    proposal_key: str
    height: int
    width: int
    annotations: list[tuple[int, object]]


@dataclass
class PartDataset:
    """PACO-LVIS or PASCAL-Part: images with part annotations and category names."""

    name: str
    images: list[PartImage]
    categories: dict[int, str | tuple[str, str]]
    proposals: ProposalReader | None
    source: Path


def class_masks(
    class_map: np.ndarray, class_ids: list[int], label_path: Path, height: int, width: int
) -> np.ndarray:
    """``(R, H, W)`` uint8 binary masks, row r = pixels of ``class_ids[r]``."""
    if class_map.shape != (height, width):
        raise DatasetFormatError(
            f"{label_path}: label map is {class_map.shape[0]}x{class_map.shape[1]} but its image "
            f"is {height}x{width}"
        )
    ids = np.asarray(class_ids, np.uint8)[:, None, None]
    return (class_map[None] == ids).astype(np.uint8)


def _short_conversations(names: list[str], rng: random.Random) -> list:
    """One single-turn conversation per name: a SHORT question and a random answer."""
    conversations = []
    for name in names:
        question = rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=name.lower())
        conversations.append([(question, rng.choice(ANSWER_TEMPLATES))])
    return conversations


def label_map_train_record(
    dataset: LabelMapDataset, image: LabelMapImage, rng: random.Random, num_classes: int = 3
) -> SegmentationRecord | None:
    """Up to ``num_classes`` classes present in ``image`` (``None`` if it has none)."""
    class_map = dataset.class_map(image)
    check_image_size(image.image_path, class_map.shape, image.label_path)
    present = [int(c) for c in np.unique(class_map) if c != IGNORE_LABEL]
    if not present:
        return None
    class_ids = rng.sample(present, min(num_classes, len(present)))
    names = [dataset.class_names[c] for c in class_ids]
    return SegmentationRecord(
        image_path=image.image_path,
        conversations=_short_conversations(names, rng),
        masks=functools.partial(class_masks, class_map, class_ids, image.label_path),
        proposals=dataset.proposals,
        proposal_key=image.proposal_key,
        name=image.image_path.stem,
        dataset=dataset.name,
        queries=names,
    )


def part_train_record(
    dataset: PartDataset, image: PartImage, rng: random.Random, num_classes: int = 3
) -> SegmentationRecord:
    """Up to ``num_classes`` of ``image``'s annotations, each named by its (part) category."""
    check_image_size(image.image_path, (image.height, image.width), dataset.source)
    chosen = rng.sample(image.annotations, min(num_classes, len(image.annotations)))
    names = [part_phrase(dataset.categories[category], rng) for category, _ in chosen]
    return SegmentationRecord(
        image_path=image.image_path,
        conversations=_short_conversations(names, rng),
        masks=functools.partial(
            annotation_masks, [s for _, s in chosen], (image.height, image.width), image.image_path
        ),
        proposals=dataset.proposals,
        proposal_key=image.proposal_key,
        name=image.image_path.stem,
        dataset=dataset.name,
        queries=names,
    )


def _label_map_dataset(name, pairs, class_names, lookup, sam_masks_dir, store) -> LabelMapDataset:
    proposals = open_proposal_store(sam_masks_dir, store)
    images = [LabelMapImage(image, label, image.name) for image, label in pairs]
    images = keep_available(
        images, name, lambda i: i.image_path, proposals, lambda i: i.proposal_key,
        extra_files=lambda i: [i.label_path],
    )  # fmt: skip
    logger.info("%s: %d images, %d classes", name, len(images), len(class_names))
    return LabelMapDataset(name, images, class_names, lookup, proposals)


def load_ade20k(dataset_dir, sam_masks_dir) -> LabelMapDataset:
    """ADE20K ``training``: every ``images/training/*.jpg`` with its annotation PNG."""
    root = Path(dataset_dir) / "ade20k"
    pairs = [
        (p, root / "annotations" / "training" / f"{p.stem}.png")
        for p in list_image_files(root / "images" / "training", "*.jpg")
    ]
    return _label_map_dataset(
        "ade20k", pairs, ade20k_classes(), ade20k_lookup(), sam_masks_dir, "ade20k"
    )


def load_cocostuff(dataset_dir, sam_masks_dir) -> LabelMapDataset:
    """COCO-Stuff: every ``cocostuff/train2017/*.png`` with its ``coco/train2017`` image."""
    root = Path(dataset_dir)
    pairs = [
        (root / "coco" / "train2017" / f"{p.stem}.jpg", p)
        for p in list_image_files(root / "cocostuff" / "train2017", "*.png")
    ]
    names = cocostuff_classes()
    return _label_map_dataset(
        "cocostuff", pairs, names, cocostuff_lookup(names), sam_masks_dir, "coco2017"
    )


def load_mapillary(dataset_dir, sam_masks_dir) -> LabelMapDataset:
    """Mapillary Vistas ``training`` with v2.0 labels and ``config_v2.0.json`` names."""
    root = Path(dataset_dir) / "mapillary"
    config_path = root / "config_v2.0.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"Mapillary config {config_path} not found (check --dataset_dir)")
    names, lookup = mapillary_classes(config_path)
    pairs = [
        (root / "training" / "images" / f"{p.stem}.jpg", p)
        for p in list_image_files(root / "training" / "v2.0" / "labels", "*.png")
    ]
    return _label_map_dataset("mapillary", pairs, names, lookup, sam_masks_dir, "mapillary")


def parse_part_annotations(path: Path) -> tuple[dict, dict, dict]:
    """``(images by id, annotations by image id, category names by id)`` of a COCO-format
    part json, validated (errors name the file and the entry)."""
    data = load_json(path, "part annotations")
    try:
        images = {int(im["id"]): im for im in data["images"]}
        categories = {int(c["id"]): part_category(str(c["name"])) for c in data["categories"]}
        by_image: dict[int, list] = {}
        for index, ann in enumerate(data["annotations"]):
            if int(ann["category_id"]) not in categories:
                raise DatasetFormatError(
                    f"{path}: annotations[{index}] has unknown category_id {ann['category_id']}"
                )
            by_image.setdefault(int(ann["image_id"]), []).append(
                (int(ann["category_id"]), ann["segmentation"])
            )
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, DatasetFormatError):
            raise
        raise DatasetFormatError(
            f"{path}: not a COCO-format file with images/annotations/categories ({error!r})"
        ) from None
    return images, by_image, categories


def _part_dataset(name, path, image_root, sam_masks_dir, store) -> PartDataset:
    images, by_image, categories = parse_part_annotations(path)
    entries = []
    for image_id in sorted(
        by_image
    ):  # images without annotations are never drawn (upstream redraws)
        info = images.get(image_id)
        if info is None:
            raise DatasetFormatError(f"{path}: annotations refer to unknown image_id {image_id}")
        try:
            file_name, height, width = info["file_name"], int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError):
            raise DatasetFormatError(
                f"{path}: image {image_id} needs file_name, height and width"
            ) from None
        image_path = image_root / file_name
        entries.append(PartImage(image_path, image_path.name, height, width, by_image[image_id]))
    proposals = open_proposal_store(sam_masks_dir, store)
    entries = keep_available(
        entries, name, lambda i: i.image_path, proposals, lambda i: i.proposal_key
    )
    logger.info("%s: %d images, %d categories", name, len(entries), len(categories))
    return PartDataset(name, entries, categories, proposals, path)


def load_paco_lvis(dataset_dir, sam_masks_dir) -> PartDataset:
    """PACO-LVIS train (COCO train2017 images; ``file_name`` is ``train2017/X.jpg``)."""
    root = Path(dataset_dir)
    path = root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json"
    return _part_dataset("paco_lvis", path, root / "coco", sam_masks_dir, "coco2017")


def load_pascal_part(dataset_dir, sam_masks_dir) -> PartDataset:
    """PASCAL-Part train (VOC2010 images)."""
    root = Path(dataset_dir) / "vlpart" / "pascal_part"
    image_root = root / "VOCdevkit" / "VOC2010" / "JPEGImages"
    return _part_dataset("pascal_part", root / "train.json", image_root, sam_masks_dir, "voc2010")


SEM_SEG_LOADERS = {
    "ade20k": load_ade20k,
    "cocostuff": load_cocostuff,
    "pascal_part": load_pascal_part,
    "paco_lvis": load_paco_lvis,
    "mapillary": load_mapillary,
}


def load_sem_seg_datasets(dataset_dir, sam_masks_dir, names: str) -> list:
    """The datasets of ``--sem_seg_data`` (``"ade20k||cocostuff||..."``), in that order."""
    datasets = []
    for name in (n.strip() for n in names.split("||") if n.strip()):
        if name not in SEM_SEG_LOADERS:
            raise ValueError(
                f"unknown --sem_seg_data entry {name!r}; expected any of {sorted(SEM_SEG_LOADERS)}"
            )
        datasets.append(SEM_SEG_LOADERS[name](dataset_dir, sam_masks_dir))
    return datasets


class SemSegSource:
    """Training source: a uniformly chosen dataset, a random image, up to N of its classes.

    ``skipped`` counts images drawn again because they had no labelled class or a broken
    annotation (see :func:`~utils.data.dataset_files.draw_usable`).
    """

    name = "sem_seg"

    def __init__(self, datasets: list, num_classes: int = 3):
        if not datasets:
            raise ValueError("sem_seg training source has no datasets (check --sem_seg_data)")
        self.datasets = datasets
        self.num_classes = num_classes
        self.skipped: dict[str, int] = {}

    def _draw(self, rng: random.Random) -> SegmentationRecord | None:
        dataset = self.datasets[rng.randrange(len(self.datasets))]
        image = dataset.images[rng.randrange(len(dataset.images))]
        if isinstance(dataset, PartDataset):
            return part_train_record(dataset, image, rng, self.num_classes)
        return label_map_train_record(dataset, image, rng, self.num_classes)

    def sample_record(self, rng: random.Random) -> SegmentationRecord:
        return draw_usable(lambda: self._draw(rng), self.skipped, self.name)
