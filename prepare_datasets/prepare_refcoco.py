"""SAM-everything proposals for refCOCO, refCOCO+ and refCOCOg (COCO train2014 images).

Reads the refer annotations ``<dataset_dir>/refer_seg/<dataset>/refs(<split_by>).p`` +
``instances.json`` and the images ``refer_seg/images/mscoco/images/train2014``; writes
``<sam_masks_dir>/coco2014/masks.h5`` keyed by file name (``COCO_train2014_....jpg``). By
default only the images some ref uses are processed (about a third of train2014);
``--all_images`` processes the whole folder, as upstream did.

    python -m prepare_datasets.prepare_refcoco --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prepare_datasets.annotations import TargetImage, items_by_name
from prepare_datasets.proposals.runner import (
    ImageItem,
    PrepareConfig,
    SplitJob,
    SplitSummary,
    run_prepare,
)
from utils.annotations import (
    annotation_mask,
    coco_images,
    list_image_files,
    load_json,
    load_refs_pickle,
)
from utils.cli import run_cli
from utils.text_files import DatasetFormatError

SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd", "refclef": "unc"}


@dataclass
class RefCocoPrepareConfig(PrepareConfig):
    """SAM-everything proposals for refCOCO/+/g images (see the module doc)."""

    refer_datasets: str = field(
        default="refcoco,refcoco+,refcocog", metadata={"help": "comma-separated refer datasets"}
    )
    all_images: bool = field(
        default=False, metadata={"help": "every train2014 image, not only the referenced ones"}
    )
    report_split: str = field(
        default="val", metadata={"help": "refs split the proposal report evaluates (or 'all')"}
    )


@dataclass
class ReferAnnotations:
    """One refer dataset: its refs and the COCO-format instances they point into."""

    name: str
    refs: list[dict]
    images: dict[int, dict]
    annotations: dict[int, dict]


def load_refer(dataset_dir: str | Path, name: str) -> ReferAnnotations:
    """Read ``refer_seg/<name>/refs(<split_by>).p`` and ``instances.json``.

    Raises:
        FileNotFoundError: either file is missing (the message names it).
        DatasetFormatError: a corrupt refs pickle, or a ref whose image is not in the instances.
    """
    folder = Path(dataset_dir) / "refer_seg" / name
    refs_path = folder / f"refs({SPLIT_BY.get(name, 'unc')}).p"
    try:  # a missing file is a FileNotFoundError naming it
        refs = load_refs_pickle(refs_path)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise DatasetFormatError(f"{refs_path}: not a refer refs pickle ({error})") from None
    instances = load_json(folder / "instances.json", f"{name} instances")
    images = coco_images(instances, str(folder / "instances.json"))
    for index, ref in enumerate(refs):
        if not isinstance(ref, dict) or int(ref.get("image_id", -1)) not in images:
            raise DatasetFormatError(
                f"{refs_path}: refs[{index}] names no image of {folder / 'instances.json'}"
            )
    annotations = {int(a["id"]): a for a in instances.get("annotations", [])}
    return ReferAnnotations(name, refs, images, annotations)


def _names(config: RefCocoPrepareConfig) -> list[str]:
    return [n.strip() for n in config.refer_datasets.split(",") if n.strip()]


def image_folder(config: PrepareConfig) -> Path:
    return Path(config.dataset_dir) / "refer_seg" / "images" / "mscoco" / "images" / "train2014"


def split_jobs(config: RefCocoPrepareConfig) -> list[SplitJob]:
    folder = image_folder(config)
    if config.all_images:
        items = items_by_name(list_image_files(folder, "*.jpg"))
    else:
        names = set()
        for refer in (load_refer(config.dataset_dir, n) for n in _names(config)):
            names.update(refer.images[int(r["image_id"])]["file_name"] for r in refer.refs)
        items = [ImageItem(key=n, path=folder / n) for n in names]
    return [SplitJob(name="coco2014", store_dir="coco2014", images=items)]


def refer_targets(
    refer: ReferAnnotations, store_dir: str, split: str, limit: int, key=lambda f: Path(f).name
) -> Iterator[TargetImage]:
    """A row per ref (its annotation's mask), grouped by image; refs of ``split`` only."""
    by_image: dict[int, list[dict]] = {}
    for ref in refer.refs:
        if split in ("all", ref.get("split")):
            by_image.setdefault(int(ref["image_id"]), []).append(ref)
    for count, image_id in enumerate(sorted(by_image)):
        if limit and count >= limit:
            return
        image = refer.images[image_id]
        height, width = int(image["height"]), int(image["width"])
        masks = [
            annotation_mask(refer.annotations[int(r["ann_id"])], height, width)
            for r in by_image[image_id]
        ]
        yield TargetImage(store_dir, key(image["file_name"]), np.stack(masks))


def iter_targets(config: RefCocoPrepareConfig) -> Iterator[TargetImage]:
    for name in _names(config):
        refer = load_refer(config.dataset_dir, name)
        yield from refer_targets(refer, "coco2014", config.report_split, config.limit)


def main(config: RefCocoPrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, RefCocoPrepareConfig)
