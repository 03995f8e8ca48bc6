import os

import pytest

from prepare_datasets.proposals.staging import (
    StagedImage,
    StagingLog,
    decode_record,
    encode_record,
    merge_split,
    scan_log,
    split_state,
)
from tests.prepare_datasets.fixtures import box_mask, proposals_from_masks, store_content
from utils.proposal_store import ProposalReader


def item(name, seed=0):
    masks = [box_mask(6, 8, (seed % 4, 0, 5, 3)), box_mask(6, 8, (0, 2, 7, 5))]
    return StagedImage(name, proposals=proposals_from_masks(masks))


def test_record_round_trip():
    staged = item("a.jpg", 2)
    for original in (staged, StagedImage("b.jpg", failure="zero bytes")):
        frame = encode_record(original)
        assert frame[:4] == b"LSP1"
        decoded = decode_record(frame[16:])
        assert decoded.name == original.name
        assert decoded.failure == original.failure
    back = decode_record(encode_record(staged)[16:]).proposals
    assert back.rle_counts == staged.proposals.rle_counts
    assert back.bbox.tolist() == staged.proposals.bbox.tolist()
    assert back.point_coords.tolist() == staged.proposals.point_coords.tolist()
    assert (back.height, back.width) == (6, 8)


def test_torn_tail_at_every_byte_keeps_complete_records(tmp_path):
    log_path = tmp_path / "staging" / "shard-00000-of-00001.log"
    with StagingLog(tmp_path, 0, 1, fsync=False) as log:
        log.append(item("a.jpg", 0))
        log.append(StagedImage("b.jpg", failure="corrupt"))
    full = log_path.read_bytes()
    last = encode_record(item("c.jpg", 1))
    for cut in range(0, len(last), 7):
        log_path.write_bytes(full + last[:cut])  # a kill in the middle of writing c.jpg
        names = [i.name for _, i in scan_log(log_path)]
        assert names == ["a.jpg", "b.jpg"]
    # Reopening truncates the torn record, and appends after the intact ones.
    with StagingLog(tmp_path, 0, 1, fsync=False) as log:
        log.append(item("c.jpg", 1))
    assert [i.name for _, i in scan_log(log_path)] == ["a.jpg", "b.jpg", "c.jpg"]
    assert len(log_path.read_bytes()) == len(full) + len(last)


def test_flipped_byte_stops_reading_at_that_record(tmp_path):
    with StagingLog(tmp_path, 0, 1, fsync=False) as log:
        log.append(item("a.jpg"))
        log.append(item("b.jpg"))
    path = tmp_path / "staging" / "shard-00000-of-00001.log"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # CRC mismatch in the second record
    path.write_bytes(bytes(data))
    assert [i.name for _, i in scan_log(path)] == ["a.jpg"]


def test_second_writer_on_a_shard_is_refused(tmp_path):
    with StagingLog(tmp_path, 1, 4), pytest.raises(RuntimeError, match="already preparing shard 1"):
        StagingLog(tmp_path, 1, 4)


def test_merge_unions_h5_and_logs_and_success_beats_failure(tmp_path):
    with StagingLog(tmp_path, 0, 2, fsync=False) as log:
        log.append(item("b.jpg", 1))
        log.append(StagedImage("c.jpg", failure="unreadable"))
    merge_split(tmp_path, {"backend": "test"})
    assert not list((tmp_path / "staging").glob("*.log"))  # merged logs are removed
    with StagingLog(tmp_path, 1, 2, fsync=False) as log:
        log.append(item("a.jpg", 0))
        log.append(item("c.jpg", 3))  # retried, now fine
        log.append(StagedImage("d.jpg", failure="zero bytes"))
    state = split_state(tmp_path)
    assert state.done == {"a.jpg", "b.jpg", "c.jpg"}
    assert state.failures == {"d.jpg": "zero bytes"}
    merge_split(tmp_path, {"backend": "test"})
    reader = ProposalReader(tmp_path)
    assert reader.names() == ["a.jpg", "b.jpg", "c.jpg"]
    assert reader.failures == {"d.jpg": "zero bytes"}
    assert reader.get("c.jpg").rle_counts == item("c.jpg", 3).proposals.rle_counts
    before = store_content(tmp_path)
    merge_split(tmp_path)  # idempotent
    assert store_content(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["masks.h5", "staging"]
