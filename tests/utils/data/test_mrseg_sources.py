"""MRSeg's other annotation sources on native-format fixtures: LVIS v1 instances (images known
by ``coco_url`` only), Visual Genome's and PASCAL's ``key -> RLE`` objects; every tag form, the
train/eval file choice, image folders and proposal stores; masks are boxes checked by hand."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.utils.data.loader_fixtures import (
    HEIGHT,
    WIDTH,
    box,
    polygon,
    rle,
    write_image,
    write_store,
)
from tests.utils.data.test_mrseg import entry, gpt, human, write_mrseg
from utils.data.mrseg import ANNOTATION_FILES, IMAGE_FOLDERS, load_mrseg, resolve_image
from utils.data.mrseg_sources import annotation_split
from utils.text_files import DatasetFormatError

LVIS_VAL_IMAGE = "000000000042.jpg"  # in coco/val2017
LVIS_FALLBACK_IMAGE = "000000000043.jpg"  # an LVIS val image of COCO train2017
LVIS_TRAIN_IMAGE = "000000000044.jpg"
VG_IMAGES = ("2345.jpg", "2346.jpg")  # VG_100K, VG_100K_2
PASCAL_IMAGE = "2008_000123.jpg"
VOC2010 = "vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages"  # LISA's, the voc2010 store's


def conversation(image: str, dataset: str, ids: tuple, image256: str | None = None) -> dict:
    """Three rounds on ``ids`` (a, b, c) through every tag form: a pipe decode; a MASK-ENCODE +
    BOX-ENCODE pair and a 4-colon decode; two pairs and a 5-colon decode with text after it."""
    a, b, c = ids

    def pair(mask_id) -> str:
        return f"[MASK-ENCODE:{image}|{dataset}|{mask_id}][BOX-ENCODE:{image}|{dataset}|{mask_id}]"

    return entry(
        human(f"[IMAGE256:{image256 or image}] Segment the first one."),
        gpt(f"[MASK-DECODE:{image}|{dataset}|{a}]"),
        human(pair(a) + "The one right of instance 1.", ind=[1]),
        gpt(f"[MASK-DECODE:relational:{a}:{b}:{image}:{dataset}]"),
        human(pair(a) + pair(b) + "Below instances 1 and 2.", ind=[1, 2]),
        gpt(f"Here: [MASK-DECODE:relational:{a}:{b}:{c}:{image}:{dataset}]."),
    )


EXPECTED_QUESTIONS = [
    "<image>\nSegment the first one.",
    "[REF:1]The one right of instance 1.",
    "[REF:1,2]Below instances 1 and 2.",
]
EXPECTED_ANSWERS = ["[SEG].", "[SEG].", "Here: [SEG]."]


def lvis_image(image_id: int, folder: str, name: str) -> dict:
    """An LVIS v1 image record: no ``file_name``, the COCO url names the file."""
    url = f"http://images.cocodataset.org/{folder}/{name}"
    return {"id": image_id, "coco_url": url, "height": HEIGHT, "width": WIDTH,
            "neg_category_ids": [], "not_exhaustive_category_ids": [], "license": 1}  # fmt: skip


def lvis_annotation(annotation_id: int, image_id: int, segmentation) -> dict:
    return {"id": annotation_id, "image_id": image_id, "category_id": 1,
            "segmentation": segmentation, "area": 1.0, "bbox": [0, 0, 1, 1]}  # fmt: skip


def write_lvis(root: Path) -> None:
    """Val: image 42 (val2017; annotations 5001-5003), image 43 (train2017; 5004); train: image
    44 (annotations 7001-7003; 5001 there is another mask, to tell the files apart)."""
    val = {
        "images": [lvis_image(42, "val2017", LVIS_VAL_IMAGE),
                   lvis_image(43, "train2017", LVIS_FALLBACK_IMAGE)],
        "annotations": [lvis_annotation(5001, 42, [polygon(0, 0, 10, 10)]),
                        lvis_annotation(5002, 42, [polygon(10, 0, 20, 10)]),
                        lvis_annotation(5003, 42, [polygon(0, 10, 5, 20), polygon(20, 10, 30, 20)]),
                        lvis_annotation(5004, 43, [polygon(3, 3, 6, 6)])],
        "categories": [{"id": 1, "name": "box", "synset": "box.n.01"}],
    }  # fmt: skip
    train = {
        "images": [lvis_image(44, "train2017", LVIS_TRAIN_IMAGE)],
        "annotations": [lvis_annotation(7001, 44, [polygon(0, 0, 30, 5)]),
                        lvis_annotation(7002, 44, rle(box(0, 5, 30, 10))),
                        lvis_annotation(7003, 44, [polygon(0, 10, 30, 20)]),
                        lvis_annotation(5001, 44, [polygon(1, 1, 2, 2)])],
        "categories": val["categories"],
    }  # fmt: skip
    for name, data in (("lvis_v1_val.json", val), ("lvis_v1_train.json", train)):
        (root / "lvis").mkdir(parents=True, exist_ok=True)
        (root / "lvis" / name).write_text(json.dumps(data))
    write_image(root / "coco/val2017" / LVIS_VAL_IMAGE)
    write_image(root / "coco/train2017" / LVIS_FALLBACK_IMAGE)
    write_image(root / "coco/train2017" / LVIS_TRAIN_IMAGE)


VG_MASKS = {
    "2345_7": box(0, 0, 15, 20),
    "2345_8": box(15, 0, 30, 20),
    "2346_1": box(5, 5, 10, 10),
    "2346_2": np.maximum(box(0, 0, 3, 3), box(27, 17, 30, 20)),  # stored as a list of two RLEs
}


def write_vg(root: Path) -> None:
    values = {key: rle(mask) for key, mask in VG_MASKS.items()}
    values["2346_2"] = [rle(box(0, 0, 3, 3)), rle(box(27, 17, 30, 20))]
    values["2346_3"] = {"size": [HEIGHT, WIDTH]}  # no counts: not an RLE
    (root / "vg").mkdir(parents=True, exist_ok=True)
    (root / "vg/vg_masks_train_new.json").write_text(json.dumps(values))
    write_image(root / "vg/VG_100K" / VG_IMAGES[0])
    write_image(root / "vg/VG_100K_2" / VG_IMAGES[1], seed=1)


PASCAL_TRAIN = {
    "2008_000123-1": box(0, 0, 30, 10),
    "2008_000123-2": box(0, 10, 30, 20),
    "2008_000123-3": box(10, 5, 20, 15),
}
# the same keys in the val file hold other masks, to tell the files apart
PASCAL_VAL = {key: 1 - mask for key, mask in PASCAL_TRAIN.items()}


def write_pascal(root: Path) -> None:
    (root / "pascal").mkdir(parents=True, exist_ok=True)
    files = {"pascal_labels.json": PASCAL_TRAIN, "pascal_labels_val.json": PASCAL_VAL}
    for name, masks in files.items():
        (root / "pascal" / name).write_text(json.dumps({k: rle(m) for k, m in masks.items()}))
    write_image(root / VOC2010 / PASCAL_IMAGE)


def check_record(record, questions=EXPECTED_QUESTIONS, answers=EXPECTED_ANSWERS) -> None:
    assert record.conversations == [list(zip(questions, answers))]
    assert record.references == [(), (1,), (1, 2)]


def test_lvis_val_and_train_files(tmp_path):
    root, masks_dir = tmp_path / "dataset", tmp_path / "sam_masks"
    write_lvis(root)
    write_store(masks_dir / "coco2017", {LVIS_VAL_IMAGE: 2, LVIS_FALLBACK_IMAGE: 1,
                                         LVIS_TRAIN_IMAGE: 3})  # fmt: skip
    val_image, fallback = f"coco/val2017/{LVIS_VAL_IMAGE}", f"coco/val2017/{LVIS_FALLBACK_IMAGE}"
    fallback_conversation = entry(human(f"[IMAGE256:{fallback}] The small box."),
                                  gpt(f"[MASK-DECODE:{fallback}|lvis|5004]"))  # fmt: skip
    write_mrseg(root, "mr_lvis_val", [conversation(val_image, "lvis", (5001, 5002, 5003)),
                                      fallback_conversation])  # fmt: skip
    first, second = load_mrseg(root, "mr_lvis_val", masks_dir)
    check_record(first)
    assert first.target_ids == [5001, 5002, 5003]
    assert first.image_path == root / "coco/val2017" / LVIS_VAL_IMAGE
    assert first.proposal_key == LVIS_VAL_IMAGE
    assert first.proposals.num_proposals(LVIS_VAL_IMAGE) == 2
    bottom = np.maximum(box(0, 10, 5, 20), box(20, 10, 30, 20))
    np.testing.assert_array_equal(
        first.masks(HEIGHT, WIDTH), np.stack([box(0, 0, 10, 10), box(10, 0, 20, 10), bottom])
    )
    # not in val2017: upstream's missing-file rewrite reads train2017
    assert second.image_path == root / "coco/train2017" / LVIS_FALLBACK_IMAGE
    np.testing.assert_array_equal(second.masks(HEIGHT, WIDTH), box(3, 3, 6, 6)[None])

    train_image = f"coco/train2017/{LVIS_TRAIN_IMAGE}"
    write_mrseg(root, "mr_lvis", [conversation(train_image, "lvis", (7001, 7002, 7003))])
    (record,) = load_mrseg(root, "mr_lvis", masks_dir)
    check_record(record)
    expected = np.stack([box(0, 0, 30, 5), box(0, 5, 30, 10), box(0, 10, 30, 20)])
    np.testing.assert_array_equal(record.masks(HEIGHT, WIDTH), expected)


def test_visual_genome(tmp_path):
    root, masks_dir = tmp_path / "dataset", tmp_path / "sam_masks"
    write_vg(root)
    write_store(masks_dir / "vg", {VG_IMAGES[0]: 1, VG_IMAGES[1]: 2})
    first = conversation(f"VG_100K/{VG_IMAGES[0]}", "visual_genome", ("2345_7", "2345_8", "2345_7"))
    # the IMAGE256 path may already name vg/; the tags use upstream's VG_100K_2/<file>
    second = conversation(
        f"VG_100K_2/{VG_IMAGES[1]}", "visual_genome", ("2346_1", "2346_2", "2346_1"),
        image256=f"vg/VG_100K_2/{VG_IMAGES[1]}",
    )  # fmt: skip
    write_mrseg(root, "mr_vg", [first, second])
    records = load_mrseg(root, "mr_vg", masks_dir)
    for record in records:
        check_record(record)
    assert [r.image_path for r in records] == [
        root / "vg/VG_100K" / VG_IMAGES[0],
        root / "vg/VG_100K_2" / VG_IMAGES[1],
    ]
    assert [r.proposal_key for r in records] == list(VG_IMAGES)
    assert records[1].proposals.num_proposals(VG_IMAGES[1]) == 2
    assert records[0].target_ids == ["2345_7", "2345_8", "2345_7"]
    for record in records:
        expected = np.stack([VG_MASKS[key] for key in record.target_ids])
        np.testing.assert_array_equal(record.masks(HEIGHT, WIDTH), expected)
    with pytest.raises(DatasetFormatError, match=r"conversation 0 .*annotated as 20x30 but"):
        records[0].masks(HEIGHT + 1, WIDTH)
    # VG has one file: an eval-named conversation file reads it too
    write_mrseg(root, "mr_vg_val", [first])
    (record,) = load_mrseg(root, "mr_vg_val", None)
    assert record.target_ids == ["2345_7", "2345_8", "2345_7"]


def test_pascal_train_and_val_files(tmp_path):
    root, masks_dir = tmp_path / "dataset", tmp_path / "sam_masks"
    write_pascal(root)
    write_store(masks_dir / "voc2010", {PASCAL_IMAGE: 4})
    keys = tuple(PASCAL_TRAIN)
    for stem in ("mr_pascal", "mr_pascal_val"):
        write_mrseg(root, stem, [conversation(f"pascal/{PASCAL_IMAGE}", "pascal", keys)])
    (train,) = load_mrseg(root, "mr_pascal", masks_dir)
    check_record(train)
    assert train.image_path == root / VOC2010 / PASCAL_IMAGE
    assert train.proposals.num_proposals(PASCAL_IMAGE) == 4
    assert train.target_ids == list(keys)
    np.testing.assert_array_equal(train.masks(HEIGHT, WIDTH), np.stack(list(PASCAL_TRAIN.values())))
    # the val file is read in its own (key -> RLE) form, not through upstream's COCO path
    (val,) = load_mrseg(root, "mr_pascal_val", None)
    np.testing.assert_array_equal(val.masks(HEIGHT, WIDTH), np.stack(list(PASCAL_VAL.values())))
    (forced,) = load_mrseg(root, "mr_pascal", None, split="eval")
    np.testing.assert_array_equal(forced.masks(HEIGHT, WIDTH), val.masks(HEIGHT, WIDTH))
    # upstream's images_folder/pascal is the unpacked VOC tar: that tag form reads LISA's folder
    tar_path = f"pascal/VOCdevkit/VOC2010/JPEGImages/{PASCAL_IMAGE}"
    write_mrseg(root, "mr_pascal_tar", [conversation(tar_path, "pascal", keys)])
    (tar,) = load_mrseg(root, "mr_pascal_tar", masks_dir)
    assert (tar.image_path, tar.proposal_key) == (root / VOC2010 / PASCAL_IMAGE, PASCAL_IMAGE)
    np.testing.assert_array_equal(tar.masks(HEIGHT, WIDTH), train.masks(HEIGHT, WIDTH))


def broken(root: Path, stem: str, image: str, dataset: str, target) -> Path:
    """Conversation 1 of the file: a good round, then a reference to it and ``target``."""
    good = {"lvis": 5001, "visual_genome": "2345_7", "pascal": "2008_000123-1"}[dataset]
    pair = f"[MASK-ENCODE:{image}|{dataset}|{good}][BOX-ENCODE:{image}|{dataset}|{good}]"
    bad = entry(
        human(f"[IMAGE256:{image}] The first."),
        gpt(f"[MASK-DECODE:{image}|{dataset}|{good}]"),
        human(pair + "Next to it."),
        gpt(f"[MASK-DECODE:relational:{good}:{target}:{image}:{dataset}]"),
    )
    good_conversation = entry(
        human(f"[IMAGE256:{image}] a"), gpt(f"[MASK-DECODE:{image}|{dataset}|{good}]")
    )
    return write_mrseg(root, stem, [good_conversation, bad])


BROKEN = {
    "vg_unknown_key": (
        ("mr_vg", "VG_100K/2345.jpg", "visual_genome", "2345_99"),
        "conversation 1, turn 3: mask id '2345_99' is not a key of "
        "{root}/vg/vg_masks_train_new.json",
    ),
    "vg_not_rle": (
        ("mr_vg", "VG_100K/2345.jpg", "visual_genome", "2346_3"),
        "{root}/vg/vg_masks_train_new.json: mask '2346_3' is not a COCO RLE",
    ),
    "pascal_unknown_key": (
        ("mr_pascal_val", f"pascal/{PASCAL_IMAGE}", "pascal", "2008_000123-9"),
        "conversation 1, turn 3: mask id '2008_000123-9' is not a key of "
        "{root}/pascal/pascal_labels_val.json",
    ),
    "lvis_unknown_id": (
        ("mr_lvis_val", f"coco/val2017/{LVIS_VAL_IMAGE}", "lvis", 7001),
        "conversation 1, turn 3: mask id 7001 is not an annotation of {root}/lvis/lvis_v1_val.json",
    ),
    "lvis_other_image": (
        ("mr_lvis_val", f"coco/val2017/{LVIS_VAL_IMAGE}", "lvis", 5004),
        "conversation 1, turn 3: annotation 5004 of {root}/lvis/lvis_v1_val.json belongs to image "
        f"'http://images.cocodataset.org/train2017/{LVIS_FALLBACK_IMAGE}', not {LVIS_VAL_IMAGE}",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_errors_name_file_conversation_and_turn(tmp_path, case):
    root = tmp_path / "dataset"
    write_lvis(root)
    write_vg(root)
    write_pascal(root)
    (stem, image, dataset, target), message = BROKEN[case]
    path = broken(root, stem, image, dataset, target)
    message = message.format(root=root)
    if "conversation 1" in message:
        message = f"{path}: {message}"
    with pytest.raises(DatasetFormatError, match=re.escape(message)):
        load_mrseg(root, stem, None)


def test_missing_annotation_file_and_unknown_folder(tmp_path):
    root = tmp_path / "dataset"
    write_pascal(root)
    (root / "pascal/pascal_labels_val.json").unlink()
    write_mrseg(root, "mr_pascal_val", [conversation(f"pascal/{PASCAL_IMAGE}", "pascal",
                                                     tuple(PASCAL_TRAIN))])  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"pascal annotations \(eval\) not found at .*"
                       r"pascal_labels_val\.json"):  # fmt: skip
        load_mrseg(root, "mr_pascal_val", None)
    with pytest.raises(DatasetFormatError, match=r"here: image 'VG_100K_3/1.jpg' is in an unknown"):
        resolve_image(root, "VG_100K_3/1.jpg", "here")


def test_tables_and_split_rule():
    assert {
        "refcoco",
        "refcoco+",
        "refcocog",
        "paco_lvis",
        "lvis",
        "visual_genome",
        "pascal",
    } == set(ANNOTATION_FILES)
    assert IMAGE_FOLDERS["vg/VG_100K_2"] == ("vg/VG_100K_2", "vg")
    assert resolve_image(Path("d"), "VG_100K/1.jpg", "") == (Path("d/vg/VG_100K/1.jpg"), "vg")
    for stem in ("mr_refcoco_val", "mr_paco_val", "mr_refcoco_gen_val", "mr_x_test", "MR_Y_VAL"):
        assert annotation_split(stem) == "eval", stem
    for stem in ("mr_refcoco", "mr_refcoco+_hard", "mr_paco", "mr_lvis", "mr_vg", "mr_validity"):
        assert annotation_split(stem) == "train", stem
    with pytest.raises(ValueError, match="annotation split must be one of"):
        load_mrseg(Path("nowhere"), "mr_x", None, split="validation")
