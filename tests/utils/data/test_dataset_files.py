"""Build-time checks shared by the loaders: skip-and-count in training, stop in evaluation."""

import json
import logging

import pytest

from tests.utils.data.loader_fixtures import write_image, write_store
from utils.data.dataset_files import keep_available, open_proposal_store
from utils.proposal_store import ProposalReader


@pytest.fixture
def files(tmp_path):
    for name in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{name}.jpg")
    # a: 2 proposals, b: none, c: not in the store, d: no image file
    write_store(tmp_path / "store", {"a.jpg": 2, "b.jpg": 0, "d.jpg": 1})
    items = [tmp_path / "images" / f"{n}.jpg" for n in "abcd"]
    return items, ProposalReader(tmp_path / "store")


def test_training_skips_and_counts(files, caplog):
    items, store = files
    kept = keep_available(items, "toy", lambda p: p, store, lambda p: p.name)
    assert [p.name for p in kept] == ["a.jpg"]
    assert "toy: skipping 3 of 4 entries: 1 files missing" in caplog.text
    assert "1 images not in the proposal store" in caplog.text
    assert "1 images have zero proposals" in caplog.text
    assert "b.jpg" in caplog.text


def test_evaluation_stops_on_missing_but_keeps_zero_proposal_images(files, caplog):
    items, store = files
    with pytest.raises(FileNotFoundError, match=r"toy: 1 files missing \(.*d\.jpg\); 1 images"):
        keep_available(items, "toy", lambda p: p, store, lambda p: p.name, strict=True)
    with caplog.at_level(logging.WARNING):
        kept = keep_available(items[:2], "toy", lambda p: p, store, lambda p: p.name, strict=True)
    assert [p.name for p in kept] == ["a.jpg", "b.jpg"]
    assert "scored as empty predictions: b.jpg" in caplog.text


def test_nothing_usable_and_missing_store(files, tmp_path):
    items, _ = files
    with pytest.raises(FileNotFoundError, match="toy: no usable entries"):
        keep_available(items[3:], "toy", lambda p: p, None)
    with pytest.raises(FileNotFoundError, match="prepare_datasets.prepare_ade20k"):
        open_proposal_store(tmp_path, "ade20k")
    assert open_proposal_store(None, "ade20k") is None


def test_num_proposals_from_both_store_formats(files, tmp_path):
    _, store = files
    assert [store.num_proposals(k) for k in ("a.jpg", "b.jpg", "d.jpg")] == [2, 0, 1]
    with pytest.raises(KeyError, match="no proposals for image 'c.jpg'"):
        store.num_proposals("c.jpg")
    records = [{"image": "x.jpg", "target_size": [2, 2], "masks": [{}, {}, {}]},
               {"image": "y.jpg", "target_size": [2, 2], "masks": []}]  # fmt: skip
    (tmp_path / "js").mkdir()
    (tmp_path / "js/masks.json").write_text(json.dumps(records))
    reader = ProposalReader(tmp_path / "js")
    assert [reader.num_proposals("x.jpg"), reader.num_proposals("y.jpg")] == [3, 0]
