"""gRefCOCO loader on a native-format fixture (grefs(unc).json + instances.json), masks by hand."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.utils.data.loader_fixtures import (
    HEIGHT,
    WIDTH,
    box,
    polygon,
    rle,
    write_image,
    write_store,
)
from utils.data.builders import eval_records
from utils.data.conversation import VALIDATION_ANSWER, VALIDATION_SHORT_QUESTION
from utils.data.grefcoco import load_grefcoco_split, parse_grefcoco_spec
from utils.data.refer_seg import ReferSegSource, load_refer_train
from utils.data.rejection import REJECTION_SENTENCE
from utils.text_files import DatasetFormatError

FILES = {1: "COCO_train2014_000000000001.jpg", 2: "COCO_train2014_000000000002.jpg",
         3: "COCO_train2014_000000000003.jpg"}  # fmt: skip
LEFT, RIGHT, STRIP = box(0, 0, 10, 10), box(20, 0, 30, 10), box(5, 5, 25, 15)
CROWD = box(0, 10, 30, 20)


def _ref(ref_id, image_id, ann_id, sentences, split="val") -> dict:
    """A ref as the release writes it: the file_name carries a ``_<ref>`` suffix not on disk."""
    stem = Path(FILES[image_id]).stem
    return {
        "ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "split": split,
        "category_id": [-1] if ann_id == [-1] else [1], "no_target": ann_id == [-1],
        "file_name": f"{stem}_{ref_id}.jpg",
        "sentences": [{"sent_id": i, "sent": s, "raw": s, "tokens": s.split()}
                      for i, s in sentences],
        "sent_ids": [i for i, _ in sentences],
    }  # fmt: skip


def grefcoco_refs() -> list[dict]:
    """val: image 1 with one target (ref 100), several targets incl. a crowd annotation (101)
    and no target (102); image 2 with a ref without sentences (103), no target (104) and a
    plain-int ann_id (105). train: image 3 with one target (106) and no target (107)."""
    return [
        _ref(100, 1, [11], [(1000, "Left Box ")]),
        _ref(101, 1, [11, 12, 13], [(1001, "all boxes"), (1002, "both top boxes")]),
        _ref(102, 1, [-1], [(1003, "the giraffe")]),
        _ref(103, 2, [21], []),
        _ref(104, 2, [-1], [(1004, "a purple dog")]),
        _ref(105, 2, 21, [(1005, "middle strip")]),
        _ref(106, 3, [31], [(1006, "left half")], split="train"),
        _ref(107, 3, [-1], [(1007, "the cat")], split="train"),
    ]


def write_grefcoco(root: Path, masks_dir: Path, refs: list[dict] | None = None) -> Path:
    """LISA's layout under ``root/refer_seg``; returns the grefcoco folder."""
    for image_id, file_name in FILES.items():
        write_image(root / "refer_seg/images/mscoco/images/train2014" / file_name, seed=image_id)
    crowd_rle = {"size": [HEIGHT, WIDTH], "counts": _uncompressed_counts(CROWD)}  # as COCO's
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [polygon(0, 0, 10, 10)]},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [polygon(20, 0, 30, 10)]},
        {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": crowd_rle},
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": rle(STRIP)},
        {"id": 31, "image_id": 3, "category_id": 1, "iscrowd": 0,
         "segmentation": [polygon(0, 0, 15, 20)]},
    ]  # fmt: skip
    instances = {
        "images": [{"id": i, "file_name": f, "height": HEIGHT, "width": WIDTH}
                   for i, f in FILES.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "box"}],
    }  # fmt: skip
    folder = root / "refer_seg/grefcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "grefs(unc).json").write_text(json.dumps(grefcoco_refs() if refs is None else refs))
    write_store(masks_dir / "coco2014", {f: 2 for f in FILES.values()})
    return folder


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    rle_ = mask_utils.frPyObjects({"size": list(mask.shape), "counts": counts}, *mask.shape)
    assert np.array_equal(mask_utils.decode(rle_), mask)  # the fixture itself is right
    return counts


@pytest.fixture
def grefcoco(tmp_path):
    root, masks = tmp_path / "dataset", tmp_path / "sam_masks"
    write_grefcoco(root, masks)
    return root, masks


def test_one_sample_per_sentence_targets_and_rejections(grefcoco):
    first, second = load_grefcoco_split(*grefcoco, "val")
    assert first.image_path.name == FILES[1]  # found by image_id, not the refs' file_name
    assert first.proposal_key == FILES[1]
    assert first.sentences == ["Left Box", "all boxes", "both top boxes", "the giraffe"]
    assert first.sentence_ids == [1000, 1001, 1002, 1003]
    assert first.no_target == [False, False, False, True]
    assert second.sentence_ids == [1004, 1005]  # ref 103 has no sentences: no sample
    assert second.no_target == [True, False]
    config = SimpleNamespace(dataset_dir=grefcoco[0], sam_masks_dir=None)
    record = eval_records(config, "grefcoco|unc|val", with_proposals=False)[0]
    assert record.no_target == (False, False, False, True)
    assert record.conversations[0] == [
        (VALIDATION_SHORT_QUESTION.format(class_name="left box"), VALIDATION_ANSWER)
    ]
    masks = record.masks(HEIGHT, WIDTH)
    both = np.maximum(LEFT, RIGHT)  # the crowd annotation 13 is left out of the union
    expected = [LEFT, both, both, np.zeros_like(LEFT)]
    assert masks.shape == (4, HEIGHT, WIDTH)
    for mask, want in zip(masks, expected):
        assert np.array_equal(mask, want)
    second_masks = eval_records(
        SimpleNamespace(dataset_dir=grefcoco[0], sam_masks_dir=grefcoco[1]), "grefcoco|val"
    )[1].masks(HEIGHT, WIDTH)
    assert np.array_equal(second_masks[0], np.zeros_like(STRIP))
    assert np.array_equal(second_masks[1], STRIP)  # a plain-int ann_id, RLE segmentation


def test_spec_parsing_and_upstream_layout(grefcoco, tmp_path):
    assert parse_grefcoco_spec("grefcoco|unc|val") == ("unc", "val")
    assert parse_grefcoco_spec("grefcoco|testA") == ("unc", "testA")
    assert parse_grefcoco_spec("grefcoco") == ("unc", "val")
    # --dataset_dir pointed at the refer_seg folder (upstream validation's layout) works too
    images = load_grefcoco_split(grefcoco[0] / "refer_seg", None, "val", strict=True)
    assert [i.sentence_ids for i in images] == [[1000, 1001, 1002, 1003], [1004, 1005]]


def test_training_family_answers_no_target_sentences_with_the_rejection_sentence(grefcoco):
    source = load_refer_train(*grefcoco, "grefcoco", num_sentences=2)
    for seed in range(4):
        record = source.sample_record(random.Random(seed))
        assert record.dataset == "grefcoco"
        assert sorted(record.queries) == ["left half", "the cat"]
        answers = {query: turns[0][1] for query, turns in zip(record.queries, record.conversations)}
        assert answers["the cat"] == REJECTION_SENTENCE
        assert "[SEG]" in answers["left half"]
        # One mask row, the target's: the rejecting round has none.
        (mask,) = record.masks(HEIGHT, WIDTH)
        assert np.array_equal(mask, box(0, 0, 15, 20))
        assert record.no_target is None  # training records flag nothing; no row is no-target


def test_training_records_of_multi_target_refs_are_unions(grefcoco):
    images = load_grefcoco_split(*grefcoco, "val")
    source = ReferSegSource({"grefcoco": images[:1]}, num_sentences=4)
    record = source.sample_record(random.Random(1))
    rejecting = [q for q, t in zip(record.queries, record.conversations) if "[SEG]" not in t[0][1]]
    assert rejecting == ["the giraffe"]
    kept = [q for q in record.queries if q != "the giraffe"]
    masks = record.masks(HEIGHT, WIDTH)
    both = np.maximum(LEFT, RIGHT)  # the non-crowd annotations of refs 100-101, crowd left out
    expected = {"Left Box": LEFT, "all boxes": both, "both top boxes": both}
    assert len(masks) == len(kept) == 3
    for query, mask in zip(kept, masks):
        assert np.array_equal(mask, expected[query]), query


def test_pickled_refs_and_cp1252_json(tmp_path):
    root, masks = tmp_path / "dataset", tmp_path / "sam_masks"
    folder = write_grefcoco(root, masks)
    refs = grefcoco_refs()
    (folder / "grefs(unc).json").unlink()
    (folder / "grefs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    assert len(load_grefcoco_split(root, None, "val")) == 2
    refs[0]["sentences"][0]["sent"] = "the café box"
    (folder / "grefs(unc).json").write_bytes(json.dumps(refs, ensure_ascii=False).encode("cp1252"))
    (image, _) = load_grefcoco_split(root, None, "val")  # the json wins over the pickle
    assert image.sentences[0] == "the café box"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda refs: refs[0].update(ann_id=[11, -1]), r"refs\[0\] mixes ann_id -1"),
        (lambda refs: refs[0].update(ann_id=[99]), r"refs\[0\] points to image 1"),
        (lambda refs: refs[0].update(ann_id=[21]), r"refs\[0\] names annotations \[21\] of anot"),
        (lambda refs: refs[2].update(no_target=False), r"refs\[2\] has no_target=False"),
        (lambda refs: refs[1]["sentences"][0].update(sent_id=1000), "sent_id 1000 is used twice"),
        (lambda refs: refs[0]["sentences"][0].pop("sent_id"), r"refs\[0\] needs sentences"),
        (lambda refs: [r.update(split="train") for r in refs], "no sentences in split 'val'"),
    ],
)
def test_bad_refs_name_the_file(tmp_path, change, message):
    refs = grefcoco_refs()
    change(refs)
    root = tmp_path / "dataset"
    write_grefcoco(root, tmp_path / "sam_masks", refs)
    with pytest.raises(DatasetFormatError, match=message) as error:
        load_grefcoco_split(root, None, "val")
    assert "grefs(unc).json" in str(error.value)


def test_missing_files(tmp_path):
    root = tmp_path / "dataset"
    folder = write_grefcoco(root, tmp_path / "sam_masks")
    (folder / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\).json"):
        load_grefcoco_split(root, None, "val")
    with pytest.raises(FileNotFoundError, match="grefcoco"):
        load_grefcoco_split(tmp_path / "nowhere", None, "val")
    write_grefcoco(root, tmp_path / "sam_masks")
    (root / "refer_seg/images/mscoco/images/train2014" / FILES[2]).unlink()
    with pytest.raises(FileNotFoundError, match="1 files missing"):
        load_grefcoco_split(root, None, "val", strict=True)
