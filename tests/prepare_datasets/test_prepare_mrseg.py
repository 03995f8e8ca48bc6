"""MRSeg conversation generator on native-format refCOCO/+/g fixtures (refs pickles, COCO
instances with boxes and box polygons, tiny images): the files load with the MRSeg reader, every
relational answer is re-derived here from the boxes, splits share no image, runs are
reproducible, and bad input fails naming the file."""

import json
import math
import pickle
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from prepare_datasets import prepare_mrseg
from prepare_datasets.conversations.relations import Instance, relation_answers, unique_answer
from prepare_datasets.prepare_mrseg import MRSegPrepareConfig, main
from tests.utils.data.loader_fixtures import box, polygon, write_image
from utils.config import parse_config
from utils.data.mrseg import load_mrseg, mrseg_report
from utils.text_files import DatasetFormatError

CATEGORIES = {1: "person", 2: "cup", 3: "dog"}
HAND_IMAGE = 11  # hand-made refcoco train image (W 100, H 60)
VAL_IMAGE, VAL_AND_G_TRAIN = 20, 21  # refcoco val; the second is also refcocog (umd) train
G_VAL_IMAGE, TEST_A_IMAGE, ONE_REF_IMAGE = 30, 31, 32  # refcoco train + refcocog val; testA; 1 ref
RANDOM_IMAGES = range(1, 11)
PHRASES = {
    "left of": "left", "right of": "right", "above": "above", "below": "below",
    "next to": "next_to", "other than": "other", "larger than": "larger",
    "smaller than": "smaller",
}  # fmt: skip
RELATIONAL = re.compile(
    r"^Segment the (?P<cat>.+) (?P<phrase>" + "|".join(PHRASES) + r") (?P<about>instance \d+|it)\.$"
)
TAG_IMAGE = re.compile(r"\[IMAGE256:coco/train2014/(COCO_train2014_\d{12}\.jpg)\]")
ENCODE = re.compile(r"\[MASK-ENCODE:[^|\]]+\|([^|\]]+)\|(\d+)\]")


def file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def hand_boxes() -> list[tuple[int, tuple[int, int, int, int]]]:
    """Image 11, 100x60: three people in a row, two cups, a big and a small dog."""
    return [
        (1, (5, 10, 20, 50)), (1, (40, 10, 55, 50)), (1, (80, 10, 95, 50)),
        (2, (22, 30, 30, 40)), (2, (60, 5, 70, 15)),
        (3, (10, 50, 40, 59)), (3, (70, 50, 75, 55)),
    ]  # fmt: skip


def random_boxes(rng: np.random.Generator, width: int, height: int) -> list:
    boxes = []
    for _ in range(int(rng.integers(3, 8))):
        w, h = int(rng.integers(4, width // 3)), int(rng.integers(4, height // 2))
        x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        boxes.append((int(rng.integers(1, 4)), (x0, y0, x0 + w, y0 + h)))
    return boxes


def write_fixture(root: Path) -> dict:
    """Images, identical instances.json for the three datasets, and their refs pickles.

    Returns ``{"sizes": image id -> (H, W), "boxes": ann id -> (category, box), "sentences":
    (dataset, ann id) -> sentences}``.
    """
    rng = np.random.default_rng(7)
    layouts = {}
    for image_id in [*RANDOM_IMAGES, VAL_IMAGE, VAL_AND_G_TRAIN, G_VAL_IMAGE, TEST_A_IMAGE]:
        width, height = int(rng.integers(60, 120)), int(rng.integers(40, 90))
        layouts[image_id] = (width, height, random_boxes(rng, width, height))
    layouts[HAND_IMAGE] = (100, 60, hand_boxes())
    layouts[ONE_REF_IMAGE] = (50, 40, [(1, (0, 0, 10, 10)), (2, (20, 20, 30, 30))])
    images, annotations, boxes = [], [], {}
    for image_id, (width, height, layout) in sorted(layouts.items()):
        write_image(root / "refer_seg/images/mscoco/images/train2014" / file_name(image_id),
                    height, width, seed=image_id)  # fmt: skip
        images.append({"id": image_id, "file_name": file_name(image_id), "height": height,
                       "width": width})  # fmt: skip
        for index, (category, (x0, y0, x1, y1)) in enumerate(layout):
            ann_id = image_id * 100 + index
            boxes[ann_id] = (CATEGORIES[category], (x0, y0, x1, y1))
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": category, "iscrowd": 0,
                "segmentation": [polygon(x0, y0, x1, y1)], "area": (x1 - x0) * (y1 - y0),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
            })  # fmt: skip
    instances = {
        "images": images, "annotations": annotations,
        "categories": [{"id": i, "name": n} for i, n in CATEGORIES.items()],
    }  # fmt: skip
    plan = {
        "refcoco": {**{i: "train" for i in [*RANDOM_IMAGES, HAND_IMAGE, G_VAL_IMAGE]},
                    VAL_IMAGE: "val", VAL_AND_G_TRAIN: "val", TEST_A_IMAGE: "testA",
                    ONE_REF_IMAGE: "train"},
        "refcoco+": {**{i: "train" for i in range(1, 6)}, VAL_IMAGE: "val"},
        "refcocog": {6: "train", 7: "train", 8: "train", VAL_AND_G_TRAIN: "train",
                     G_VAL_IMAGE: "val"},
    }  # fmt: skip
    sentences = {}
    for dataset, splits in plan.items():
        refs = []
        for image_id, split in splits.items():
            count = 1 if image_id == ONE_REF_IMAGE else min(4, len(layouts[image_id][2]))
            for index in range(count):
                ann_id = image_id * 100 + index
                sents = [f"{dataset} {boxes[ann_id][0]} {index}", f"the [odd] one {index}."]
                sentences[(dataset, ann_id)] = [sents[0], "the (odd) one " + str(index)]
                ref = {"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id}
                refs.append({**ref, "split": split, "sentences": [{"sent": s} for s in sents]})
        folder = root / "refer_seg" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "instances.json").write_text(json.dumps(instances))
        split_by = "umd" if dataset == "refcocog" else "unc"
        (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    sizes = {i: (h, w) for i, (w, h, _) in layouts.items()}
    return {"sizes": sizes, "boxes": boxes, "sentences": sentences}


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "dataset"
    return root, write_fixture(root)


def run(root: Path, **overrides) -> prepare_mrseg.MRSegSummary:
    return main(MRSegPrepareConfig(dataset_dir=str(root), progress=False, **overrides))


def center(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def expected_answers(relation: str, ref_id: int, category: str, fixture: dict, size) -> set:
    """Ids of ``category`` satisfying the relation to ``ref_id``, computed from the boxes."""
    height, width = size
    image_id = ref_id // 100
    ref_cat, (ax0, ay0, ax1, ay1) = fixture["boxes"][ref_id]
    (acx, acy), ref_area = center((ax0, ay0, ax1, ay1)), (ax1 - ax0) * (ay1 - ay0)
    same = {i: b for i, (c, b) in fixture["boxes"].items()
            if i // 100 == image_id and c == category and i != ref_id}  # fmt: skip
    found = set()
    for ann_id, (bx0, by0, bx1, by1) in same.items():
        bcx, bcy = center((bx0, by0, bx1, by1))
        rows_overlap = min(ay1, by1) > max(ay0, by0)
        cols_overlap = min(ax1, bx1) > max(ax0, bx0)
        area = (bx1 - bx0) * (by1 - by0)
        holds = {
            "left": acx - bcx > 0.1 * width and rows_overlap,
            "right": bcx - acx > 0.1 * width and rows_overlap,
            "above": acy - bcy > 0.1 * height and cols_overlap,
            "below": bcy - acy > 0.1 * height and cols_overlap,
            "larger": area >= 1.5 * ref_area,
            "smaller": 1.5 * area <= ref_area,
            "other": category == ref_cat and len(same) == 1,
        }.get(relation)
        if holds:
            found.add(ann_id)
    if relation == "next_to":
        distances = sorted((math.dist(center(b), (acx, acy)), i) for i, b in same.items())
        if len(distances) >= 2 and distances[1][0] >= 1.3 * distances[0][0] > 0:
            found = {distances[0][1]}
    return found


def check_conversation(entry: dict, record, fixture: dict) -> Counter:
    """Every round of one written conversation against the fixture; returns its query types."""
    image_id = int(TAG_IMAGE.search(entry["conversations"][0]["value"]).group(1)[-16:-4])
    size = fixture["sizes"][image_id]
    dataset = entry["conv_id"].rsplit("_", 1)[0]
    targets, types = record.target_ids, Counter()
    assert len(entry["relations"]) == len(targets) == len(entry["conversations"]) // 2
    assert 2 <= len(targets) <= 6
    for k, info in enumerate(entry["relations"], start=1):
        human = entry["conversations"][2 * k - 2]["value"]
        query, target = record.queries[k - 1], targets[k - 1]
        assert info["round"] == k
        assert info["target_id"] == target
        types[info["type"]] += 1
        if k == 1:
            assert record.conversations[0][0] == (f"<image>\n{query}", "[SEG].")
        if info["type"] == "expression":
            assert record.references[k - 1] == ()
            assert query in [f"Segment {s}." for s in fixture["sentences"][(dataset, target)]]
            assert target not in targets[: k - 1]
            continue
        j = info["reference_round"]
        assert record.conversations[0][k - 1] == (f"[REF:{j}]{query}", "[SEG].")
        assert 1 <= j < k
        assert record.references[k - 1] == (j,)
        assert human.count("[MASK-ENCODE:") == human.count("[BOX-ENCODE:") == 1
        assert ENCODE.search(human).groups() == (dataset, str(targets[j - 1]))
        if info["type"] == "copy":
            assert query == f"Segment instance {j} again."
            assert target == targets[j - 1]
            continue
        assert target not in targets[: k - 1]
        match = RELATIONAL.match(query)
        relation = PHRASES[match["phrase"]]
        assert info["relation"] == relation
        assert info["unique"] is True
        assert fixture["boxes"][target][0] == match["cat"]
        if info["type"] == "chain":
            assert match["about"] == "it"
            assert j == k - 1
        else:
            assert match["about"] == f"instance {j}"
        answers = expected_answers(relation, targets[j - 1], match["cat"], fixture, size)
        assert answers == {target}, (query, answers, target)
    masks = record.masks(*size)
    for k, target in enumerate(targets):
        np.testing.assert_array_equal(masks[k], box(*fixture["boxes"][target][1], *size))
    return types


def test_written_files_load_and_every_round_checks_out(dataset):
    root, fixture = dataset
    summary = run(root)
    query_types = Counter()
    images = {}
    for split in ("train", "val"):
        path = root / "mrseg" / f"mr_refcoco_gen_{split}.json"
        assert summary.files[split] == path
        entries = json.loads(path.read_text())
        records = load_mrseg(root, f"mr_refcoco_gen_{split}", None)
        report = mrseg_report(root, f"mr_refcoco_gen_{split}")
        assert report.skipped == []
        assert report.ind_mismatches == []
        assert len(records) == len(entries) == summary.stats[split].conversations
        for entry, record in zip(entries, records):
            query_types += check_conversation(entry, record, fixture)
        images[split] = {r.image_path.name for r in records}
    assert images["val"] == {file_name(VAL_IMAGE), file_name(VAL_AND_G_TRAIN)}
    expected_train = {file_name(i) for i in [*RANDOM_IMAGES, HAND_IMAGE]}
    assert images["train"] == expected_train
    assert not images["train"] & images["val"]
    train = summary.stats["train"]
    assert train.skipped == {
        "held-out image (a val/test image of refCOCO/+/g)": 2,  # 30 (refcoco), 21 (refcocog)
        "fewer than 2 referred annotations": 1,
    }
    assert train.conversations == 11 + 5 + 3  # refcoco, refcoco+, refcocog train images
    assert set(query_types) == {"expression", "relational", "copy", "chain"}
    conversations = sum(stats.conversations for stats in summary.stats.values())
    later = sum(query_types.values()) - conversations  # rounds >= 2
    assert query_types["relational"] + query_types["chain"] > later / 2
    config = json.loads((root / "mrseg/prepare_mrseg_config.json").read_text())
    assert config["out_dir"] == str(root / "mrseg")
    assert config["max_rounds"] == 6


def test_relation_answers_by_hand():
    """Image 11: people at x-centres 12.5, 47.5, 87.5 (rows 10-50), cups, a big and a small dog."""

    def inst(ann_id, category, b):
        return Instance(ann_id, category, b, (b[2] - b[0]) * (b[3] - b[1]))

    people = [inst(i, "person", b) for i, (_, b) in enumerate(hand_boxes()[:3])]
    dogs = [inst(5, "dog", (10, 50, 40, 59)), inst(6, "dog", (70, 50, 75, 55))]
    middle = people[1]
    assert relation_answers("left", middle, people, 100, 60) == [0]
    assert relation_answers("right", middle, people, 100, 60) == [2]
    assert relation_answers("above", middle, people, 100, 60) == []
    assert unique_answer("next_to", middle, people, 100, 60) is None  # 35 vs 40: < 1.3x
    assert unique_answer("next_to", people[0], people, 100, 60) == 1  # 35 vs 75
    assert relation_answers("other", dogs[0], dogs, 100, 60) == [6]
    assert relation_answers("other", middle, dogs, 100, 60) == []  # another category
    assert unique_answer("smaller", dogs[0], dogs, 100, 60) == 6
    assert relation_answers("larger", dogs[0], dogs, 100, 60) == []
    shifted = inst(9, "person", (50, 10, 60, 50))  # centre 55: 7.5 px right of the middle
    assert relation_answers("right", middle, [*people, shifted], 100, 60) == [2]
    with pytest.raises(ValueError, match="unknown relation 'behind'"):
        relation_answers("behind", middle, people, 100, 60)


def test_same_seed_same_bytes_and_overwrite(dataset, tmp_path):
    root, _ = dataset
    first, second = tmp_path / "a", tmp_path / "b"
    run(root, out_dir=str(first), seed=3)
    run(root, out_dir=str(second), seed=3)
    for split in ("train", "val"):
        name = f"mr_refcoco_gen_{split}.json"
        assert (first / name).read_bytes() == (second / name).read_bytes()
    with pytest.raises(FileExistsError, match=r"mr_refcoco_gen_train.json exists .*--overwrite"):
        run(root, out_dir=str(first), seed=4)
    run(root, out_dir=str(first), seed=4, overwrite=True)
    assert (first / "mr_refcoco_gen_train.json").read_bytes() != (
        second / "mr_refcoco_gen_train.json"
    ).read_bytes()


def test_limit_datasets_and_cli(dataset):
    root, _ = dataset
    config = parse_config(
        MRSegPrepareConfig,
        ["--dataset_dir", str(root), "--datasets", "refcocog", "--limit", "2", "--max_rounds",
         "2", "--no-progress", "--name", "small"],
    )  # fmt: skip
    summary = main(config)
    assert summary.stats["train"].conversations == 2
    assert summary.stats["val"].conversations == 2
    assert summary.stats["train"].rounds == {2: 2}
    records = load_mrseg(root, "mr_small_train", None)
    assert [r.conversation_id for r in records] == ["refcocog_6", "refcocog_7"]


def test_overlap_is_refused_when_held_out_images_leak(dataset, monkeypatch):
    root, _ = dataset
    monkeypatch.setattr(prepare_mrseg, "held_out_images", lambda refers: set())
    with pytest.raises(RuntimeError, match=r"1 images are in both the train and the val"):
        run(root)
    assert not (root / "mrseg/mr_refcoco_gen_train.json").exists()


def test_bad_input_names_the_file(dataset):
    root, _ = dataset
    refs = root / "refer_seg/refcocog/refs(umd).p"
    refs.rename(refs.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(refs))):
        run(root)
    refs.with_suffix(".bak").rename(refs)
    instances = root / "refer_seg/refcoco+/instances.json"
    content = json.loads(instances.read_text())
    instances.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(instances))):
        run(root)
    instances.write_text("{not json")
    with pytest.raises(DatasetFormatError, match=re.escape(str(instances))):
        run(root)
    del content["categories"]
    instances.write_text(json.dumps(content))
    with pytest.raises(DatasetFormatError, match=re.escape(str(instances)) + ".*categories"):
        run(root)
    content["categories"] = [{"id": 1, "name": "person"}]  # 2 and 3 unknown
    instances.write_text(json.dumps(content))
    with pytest.raises(DatasetFormatError, match=r"annotation \d+ has category [23], not in"):
        run(root)
    refs.write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match=re.escape(str(refs)) + ": not a refer refs"):
        run(root)
    with pytest.raises(ValueError, match="--max_rounds must be >= 2"):
        run(root, max_rounds=1)
