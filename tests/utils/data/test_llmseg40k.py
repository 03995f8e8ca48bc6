"""LLM-Seg40K loader on a native-format fixture (rle_seg and segmentation_path targets)."""

import json
import pickle
import random
from types import SimpleNamespace

import numpy as np
import pytest

from tests.utils.data.loader_fixtures import HEIGHT, WIDTH, box, rle, write_llmseg40k
from utils.data.builders import eval_records
from utils.data.conversation import (
    ANSWER_TEMPLATES,
    LONG_QUESTION_TEMPLATES,
    VALIDATION_ANSWER,
    VALIDATION_LONG_QUESTION,
)
from utils.data.llmseg40k import LLMSeg40KSource, load_llmseg40k_split, split_file
from utils.text_files import DatasetFormatError


@pytest.fixture
def llmseg(tmp_path):
    root, masks = tmp_path / "dataset", tmp_path / "sam_masks"
    return root, masks, write_llmseg40k(root, masks)


def _config(root, masks):
    return SimpleNamespace(dataset_dir=root, sam_masks_dir=masks, llmseg40k_dir="LLM-Seg40K")


def test_train_questions_both_target_kinds(llmseg):
    root, masks, expected = llmseg
    questions = load_llmseg40k_split(root, masks, "train")
    assert sorted(q.name for q in questions) == sorted(expected)
    by_name = {q.name: q for q in questions}
    assert by_name["ego_0001_0"].image_path == root / "ego_objects/images/ego_0001.jpg"
    assert by_name["ego_0001_0"].proposals.path == masks / "ego_objects/masks.h5"
    assert by_name["000000000042_0"].proposals.path == masks / "coco2017/masks.h5"
    source = LLMSeg40KSource(questions)
    seen = set()
    for seed in range(30):
        record = source.sample_record(random.Random(seed))
        ((question, answer),) = record.conversations[0]
        assert len(record.conversations) == 1
        assert question in {t.format(sent=record.queries[0]) for t in LONG_QUESTION_TEMPLATES}
        assert answer in ANSWER_TEMPLATES
        assert np.array_equal(record.masks(HEIGHT, WIDTH), expected[record.name][None])
        assert record.groups == (by_name[record.name].from_dataset,)
        seen.add(record.name)
    assert seen == set(expected)  # uniform over questions


def test_eval_splits(llmseg):
    root, masks, expected = llmseg
    (record,) = eval_records(_config(root, masks), "LLMSeg40K|validation")
    assert record.name == "000000000042_0"
    assert record.conversations == [
        [(VALIDATION_LONG_QUESTION.format(sent="Where would you sit?"), VALIDATION_ANSWER)]
    ]
    # a PNG next to the json with value 7: nonzero is the target
    assert np.array_equal(record.masks(HEIGHT, WIDTH)[0], expected["000000000042_1"])
    assert np.array_equal(pickle.loads(pickle.dumps(record)).masks(HEIGHT, WIDTH),
                          record.masks(HEIGHT, WIDTH))  # fmt: skip
    (val,) = eval_records(_config(root, masks), "LLMSeg40K|val")
    assert val.name == record.name
    (test,) = eval_records(_config(root, masks), "llmseg40k|test")
    assert test.groups == ("ego_objects",)
    assert np.array_equal(test.masks(HEIGHT, WIDTH)[0], expected["ego_0001_0"])
    assert eval_records(_config(root, None), "LLMSeg40K|test", with_proposals=False)
    with pytest.raises(ValueError, match="unknown LLM-Seg40K split 'dev'"):
        eval_records(_config(root, masks), "LLMSeg40K|dev")


def test_upstream_folder_name(llmseg):
    root, _, _ = llmseg
    (root / "LLM-Seg40K").rename(root / "LLMSeg-40K")
    assert split_file(root, "LLM-Seg40K", "test") == root / "LLMSeg-40K/test.json"
    (root / "LLMSeg-40K").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match="LLM-Seg40K/test.json"):
        split_file(root, "LLM-Seg40K", "test")


def _rewrite(root, split, mutate):
    path = root / "LLM-Seg40K" / f"{split}.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    return path


def test_malformed_split_names_file_and_entry(llmseg):
    root, masks, _ = llmseg
    _rewrite(root, "test", lambda d: d["ego_0001.jpg"].update(from_dataset="lvis"))
    with pytest.raises(DatasetFormatError, match=r"test.json entry 'ego_0001.jpg': 'from_dataset'"):
        load_llmseg40k_split(root, masks, "test")
    _rewrite(root, "test", lambda d: d["ego_0001.jpg"].update(from_dataset="ego_objects"))
    _rewrite(root, "test", lambda d: d["ego_0001.jpg"]["qa_pairs"][0].pop("rle_seg"))
    with pytest.raises(DatasetFormatError, match=r"qa_pairs\[0\]: needs 'rle_seg' or 'segm"):
        load_llmseg40k_split(root, masks, "test")
    _rewrite(root, "test", lambda d: d["ego_0001.jpg"]["qa_pairs"][0].update(rle_seg={"x": 1}))
    with pytest.raises(DatasetFormatError, match="rle_seg must be a COCO RLE"):
        load_llmseg40k_split(root, masks, "test")
    (root / "LLM-Seg40K/test.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="test.json: invalid JSON"):
        load_llmseg40k_split(root, masks, "test")


def test_missing_mask_png_and_wrong_size(llmseg, caplog):
    root, masks, _ = llmseg
    (root / "LLM-Seg40K/val_masks/v.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 files missing .*v.png"):
        eval_records(_config(root, masks), "LLMSeg40K|validation")
    # training: a target made for another image size is skipped, logged and counted
    _rewrite(root, "train", lambda d: d["ego_0001.jpg"]["qa_pairs"][0].update(
        rle_seg=rle(box(0, 0, 5, 5, height=10, width=10))))  # fmt: skip
    source = LLMSeg40KSource(load_llmseg40k_split(root, masks, "train"))
    names = {source.sample_record(random.Random(seed)).name for seed in range(30)}
    assert "ego_0001_0" not in names
    assert source.skipped["bad annotation"] > 0
    assert "annotated as 10x10 but the image" in caplog.text
