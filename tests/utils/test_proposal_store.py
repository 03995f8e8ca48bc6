import json
import pickle

import h5py
import numpy as np
import pytest
import torch

from utils.masks import encode_rles
from utils.proposal_store import (
    H5StoreWriter,
    ImageProposals,
    ProposalReader,
    build_proposal_sample,
    top_k_indices,
)
from utils.text_files import DatasetFormatError


def make_proposals(masks, predicted_iou=None):
    masks = np.asarray(masks, bool)
    k, h, w = masks.shape
    return ImageProposals(
        height=h,
        width=w,
        rle_counts=encode_rles(masks),
        area=masks.reshape(k, h * w).sum(1),
        bbox=np.arange(4 * k, dtype=np.float32).reshape(k, 4),
        predicted_iou=np.linspace(0.9, 0.99, k) if predicted_iou is None else predicted_iou,
        stability_score=np.full(k, 0.97),
        point_coords=np.arange(2 * k, dtype=np.float32).reshape(k, 2),
    )


def random_proposals(seed, k, h=6, w=5):
    return make_proposals(np.random.default_rng(seed).random((k, h, w)) > 0.6)


def assert_same(a: ImageProposals, b: ImageProposals):
    assert (a.height, a.width) == (b.height, b.width)
    assert a.rle_counts == b.rle_counts
    for field in ("area", "bbox", "predicted_iou", "stability_score", "point_coords"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_from_amg_records_binary_and_rle_agree():
    masks = np.random.default_rng(1).random((3, 4, 5)) > 0.5
    ref = make_proposals(masks)
    base = [
        {
            "area": int(ref.area[i]),
            "bbox": ref.bbox[i].tolist(),
            "predicted_iou": float(ref.predicted_iou[i]),
            "stability_score": float(ref.stability_score[i]),
            "point_coords": [ref.point_coords[i].tolist()],
            "crop_box": [0, 0, 5, 4],
        }
        for i in range(3)
    ]
    binary = [dict(r, segmentation=m) for r, m in zip(base, masks)]
    rle = [
        dict(r, segmentation={"size": [4, 5], "counts": c.decode()})
        for r, c in zip(base, ref.rle_counts)
    ]
    assert_same(ImageProposals.from_amg_records(binary, 4, 5), ref)
    assert_same(ImageProposals.from_amg_records(rle, 4, 5), ref)
    assert np.array_equal(ref.decode([2, 0]), masks[[2, 0]])
    with pytest.raises(ValueError, match=r"record 0: mask shape \(4, 5\) != image size \(5, 5\)"):
        ImageProposals.from_amg_records(binary, 5, 5)


def test_h5_round_trip_lazy_reader(tmp_path):
    path = tmp_path / "split" / "masks.h5"
    images = {f"img{i:02d}.jpg": random_proposals(i, k=i % 4) for i in range(7)}
    with H5StoreWriter(path, {"points_per_side": 32}, flush_every=2) as writer:
        for name in sorted(images):
            writer.add(name, images[name])
        writer.add_failure("bad.jpg", "zero bytes")
    reader = ProposalReader(path.parent)  # a directory resolves to its masks.h5
    assert len(reader) == 7
    assert reader.names() == sorted(images)
    assert "img03.jpg" in reader
    assert "nope.jpg" not in reader
    for name, proposals in images.items():
        assert_same(reader.get(name), proposals)
    assert len(reader.get("img00.jpg")) == 0
    assert reader.generator == {"points_per_side": 32}
    with pytest.raises(KeyError, match="bad.jpg.*failed during preparation: zero bytes"):
        reader.get("bad.jpg")
    with pytest.raises(KeyError, match="no proposals for image 'nope.jpg'"):
        reader.get("nope.jpg")
    clone = pickle.loads(pickle.dumps(reader))  # e.g. spawned DataLoader workers
    assert_same(clone.get("img05.jpg"), images["img05.jpg"])
    with h5py.File(path) as f:
        assert f.attrs["num_proposals"] == sum(len(p) for p in images.values())


def test_writer_is_atomic_and_checks_order(tmp_path):
    path = tmp_path / "masks.h5"
    with H5StoreWriter(path) as writer:
        writer.add("a.jpg", random_proposals(0, 2))
    writer = H5StoreWriter(path)
    writer.add("b.jpg", random_proposals(1, 1))
    with pytest.raises(ValueError, match="'a.jpg' is out of order"):
        writer.add("a.jpg", random_proposals(2, 1))
    writer.abort()
    assert ProposalReader(path).names() == ["a.jpg"]  # the old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.h5"]


def test_json_reader_reads_upstream_records(tmp_path):
    proposals = random_proposals(3, 2)
    record = {
        "image": "x.jpg",
        "target_size": [6, 5],
        "masks": [
            {
                "segmentation": {"size": [6, 5], "counts": proposals.rle_counts[i].decode()},
                "area": int(proposals.area[i]),
                "bbox": proposals.bbox[i].tolist(),
                "predicted_iou": float(proposals.predicted_iou[i]),
                "point_coords": [proposals.point_coords[i].tolist()],
                "stability_score": float(proposals.stability_score[i]),
                "crop_box": [0, 0, 5, 6],
            }
            for i in range(2)
        ],
    }
    (tmp_path / "masks.json").write_text(json.dumps([record]))
    reader = ProposalReader(tmp_path)
    assert reader.is_json
    assert reader.names() == ["x.jpg"]
    assert_same(reader.get("x.jpg"), proposals)
    (tmp_path / "masks.json").write_text("[{")
    with pytest.raises(ValueError, match="masks.json: not valid JSON"):
        ProposalReader(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no masks.h5 or masks.json"):
        ProposalReader(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="proposal store .*nothing.h5 does not exist"):
        ProposalReader(tmp_path / "nothing.h5")


def test_top_k_orders_and_ties():
    masks = np.zeros((4, 4, 4), bool)
    masks[0, :1] = True  # area 4
    masks[1, :2] = True  # area 8
    masks[2, :1] = True  # area 4 (tie with 0, stays after it)
    masks[3, :3] = True  # area 12
    proposals = make_proposals(masks, predicted_iou=np.array([0.5, 0.9, 0.99, 0.1]))
    assert top_k_indices(proposals, 3).tolist() == [3, 1, 0]
    assert top_k_indices(proposals, 50, "predicted_iou").tolist() == [2, 1, 0, 3]
    with pytest.raises(ValueError, match="unknown proposal order 'random'"):
        top_k_indices(proposals, 3, "random")


def test_build_proposal_sample_targets_by_hand():
    masks = np.zeros((3, 4, 8), bool)
    masks[0, :, :4] = True  # left half, area 16
    masks[1, :2, :4] = True  # top-left quarter, area 8
    masks[2, :, :] = True  # everything, area 32
    proposals = make_proposals(masks)
    gt = np.zeros((1, 8, 16), np.uint8)  # original resolution, twice the store's
    gt[0, :4, :8] = 1  # = proposal 1 at store resolution
    gt[0, 4:, :8] = 255  # ignored, counts as background
    sample = build_proposal_sample(proposals, gt, top_k=2, size=8, antialias=False)
    assert sample.indices.tolist() == [2, 0]  # largest two by area
    assert sample.weight_maps.shape == (2, 8, 8)
    assert sample.masks.shape == (2, 4, 8)
    assert torch.allclose(sample.iou, torch.tensor([[8 / 32, 8 / 16]]))
    assert torch.allclose(sample.iop, torch.tensor([[8 / 32, 8 / 16]]))
    # Padded to 8x8 (rows 4-7 zero) then identity resize.
    assert sample.weight_maps[1, :4, :4].eq(1).all()
    assert sample.weight_maps[1, 4:].eq(0).all()
    assert torch.equal(sample.bbox, torch.from_numpy(proposals.bbox[[2, 0]]))
    no_gt = build_proposal_sample(proposals, None)
    assert no_gt.iou.shape == (0, 3)
    assert no_gt.weight_maps.shape == (3, 256, 256)


def test_damaged_h5_store_is_a_format_error_naming_it(tmp_path):
    path = tmp_path / "masks.h5"
    with H5StoreWriter(path) as writer:
        for i in range(3):
            writer.add(f"img{i}.jpg", random_proposals(i, 3))
    data = path.read_bytes()
    truncated = tmp_path / "truncated" / "masks.h5"
    truncated.parent.mkdir()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFormatError, match=f"{truncated}: truncated or corrupt"):
        ProposalReader(truncated)
    with h5py.File(path, "a") as file:
        del file["images/offset"]
    with pytest.raises(DatasetFormatError, match=f"{path}: truncated or corrupt.*offset"):
        ProposalReader(path)


def test_damaged_chunk_names_the_store_and_the_image(tmp_path):
    path = tmp_path / "masks.h5"
    with H5StoreWriter(path) as writer:
        for i in range(2):
            writer.add(f"img{i}.jpg", random_proposals(i, 3))
    with h5py.File(path, "a") as file:
        del file["proposals/rle_bytes"]  # the index still opens; one image's data does not
    reader = ProposalReader(path)
    assert reader.names() == ["img0.jpg", "img1.jpg"]
    with pytest.raises(DatasetFormatError, match=f"{path}: image 'img1.jpg': its proposals cannot"):
        reader.get("img1.jpg")
