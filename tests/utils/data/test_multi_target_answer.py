"""``--multi_target_answer per_instance``: one ``[SEG]`` per instance of a multi-target training
round (gRefCOCO refs of several annotations, ReasonSeg jsons with ``targets``), on native-format
fixtures whose masks are boxes; ``union`` (the default) gives the records of before."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from tests.utils.data.loader_fixtures import HEIGHT, WIDTH, box, polygon, write_store
from tests.utils.data.test_grefcoco import FILES, write_grefcoco
from tests.utils.data.test_reason_seg_no_target import query, target, write_split
from utils.config import parse_config
from utils.data.builders import DataConfig, build_train_dataset
from utils.data.conversation import (
    ANSWER_TEMPLATES,
    LONG_QUESTION_TEMPLATES,
    SHORT_QUESTION_TEMPLATES,
)
from utils.data.grefcoco import load_grefcoco_split
from utils.data.multi_target import per_instance_answer
from utils.data.reason_seg import (
    ReasonSegSource,
    load_reason_seg_split,
    reason_seg_train_record,
)
from utils.data.refer_seg import ReferSegSource, load_refer_train, refer_train_record
from utils.data.rejection import REJECTION_SENTENCE
from utils.text_files import DatasetFormatError

LEFT, RIGHT, BOTTOM = (0, 0, 10, 10), (20, 0, 30, 10), (0, 12, 10, 20)
CORNER = (25, 15, 30, 20)  # a second polygon of the object RIGHT outlines


def seg_count(answer: str) -> int:
    return answer.count("[SEG]")


def single_answer(answer: str) -> str:
    """The one-``[SEG]`` template a per-instance answer was made from."""
    return re.sub(r"\[SEG\](, \[SEG\])* and \[SEG\]", "[SEG]", answer)


def test_the_join_is_an_english_list():
    assert per_instance_answer("Sure, it is [SEG].", 1) == "Sure, it is [SEG]."
    assert per_instance_answer("[SEG].", 2) == "[SEG] and [SEG]."
    assert per_instance_answer("It is [SEG].", 3) == "It is [SEG], [SEG] and [SEG]."
    with pytest.raises(ValueError, match="one \\[SEG\\]"):
        per_instance_answer("no mask here", 2)


# ----------------------------------------------------------------------------- gRefCOCO


def grefcoco_train(tmp_path):
    """Image 1's train refs: all boxes (annotations 12, crowd 13, 14, 11: three instances in
    ann_id order, the crowd one left out), the left box (11) and no target."""
    root, masks = tmp_path / "dataset", tmp_path / "sam_masks"
    refs = [
        {"ref_id": 1, "image_id": 1, "ann_id": [12, 13, 14, 11], "split": "train",
         "sentences": [{"sent_id": 1, "sent": "all boxes"}]},
        {"ref_id": 2, "image_id": 1, "ann_id": [11], "split": "train",
         "sentences": [{"sent_id": 2, "sent": "left box"}]},
        {"ref_id": 3, "image_id": 1, "ann_id": [-1], "split": "train",
         "sentences": [{"sent_id": 3, "sent": "the giraffe"}]},
    ]  # fmt: skip
    folder = write_grefcoco(root, masks, refs)
    instances = json.loads((folder / "instances.json").read_text())
    instances["annotations"].append(
        {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [polygon(*BOTTOM)]}
    )  # fmt: skip
    (folder / "instances.json").write_text(json.dumps(instances))
    (image,) = [
        i for i in load_grefcoco_split(root, masks, "train") if i.image_path.name == FILES[1]
    ]
    return image


GREFCOCO_TARGETS = {
    "all boxes": [box(*RIGHT), box(*BOTTOM), box(*LEFT)],  # ann_id order 12, 14, 11
    "left box": [box(*LEFT)],
    "the giraffe": [],
}


def expected_refer_conversations(image, seed: int, num_sentences: int) -> list:
    """The union-mode conversations as the refer family has drawn them since before the option:
    the sentences, then per sentence a question template and an answer template."""
    rng = random.Random(seed)
    rows = rng.sample(range(len(image.sentences)), min(num_sentences, len(image.sentences)))
    conversations = []
    for row in rows:
        question = rng.choice(SHORT_QUESTION_TEMPLATES).format(
            class_name=image.sentences[row].lower()
        )
        answer = rng.choice(ANSWER_TEMPLATES)
        conversations.append([(question, REJECTION_SENTENCE if image.no_target[row] else answer)])
    return conversations


def test_grefcoco_per_instance_rounds_answer_one_seg_per_annotation(tmp_path):
    image = grefcoco_train(tmp_path)
    per_instance = ReferSegSource({"grefcoco": [image]}, 3, multi_target_answer="per_instance")
    union = ReferSegSource({"grefcoco": [image]}, 3)
    for seed in range(5):
        record = per_instance.sample_record(random.Random(seed))
        plain = union.sample_record(random.Random(seed))
        assert record.queries == plain.queries
        assert sorted(record.queries) == sorted(GREFCOCO_TARGETS)
        answers = [turns[0][1] for turns in record.conversations]
        for text, answer, plain_turns in zip(record.queries, answers, plain.conversations):
            assert seg_count(answer) == len(GREFCOCO_TARGETS[text]), answer
            assert single_answer(answer) == plain_turns[0][1]  # the same draws
        assert answers[record.queries.index("the giraffe")] == REJECTION_SENTENCE
        masks = record.masks(HEIGHT, WIDTH)
        expected = [m for q in record.queries for m in GREFCOCO_TARGETS[q]]
        assert masks.shape == (4, HEIGHT, WIDTH)
        for mask, want in zip(masks, expected):
            assert np.array_equal(mask, want)
        assert len(record.prediction_names) == 4  # one per row, the sentence's sent_id
        # The union of the instance rows is the union-mode row.
        plain_masks = plain.masks(HEIGHT, WIDTH)
        kept = [q for q in plain.queries if q != "the giraffe"]
        union_row = plain_masks[kept.index("all boxes")]
        first = [q for q in record.queries if q != "the giraffe"].index("all boxes")
        start = 0 if first == 0 else 1  # "left box" has one row
        assert np.array_equal(np.maximum.reduce(masks[start : start + 3]), union_row)


def test_grefcoco_union_is_the_records_of_before(tmp_path):
    image = grefcoco_train(tmp_path)
    for seed in range(6):
        record = refer_train_record(image, random.Random(seed), 2)
        assert record.conversations == expected_refer_conversations(image, seed, 2)
        rows = [q for q in record.queries if q != "the giraffe"]
        masks = record.masks(HEIGHT, WIDTH)
        assert len(masks) == len(rows)
        for text, mask in zip(rows, masks):
            assert np.array_equal(mask, np.maximum.reduce(GREFCOCO_TARGETS[text]))


# ----------------------------------------------------------------------------- ReasonSeg


def shape(x0, y0, x1, y1, group_id) -> dict:
    return {**target(x0, y0, x1, y1), "shape_type": "polygon", "group_id": group_id}


def synthetic_scene() -> dict:
    """A synthetic-style json: main query about one object, extra queries "all the boxes"
    (targets 2, 0, 1; object 1 drawn as two polygons, the shapes in another order than the
    targets) and a no-target one."""
    main = query("left box", [target(*LEFT)], target=0)
    all_boxes = [shape(*LEFT, 0), shape(*RIGHT, 1), shape(*BOTTOM, 2), shape(*CORNER, 1)]
    main["extra_queries"] = [
        query("Where are all the boxes?", all_boxes, True, targets=[2, 0, 1], target=None),
        query("the purple box", [], no_target=True, targets=[], target=None),
    ]
    return main


REASON_TARGETS = {
    "left box": [box(*LEFT)],
    "Where are all the boxes?": [box(*BOTTOM), box(*LEFT), np.maximum(box(*RIGHT), box(*CORNER))],
    "the purple box": [],
}


def expected_reason_conversations(item, seed: int, num_queries: int) -> list:
    """The union-mode conversations as ReasonSeg training has drawn them since before the
    option: the queries, a phrasing of each, then per query a question and an answer."""
    rng = random.Random(seed)
    pool = [item.main_query, *item.extra_queries]
    chosen = rng.sample(pool, min(num_queries, len(pool)))
    texts = [rng.choice(q.texts) for q in chosen]
    conversations = []
    for text, q in zip(texts, chosen):
        if q.is_sentence:
            question = rng.choice(LONG_QUESTION_TEMPLATES).format(sent=text)
        else:
            question = rng.choice(SHORT_QUESTION_TEMPLATES).format(class_name=text.lower())
        answer = rng.choice(ANSWER_TEMPLATES)
        conversations.append([(question, REJECTION_SENTENCE if q.no_target else answer)])
    return conversations


def test_synthetic_per_instance_rounds_follow_the_targets_order(tmp_path):
    write_split(tmp_path, "train", {"scene": synthetic_scene()})
    items = load_reason_seg_split(tmp_path, None, "train")
    per_instance = ReasonSegSource(items, 3, "per_instance")
    union = ReasonSegSource(items, 3)
    for seed in range(5):
        record = per_instance.sample_record(random.Random(seed))
        plain = union.sample_record(random.Random(seed))
        assert record.queries == plain.queries
        answers = [turns[0][1] for turns in record.conversations]
        for text, answer, plain_turns in zip(record.queries, answers, plain.conversations):
            assert seg_count(answer) == len(REASON_TARGETS[text]), answer
            assert single_answer(answer) == plain_turns[0][1]
            if not REASON_TARGETS[text]:
                assert answer == REJECTION_SENTENCE
        masks = record.masks(HEIGHT, WIDTH)
        expected = [m for text in record.queries for m in REASON_TARGETS[text]]
        assert masks.shape == (4, HEIGHT, WIDTH)
        for mask, want in zip(masks, expected):
            assert np.array_equal(mask, want)
        plain_rows = dict(
            zip([q for q in plain.queries if REASON_TARGETS[q]], plain.masks(HEIGHT, WIDTH))
        )
        multi = [m for q in record.queries for m in REASON_TARGETS[q] if q.startswith("Where")]
        assert np.array_equal(np.maximum.reduce(multi), plain_rows["Where are all the boxes?"])


def test_synthetic_union_is_the_records_of_before(tmp_path):
    write_split(tmp_path, "train", {"scene": synthetic_scene()})
    (item,) = load_reason_seg_split(tmp_path, None, "train")
    for seed in range(6):
        record = reason_seg_train_record(item, random.Random(seed), 2)
        assert record.conversations == expected_reason_conversations(item, seed, 2)
        rows = [q for q in record.queries if REASON_TARGETS[q]]
        for text, mask in zip(rows, record.masks(HEIGHT, WIDTH), strict=True):
            assert np.array_equal(mask, np.maximum.reduce(REASON_TARGETS[text]))


def test_single_and_no_target_rounds_are_unchanged(tmp_path):
    """A main query with targets (no extras), one without, and a no-target one."""
    multi = query("all the boxes", [shape(*LEFT, 4), shape(*RIGHT, 7)], targets=[7, 4])
    single = query("left box", [target(*LEFT)], target=0)
    single["extra_queries"] = [query("the cat", [], no_target=True, targets=[])]
    write_split(tmp_path, "train", {"a_multi": multi, "b_single": single})
    items = load_reason_seg_split(tmp_path, None, "train")
    for seed in range(4):
        per_instance = ReasonSegSource(items[1:], 3, "per_instance").sample_record(
            random.Random(seed)
        )
        plain = ReasonSegSource(items[1:], 3).sample_record(random.Random(seed))
        assert per_instance.conversations == plain.conversations
        assert np.array_equal(per_instance.masks(HEIGHT, WIDTH), plain.masks(HEIGHT, WIDTH))
    # Without extra queries: every phrasing's round answers one [SEG] per target.
    record = ReasonSegSource(items[:1], 3, "per_instance").sample_record(random.Random(0))
    assert [seg_count(turns[0][1]) for turns in record.conversations] == [2]
    right, left = record.masks(HEIGHT, WIDTH)
    assert np.array_equal(right, box(*RIGHT))
    assert np.array_equal(left, box(*LEFT))


@pytest.mark.parametrize(
    ("shapes", "targets", "message"),
    [
        (
            [target(*LEFT), shape(*RIGHT, 1)],
            [0, 1],
            r"extra_queries\[0\]: shapes\[0\] has no group_id",
        ),
        ([shape(*LEFT, 0), shape(*RIGHT, 5)], [0, 1], r"shapes\[1\] has no group_id naming"),
        ([shape(*LEFT, 0)], [0, 1], "target 1 has no shape"),
        ([shape(*LEFT, 0), shape(*RIGHT, 1)], [0, 0], "'targets' must be a list of distinct"),
    ],
)
def test_unattributable_polygons_stop_the_build_naming_the_json(tmp_path, shapes, targets, message):
    main = query("left box", [target(*LEFT)])
    main["extra_queries"] = [query("both", shapes, targets=targets)]
    write_split(tmp_path, "train", {"scene": main})
    items = load_reason_seg_split(tmp_path, None, "train")
    ReasonSegSource(items, 3)  # union mode reads no group_id
    with pytest.raises(DatasetFormatError, match=message) as error:
        ReasonSegSource(items, 3, "per_instance")
    assert "scene.json" in str(error.value)


# ----------------------------------------------------------------------------- the option


def test_a_bad_value_is_one_line_naming_the_flag(tmp_path):
    write_split(tmp_path, "train", {"scene": synthetic_scene()})
    items = load_reason_seg_split(tmp_path, None, "train")
    calls = [
        lambda: ReasonSegSource(items, 3, "instances"),
        lambda: ReferSegSource({"grefcoco": [grefcoco_train(tmp_path)]}, 3, 0.0, "instances"),
        lambda: load_refer_train(tmp_path / "nowhere", None, "grefcoco", 3, 0.0, "instances"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="--multi_target_answer must be one of") as error:
            call()
        assert "\n" not in str(error.value)
        assert "'instances'" in str(error.value)
    write_store(tmp_path / "sam_masks/reason_seg/ReasonSeg/train", {"scene.jpg": 2})
    config = DataConfig(
        dataset_dir=str(tmp_path),
        sam_masks_dir=str(tmp_path / "sam_masks"),
        dataset="reason_seg",
        sample_rates="1",
        multi_target_answer="instances",
    )
    config.seed = 0
    with pytest.raises(ValueError, match="--multi_target_answer"):
        build_train_dataset(config, encoder=None, length=1)
    with pytest.raises(SystemExit):
        parse_config(DataConfig, ["--multi_target_answer", "instances"])
    assert parse_config(DataConfig, []).multi_target_answer == "union"


# ----------------------------------------------------------------------------- encoded


def test_encoded_samples_hold_one_seg_token_and_mask_row_per_instance(
    tmp_path, tiny_model_and_encoder
):
    _, tokenizer, encoder = tiny_model_and_encoder
    seg_id = tokenizer.convert_tokens_to_ids("[SEG]")
    image = grefcoco_train(tmp_path / "refer")
    record = ReferSegSource({"grefcoco": [image]}, 3, 0.0, "per_instance").sample_record(
        random.Random(0)
    )
    sample = encoder(record)
    counts = {q: c.num_seg for q, c in zip(record.queries, sample.conversations)}
    assert counts == {"all boxes": 3, "left box": 1, "the giraffe": 0}
    assert sum(int((c.input_ids == seg_id).sum()) for c in sample.conversations) == 4
    assert sample.masks.shape == (4, HEIGHT, WIDTH)
    assert sample.proposal_ious.shape == (4, 2)

    dataset_dir, masks_dir = tmp_path / "reason/dataset", tmp_path / "reason/sam_masks"
    write_split(dataset_dir, "train", {"scene": synthetic_scene()})
    write_store(masks_dir / "reason_seg/ReasonSeg/train", {"scene.jpg": 2})
    items = load_reason_seg_split(dataset_dir, masks_dir, "train")
    record = ReasonSegSource(items, 3, "per_instance").sample_record(random.Random(0))
    sample = encoder(record)
    counts = {q: c.num_seg for q, c in zip(record.queries, sample.conversations)}
    assert counts == {q: len(REASON_TARGETS[q]) for q in record.queries}
    multi = sample.conversations[record.queries.index("Where are all the boxes?")]
    assert int((multi.input_ids == seg_id).sum()) == 3
    assert sample.masks.shape == (sum(counts.values()), HEIGHT, WIDTH)
