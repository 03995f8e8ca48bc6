"""SAM-everything proposals for refCLEF (SAIAPR TC-12 images).

Reads ``<dataset_dir>/refer_seg/images/saiapr_tc-12/<NN>/images/*.jpg`` and writes
``<sam_masks_dir>/saiapr/masks.h5``, keyed as upstream's loaders look them up:
``<NN>/images/<file>.jpg``. The report reads ``refer_seg/refclef/refs(unc).p`` +
``instances.json``.

    python -m prepare_datasets.prepare_refclef --dataset_dir ./dataset \
        --sam_masks_dir ./dataset/sam_masks --vision_pretrained sam_vit_h_4b8939.pth
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prepare_datasets.annotations import TargetImage
from prepare_datasets.prepare_refcoco import load_refer, refer_targets
from prepare_datasets.proposals.runner import (
    ImageItem,
    PrepareConfig,
    SplitJob,
    SplitSummary,
    run_prepare,
)
from utils.annotations import list_image_files, saiapr_key
from utils.cli import run_cli


@dataclass
class RefClefPrepareConfig(PrepareConfig):
    """SAM-everything proposals for refCLEF (SAIAPR) images (see the module doc)."""

    report_split: str = field(
        default="val", metadata={"help": "refs split the proposal report evaluates (or 'all')"}
    )


def image_root(config: PrepareConfig) -> Path:
    return Path(config.dataset_dir) / "refer_seg" / "images" / "saiapr_tc-12"


def split_jobs(config: RefClefPrepareConfig) -> list[SplitJob]:
    root = image_root(config)
    paths = list_image_files(root, "*/images/*.jpg")
    items = [ImageItem(key=p.relative_to(root).as_posix(), path=p) for p in paths]
    return [SplitJob(name="saiapr", store_dir="saiapr", images=items)]


def iter_targets(config: RefClefPrepareConfig) -> Iterator[TargetImage]:
    refer = load_refer(config.dataset_dir, "refclef")
    yield from refer_targets(refer, "saiapr", config.report_split, config.limit, key=saiapr_key)


def main(config: RefClefPrepareConfig) -> list[SplitSummary]:
    return run_prepare(config, split_jobs(config))


if __name__ == "__main__":
    run_cli(main, RefClefPrepareConfig)
