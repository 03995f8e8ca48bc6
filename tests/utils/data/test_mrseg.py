"""MRSeg loader on native-format fixtures: SegLLM conversation files with every tag form, a
refCOCO-style ``instances.json`` (polygon, RLE and list-of-RLE segmentations), PACO-LVIS; masks
are boxes checked by hand."""

import json
import logging
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
    write_part_json,
    write_store,
)
from utils.data.mrseg import (
    SKIP_NOT_SEGMENTATION,
    SKIP_UNRESOLVED,
    load_mrseg,
    mrseg_report,
    parse_mask_id,
    parse_mask_tag,
)
from utils.text_files import DatasetFormatError

IMG1, IMG2 = "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"
IMG3 = "COCO_train2014_000000000003.jpg"  # annotated, never written (a missing image)
PACO_IMAGE = "000000000042.jpg"
EXPECTED = {
    101: box(0, 0, 10, 10),
    102: box(10, 0, 20, 10),
    103: np.maximum(box(0, 10, 5, 20), box(20, 10, 30, 20)),
    201: box(5, 5, 25, 15),
    301: box(2, 2, 8, 18),
}


def image_tag(image: str = IMG1) -> str:
    return f"[IMAGE256:coco/train2014/{image}]"


def encode(kind: str, mask_id, image: str = IMG1, dataset: str = "refcoco") -> str:
    return f"[{kind}:coco/train2014/{image}|{dataset}|{mask_id}]"


def ref(mask_id, image: str = IMG1) -> str:
    """One reference as SegLLM writes it: a MASK-ENCODE + BOX-ENCODE pair, before the text."""
    return encode("MASK-ENCODE", mask_id, image) + encode("BOX-ENCODE", mask_id, image)


def decode(mask_id, image: str = IMG1, dataset: str = "refcoco") -> str:
    """The pipe form (no reference)."""
    return f"[MASK-DECODE:coco/train2014/{image}|{dataset}|{mask_id}]"


def decode_colon(task: str, refs: list, mask_id, image: str = IMG1) -> str:
    fields = [task, *map(str, refs), str(mask_id), f"coco/train2014/{image}", "refcoco"]
    return "[MASK-DECODE:" + ":".join(fields) + "]"


def human(value: str, ind=None) -> dict:
    return {"from": "human", "value": value, **({"ind": ind} if ind is not None else {})}


def gpt(value: str) -> dict:
    return {"from": "gpt", "value": value}


def entry(*turns, task: str = "segmentation") -> dict:
    return {"task": task, "base": "[null]", "conversations": list(turns)}


def three_rounds() -> dict:
    """Image 1: left box (pipe decode), right box (4-colon decode, one reference), the two
    bottom boxes (5-colon decode with val2014/new_ rewrites, two references)."""
    return entry(
        human(f"{image_tag()} Segment the left box."),
        gpt(decode(101)),
        human(ref(101) + "Segment the box right of instance 1.", ind=[1]),
        gpt(decode_colon("relational", [101], 102)),
        human(ref(101) + ref(102) + "Segment what is below instances 1 and 2.", ind=[1, 2]),
        gpt(
            "Sure, [MASK-DECODE:relational:101:102:103:"
            "coco/val2014/new_COCO_val2014_000000000001.jpg:refcoco]."
        ),
    )


def again_rounds() -> dict:
    """Image 2: the strip (colon decode with ``none``), the same strip again (a MASK-ENCODE
    alone, mid-text, ``ind`` an int), then a refcocog target referring to round 2."""
    return entry(
        human(f"{image_tag(IMG2)}\nWhat is the [middle] strip?"),
        gpt(decode_colon("none", ["none"], 201, IMG2)),
        human("Now the same one again " + encode("MASK-ENCODE", 201, IMG2) + " please.", ind=1),
        gpt("It is " + decode_colon("relational", [201], 201, IMG2)),
        human(ref(201, IMG2) + "The thin box left of it.", ind=[2]),
        gpt(decode(301, IMG2, "refcocog")),
    )


def unresolved_reference() -> dict:
    return entry(
        human(image_tag() + "Segment the left box."),
        gpt(decode(101)),
        human(ref(999) + "What is next to it?"),
        gpt(decode(102)),
    )


def latest_round_and_wrong_ind() -> dict:
    """Targets 101, 101, 102: round 3's reference to 101 is round 2 (the latest), not ``ind``."""
    return entry(
        human(image_tag() + "The left box."),
        gpt(decode(101)),
        human(ref(101) + "Again.", ind=1),
        gpt(decode(101)),
        human(ref(101) + "Right of it.", ind=[1]),
        gpt(decode(102)),
    )


def write_coco(root: Path) -> None:
    """Images 1 and 2, refcoco (polygon, RLE, list-of-RLE) and refcocog instances."""
    images_dir = root / "refer_seg/images/mscoco/images/train2014"
    for seed, name in enumerate((IMG1, IMG2)):
        write_image(images_dir / name, seed=seed)
    images = [
        {"id": i, "file_name": name, "height": HEIGHT, "width": WIDTH}
        for i, name in ((1, IMG1), (2, IMG2), (3, IMG3))
    ]
    refcoco = [
        {"id": 101, "image_id": 1, "segmentation": [polygon(0, 0, 10, 10)]},
        {"id": 102, "image_id": 1, "segmentation": rle(box(10, 0, 20, 10))},
        {"id": 103, "image_id": 1, "segmentation": [rle(box(0, 10, 5, 20)),
                                                    rle(box(20, 10, 30, 20))]},
        {"id": 201, "image_id": 2, "segmentation": [polygon(5, 5, 25, 15)]},
        {"id": 401, "image_id": 3, "segmentation": [polygon(0, 0, 5, 5)]},
    ]  # fmt: skip
    refcocog = [{"id": 301, "image_id": 2, "segmentation": [polygon(2, 2, 8, 18)]}]
    for name, annotations in (("refcoco", refcoco), ("refcocog", refcocog)):
        folder = root / "refer_seg" / name
        folder.mkdir(parents=True, exist_ok=True)
        data = {"images": images, "annotations": annotations, "categories": []}
        (folder / "instances.json").write_text(json.dumps(data))


def write_mrseg(root: Path, stem: str, conversations, encoding: str = "utf-8") -> Path:
    path = root / "mrseg" / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(conversations, ensure_ascii=False).encode(encoding))
    return path


@pytest.fixture
def mrseg(tmp_path):
    root = tmp_path / "dataset"
    write_coco(root)
    conversations = [
        three_rounds(),
        again_rounds(),
        unresolved_reference(),
        latest_round_and_wrong_ind(),
        entry(human("Describe the image."), gpt("Boxes."), task="conversation"),
    ]
    write_mrseg(root, "mr_refcoco_val", conversations)
    return root


def test_turns_answers_and_references(mrseg):
    records = load_mrseg(mrseg, "mr_refcoco_val", None)
    assert [r.name for r in records] == ["mr_refcoco_val_0", "mr_refcoco_val_1", "mr_refcoco_val_3"]
    assert [r.conversation_index for r in records] == [0, 1, 3]
    first, second, third = records
    assert first.conversations == [
        [
            ("<image>\nSegment the left box.", "[SEG]."),
            ("[REF:1]Segment the box right of instance 1.", "[SEG]."),
            ("[REF:1,2]Segment what is below instances 1 and 2.", "Sure, [SEG]."),
        ]
    ]
    assert first.queries == [
        "Segment the left box.",
        "Segment the box right of instance 1.",
        "Segment what is below instances 1 and 2.",
    ]
    assert first.references == [(), (1,), (1, 2)]
    assert first.target_ids == [101, 102, 103]
    assert second.conversations == [
        [
            ("<image>\nWhat is the [middle] strip?", "[SEG]."),
            ("Now the same one again [REF:1] please.", "It is [SEG]"),
            ("[REF:2]The thin box left of it.", "[SEG]."),
        ]
    ]
    assert second.queries[1] == "Now the same one again please."
    assert third.conversations[0][2][0] == "[REF:2]Right of it."
    assert {r.dataset for r in records} == {"MRSeg"}
    root = mrseg / "refer_seg/images/mscoco/images/train2014"
    assert [r.image_path for r in records] == [root / IMG1, root / IMG2, root / IMG1]
    assert [r.proposals for r in records] == [None] * 3
    assert [r.proposal_key for r in records] == [IMG1, IMG2, IMG1]


def test_masks_are_the_round_targets(mrseg):
    first, second, third = load_mrseg(mrseg, "mr_refcoco_val", None)
    expected = np.stack([EXPECTED[101], EXPECTED[102], EXPECTED[103]])
    masks = first.masks(HEIGHT, WIDTH)
    assert masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, expected)
    np.testing.assert_array_equal(
        second.masks(HEIGHT, WIDTH), np.stack([EXPECTED[201], EXPECTED[201], EXPECTED[301]])
    )
    np.testing.assert_array_equal(
        third.masks(HEIGHT, WIDTH), np.stack([EXPECTED[101], EXPECTED[101], EXPECTED[102]])
    )
    with pytest.raises(DatasetFormatError, match=r"conversation 0 .*annotated as 20x30 but"):
        first.masks(HEIGHT, WIDTH + 1)


def test_skipped_conversations_and_ind_mismatches_are_reported(mrseg, caplog):
    with caplog.at_level(logging.WARNING):
        load_mrseg(mrseg, "mr_refcoco_val", None)
    report = mrseg_report(mrseg, "mr_refcoco_val")
    assert report.num_conversations == 5
    assert report.skip_counts() == {SKIP_UNRESOLVED: 1, SKIP_NOT_SEGMENTATION: 1}
    assert [(i, reason) for i, reason, _ in report.skipped] == [
        (2, SKIP_UNRESOLVED),
        (4, SKIP_NOT_SEGMENTATION),
    ]
    assert "conversation 2: round 2 refers to mask id 999" in report.skipped[0][2]
    assert report.ind_mismatches == [{"conversation": 3, "round": 3, "ind": [1], "resolved": [2]}]
    skipping = [r.getMessage() for r in caplog.records if "skipping 2 of 5" in r.getMessage()]
    assert len(skipping) == 1
    assert "mr_refcoco_val.json" in skipping[0]
    assert "mask id 999" in skipping[0]
    assert report.as_dict()["skipped"] == {SKIP_UNRESOLVED: 1, SKIP_NOT_SEGMENTATION: 1}


def test_mask_ids_and_tag_forms():
    assert parse_mask_id("", True) is None
    assert parse_mask_id("'", False) is None
    assert parse_mask_id("none", True) is None
    with pytest.raises(ValueError):
        parse_mask_id("none", False)  # encode ids have no 'none'
    assert parse_mask_id("vg_12", False) == "vg_12"
    assert parse_mask_id("-1", True) == "-1"
    assert parse_mask_id("700042", True) == 700042
    tag = "[MASK-DECODE:relational:7:none:9:coco/train2014/x.jpg:refcoco+]"
    parsed = parse_mask_tag(tag, "MASK-DECODE", "here")
    assert (parsed.mask_id, parsed.reference_ids, parsed.dataset) == (9, (7, None), "refcoco+")
    assert parse_mask_tag("[MASK-DECODE:a.jpg|paco_lvis|5]", "MASK-DECODE", "").mask_id == 5
    with pytest.raises(DatasetFormatError, match="here: .* has 3 colons; the colon form needs 4"):
        parse_mask_tag("[MASK-DECODE:x:1:2:refcoco]", "MASK-DECODE", "here")
    with pytest.raises(DatasetFormatError, match=r"needs <image>\|<dataset>\|<mask id>"):
        parse_mask_tag("[MASK-ENCODE:a.jpg|refcoco]", "MASK-ENCODE", "here")


def test_cp1252_file(tmp_path):
    root = tmp_path / "dataset"
    write_coco(root)
    conversation = entry(human(image_tag() + " Segment the café table."), gpt(decode(101)))
    path = write_mrseg(root, "mr_cafe_val", [conversation], encoding="cp1252")
    assert "café".encode("cp1252") in path.read_bytes()
    (record,) = load_mrseg(root, "mr_cafe_val.json", None)
    assert record.conversations == [[("<image>\nSegment the café table.", "[SEG].")]]


BROKEN = {
    "odd_turns": (
        entry(human(image_tag()), gpt(decode(101)), human("more?")),
        r"conversation 1: needs human\+gpt turn pairs, has 3 turns",
    ),
    "no_decode": (
        entry(human(image_tag() + "a"), gpt(decode(101)), human("b"), gpt("Sure.")),
        r"conversation 1, turn 3: a gpt turn needs exactly one MASK-DECODE, has \[\]",
    ),
    "unknown_dataset": (
        entry(human(image_tag()), gpt(decode(101, dataset="refclef"))),
        "conversation 1, turn 1: unknown dataset key 'refclef'",
    ),
    "no_image": (
        entry(human("Segment the box."), gpt(decode(101))),
        "conversation 1, turn 0: the first turn has no IMAGE256 tag",
    ),
    "unknown_mask": (
        entry(human(image_tag()), gpt(decode(101)), human(ref(101)), gpt(decode(555))),
        "conversation 1, turn 3: mask id 555 is not an annotation of",
    ),
    "other_image": (
        entry(human(image_tag()), gpt(decode(201))),
        "conversation 1, turn 1: annotation 201 of .* belongs to image 'COCO_train2014_0+2.jpg'",
    ),
    "wrong_speaker": (
        entry(human(image_tag()), human(decode(101))),
        "conversation 1, turn 1: expected a 'gpt' turn",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_malformed_files_name_file_conversation_and_turn(tmp_path, case):
    root = tmp_path / "dataset"
    write_coco(root)
    conversation, message = BROKEN[case]
    path = write_mrseg(root, "mr_broken", [three_rounds(), conversation])
    # the messages are regular expressions
    with pytest.raises(DatasetFormatError, match=re.escape(f"{path}: ") + message):
        load_mrseg(root, "mr_broken", None)


def test_not_a_list(tmp_path):
    root = tmp_path / "dataset"
    path = write_mrseg(root, "mr_dict", {"conversations": []})
    with pytest.raises(DatasetFormatError, match=f"{path}: expected a JSON list of conversations"):
        load_mrseg(root, "mr_dict", None)
    with pytest.raises(FileNotFoundError, match="MRSeg conversation file not found at"):
        load_mrseg(root, "mr_absent", None)


def test_missing_images_and_proposals(tmp_path):
    root, masks_dir = tmp_path / "dataset", tmp_path / "sam_masks"
    write_coco(root)
    missing = entry(human(image_tag(IMG3)), gpt(decode(401, IMG3)))
    write_mrseg(root, "mr_missing", [three_rounds(), missing])
    with pytest.raises(FileNotFoundError, match=f"MRSeg\\|mr_missing: 1 files missing .*{IMG3}"):
        load_mrseg(root, "mr_missing", None)
    kept = load_mrseg(root, "mr_missing", None, strict=False)
    assert [r.conversation_index for r in kept] == [0]
    write_store(masks_dir / "coco2014", {IMG1: 2})
    (record,) = load_mrseg(root, "mr_missing", masks_dir, strict=False)
    assert record.proposals is not None
    assert record.proposal_key == IMG1
    assert record.proposals.num_proposals(IMG1) == 2
    write_mrseg(root, "mr_two_images", [three_rounds(), again_rounds()])
    with pytest.raises(FileNotFoundError, match=f"1 images not in the proposal store .*{IMG2}"):
        load_mrseg(root, "mr_two_images", masks_dir)


def test_paco_lvis(tmp_path):
    root, masks_dir = tmp_path / "dataset", tmp_path / "sam_masks"
    boxes = [(1, (0, 0, 10, 10)), (2, (10, 5, 30, 20))]
    write_part_json(
        root / "vlpart/paco/annotations/paco_lvis_v1_val.json",
        f"train2017/{PACO_IMAGE}", [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], boxes,
    )  # fmt: skip
    write_image(root / "coco/train2017" / PACO_IMAGE)
    write_store(masks_dir / "coco2017", {PACO_IMAGE: 3})
    paco = f"coco/train2017/{PACO_IMAGE}"
    conversation = entry(
        # val2017 is not there: upstream's missing-file rewrite reads train2017
        human(f"[IMAGE256:coco/val2017/{PACO_IMAGE}] The wheel."),
        gpt(f"[MASK-DECODE:{paco}|paco_lvis|1]"),
        human(f"[MASK-ENCODE:{paco}|paco_lvis|1][BOX-ENCODE:{paco}|paco_lvis|1]The can near it."),
        gpt(f"[MASK-DECODE:relational:1:2:{paco}:paco_lvis]"),
    )
    write_mrseg(root, "mr_paco_val", [conversation])
    (record,) = load_mrseg(root, "mr_paco_val", masks_dir)
    assert record.image_path == root / "coco/train2017" / PACO_IMAGE
    assert record.proposal_key == PACO_IMAGE
    assert record.proposals.num_proposals(PACO_IMAGE) == 3
    assert record.conversations[0][1] == ("[REF:1]The can near it.", "[SEG].")
    np.testing.assert_array_equal(
        record.masks(HEIGHT, WIDTH), np.stack([box(0, 0, 10, 10), box(10, 5, 30, 20)])
    )
