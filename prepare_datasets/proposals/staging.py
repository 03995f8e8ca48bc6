"""Crash-safe staging of prepared images, merged into one ``masks.h5`` per split.

Why: an HDF5 file being written when a process is killed can be left unreadable, and SAM on a
large dataset runs for days on many processes. So nobody appends to ``masks.h5``. Instead:

1. Each shard process appends one *record* per finished image (its proposals, or the reason it
   failed) to its own log, ``<split>/staging/shard-XXXXX-of-YYYYY.log``, holding an exclusive
   ``flock`` on it (a second process on the same shard gets a clear error). A record is
   ``magic | payload length | CRC32 | payload`` where the payload is an ``.npz`` (no pickles)
   with a JSON header; it is flushed and fsync-ed before the next image starts.
2. A kill at any moment leaves at most a torn last record. Readers stop at the first record
   whose magic, length or CRC does not check out; a writer reopening the log truncates it there.
   So only the image in flight is lost, and every file stays readable.
3. `merge_split` (run by whichever shard finishes the split last, or by ``--merge_only``) reads
   the current ``masks.h5`` plus every log, writes a new ``masks.h5`` sorted by image name to a
   temporary file and ``os.replace``-s it (readers see the old or the new file, never a partial
   one), then deletes the logs no live process holds. Since the store is sorted by name, any
   split into shards, any order and any number of interruptions give the same store.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.proposal_store import H5_NAME, H5StoreWriter, ImageProposals, ProposalReader
from utils.proposal_store import name_sort_key as _sort_key

logger = logging.getLogger(__name__)

STAGING_DIR = "staging"
_MAGIC = b"LSP1"
_HEADER = struct.Struct("<4sQI")  # magic, payload length, CRC32 of the payload
_MAX_PAYLOAD = 1 << 34  # a corrupt length field must not make us allocate terabytes


@dataclass
class StagedImage:
    """One finished image: its proposals, or ``failure`` (why it has none)."""

    name: str
    proposals: ImageProposals | None = None
    failure: str | None = None


def encode_record(item: StagedImage) -> bytes:
    """Frame one image as ``magic | length | crc32 | npz payload``."""
    header = {"name": item.name, "failure": item.failure}
    arrays = {}
    if item.proposals is not None:
        p = item.proposals
        header.update(height=int(p.height), width=int(p.width))
        arrays = {
            "area": p.area,
            "bbox": p.bbox,
            "predicted_iou": p.predicted_iou,
            "stability_score": p.stability_score,
            "point_coords": p.point_coords,
            "rle_lengths": np.array([len(c) for c in p.rle_counts], dtype=np.int64),
            "rle_bytes": np.frombuffer(b"".join(p.rle_counts), dtype=np.uint8),
        }
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    payload = buffer.getvalue()
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode_record(payload: bytes) -> StagedImage:
    """Inverse of `encode_record` (without the frame)."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        header = json.loads(data["header"].tobytes().decode())
        if "height" not in header:
            return StagedImage(header["name"], failure=header["failure"] or "unknown failure")
        ends = np.cumsum(data["rle_lengths"])
        blob = data["rle_bytes"].tobytes()
        counts = [blob[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
        proposals = ImageProposals(
            height=header["height"],
            width=header["width"],
            rle_counts=counts,
            area=data["area"],
            bbox=data["bbox"],
            predicted_iou=data["predicted_iou"],
            stability_score=data["stability_score"],
            point_coords=data["point_coords"],
        )
    return StagedImage(header["name"], proposals=proposals)


def scan_log(path: str | os.PathLike) -> Iterator[tuple[int, StagedImage]]:
    """Yield ``(offset, image)`` for every intact record; stops silently at a torn tail."""
    with open(path, "rb") as handle:
        offset = 0
        while True:
            frame = handle.read(_HEADER.size)
            if len(frame) < _HEADER.size:
                return
            magic, length, crc = _HEADER.unpack(frame)
            if magic != _MAGIC or length > _MAX_PAYLOAD:
                return
            payload = handle.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            yield offset, decode_record(payload)
            offset += _HEADER.size + length


def valid_log_end(path: str | os.PathLike) -> int:
    """Byte offset just after the last intact record of a log."""
    end = 0
    with open(path, "rb") as handle:
        while True:
            frame = handle.read(_HEADER.size)
            if len(frame) < _HEADER.size:
                return end
            magic, length, crc = _HEADER.unpack(frame)
            if magic != _MAGIC or length > _MAX_PAYLOAD:
                return end
            payload = handle.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return end
            end += _HEADER.size + length


def read_record(handle, offset: int) -> StagedImage:
    """The record at ``offset`` of an open log (offsets come from `scan_log`)."""
    handle.seek(offset)
    _, length, _ = _HEADER.unpack(handle.read(_HEADER.size))
    return decode_record(handle.read(length))


class StagingLog:
    """Append-only log of one shard; holds an exclusive lock while open.

    Args:
        split_dir: the split's directory (``masks.h5`` lives there).
        shard_id, num_shards: name the log, ``staging/shard-XXXXX-of-YYYYY.log``.
        fsync: force each record to disk (survives power loss, not only a killed process).
    """

    def __init__(self, split_dir: str | os.PathLike, shard_id: int, num_shards: int, fsync=True):
        self.path = Path(split_dir) / STAGING_DIR / f"shard-{shard_id:05d}-of-{num_shards:05d}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.handle = open(self.path, "ab+")  # noqa: SIM115 (kept open for appends)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise RuntimeError(
                f"{self.path} is locked: another process is already preparing shard {shard_id} "
                f"of {num_shards} for this split"
            ) from None
        end = valid_log_end(self.path)
        if end < os.path.getsize(self.path):
            logger.warning(
                "%s: dropping a torn record at byte %d (interrupted run)", self.path, end
            )
            self.handle.truncate(end)
        self.handle.seek(0, os.SEEK_END)

    def append(self, item: StagedImage) -> None:
        """Durably add one finished image."""
        self.handle.write(encode_record(item))
        self.handle.flush()
        if self.fsync:
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()  # also releases the lock

    def __enter__(self) -> StagingLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class SplitState:
    """What a split already holds: finished names (with proposals) and failures with reasons."""

    done: set[str]
    failures: dict[str, str]


def _staged_locations(
    split_dir: Path, sizes: dict[Path, int] | None = None
) -> dict[str, tuple[Path, int, str | None]]:
    """name -> (log path, offset, failure) of the best staged record (a success beats a failure).

    ``sizes``, when given, receives each log's size before it was read.
    """
    found: dict[str, tuple[Path, int, str | None]] = {}
    for log in sorted((split_dir / STAGING_DIR).glob("shard-*.log")):
        if sizes is not None:
            sizes[log] = log.stat().st_size
        for offset, item in scan_log(log):
            previous = found.get(item.name)
            if previous is None or previous[2] is not None or item.failure is None:
                found[item.name] = (log, offset, item.failure)
    return found


def split_state(split_dir: str | os.PathLike) -> SplitState:
    """Union of the merged ``masks.h5`` and all staging logs of ``split_dir``."""
    split_dir = Path(split_dir)
    done: set[str] = set()
    failures: dict[str, str] = {}
    if (split_dir / H5_NAME).is_file():
        reader = ProposalReader(split_dir / H5_NAME)
        done.update(reader.names())
        failures.update(reader.failures)
    for name, (_, _, failure) in _staged_locations(split_dir).items():
        if failure is None:
            done.add(name)
            failures.pop(name, None)
        elif name not in done:
            failures[name] = failure
    return SplitState(done=done, failures=failures)


def merge_split(split_dir: str | os.PathLike, generator: dict | None = None) -> SplitState:
    """Rebuild ``<split_dir>/masks.h5`` from itself plus all staging logs (see module doc).

    Merges are serialised by a lock; the result is sorted by name, so it does not depend on
    which shard produced what. Logs still held by a running writer are kept, others removed.
    """
    split_dir = Path(split_dir)
    staging = split_dir / STAGING_DIR
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / "merge.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        h5_path = split_dir / H5_NAME
        old = ProposalReader(h5_path) if h5_path.is_file() else None
        log_sizes: dict[Path, int] = {}
        staged = _staged_locations(split_dir, log_sizes)
        if old is not None and not staged:
            # Nothing new (e.g. another shard merged first): keep the store as it is.
            state = SplitState(done=set(old.names()), failures=dict(old.failures))
            old.close()
            return state
        failures = dict(old.failures) if old is not None else {}
        sources: dict[str, tuple[Path, int] | None] = {}  # None: read from the old h5
        if old is not None:
            sources.update(dict.fromkeys(old.names()))
        for name, (log, offset, failure) in staged.items():
            if failure is None:
                sources[name] = (log, offset)
                failures.pop(name, None)
            elif name not in sources:
                failures[name] = failure
        if old is not None and generator and old.generator and old.generator != generator:
            logger.warning(
                "%s was made with other generator settings %s; new images use %s",
                h5_path,
                old.generator,
                generator,
            )
        settings = generator or (old.generator if old is not None else {})
        handles = {log: open(log, "rb") for log in {s[0] for s in sources.values() if s}}  # noqa: SIM115
        try:
            with H5StoreWriter(h5_path, settings) as writer:
                for name in sorted(sources, key=_sort_key):
                    source = sources[name]
                    if source is None:
                        proposals = old.get(name)
                    else:
                        proposals = read_record(handles[source[0]], source[1]).proposals
                    writer.add(name, proposals)
                for name in sorted(failures, key=_sort_key):
                    writer.add_failure(name, failures[name])
        finally:
            for handle in handles.values():
                handle.close()
            if old is not None:
                old.close()
        _remove_merged_logs(log_sizes)
    logger.info(
        "merged %s: %d images with proposals, %d failed", h5_path, len(sources), len(failures)
    )
    return SplitState(done=set(sources), failures=failures)


def _remove_merged_logs(sizes: dict[Path, int]) -> None:
    """Delete logs now inside masks.h5, unless a running shard holds them or they have grown
    since they were read (their new records wait for the next merge)."""
    for log, size in sizes.items():
        with open(log, "rb") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if log.stat().st_size == size:
                log.unlink()
