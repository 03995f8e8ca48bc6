"""The demo report: chance/oracle IoU by hand, grouping, table, files and mismatches."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from prepare_datasets.demo_report import (
    DemoReportConfig,
    ProposalBaseline,
    build_report,
    format_table,
    main,
    parse_stage_seconds,
    proposal_baselines,
    proposal_ious,
)
from tests.data_fixtures import write_reason_seg


def test_proposal_ious_follow_the_metric():
    label_map = np.zeros((4, 4), np.uint8)
    label_map[0, :2] = 1  # target: 2 pixels
    label_map[3, 3] = 255  # ignored
    proposals = np.zeros((4, 4, 4), bool)
    proposals[0, 0, :2] = True  # exact: 1
    proposals[1, 0, 0] = True  # half: 1/2
    proposals[2, 3, 3] = True  # only an ignored pixel: empty prediction, IoU 0
    proposals[3, 0, :4] = True  # 2 of 4: 1/2
    np.testing.assert_allclose(proposal_ious(proposals, label_map), [1.0, 0.5, 0.0, 0.5])
    # A prediction at another resolution is resized (nearest) to the ground truth first.
    small = np.zeros((1, 2, 2), bool)
    small[0, 0, 0] = True  # covers the 2x2 top-left block: 2 of 4 pixels are target
    np.testing.assert_allclose(proposal_ious(small, label_map), [0.5])
    # An empty target: only an empty prediction scores 1 (as utils.metrics); proposal 2 covers
    # nothing but the ignored pixel, so it counts as empty.
    empty = np.where(label_map == 255, 255, 0).astype(np.uint8)
    np.testing.assert_allclose(proposal_ious(proposals[[2, 0]], empty), [1.0, 0.0])


def _baselines() -> list[ProposalBaseline]:
    return [
        ProposalBaseline("a", "attribute", "short", 0.2, 1.0, 4),
        ProposalBaseline("b", "attribute", "long", 0.1, 0.8, 4),
        ProposalBaseline("c", "spatial", "short", 0.3, 0.9, 3),
    ]


def _eval_metrics() -> dict:
    return {
        "giou": 0.7, "ciou": 0.6, "nciou": 0.65, "num_images": 3, "selection": "argmax",
        "type:attribute/giou": 0.5, "type:attribute/ciou": 0.4, "type:spatial/giou": 1.0,
        "type:spatial/ciou": 1.0, "short/giou": 0.9, "short/ciou": 0.8, "long/giou": 0.3,
        "long/ciou": 0.3,
    }  # fmt: skip


def test_report_puts_chance_and_oracle_beside_the_model_per_group():
    report = build_report(_eval_metrics(), _baselines(), {"generate": 2.0, "train": 100.0})
    assert (report["giou"], report["ciou"]) == (0.7, 0.6)
    assert report["chance_giou"] == pytest.approx(0.2)
    assert report["oracle_giou"] == pytest.approx(0.9)
    attribute = report["per_query_type"]["attribute"]
    assert attribute == pytest.approx(
        {"giou": 0.5, "ciou": 0.4, "chance_giou": 0.15, "oracle_giou": 0.9, "num_images": 2}
    )
    assert report["per_query_type"]["spatial"]["chance_giou"] == pytest.approx(0.3)
    assert report["per_query_length"]["long"]["oracle_giou"] == pytest.approx(0.8)
    assert report["total_seconds"] == pytest.approx(102.0)
    table = format_table(report)
    assert "  attribute" in table
    assert "0.700" in table
    assert "wall time 102s" in table
    with pytest.raises(ValueError, match="scored 5 images but the split has 3"):
        build_report(dict(_eval_metrics(), num_images=5), _baselines())


def test_stage_seconds_parsing():
    assert parse_stage_seconds("generate=3.5, train=250") == {"generate": 3.5, "train": 250.0}
    assert parse_stage_seconds("") == {}
    with pytest.raises(ValueError, match="name=seconds"):
        parse_stage_seconds("train:250")


def test_main_writes_metrics_and_pictures(tmp_path):
    dataset_dir, masks_dir = write_reason_seg(tmp_path / "data", "val", 3, seed=1)
    eval_dir = tmp_path / "eval"
    (eval_dir / "vis").mkdir(parents=True)
    (eval_dir / "vis" / "img_000.png").write_bytes(b"png")
    metrics = {"giou": 0.5, "ciou": 0.5, "nciou": 0.5, "num_images": 3, "selection": "argmax"}
    (eval_dir / "metrics.json").write_text(json.dumps(metrics))
    with open(eval_dir / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "iou"])
        writer.writeheader()
        writer.writerows({"name": f"img_{i:03d}", "iou": 0.5} for i in range(3))
    out_dir = tmp_path / "out"
    config = DemoReportConfig(
        dataset_dir=str(dataset_dir),
        sam_masks_dir=str(masks_dir),
        eval_dir=str(eval_dir),
        out_dir=str(out_dir),
        stage_seconds="train=10",
    )
    report = main(config)
    saved = json.loads((out_dir / "metrics.json").read_text())
    # The fixture's proposals: the two squares, their union and the background; the query asks
    # for the first square, so the oracle is exact and chance is the mean over the four.
    assert saved["oracle_giou"] == pytest.approx(1.0)
    assert 0.25 < saved["chance_giou"] < 0.5
    assert saved["per_query_type"]["unknown"]["num_images"] == 3
    assert saved["stage_seconds"] == {"train": 10.0}
    assert report["num_pictures"] == 1
    assert (out_dir / "vis" / "img_000.png").read_bytes() == b"png"

    (eval_dir / "per_image.csv").write_text("name,iou\nimg_000,1\n")
    with pytest.raises(ValueError, match="images differ"):
        main(config)
    (eval_dir / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="run eval.py first"):
        main(config)


def test_no_target_rows_and_the_free_mode_sit_beside_the_rest():
    baselines = [*_baselines(), ProposalBaseline("d", "no_target", "short", 0.0, 1.0, 3)]
    metrics = dict(
        _eval_metrics(), num_images=4, n_acc=0.5, t_acc=1.0, num_no_target=2, num_rejected=1
    )
    metrics.update({"type:no_target/giou": 1.0, "type:no_target/ciou": 0.0})
    free = {
        "giou": 0.55, "ciou": 0.5, "num_images": 4, "n_acc": 1.0, "t_acc": 0.75,
        "answers": {"no_seg": 0.25, "one_seg": 0.75, "several_seg": 0.0},
        "type:attribute/giou": 0.25, "type:spatial/giou": 1.0, "type:no_target/giou": 1.0,
        "short/giou": 0.75, "long/giou": 0.125,
    }  # fmt: skip
    report = build_report(metrics, baselines, None, free)
    assert (report["n_acc"], report["t_acc"], report["num_no_target"]) == (0.5, 1.0, 2)
    assert report["num_rejected"] == 1
    assert report["per_query_type"]["no_target"]["oracle_giou"] == 1.0
    assert report["free"]["per_query_type"] == {"attribute": 0.25, "no_target": 1.0, "spatial": 1.0}
    assert (report["free"]["n_acc"], report["free"]["t_acc"]) == (1.0, 0.75)
    table = format_table(report)
    assert "free gIoU" in table
    assert "N-acc 0.500 (2 no-target), T-acc 1.000; free: N-acc 1.000, T-acc 0.750" in table
    assert "free answers: no_seg 0.25, one_seg 0.75, several_seg 0.00" in table
    assert table.splitlines()[2].split()[-1] == "0.250"  # attribute's free gIoU
    assert report["free"]["per_query_length"] == {"long": 0.125, "short": 0.75}
    assert table.splitlines()[-3].split()[-1] == "0.750"  # short (after long): its free gIoU
    with pytest.raises(ValueError, match="--free_eval_dir and --split do not match"):
        build_report(metrics, baselines, None, dict(free, num_images=3))
    # Without no-target queries or a free evaluation the report keeps its old keys.
    plain = build_report(_eval_metrics(), _baselines())
    assert not {"n_acc", "free", "num_rejected"} & set(plain)
    assert "free" not in format_table(plain)


def test_a_no_target_query_has_chance_0_and_oracle_1(tmp_path):
    # Its right answer, nothing, is a rejection: no proposal reaches it, rejecting does.
    dataset_dir, masks_dir = write_reason_seg(tmp_path / "data", "val", 2, seed=1)
    path = dataset_dir / "reason_seg" / "ReasonSeg" / "val" / "img_001.json"
    data = json.loads(path.read_text())
    data.update(shapes=[], no_target=True, query_type="no_target")
    path.write_text(json.dumps(data))
    baselines = {b.name: b for b in proposal_baselines(str(dataset_dir), str(masks_dir), "val")}
    assert (baselines["img_001"].chance_iou, baselines["img_001"].oracle_iou) == (0.0, 1.0)
    assert baselines["img_001"].query_type == "no_target"
    assert baselines["img_000"].oracle_iou == pytest.approx(1.0)  # the target query as before
    assert baselines["img_000"].chance_iou > 0
