"""The prepare runner driving the real SAM generators (tiny random SAM, no weights needed)."""

import numpy as np

from prepare_datasets.prepare_reason_seg import ReasonSegPrepareConfig, main
from prepare_datasets.proposals.runner import make_generator, prepare_image
from tests.prepare_datasets.fixtures import write_image
from utils.proposal_store import ProposalReader


def test_prepare_with_tiny_sam_matches_a_direct_generator_call(tmp_path, tiny_checkpoints):
    root = tmp_path / "dataset"
    folder = root / "reason_seg/ReasonSeg/val"
    for i, (height, width) in enumerate([(48, 64), (40, 30)]):
        write_image(folder / f"{i}.jpg", height, width, seed=i)
    stores = {}
    for backend in ("sam", "sam_reference"):
        config = ReasonSegPrepareConfig(
            dataset_dir=str(root), sam_masks_dir=str(tmp_path / backend), splits="val",
            backend=backend, vision_pretrained=str(tiny_checkpoints.sam), device="cpu",
            points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, fsync=False,
        )  # fmt: skip
        (summary,) = main(config)
        assert summary.merged
        assert not summary.failures
        stores[backend] = ProposalReader(summary.store_path)
    reader = stores["sam"]
    assert reader.names() == ["0.jpg", "1.jpg"]
    assert reader.generator["points_per_side"] == 8
    assert reader.generator["checkpoint"] == tiny_checkpoints.sam.name
    direct = make_generator(config)(prepare_image(folder / "1.jpg"))
    stored = stores["sam_reference"].get("1.jpg")
    assert (stored.height, stored.width) == (40, 30)
    assert stored.rle_counts == direct.rle_counts
    assert len(reader.get("0.jpg")) > 0
    # Both backends store the same number of masks of the same size for each image.
    for name in reader.names():
        fast, ref = reader.get(name), stores["sam_reference"].get(name)
        assert (fast.height, fast.width) == (ref.height, ref.width)
        assert np.array_equal(np.sort(fast.area), np.sort(ref.area))
