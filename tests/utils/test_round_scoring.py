"""Per-round MRSeg metrics (gIoU, cIoU, P@0.5) against hand computations, directly and through
``eval.py --pred_dir`` on an MRSeg fixture file."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

import eval as eval_script
from tests.utils.data.loader_fixtures import box
from tests.utils.data.test_mrseg import (
    again_rounds,
    decode,
    entry,
    gpt,
    human,
    image_tag,
    ref,
    three_rounds,
    unresolved_reference,
    write_coco,
    write_mrseg,
)
from utils.data.mrseg import SKIP_UNRESOLVED, load_mrseg
from utils.metrics import MultiRoundMetrics, box_iou, mask_box
from utils.round_scoring import score_multi_round_predictions

# Conversation 0 (targets: left box 100 px, right box 100 px, two bottom boxes 50 + 100 px) and
# conversation 2 (the middle strip, 200 px, twice); conversation 1 is skipped by the loader.
# round conv prediction           I    U    IoU  pred box      GT box        box IoU  hit
#   1    0   box(0,0,10,5)        50   100  0.5  (0,0,10,5)    (0,0,10,10)   0.5      no (not > .5)
#   2    0   box(12,0,20,10)      80   100  0.8  (12,0,20,10)  (10,0,20,10)  0.8      yes
#   3    0   missing PNG (empty)  0    150  0    (0,0,0,0)     (0,10,30,20)  0        no
#   1    2   empty PNG            0    200  0    (0,0,0,0)     (5,5,25,15)   0        no
#   2    2   the strip itself     200  200  1    (5,5,25,15)   (5,5,25,15)   1        yes
EXPECTED = {
    "per_round": [
        {"round": 1, "giou": 0.25, "ciou": 50 / 300, "p_at_05": 0.0, "count": 2},
        {"round": 2, "giou": 0.9, "ciou": 280 / 300, "p_at_05": 1.0, "count": 2},
        {"round": 3, "giou": 0.0, "ciou": 0.0, "p_at_05": 0.0, "count": 1},
    ],
    "rounds_2plus": {"giou": 0.6, "ciou": 280 / 450, "p_at_05": 2 / 3, "count": 3},
    "overall": {"giou": 0.46, "ciou": 330 / 750, "p_at_05": 0.4, "count": 5},
}
PREDICTIONS = {
    (0, 1): box(0, 0, 10, 5),
    (0, 2): box(12, 0, 20, 10),
    (2, 1): np.zeros_like(box(0, 0, 1, 1)),
    (2, 2): box(5, 5, 25, 15),
}


def assert_summary(summary: dict, expected: dict = EXPECTED) -> None:
    assert len(summary["per_round"]) == len(expected["per_round"])
    for got, want in zip(summary["per_round"], expected["per_round"]):
        assert got == pytest.approx(want)
    assert summary["rounds_2plus"] == pytest.approx(expected["rounds_2plus"])
    assert summary["overall"] == pytest.approx(expected["overall"])


def two_rounds_on_image_2() -> dict:
    """The strip twice (targets 201, 201)."""
    return entry(
        human(image_tag("COCO_train2014_000000000002.jpg") + "The strip."),
        gpt(decode(201, "COCO_train2014_000000000002.jpg")),
        human(ref(201, "COCO_train2014_000000000002.jpg") + "Again."),
        gpt(decode(201, "COCO_train2014_000000000002.jpg")),
    )


@pytest.fixture
def scored(tmp_path):
    """``(dataset_dir, pred_dir)``: ``mr_small_val`` (conversations 0 and 2 usable) and PNGs for
    every round but conversation 0's third (grayscale 0/255, round 2 as RGB)."""
    root, preds = tmp_path / "dataset", tmp_path / "preds"
    write_coco(root)
    write_mrseg(
        root, "mr_small_val", [three_rounds(), unresolved_reference(), two_rounds_on_image_2()]
    )
    for (index, round_index), mask in PREDICTIONS.items():
        path = preds / str(index) / f"round_{round_index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = mask.astype(np.uint8) * 255
        image = np.stack([pixels] * 3, axis=2) if round_index == 2 else pixels
        Image.fromarray(image).save(path)
    return root, preds


def test_boxes():
    assert mask_box(box(2, 3, 7, 9)) == (2, 3, 7, 9)
    assert mask_box(np.zeros((4, 5), np.uint8)) == (0, 0, 0, 0)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 0, 0), (0, 0, 10, 10)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_metrics_by_hand():
    metrics = MultiRoundMetrics()
    targets = {
        (0, 1): box(0, 0, 10, 10),
        (0, 2): box(10, 0, 20, 10),
        (0, 3): np.maximum(box(0, 10, 5, 20), box(20, 10, 30, 20)),
        (2, 1): box(5, 5, 25, 15),
        (2, 2): box(5, 5, 25, 15),
    }
    for (index, round_index), gt in targets.items():
        pred = PREDICTIONS.get((index, round_index), np.zeros_like(gt))
        score = metrics.update(pred, gt, round_index, f"c{index}")
        if (index, round_index) == (0, 1):
            assert (score.intersection, score.union, score.iou) == (50, 100, pytest.approx(0.5))
            assert (score.pred_box, score.gt_box) == ((0, 0, 10, 5), (0, 0, 10, 10))
            assert score.box_iou == pytest.approx(0.5)
            assert not score.hit  # 0.5 is not strictly above 0.5
        if (index, round_index) == (0, 3):
            assert (score.pred_box, score.gt_box, score.hit) == (
                (0, 0, 0, 0),
                (0, 10, 30, 20),
                False,
            )
    assert_summary(metrics.summary())


def test_empty_union_and_ignore_pixels():
    """An empty prediction of an empty target scores IoU 1 (SegmentationMetrics' convention) but
    never a box hit; 255 pixels count in neither I, U nor the predicted box."""
    metrics = MultiRoundMetrics()
    empty = np.zeros((4, 4), np.uint8)
    score = metrics.update(empty, empty, 1)
    assert (score.iou, score.hit) == (pytest.approx(1.0), False)
    gt = np.array([[1, 1, 255, 0]] * 2, np.uint8)
    pred = np.array([[1, 1, 1, 1]] * 2, np.uint8)
    score = metrics.update(pred, gt, 2)
    assert (score.intersection, score.union) == (4, 6)
    assert score.pred_box == (0, 0, 4, 2)
    with pytest.raises(ValueError, match="1-based"):
        metrics.update(pred, gt, 0)


def test_score_folder_directly(scored, tmp_path):
    root, preds = scored
    records = load_mrseg(root, "mr_small_val", None)
    assert [r.conversation_index for r in records] == [0, 2]
    out_json = tmp_path / "out" / "mrseg.json"
    results = score_multi_round_predictions(records, preds, out_json)
    assert_summary(results)
    assert results["missing"] == ["0/round_3.png"]
    assert results["num_conversations"] == 2
    saved = json.loads(out_json.read_text())
    assert_summary(saved)
    assert saved["missing"] == ["0/round_3.png"]
    with open(out_json.with_suffix(".csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["round"] for row in rows] == ["1", "2", "3", "2+", "all"]
    assert float(rows[1]["ciou"]) == pytest.approx(280 / 300)
    assert rows[4]["count"] == "5"
    with open(out_json.with_name("mrseg_per_mask.csv")) as handle:
        masks = list(csv.DictReader(handle))
    assert [(m["name"], m["round"], m["intersection"], m["union"], m["hit"]) for m in masks] == [
        ("mr_small_val_0", "1", "50", "100", "0"),
        ("mr_small_val_0", "2", "80", "100", "1"),
        ("mr_small_val_0", "3", "0", "150", "0"),
        ("mr_small_val_2", "1", "0", "200", "0"),
        ("mr_small_val_2", "2", "200", "200", "1"),
    ]
    with pytest.raises(FileNotFoundError, match="prediction folder"):
        score_multi_round_predictions(records, tmp_path / "nowhere", out_json)


def test_eval_pred_dir(scored, tmp_path):
    root, preds = scored
    out_json = tmp_path / "scores.json"
    config = eval_script.EvalConfig(
        dataset_dir=str(root),
        val_dataset="mrseg|mr_small_val",
        pred_dir=str(preds),
        out_json=str(out_json),
    )
    results = eval_script.main(config)
    assert_summary(results)
    assert results["missing"] == ["0/round_3.png"]
    saved = json.loads(out_json.read_text())
    assert_summary(saved)
    skipped = saved["conversation_file"]["skipped_conversations"]
    assert [(s["conversation"], s["reason"]) for s in skipped] == [(1, SKIP_UNRESOLVED)]
    assert saved["conversation_file"]["skipped"] == {SKIP_UNRESOLVED: 1}
    assert (tmp_path / "eval_config.json").is_file()


def test_again_round_is_scored_against_its_own_target(tmp_path):
    """Round 2 of ``again_rounds`` names the same mask as round 1; round 3 comes from refcocog."""
    root, preds = tmp_path / "dataset", tmp_path / "preds"
    write_coco(root)
    write_mrseg(root, "mr_again", [again_rounds()])
    (preds / "0").mkdir(parents=True)
    for round_index, mask in (
        (1, box(5, 5, 25, 15)),
        (2, box(5, 5, 25, 15)),
        (3, box(2, 2, 8, 18)),
    ):
        Image.fromarray(mask * 255).save(preds / "0" / f"round_{round_index}.png")
    records = load_mrseg(root, "mr_again", None)
    results = score_multi_round_predictions(records, preds, tmp_path / "again.json")
    assert [r["giou"] for r in results["per_round"]] == pytest.approx([1.0, 1.0, 1.0])
    assert results["overall"] == pytest.approx(
        {"giou": 1.0, "ciou": 1.0, "p_at_05": 1.0, "count": 3}
    )
    assert results["missing"] == []
