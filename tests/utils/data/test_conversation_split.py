"""Conversations kept in ReasonSeg-format jsons: records, prompts, masks, errors."""

import json
import random

import pytest

from tests.data_fixtures import write_reason_seg
from utils.data.conversation_split import load_conversation_split
from utils.data.multi_round import load_multi_round_train
from utils.text_files import DatasetFormatError

SQUARE = [[2, 2], [9, 2], [9, 9], [2, 9]]
OTHER = [[20, 20], [29, 20], [29, 29], [20, 29]]


@pytest.fixture
def split(tmp_path):
    dataset_dir, masks_dir = write_reason_seg(tmp_path, "val", 2)
    folder = dataset_dir / "reason_seg" / "ReasonSeg" / "val"
    path = folder / "img_000.json"
    data = json.loads(path.read_text())
    data["conversation"] = [
        {"text": "the red square", "is_sentence": False, "references": [],
         "shapes": [{"label": "target", "points": SQUARE}]},
        {"text": "the square below and right of object 1 [REF:1]", "is_sentence": False,
         "references": [1], "shapes": [{"label": "target", "points": OTHER}]},
    ]  # fmt: skip
    path.write_text(json.dumps(data))
    return dataset_dir, masks_dir, folder


def test_records_prompts_and_masks(split):
    dataset_dir, masks_dir, _ = split
    (record,) = load_conversation_split(dataset_dir, masks_dir, "val")  # img_001 has none
    (turns,) = record.conversations
    assert turns[0] == (
        "<image>\n What is the red square in this image? Please output segmentation mask.",
        "[SEG].",
    )
    assert turns[1][0] == (
        "What is the square below and right of object 1 [REF:1] in this image? "
        "Please output segmentation mask."
    )
    masks = record.masks(48, 56)
    assert masks.shape == (2, 48, 56)
    assert masks[0, 5, 5] == 1
    assert masks[0, 25, 25] == 0
    assert masks[1, 25, 25] == 1
    assert record.proposal_key == "img_000.jpg"
    source = load_multi_round_train(dataset_dir, masks_dir, "ReasonSeg|val", max_rounds=1)
    sampled = source.sample_record(random.Random(0))
    assert len(sampled.conversations[0]) == 1


def test_errors_name_the_json(split):
    dataset_dir, masks_dir, folder = split
    path = folder / "img_000.json"
    data = json.loads(path.read_text())
    data["conversation"][1]["text"] = ""
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"img_000\.json: conversation\[1\] needs"):
        load_conversation_split(dataset_dir, masks_dir, "val")
    data.pop("conversation")
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match="no json holds a 'conversation'"):
        load_conversation_split(dataset_dir, masks_dir, "val")


@pytest.mark.parametrize("extra", [[None], [[]], "one", [{"text": "x"}]])
def test_malformed_extra_conversations_name_the_json(split, extra):
    dataset_dir, masks_dir, folder = split
    path = folder / "img_000.json"
    data = json.loads(path.read_text())
    data["extra_conversations"] = extra
    path.write_text(json.dumps(data))
    assert len(load_conversation_split(dataset_dir, masks_dir, "val")) == 1  # evaluation: unread
    with pytest.raises(DatasetFormatError, match=r"img_000\.json: '?extra_conversations"):
        load_conversation_split(dataset_dir, masks_dir, "val", extra_conversations=True)
