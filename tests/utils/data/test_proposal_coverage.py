"""A training split whose proposal store holds too few of its images stops at start-up."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from tests.data_fixtures import write_reason_seg
from utils.data.builders import _reason_seg_train
from utils.text_files import DatasetFormatError


def _config(dataset_dir, masks_dir):
    return SimpleNamespace(
        reason_seg_data="ReasonSeg|train", dataset_dir=str(dataset_dir),
        sam_masks_dir=str(masks_dir), num_classes_per_sample=1,
    )  # fmt: skip


def test_store_of_another_split_is_refused_with_its_coverage(tmp_path):
    dataset_dir, masks_dir = write_reason_seg(tmp_path, "train", 6, seed=0)
    _, small_masks = write_reason_seg(tmp_path / "small", "train", 2, seed=1)
    stores = masks_dir / "reason_seg" / "ReasonSeg"
    assert len(_reason_seg_train(_config(dataset_dir, masks_dir)).items) == 6  # covered: fine
    shutil.rmtree(stores / "train")  # an unfinished run's store: 2 of the 6 images
    shutil.copytree(small_masks / "reason_seg" / "ReasonSeg" / "train", stores / "train")
    with pytest.raises(DatasetFormatError) as error:
        _reason_seg_train(_config(dataset_dir, masks_dir))
    message = str(error.value)
    assert "covers 2 of 6 images of ReasonSeg|train" in message
    assert message.endswith(str(stores / "train" / "masks.h5"))
