"""gIoU / cIoU / ncIoU against hand-computed values on constructed masks."""

import numpy as np
import pytest
import torch

from utils.metrics import SegmentationMetrics, image_iou, intersection_union, resize_nearest


def _mask(shape, *boxes, value=1):
    mask = np.zeros(shape, np.uint8)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = value
    return mask


def test_intersection_union_by_hand():
    gt = _mask((10, 10), (0, 4, 0, 4))  # 16 target pixels
    pred = _mask((10, 10), (2, 6, 2, 6))  # 16 predicted, 4 overlap
    assert intersection_union(pred, gt) == (4, 28)


def test_ignore_pixels_count_in_neither_set():
    gt = _mask((10, 10), (0, 4, 0, 4))
    gt[4:10, :] = 255  # bottom rows ignored
    pred = _mask((10, 10), (0, 10, 0, 2))  # 20 px, of which 12 lie in ignore
    # valid prediction: rows 0-3, cols 0-1 = 8 px, all inside the target -> I=8, U=8+16-8=16
    assert intersection_union(pred, gt) == (8, 16)


def test_empty_gt_and_empty_prediction_scores_one():
    gt = np.zeros((5, 5), np.uint8)
    assert intersection_union(np.zeros((5, 5)), gt) == (0, 0)
    assert image_iou(0, 0) == 1.0
    assert image_iou(0, 3) == 0.0


def test_prediction_is_resized_nearest_to_gt_size():
    pred = _mask((2, 2), (0, 1, 0, 1))  # top-left quarter
    assert resize_nearest(pred, (4, 4)).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0] * 4, [0] * 4]
    gt = _mask((4, 4), (0, 2, 0, 2))
    assert intersection_union(pred, gt) == (4, 4)


def test_split_metrics_by_hand_with_images_of_different_sizes():
    metrics = SegmentationMetrics()
    # image a: 10x10, I=4, U=28
    metrics.update(_mask((10, 10), (2, 6, 2, 6)), _mask((10, 10), (0, 4, 0, 4)), "a", "short")
    # image b: 20x40, perfect on 100 px
    gt_b = _mask((20, 40), (0, 10, 0, 10))
    metrics.update(gt_b.copy(), gt_b, "b", "long")
    # image c: empty target, empty prediction -> IoU 1, contributes nothing to cIoU
    metrics.update(np.zeros((8, 8)), np.zeros((8, 8), np.uint8), "c", "long")
    result = metrics.compute()
    assert result["giou"] == pytest.approx((4 / 28 + 1 + 1) / 3)
    assert result["ciou"] == pytest.approx((4 + 100) / (28 + 100))
    assert result["num_images"] == 3
    assert result["short/giou"] == pytest.approx(4 / 28)
    assert result["long/giou"] == pytest.approx(1.0)
    assert result["long/num_images"] == 2
    # ncIoU: every image resized to 1024^2; a: 4/28 of 1024^2 scaled areas, b: perfect (1/8 area)
    area = 1024 * 1024
    i_norm = area * 4 / 100 + area / 8
    u_norm = area * 28 / 100 + area / 8
    assert result["nciou"] == pytest.approx(i_norm / u_norm, rel=1e-3)
    assert [s.name for s in metrics.images] == ["a", "b", "c"]


def test_accepts_torch_bool_masks():
    metrics = SegmentationMetrics()
    metrics.update(torch.ones(3, 3, dtype=torch.bool), torch.ones(3, 3, dtype=torch.uint8))
    assert metrics.compute()["giou"] == pytest.approx(1.0)


def _reduce_worker(rank, world_size, port, out_dir):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    metrics = SegmentationMetrics()
    gt = _mask((10, 10), (0, 4, 0, 4))
    pred = gt.copy() if rank == 0 else _mask((10, 10), (2, 6, 2, 6))
    metrics.update(pred, gt, f"img{rank}", "long" if rank else "short")
    metrics.all_reduce(["all", "long", "short"])
    torch.save(metrics.compute(), f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_reduce_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[0] == results[1]
    assert results[0]["giou"] == pytest.approx((1 + 4 / 28) / 2)
    assert results[0]["ciou"] == pytest.approx((16 + 4) / (16 + 28))
    assert results[0]["short/num_images"] == 1
