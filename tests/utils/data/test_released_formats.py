"""The released files as they really are: cp1252 json, refCLEF's RLE lists, upstream's COCO-Stuff
names, labelme labels in any case, empty shapes, the authors' absolute mask paths, long dialogues.
"""

import copy
import json
import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest

from tests.data_fixtures import write_reason_seg
from tests.utils.data.loader_fixtures import (
    box,
    refer_expected_masks,
    rle,
    write_llmseg40k,
    write_refclef,
    write_refer,
    write_vqa,
)
from utils.data.builders import build_eval_dataset
from utils.data.class_names import cocostuff_classes, cocostuff_lookup
from utils.data.conversation import SequenceTooLong
from utils.data.llmseg40k import load_llmseg40k_split
from utils.data.reason_seg import load_reason_seg_split, reason_seg_eval_record
from utils.data.refer_seg import load_refer_split, refer_train_record
from utils.data.samples import SampleEncoder
from utils.data.vqa import VQASource, load_vqa, vqa_record
from utils.masks import IGNORE_LABEL, labelme_to_mask
from utils.text_files import DatasetFormatError, load_dataset_json, read_dataset_text

# An accented word and a curly quote: in cp1252 these are the single bytes 0xE9 and 0x92, which
# are not valid UTF-8 (ReasonSeg's released files hold text like this).
CP1252_TEXT = "the caf\u00e9\u2019s sign above the door"


@pytest.fixture
def reason_seg(tmp_path):
    write_reason_seg(tmp_path, "val", 2)
    folder = tmp_path / "dataset" / "reason_seg" / "ReasonSeg" / "val"
    return tmp_path / "dataset", tmp_path / "sam_masks", folder


def test_text_reader_utf8_cp1252_and_neither(tmp_path):
    utf8, cp1252, bom, neither = (tmp_path / n for n in ("u.json", "c.json", "b.json", "x.json"))
    utf8.write_bytes(json.dumps({"t": CP1252_TEXT}, ensure_ascii=False).encode("utf-8"))
    cp1252.write_bytes(json.dumps({"t": CP1252_TEXT}, ensure_ascii=False).encode("cp1252"))
    bom.write_bytes(b"\xef\xbb\xbf" + utf8.read_bytes())
    assert b"\xe9" in cp1252.read_bytes()
    assert b"\x92" in cp1252.read_bytes()
    for path in (utf8, cp1252, bom):
        assert load_dataset_json(path) == {"t": CP1252_TEXT}
    # 0x81 is undefined in cp1252 and invalid as UTF-8 here.
    neither.write_bytes(b'{"t": "a\x81b"}')
    with pytest.raises(DatasetFormatError, match=r"x\.json: neither UTF-8 nor cp1252"):
        read_dataset_text(neither)
    (tmp_path / "bad.json").write_text('{"t": ')
    with pytest.raises(DatasetFormatError, match=r"bad\.json: invalid JSON"):
        load_dataset_json(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_dataset_json(tmp_path / "missing.json")


def test_reason_seg_cp1252_json_is_read_with_its_text(reason_seg):
    dataset_dir, masks_dir, folder = reason_seg
    path = folder / "img_000.json"
    data = json.loads(path.read_text())
    data["text"] = [CP1252_TEXT]
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode("cp1252"))
    items = load_reason_seg_split(dataset_dir, masks_dir, "val")
    assert items[0].texts == [CP1252_TEXT]
    record = reason_seg_eval_record(items[0])
    assert CP1252_TEXT in record.conversations[0][0][0]
    path.write_bytes(b'{"text": ["\x81"], "shapes": [], "is_sentence": true}')
    with pytest.raises(DatasetFormatError, match=r"img_000\.json: neither UTF-8 nor cp1252"):
        load_reason_seg_split(dataset_dir, masks_dir, "val")


def test_labelme_labels_compare_lower_cased():
    square = [[2, 2], [7, 2], [7, 7], [2, 7]]
    inner = [[4, 4], [5, 4], [5, 5], [4, 5]]
    shapes = [
        {"label": "Target", "points": square},
        {"label": "IGNORE_this", "points": inner},
        {"label": "Flag", "points": [[0, 0], [9, 0], [9, 9], [0, 9]]},
    ]
    label_map = labelme_to_mask(shapes, 10, 10)
    assert label_map[0, 0] == 0  # the Flag shape is skipped, as upstream's "flag" == lower()
    assert label_map[2, 2] == 1
    assert label_map[4, 4] == IGNORE_LABEL  # "ignore" in lower()
    assert int((label_map == 1).sum()) == 36 - 4
    assert not labelme_to_mask([], 10, 10).any()


def test_reason_seg_json_without_shapes_is_kept_counted_and_empty(reason_seg, caplog):
    dataset_dir, masks_dir, folder = reason_seg
    path = folder / "img_001.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "shapes": []}))
    with caplog.at_level(logging.WARNING):
        items = load_reason_seg_split(dataset_dir, masks_dir, "val")
    assert len(items) == 2
    assert "ReasonSeg|val: 1 of 2 jsons have no target polygon" in caplog.text
    assert "img_001.json" in caplog.text
    assert "img_000.json" not in caplog.text
    record = reason_seg_eval_record(items[1])
    masks = record.masks(48, 56)
    assert masks.shape == (1, 48, 56)
    assert not masks.any()
    # Only flag / ignore shapes: kept, counted the same way.
    path.write_text(json.dumps({**data, "shapes": [{**data["shapes"][0], "label": "Flag"}]}))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_reason_seg_split(dataset_dir, masks_dir, "val")
    assert "1 of 2 jsons have no target polygon" in caplog.text


def test_refclef_list_of_compressed_rles_is_decoded_and_merged(tmp_path):
    """refCLEF's instances.json stores a segmentation as a list of RLE dicts (str counts)."""
    write_refclef(tmp_path, tmp_path / "masks")
    path = tmp_path / "refer_seg/refclef/instances.json"
    instances = json.loads(path.read_text())
    top, overlapping = box(0, 0, 12, 6), box(8, 3, 20, 10)
    instances["annotations"][0]["segmentation"] = [rle(top), rle(overlapping)]
    path.write_text(json.dumps(instances))
    (image,) = load_refer_split(tmp_path, tmp_path / "masks", "refclef", "train")
    record = refer_train_record(image, random.Random(0))
    masks = record.masks(image.height, image.width)
    assert masks.shape == (1, image.height, image.width)
    # The union: overlapping pixels are 1, not the refer API's sum (2).
    np.testing.assert_array_equal(masks[0], np.maximum(top, overlapping))


def test_refer_instances_in_cp1252_are_read(tmp_path):
    write_refer(tmp_path, tmp_path / "masks")
    path = tmp_path / "refer_seg/refcoco/instances.json"
    instances = json.loads(path.read_text())
    instances["categories"][0]["name"] = "caf\u00e9\u2019s box"
    path.write_bytes(json.dumps(instances, ensure_ascii=False).encode("cp1252"))
    images = load_refer_split(tmp_path, tmp_path / "masks", "refcoco", "train")
    masks = refer_train_record(images[0], random.Random(0)).masks(20, 30)
    expected = refer_expected_masks()
    assert any(np.array_equal(masks[0], m) for m in expected.values())


def test_cocostuff_index_156_is_sky_and_asked_about():
    names = cocostuff_classes()
    assert len(names) == 182
    assert names[156] == "sky"
    lookup = cocostuff_lookup(names)
    assert lookup[156] == 156  # kept: the "names with '-' are ignored" rule does not drop it
    assert lookup[names.index("wall-brick")] == IGNORE_LABEL


def test_llmseg40k_absolute_author_path_falls_back_to_the_name_beside_the_json(tmp_path):
    masks = write_llmseg40k(tmp_path, tmp_path / "sam_masks")
    path = tmp_path / "LLM-Seg40K/validation.json"
    data = json.loads(path.read_text())
    (entry,) = data.values()
    (tmp_path / "LLM-Seg40K/val_masks/v.png").rename(tmp_path / "LLM-Seg40K/v.png")
    entry["qa_pairs"][0]["segmentation_path"] = "/mnt/authors/LLMSeg-40K/val_masks/v.png"
    path.write_text(json.dumps(data))
    (question,) = load_llmseg40k_split(tmp_path, tmp_path / "sam_masks", "validation", strict=True)
    assert question.target == tmp_path / "LLM-Seg40K/v.png"
    np.testing.assert_array_equal(question.masks(20, 30)[0], masks["000000000042_1"])
    # Found nowhere: still reported as missing, under the path as written.
    (tmp_path / "LLM-Seg40K/v.png").unlink()
    with pytest.raises(FileNotFoundError, match="/mnt/authors/LLMSeg-40K/val_masks/v.png"):
        load_llmseg40k_split(tmp_path, tmp_path / "sam_masks", "validation", strict=True)


def _short_encoder(encoder: SampleEncoder, max_length: int) -> SampleEncoder:
    settings = copy.copy(encoder.settings)
    settings.model_max_length = max_length
    return SampleEncoder(encoder.tokenizer, encoder.fmt, settings)


def test_long_dialogues_are_cut_at_a_turn_boundary_and_reported(
    tmp_path, tiny_model_and_encoder, caplog
):
    _, _, encoder = tiny_model_and_encoder
    long_answer = "a long answer " * 30
    entries = [
        {"image": "000000000101.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Grey."},
            {"from": "human", "value": "Why?"}, {"from": "gpt", "value": long_answer},
        ]},
        {"image": "000000000102.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Noise."},
        ]},
        {"image": "000000000103.jpg", "conversations": [
            {"from": "human", "value": "<image>\n" + long_answer}, {"from": "gpt", "value": "x"},
        ]},
    ]  # fmt: skip
    write_vqa(tmp_path, entries)
    items = load_vqa(tmp_path)
    first_turn = encoder.encode_text_dialogue(items[0].turns[:1])
    short = _short_encoder(encoder, len(first_turn.input_ids) + 10)
    sample = short(vqa_record(items[0]))
    (conversation,) = sample.conversations
    assert conversation.num_turns == 1
    assert conversation.input_ids.tolist() == first_turn.input_ids.tolist()
    assert short.num_truncated == 1
    assert short.num_dropped == 0
    assert short(vqa_record(items[1])).conversations[0].num_turns == 1
    assert short(vqa_record(items[2])) is None  # the first turn alone is too long
    assert short.num_dropped == 1
    with pytest.raises(SequenceTooLong):
        short.encode_text_dialogue(items[2].turns)
    with caplog.at_level(logging.INFO):
        counts = VQASource(items).report_lengths(short)
    assert counts == {"checked": 3, "whole": 1, "truncated": 1, "dropped": 1}
    assert "33.3% fit --model_max_length whole, 33.3% are cut at a turn boundary" in caplog.text
    sampled = VQASource(items * 5).report_lengths(short, sample_size=4)
    assert sampled["checked"] == 4
    assert sum(sampled.values()) == 8
    assert "(a sample of 15)" in caplog.text


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([[1, 1], [5, float("nan")], [5, 5]], "holds a NaN or infinite coordinate"),
        ([[1, 1], [5, float("inf")], [5, 5]], "holds a NaN or infinite coordinate"),
        ([[1, 1], [5, 1]], "has 2 points; a polygon needs at least 3"),
        ([], "has 0 points"),
        ([[1, "a"], [2, 2], [3, 3]], r"must be a list of \[x, y\] number pairs"),
    ],
)
def test_bad_polygons_are_format_errors_naming_file_and_shape(reason_seg, points, message):
    dataset_dir, masks_dir, folder = reason_seg
    path = folder / "img_001.json"
    data = json.loads(path.read_text())
    data["shapes"].append({"label": "ignore", "points": points})
    path.write_text(json.dumps(data, allow_nan=True))
    with pytest.raises(DatasetFormatError, match=r"img_001\.json: shapes\[1\]\.points " + message):
        load_reason_seg_split(dataset_dir, masks_dir, "val")


def test_unpaired_files_stop_evaluation_unless_skipped_and_listed(reason_seg, tmp_path):
    dataset_dir, masks_dir, folder = reason_seg
    (folder / "img_001.jpg").unlink()  # a json without its image
    with pytest.raises(DatasetFormatError, match=r"1 images without their json or jsons"):
        load_reason_seg_split(dataset_dir, masks_dir, "val")
    skipped: list[str] = []
    items = load_reason_seg_split(dataset_dir, masks_dir, "val", True, skipped)
    assert [i.image_path.name for i in items] == ["img_000.jpg"]
    assert skipped == [str(folder / "img_001.json")]
    config = SimpleNamespace(dataset_dir=dataset_dir, sam_masks_dir=masks_dir, skip_missing=True)
    dataset = build_eval_dataset(config, encoder=None, spec="ReasonSeg|val")
    assert dataset.skipped == [str(folder / "img_001.json")]
    assert len(dataset) == 1
