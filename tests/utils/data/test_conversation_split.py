"""Conversations kept in ReasonSeg-format jsons: records, prompts, masks, errors."""

import copy
import dataclasses
import json
import random

import pytest

from tests.data_fixtures import write_reason_seg
from utils.data.conversation_split import load_conversation_split
from utils.data.multi_round import load_multi_round_train, merge_conversations
from utils.data.samples import SampleEncoder
from utils.text_files import DatasetFormatError
from utils.tokenizer import REF_TOKEN

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


def _add_extra_conversations(folder):
    path = folder / "img_000.json"
    data = json.loads(path.read_text())
    data["extra_conversations"] = [
        [{"text": "the blue square", "is_sentence": False, "references": [],
          "shapes": [{"label": "target", "points": OTHER}]}],
        [{"text": "the green square", "is_sentence": False, "references": [],
          "shapes": [{"label": "target", "points": OTHER}]},
         {"text": "the square above and left of object 1 [REF:1]", "is_sentence": False,
          "references": [1], "shapes": [{"label": "target", "points": SQUARE}]}],
    ]  # fmt: skip
    path.write_text(json.dumps(data))


def test_conversations_per_sample_packs_one_pictures_conversations(split, tiny_model_and_encoder):
    dataset_dir, masks_dir, folder = split
    _add_extra_conversations(folder)
    other = folder / "img_001.json"
    data = json.loads(other.read_text())
    data["conversation"] = [{"text": "the red square", "is_sentence": False, "references": [],
                             "shapes": [{"label": "target", "points": SQUARE}]}]  # fmt: skip
    other.write_text(json.dumps(data))
    source = load_multi_round_train(
        dataset_dir, masks_dir, "ReasonSeg|val", max_rounds=5, conversations_per_sample=2
    )
    seen, pictures = set(), set()
    for seed in range(16):
        record = source.sample_record(random.Random(seed))
        # img_000's three conversations give two, img_001's one only itself; never mixed
        expected = {"img_000.jpg": 2, "img_001.jpg": 1}[record.image_path.name]
        assert len(record.conversations) == expected
        pictures.add(record.image_path.name)
        assert len(record.queries) == sum(len(turns) for turns in record.conversations)
        masks = record.masks(48, 56)
        assert masks.shape == (len(record.queries), 48, 56)
        # Every mask row is its own round's target: the squares by the query's words.
        for query, mask in zip(record.queries, masks):
            square = "red" in query or "above" in query
            assert mask[5, 5] == (1 if square else 0)
            assert mask[25, 25] == (0 if square else 1)
        seen.add(tuple(record.queries))
    assert len(seen) > 2  # the conversations are drawn, not always the same two
    assert pictures == {"img_000.jpg", "img_001.jpg"}
    # A packed conversation's reference names its own round 1, after the other's rows.
    *_, encoder = tiny_model_and_encoder
    tokenizer = copy.deepcopy(encoder.tokenizer)
    tokenizer.add_tokens([REF_TOKEN], special_tokens=True)
    with_references = SampleEncoder(tokenizer, encoder.fmt, encoder.settings)
    assert with_references.references == "tokens"
    blue, green = source.pictures["ReasonSeg|val"][0][1:]
    assert [len(p) for p in source.pictures["ReasonSeg|val"]] == [3, 1]
    sample = with_references(merge_conversations([blue, green]))
    assert sample.reference_rows.tolist() == [1]
    assert sample.masks[:, 25, 25].tolist() == [1, 1, 0]
    assert with_references(green).reference_rows.tolist() == [0]
    with pytest.raises(ValueError, match="one picture"):
        merge_conversations([blue, dataclasses.replace(green, image_path=folder / "img_001.jpg")])
    with pytest.raises(ValueError, match="no_target"):
        merge_conversations([blue, dataclasses.replace(green, no_target=(False, False))])


def test_conversations_per_sample_one_draws_as_before(split):
    dataset_dir, masks_dir, folder = split
    _add_extra_conversations(folder)
    one = load_multi_round_train(dataset_dir, masks_dir, "ReasonSeg|val", max_rounds=5)
    default = [one.sample_record(random.Random(seed)).queries for seed in range(8)]
    expected = []
    for seed in range(8):
        rng = random.Random(seed)
        rng.randrange(1)  # the file
        expected.append(one.files["ReasonSeg|val"][rng.randrange(3)].queries)
    assert default == expected


def test_conversations_per_sample_must_be_positive(split):
    dataset_dir, masks_dir, _ = split
    with pytest.raises(ValueError, match="--conversations_per_sample must be at least 1"):
        load_multi_round_train(dataset_dir, masks_dir, "ReasonSeg|val", conversations_per_sample=0)
