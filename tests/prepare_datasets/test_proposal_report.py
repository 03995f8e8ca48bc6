import json

import pytest
import torch

from prepare_datasets import prepare_reason_seg
from prepare_datasets.proposal_report import ReportConfig, greedy_union_iou, main
from prepare_datasets.proposals.runner import run_prepare
from tests.prepare_datasets.fixtures import BoxGenerator, write_image

# Target = A | B (200 px). Proposals: image (2400 px), A, B, C = x0-29 (300 px, holds A only).
A, B, C = (0, 0, 9, 9), (30, 0, 39, 9), (0, 0, 29, 9)


def test_greedy_union_by_hand():
    target = torch.tensor([1, 1, 1, 0], dtype=torch.float32)
    proposals = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    assert greedy_union_iou(proposals, target) == pytest.approx(1.0)  # first two, not the third
    # Greedy is a lower bound: taking the best single first (3/4) blocks the exact union.
    with_everything = torch.cat([proposals[:2], torch.ones(1, 4)])
    assert greedy_union_iou(with_everything, target) == pytest.approx(0.75)
    assert greedy_union_iou(proposals[:0], target) == 0.0


@pytest.fixture
def prepared(tmp_path):
    root = tmp_path / "dataset"
    folder = root / "reason_seg/ReasonSeg/val"
    write_image(folder / "a.jpg", height=40, width=60)
    shapes = [
        {"label": "target", "points": [[0, 0], [9, 0], [9, 9], [0, 9]]},
        {"label": "target", "points": [[30, 0], [39, 0], [39, 9], [30, 9]]},
    ]
    (folder / "a.json").write_text(json.dumps({"text": ["x"], "shapes": shapes}))
    config = prepare_reason_seg.ReasonSegPrepareConfig(
        dataset_dir=str(root), sam_masks_dir=str(tmp_path / "masks"), splits="val", fsync=False
    )
    run_prepare(config, prepare_reason_seg.split_jobs(config), generator=BoxGenerator([A, B, C]))
    return root, tmp_path / "masks"


def test_report_numbers_by_hand(prepared, tmp_path):
    root, masks = prepared
    rows = main(
        ReportConfig(
            datasets="reason_seg",
            dataset_dir=str(root),
            sam_masks_dir=str(masks),
            prepare_args="--splits val",
        )
    )
    row = rows["reason_seg"]
    assert row["images"] == 1
    assert row["targets"] == 1
    assert row["mean_k"] == 4
    assert row["single_topk"] == pytest.approx(0.5)  # A or B alone
    assert row["union_topk"] == pytest.approx(1.0)  # A | B
    assert row["recall@0.5"] == 1.0
    assert row["recall@0.75"] == 0.0
    assert row["topk_drops_best"] == 0.0
    saved = json.loads((masks / "proposal_report.json").read_text())
    assert saved["datasets"]["reason_seg"] == row
    # Top-2 by area keeps only the image and C: the best proposal (A) is dropped.
    out = tmp_path / "top2.json"
    row = main(
        ReportConfig(
            datasets="reason_seg",
            dataset_dir=str(root),
            sam_masks_dir=str(masks),
            top_k=2,
            prepare_args="--splits val --unknown_flag 1",
            output=str(out),
        )
    )["reason_seg"]
    assert row["single_topk"] == pytest.approx(100 / 400)
    assert row["single_all"] == pytest.approx(0.5)
    assert row["union_topk"] == pytest.approx(100 / 400)
    assert row["topk_drops_best"] == 1.0
    assert out.is_file()


def test_unknown_dataset_is_named(prepared):
    with pytest.raises(ValueError, match=r"unknown datasets \['cityscapes'\]"):
        main(ReportConfig(datasets="cityscapes"))
