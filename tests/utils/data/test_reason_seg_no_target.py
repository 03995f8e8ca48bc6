"""ReasonSeg jsons with no-target (``"no_target": true``) and multi-target queries: evaluation
rows and flags, training answers and mask rows, on a native-format fixture with boxes."""

import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.utils.data.loader_fixtures import HEIGHT, WIDTH, box, write_image, write_store
from utils.data.builders import eval_records
from utils.data.reason_seg import ReasonSegSource, load_reason_seg_split
from utils.data.rejection import REJECTION_SENTENCE
from utils.text_files import DatasetFormatError

LEFT, RIGHT = (0, 0, 10, 10), (20, 0, 30, 10)  # x0, y0, x1, y1 (exclusive ends)


def target(x0, y0, x1, y1) -> dict:
    """A labelme polygon rasterising to :func:`box` ``(x0, y0, x1, y1)``: labelme polygons
    include their outline, so the corners are the last pixels inside."""
    return {"label": "target", "points": [[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]]}


def query(text, shapes, is_sentence=False, **fields) -> dict:
    return {"text": [text], "is_sentence": is_sentence, "shapes": shapes, **fields}


def write_split(dataset_dir: Path, split: str, records: dict[str, dict]) -> None:
    folder = dataset_dir / "reason_seg" / "ReasonSeg" / split
    for index, (stem, record) in enumerate(records.items()):
        write_image(folder / f"{stem}.jpg", seed=index)
        (folder / f"{stem}.json").write_text(json.dumps(record))


def val_records() -> dict[str, dict]:
    return {
        "a_single": query("left box", [target(*LEFT)]),
        "b_none": query("the purple object", [], no_target=True),
        "c_both": query("Which boxes are there?", [target(*LEFT), target(*RIGHT)], True),
    }


@pytest.fixture
def dataset_dir(tmp_path):
    write_split(tmp_path, "val", val_records())
    return tmp_path


def test_evaluation_flags_the_no_target_row_and_unions_multi_target(dataset_dir):
    config = SimpleNamespace(dataset_dir=dataset_dir, sam_masks_dir=None)
    records = eval_records(config, "ReasonSeg|val", with_proposals=False)
    assert [r.name for r in records] == ["a_single", "b_none", "c_both"]
    assert [r.no_target for r in records] == [(False,), (True,), (False,)]
    assert all(r.conversations[0][0][1] == "[SEG]." for r in records)
    masks = [r.masks(HEIGHT, WIDTH) for r in records]
    assert all(m.shape == (1, HEIGHT, WIDTH) for m in masks)
    assert np.array_equal(masks[0][0], box(*LEFT))
    assert not masks[1].any()  # the no-target row: all zero
    assert np.array_equal(masks[2][0], np.maximum(box(*LEFT), box(*RIGHT)))  # the union


def test_sets_without_no_target_queries_keep_none_and_unflagged_empty_jsons_warn(tmp_path, caplog):
    records = val_records()
    records.pop("b_none")
    records["d_empty"] = query("nothing drawn", [])  # a released json without polygons
    write_split(tmp_path, "val", records)
    config = SimpleNamespace(dataset_dir=tmp_path, sam_masks_dir=None)
    with caplog.at_level(logging.WARNING):
        evaluated = eval_records(config, "ReasonSeg|val", with_proposals=False)
    assert [r.no_target for r in evaluated] == [None, None, None]
    assert "1 of 3 jsons have no target polygon" in caplog.text
    assert "d_empty.json" in caplog.text
    caplog.clear()
    write_split(tmp_path, "test", val_records())
    with caplog.at_level(logging.WARNING):
        load_reason_seg_split(tmp_path, None, "test")
    assert "no target polygon" not in caplog.text  # a flagged no-target query is meant empty


def test_training_rounds_answer_the_rejection_sentence_without_a_mask_row(tmp_path):
    main = query("left box", [target(*LEFT)])
    main["extra_queries"] = [
        query("Is there a giraffe?", [], True, no_target=True),
        query("both boxes", [target(*LEFT), target(*RIGHT)]),
    ]
    write_split(tmp_path, "train", {"scene": main, "empty": query("a cat", [], no_target=True)})
    items = load_reason_seg_split(tmp_path, None, "train")
    source = ReasonSegSource(items, num_queries=3)
    assert source.num_no_target == 2
    scene = next(i for i in items if i.image_path.stem == "scene")
    expected = {"left box": box(*LEFT), "both boxes": np.maximum(box(*LEFT), box(*RIGHT))}
    for seed in range(6):
        record = source.sample_record(random.Random(seed))
        answers = dict(zip(record.queries, (turns[0][1] for turns in record.conversations)))
        masks = record.masks(HEIGHT, WIDTH)
        if record.image_path.stem == "empty":
            assert answers == {"a cat": REJECTION_SENTENCE}
            assert masks.shape == (0, HEIGHT, WIDTH)
            continue
        assert answers["Is there a giraffe?"] == REJECTION_SENTENCE
        targets = [q for q in record.queries if q in expected]
        assert all("[SEG]" in answers[q] for q in targets)
        assert len(masks) == len(targets) == 2  # no row for the rejecting round
        for text, mask in zip(targets, masks):
            assert np.array_equal(mask, expected[text]), text
    assert scene.no_target is False
    assert [q.no_target for q in scene.extra_queries] == [True, False]


def test_encoded_rejection_round_has_no_seg_and_no_mask(tmp_path, tiny_model_and_encoder):
    _, _, encoder = tiny_model_and_encoder
    main = query("left box", [target(*LEFT)])
    main["extra_queries"] = [query("the purple object", [], no_target=True)]
    write_split(tmp_path / "dataset", "train", {"scene": main})
    write_store(tmp_path / "sam_masks/reason_seg/ReasonSeg/train", {"scene.jpg": 2})
    (item,) = load_reason_seg_split(tmp_path / "dataset", tmp_path / "sam_masks", "train")
    sample = encoder(ReasonSegSource([item]).sample_record(random.Random(0)))
    assert len(sample.conversations) == 2
    assert sorted(c.num_seg for c in sample.conversations) == [0, 1]
    assert sample.masks.shape == (1, HEIGHT, WIDTH)
    assert sample.proposal_ious.shape == (1, 2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shapes": [target(*LEFT)], "no_target": True}, "'no_target' is true but 'shapes'"),
        ({"shapes": [], "no_target": "yes"}, "'no_target' must be true or false"),
    ],
)
def test_contradictory_flags_name_the_file(tmp_path, fields, message):
    write_split(tmp_path, "val", {"bad": {"text": ["x"], "is_sentence": False, **fields}})
    with pytest.raises(DatasetFormatError, match=message) as error:
        load_reason_seg_split(tmp_path, None, "val")
    assert "bad.json" in str(error.value)
