"""refer_seg loader on refer-format fixtures (refs pickle + instances.json), masks by hand."""

import json
import pickle
import random
import shutil
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from model.evaluation import score_prediction_folder
from tests.utils.data.loader_fixtures import (
    HEIGHT,
    WIDTH,
    box,
    refer_expected_masks,
    write_refclef,
    write_refer,
)
from tests.utils.data.test_sem_seg import asked_name
from utils.data.builders import eval_records
from utils.data.conversation import VALIDATION_ANSWER, VALIDATION_SHORT_QUESTION
from utils.data.refer_seg import (
    ReferSegSource,
    load_refer_split,
    load_refer_train,
    refer_root,
)
from utils.text_files import DatasetFormatError


@pytest.fixture
def refer(tmp_path):
    root, masks = tmp_path / "dataset", tmp_path / "sam_masks"
    write_refer(root, masks)
    write_refclef(root, masks)
    return root, masks


def test_train_pools_sentences_of_all_refs(refer):
    (image,) = load_refer_split(*refer, "refcoco", "train")
    assert image.image_path.name == "COCO_train2014_000000000001.jpg"
    assert image.proposal_key == image.image_path.name
    assert image.sentences == ["The Left Box", "box on the left", "right shape"]
    expected = refer_expected_masks()
    source = ReferSegSource({"refcoco": [image]}, num_sentences=3)
    for seed in range(5):
        record = source.sample_record(random.Random(seed))
        assert len(record.conversations) == 3  # all pooled sentences, in a random order
        masks = record.masks(HEIGHT, WIDTH)
        asked = []
        for turns, mask, query in zip(record.conversations, masks, record.queries):
            ((question, _),) = turns
            assert asked_name(question) == query.lower()  # SHORT template, lower-cased
            assert np.array_equal(mask, expected[query])
            asked.append(query)
        assert sorted(asked) == sorted(image.sentences)
    # Overlapping polygons of one annotation are a union (upstream's sum would give 2).
    assert expected["right shape"].max() == 1
    two = ReferSegSource({"refcoco": [image]}, num_sentences=2).sample_record(random.Random(0))
    assert len(two.conversations) == 2


def test_refclef_keys_and_uniform_datasets(refer):
    (clef,) = load_refer_split(*refer, "refclef", "train")
    assert clef.proposal_key == "25/images/25001.jpg"
    assert clef.image_path == refer[0] / "refer_seg/images/saiapr_tc-12/25/images/25001.jpg"
    source = load_refer_train(*refer, "refclef||refcoco", num_sentences=3)
    drawn = [source.sample_record(random.Random(i)) for i in range(40)]
    counts = {name: sum(r.dataset == name for r in drawn) for name in ("refclef", "refcoco")}
    assert min(counts.values()) >= 10  # uniform over datasets, not over images
    clef_record = next(r for r in drawn if r.dataset == "refclef")
    assert np.array_equal(clef_record.masks(HEIGHT, WIDTH)[0], box(0, 10, 30, 20))


def test_eval_split_all_sentences_validation_prompt(refer):
    config = SimpleNamespace(dataset_dir=refer[0], sam_masks_dir=refer[1])
    (record,) = eval_records(config, "refcoco|unc|val")
    assert record.name == "COCO_train2014_000000000002"
    assert record.conversations == [
        [(VALIDATION_SHORT_QUESTION.format(class_name="middle strip"), VALIDATION_ANSWER)],
        [(VALIDATION_SHORT_QUESTION.format(class_name="the strip"), VALIDATION_ANSWER)],
    ]
    masks = record.masks(HEIGHT, WIDTH)  # from an RLE annotation
    assert np.array_equal(masks, np.stack([box(5, 5, 25, 15)] * 2))
    (same,) = eval_records(config, "refcoco|val")  # split_by defaults to unc
    assert same.conversations == record.conversations
    # records must survive pickling (DataLoader workers)
    assert np.array_equal(pickle.loads(pickle.dumps(record)).masks(HEIGHT, WIDTH), masks)


def test_upstream_val_layout_dataset_dir_is_the_refer_folder(refer):
    root = refer[0] / "refer_seg"
    assert refer_root(refer[0], "refcoco") == root
    assert refer_root(root, "refcoco") == root  # --dataset_dir pointed at refer_seg/
    config = SimpleNamespace(dataset_dir=root, sam_masks_dir=refer[1])
    assert len(eval_records(config, "refcoco|unc|val")) == 1
    with pytest.raises(FileNotFoundError, match="refer dataset 'refcocog' not found"):
        refer_root(refer[0], "refcocog")


def test_pred_dir_takes_one_png_per_expression(refer, tmp_path):
    config = SimpleNamespace(dataset_dir=refer[0], sam_masks_dir=refer[1])
    (record,) = eval_records(config, "refcoco|unc|val", with_proposals=False)
    assert record.prediction_names == ("31", "32")
    preds = tmp_path / "preds"
    preds.mkdir()
    strip = (box(5, 5, 25, 15) * 255).astype(np.uint8)
    cv2.imwrite(str(preds / "31.png"), strip)  # right for "Middle Strip"
    cv2.imwrite(str(preds / "32.png"), np.zeros_like(strip))  # empty for "the strip"
    results = score_prediction_folder([record], preds, tmp_path / "scores.json")
    assert results["giou"] == pytest.approx(0.5)
    assert results["missing_predictions"] == []
    (preds / "32.png").unlink()
    results = score_prediction_folder([record], preds, tmp_path / "scores.json")
    assert results["missing_predictions"] == ["32.png"]


def test_scoring_without_proposals(refer):
    shutil.rmtree(refer[1])
    config = SimpleNamespace(dataset_dir=refer[0], sam_masks_dir=refer[1])
    (record,) = eval_records(config, "refcoco|unc|val", with_proposals=False)
    assert record.proposals is None


def test_bad_input(refer, tmp_path, caplog):
    root, masks = refer
    folder = root / "refer_seg/refcoco"
    refs_path = folder / "refs(unc).p"
    refs = pickle.loads(refs_path.read_bytes())

    refs_path.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(DatasetFormatError, match=r"refs\(unc\)\.p: not a refer refs pickle"):
        load_refer_split(root, masks, "refcoco")
    refs_path.write_bytes(pickle.dumps([{**refs[0], "ann_id": 99}]))
    with pytest.raises(DatasetFormatError, match=r"refs\[0\] points to image 1 / annotation 99"):
        load_refer_split(root, masks, "refcoco")
    refs_path.write_bytes(pickle.dumps(refs))
    with pytest.raises(DatasetFormatError, match="no refs in split 'testA'"):
        load_refer_split(root, masks, "refcoco", "testA")
    instances = json.loads((folder / "instances.json").read_text())
    (folder / "instances.json").write_text(json.dumps({"images": instances["images"]}))
    with pytest.raises(DatasetFormatError, match="instances.json: not a COCO-format file"):
        load_refer_split(root, masks, "refcoco")
    (folder / "instances.json").write_text(json.dumps(instances))

    image = root / "refer_seg/images/mscoco/images/train2014/COCO_train2014_000000000002.jpg"
    image.unlink()
    config = SimpleNamespace(dataset_dir=root, sam_masks_dir=masks)
    with pytest.raises(FileNotFoundError, match="1 files missing .*COCO_train2014_000000000002"):
        eval_records(config, "refcoco|unc|val")  # evaluation stops
    with pytest.raises(FileNotFoundError, match="no usable entries"):
        load_refer_split(root, masks, "refcoco", "val")  # training skips (here: all of them)
    assert "skipping 1 of 1 entries" in caplog.text
