"""sem_seg loaders on native-format fixtures: class rules, sampled conversations, masks by hand."""

import json
import logging
import random
import re

import numpy as np
import pytest

from tests.utils.data.loader_fixtures import (
    HEIGHT,
    PACO_BOXES,
    PASCAL_BOXES,
    WIDTH,
    box,
    write_ade20k,
    write_cocostuff,
    write_image,
    write_mapillary,
    write_paco_lvis,
    write_pascal_part,
    write_png,
)
from utils.data.class_names import (
    ade20k_classes,
    cocostuff_classes,
    cocostuff_lookup,
    part_category,
    part_phrase,
)
from utils.data.conversation import ANSWER_TEMPLATES, SHORT_QUESTION_TEMPLATES
from utils.data.sem_seg import (
    SemSegSource,
    label_map_train_record,
    load_ade20k,
    load_cocostuff,
    load_mapillary,
    load_paco_lvis,
    load_pascal_part,
    load_sem_seg_datasets,
    part_train_record,
)
from utils.text_files import DatasetFormatError

SHORT_PATTERNS = [
    re.compile(re.escape(t).replace(re.escape("{class_name}"), "(.+)") + "$")
    for t in SHORT_QUESTION_TEMPLATES
]


def asked_name(question: str) -> str:
    """The class name a SHORT question asks about."""
    for pattern in SHORT_PATTERNS:
        match = pattern.match(question)
        if match:
            return match.group(1)
    raise AssertionError(f"not a SHORT question: {question!r}")


def conversations_and_masks(record):
    masks = record.masks(HEIGHT, WIDTH)
    assert masks.shape == (len(record.conversations), HEIGHT, WIDTH)
    assert masks.dtype == np.uint8
    names = []
    for turns in record.conversations:
        ((question, answer),) = turns
        assert answer in ANSWER_TEMPLATES
        names.append(asked_name(question))
    return names, masks


def test_class_name_lists():
    ade, stuff = ade20k_classes(), cocostuff_classes()
    assert len(ade) == 150
    assert len(set(ade)) == 150
    assert (ade[0], ade[2], ade[149]) == ("wall", "sky", "flag")
    assert len(stuff) == 182
    assert len(set(stuff)) == 182
    assert (stuff[0], stuff[95], stuff[168], stuff[181]) == (
        "person",
        "building-other",
        "tree",
        "wood",
    )
    # "-" names are ignored; index 156 is named "sky" (upstream), so it is kept
    lookup = cocostuff_lookup(stuff)
    assert sum(lookup[v] == 255 for v in range(182)) == sum("-" in n for n in stuff) == 28


def test_part_names():
    assert part_category("car_(automobile):wheel") == ("car", "wheel")
    assert part_category(" trash_can ") == "trash_can"
    rng = random.Random(0)
    phrases = {part_phrase(("dog", "head"), rng) for _ in range(50)}
    assert phrases == {"dog head", "the head of the dog"}
    assert part_phrase("bottle", rng) == "bottle"


def test_ade20k_classes_masks_and_skips(tmp_path, caplog):
    labels = write_ade20k(tmp_path / "d", tmp_path / "m")
    dataset = load_ade20k(tmp_path / "d", tmp_path / "m")
    # c has no label PNG, d is not in the proposal store: skipped and counted at build time.
    assert [i.image_path.name for i in dataset.images] == ["a.jpg", "b.jpg"]
    assert "skipping 2 of 4 entries" in caplog.text
    assert "c.png" in caplog.text
    assert "d.jpg" in caplog.text

    record = label_map_train_record(dataset, dataset.images[0], random.Random(0), num_classes=3)
    names, masks = conversations_and_masks(record)
    assert sorted(names) == ["sky", "wall"]  # unlabelled (0) is never asked for
    for name, mask in zip(names, masks):
        raw_value = {"wall": 1, "sky": 3}[name]
        assert np.array_equal(mask, (labels["a"] == raw_value).astype(np.uint8))
    assert record.proposal_key == "a.jpg"
    assert record.dataset == "ade20k"
    one = label_map_train_record(dataset, dataset.images[0], random.Random(1), num_classes=1)
    assert len(one.conversations) == 1
    assert label_map_train_record(dataset, dataset.images[1], random.Random(0)) is None


def test_cocostuff_dash_classes_ignored(tmp_path):
    raw = write_cocostuff(tmp_path / "d", tmp_path / "m")
    dataset = load_cocostuff(tmp_path / "d", tmp_path / "m")
    names, masks = conversations_and_masks(
        label_map_train_record(dataset, dataset.images[0], random.Random(0))
    )
    assert sorted(names) == ["person", "tree"]  # building-other (has '-') and 255 ignored
    for name, mask in zip(names, masks):
        assert np.array_equal(mask, (raw == {"person": 0, "tree": 168}[name]).astype(np.uint8))


def test_mapillary_readable_names_and_palette_png(tmp_path):
    raw = write_mapillary(tmp_path / "d", tmp_path / "m")
    dataset = load_mapillary(tmp_path / "d", tmp_path / "m")
    names, masks = conversations_and_masks(
        label_map_train_record(dataset, dataset.images[0], random.Random(0))
    )
    assert sorted(names) == ["curb", "sky"]  # lower-cased readable names; unlabeled ignored
    for name, mask in zip(names, masks):
        assert np.array_equal(mask, (raw == {"curb": 0, "sky": 1}[name]).astype(np.uint8))


def test_paco_lvis_parts(tmp_path):
    write_paco_lvis(tmp_path / "d", tmp_path / "m")
    dataset = load_paco_lvis(tmp_path / "d", tmp_path / "m")
    (image,) = dataset.images  # the unannotated image is never drawn
    assert image.image_path == tmp_path / "d/coco/train2017/000000000042.jpg"
    seen = set()
    for seed in range(20):
        names, masks = conversations_and_masks(
            part_train_record(dataset, image, random.Random(seed))
        )
        expected = {"trash_can": box(*PACO_BOXES[1][1])}
        for phrase in ("car wheel", "the wheel of the car"):
            expected[phrase] = box(*PACO_BOXES[0][1])
        assert len(names) == 2
        for name, mask in zip(names, masks):
            assert np.array_equal(mask, expected[name])
        seen.update(names)
    assert seen == {"trash_can", "car wheel", "the wheel of the car"}


def test_pascal_part(tmp_path):
    write_pascal_part(tmp_path / "d", tmp_path / "m")
    dataset = load_pascal_part(tmp_path / "d", tmp_path / "m")
    names, masks = conversations_and_masks(
        part_train_record(dataset, dataset.images[0], random.Random(0))
    )
    assert names[0] in ("dog head", "the head of the dog")
    assert np.array_equal(masks[0], box(*PASCAL_BOXES[0][1]))


def test_source_mixes_datasets_reproducibly_and_redraws(tmp_path):
    root, masks = tmp_path / "d", tmp_path / "m"
    write_ade20k(root, masks)
    write_mapillary(root, masks)
    write_pascal_part(root, masks)
    datasets = load_sem_seg_datasets(root, masks, "ade20k||mapillary||pascal_part")
    source = SemSegSource(datasets, num_classes=3)
    drawn = [source.sample_record(random.Random(f"0:{i}")) for i in range(60)]
    again = [source.sample_record(random.Random(f"0:{i}")) for i in range(60)]
    assert [r.conversations for r in drawn] == [r.conversations for r in again]
    assert {r.dataset for r in drawn} == {"ade20k", "mapillary", "pascal_part"}
    assert all(r.image_path.name != "b.jpg" for r in drawn)  # no labelled class: redrawn
    assert source.skipped["no target"] > 0


def test_broken_label_png_is_skipped_with_its_name(tmp_path, caplog):
    root, masks = tmp_path / "d", tmp_path / "m"
    write_ade20k(root, masks)
    (root / "ade20k/annotations/training/a.png").write_bytes(b"not a png")
    write_png(root / "ade20k/annotations/training/b.png", np.ones((5, 5), np.uint8))
    source = SemSegSource([load_ade20k(root, masks)])
    with pytest.raises(RuntimeError, match="unusable"):
        source.sample_record(random.Random(0))
    assert source.skipped["bad annotation"] > 0
    assert "a.png: unreadable label PNG" in caplog.text
    assert re.search(r"b\.png: annotated as 5x5 but the image .*b\.jpg is 20x30", caplog.text)


def test_bad_input_messages(tmp_path):
    root, masks = tmp_path / "d", tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="ade20k/images/training"):
        load_ade20k(root, masks)
    write_paco_lvis(root, masks)
    path = root / "vlpart/paco/annotations/paco_lvis_v1_train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"paco_lvis_v1_train.json: annotations\[0\]"):
        load_paco_lvis(root, masks)
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match="paco_lvis_v1_train.json: invalid JSON"):
        load_paco_lvis(root, masks)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetFormatError, match="not a COCO-format file"):
        load_paco_lvis(root, masks)
    with pytest.raises(ValueError, match="unknown --sem_seg_data entry 'partimagenet'"):
        load_sem_seg_datasets(root, masks, "partimagenet")


def test_missing_store_and_zero_proposals(tmp_path, caplog):
    root, masks = tmp_path / "d", tmp_path / "m"
    write_paco_lvis(root, masks, store=False)
    with pytest.raises(
        FileNotFoundError,
        match="coco2017 does not exist; write it with python -m prepare_datasets.prepare_coco2017",
    ):
        load_paco_lvis(root, masks)
    from tests.utils.data.loader_fixtures import write_store

    write_store(masks / "coco2017", {"000000000042.jpg": 0})
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="no usable"):
        load_paco_lvis(root, masks)
    assert "1 images have zero proposals" in caplog.text
    assert "000000000042.jpg" in caplog.text


def test_exif_rotated_image_does_not_fit_its_annotation(tmp_path, caplog):
    from PIL import Image

    root, masks = tmp_path / "d", tmp_path / "m"
    write_pascal_part(root, masks)
    path = root / "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg"
    image = Image.open(write_image(path))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed: 30x20
    image.save(path, exif=exif)
    source = SemSegSource([load_pascal_part(root, masks)])
    with pytest.raises(RuntimeError):
        source.sample_record(random.Random(0))
    assert "annotated as 20x30 but the image" in caplog.text
    assert "is 30x20" in caplog.text
