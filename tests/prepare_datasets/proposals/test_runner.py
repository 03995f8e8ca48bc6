import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepare_datasets.prepare_reason_seg import ReasonSegPrepareConfig, main
from prepare_datasets.proposals.runner import (
    PAUSE_ENV,
    ImageItem,
    PrepareConfig,
    SplitJob,
    resolve_shard,
    run_prepare,
)
from prepare_datasets.proposals.staging import scan_log
from tests.prepare_datasets.fixtures import BoxGenerator, store_content, write_image
from utils.proposal_store import ProposalReader

REPO = Path(__file__).resolve().parents[3]
NUM_IMAGES = 7


@pytest.fixture
def reason_seg_root(tmp_path):
    root = tmp_path / "dataset"
    for i in range(NUM_IMAGES):
        write_image(root / "reason_seg/ReasonSeg/train" / f"img_{i}.jpg", 40, 56, seed=i)
    return root


def config_for(root, out, **overrides):
    return ReasonSegPrepareConfig(
        dataset_dir=str(root),
        sam_masks_dir=str(out),
        backend="weightfree",
        splits="train",
        fsync=False,
        **overrides,
    )


def test_resolve_shard_from_flags_and_launcher_env(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_shard() == (0, 1)
    assert resolve_shard(4, 2) == (2, 4)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    assert resolve_shard() == (5, 8)
    assert resolve_shard(2, 1) == (1, 2)  # flags win
    with pytest.raises(ValueError, match="shard_id 3 is outside"):
        resolve_shard(2, 3)


def test_shards_merge_into_the_clean_store(reason_seg_root, tmp_path, monkeypatch):
    clean = main(config_for(reason_seg_root, tmp_path / "clean"))[0]
    assert clean.merged
    assert clean.num_done == NUM_IMAGES
    expected = store_content(clean.store_path)
    for shard_id in range(3):
        summary = main(
            config_for(reason_seg_root, tmp_path / "flags", num_shards=3, shard_id=shard_id)
        )[0]
        assert summary.merged == (shard_id == 2)  # the last shard to finish merges
        assert summary.processed_here == len(range(shard_id, NUM_IMAGES, 3))
    assert store_content(summary.store_path) == expected
    # The same, with the shard taken from a launcher's environment.
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        summary = main(config_for(reason_seg_root, tmp_path / "env"))[0]
    assert store_content(summary.store_path) == expected
    # A rerun finds everything done and generates nothing.
    again = main(config_for(reason_seg_root, tmp_path / "env", num_shards=1))[0]
    assert again.processed_here == 0
    assert store_content(again.store_path) == expected


def test_killed_run_resumes_to_the_clean_store(reason_seg_root, tmp_path):
    clean = main(config_for(reason_seg_root, tmp_path / "clean"))[0]
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "prepare_datasets.prepare_reason_seg",
        "--dataset_dir",
        str(reason_seg_root),
        "--sam_masks_dir",
        str(out),
        "--backend",
        "weightfree",
        "--splits",
        "train",
        "--no-fsync",
    ]
    env = dict(os.environ, **{PAUSE_ENV: "3"})
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = out / "reason_seg/ReasonSeg/train/staging/shard-00000-of-00001.log"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and len(list(scan_log(log))) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(list(scan_log(log))) == 3
    assert not (out / "reason_seg/ReasonSeg/train/masks.h5").exists()
    # Simulate the kill landing mid-write as well: a torn half record at the end.
    with open(log, "ab") as handle:
        handle.write(b"LSP1\x00\x10\x00\x00\x00\x00\x00\x00garbage")
    resumed = main(config_for(reason_seg_root, out))[0]
    assert resumed.processed_here == NUM_IMAGES - 3
    assert store_content(resumed.store_path) == store_content(clean.store_path)


def write_bad_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    paths = {
        name: folder / name
        for name in (
            "corrupt.jpg",
            "empty.jpg",
            "gray.png",
            "rgba.png",
            "deep16.png",
            "exif.png",
            "tiny.png",
            "huge.png",
            "missing.jpg",
            "boom.png",
        )
    }
    paths["corrupt.jpg"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    paths["empty.jpg"].write_bytes(b"")
    Image.fromarray(np.tile(np.arange(30, dtype=np.uint8) * 8, (20, 1))).save(paths["gray.png"])
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba).save(paths["rgba.png"])
    deep = np.zeros((20, 30), np.uint16)
    deep[:, 10:] = 65535
    deep[:, 20:] = 32896  # 128 * 257
    Image.fromarray(deep).save(paths["deep16.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)).save(
        paths["exif.png"], exif=exif
    )
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(paths["tiny.png"])
    Image.fromarray(np.full((300, 8000, 3), 90, np.uint8)).save(paths["huge.png"])
    Image.fromarray(np.full((13, 17, 3), 1, np.uint8)).save(paths["boom.png"])
    return paths


def test_bad_images_each_get_a_clear_outcome(tmp_path, caplog):
    paths = write_bad_images(tmp_path / "images")
    paths["missing.jpg"].unlink(missing_ok=True)
    job = SplitJob("bad", "bad", [ImageItem(name, path) for name, path in paths.items()])
    generator = BoxGenerator(boxes=[(0, 0, 3, 3)], fail_on_shape=(13, 17))
    config = PrepareConfig(sam_masks_dir=str(tmp_path / "out"), fsync=False)
    summary = run_prepare(config, [job], generator=generator)[0]
    failures = summary.failures
    assert sorted(failures) == ["boom.png", "corrupt.jpg", "empty.jpg", "missing.jpg"]
    assert "unreadable image" in failures["corrupt.jpg"]
    assert "empty (0 bytes)" in failures["empty.jpg"]
    assert "not found" in failures["missing.jpg"]
    assert "generator error" in failures["boom.png"]
    assert "out of memory (simulated)" in failures["boom.png"]
    for name in failures:  # the summary names every failed image
        assert f"failed {name}:" in caplog.text
    reader = ProposalReader(summary.store_path)
    assert reader.names() == [
        "deep16.png",
        "exif.png",
        "gray.png",
        "huge.png",
        "rgba.png",
        "tiny.png",
    ]
    with pytest.raises(KeyError, match="failed during preparation: .*empty"):
        reader.get("empty.jpg")
    # The runner works in key order; the generator saw every readable image (boom.png too).
    # Grayscale -> three equal channels; RGBA composited on black; 16-bit scaled to 8 bits;
    # EXIF orientation applied; 8 px kept; 8000 px shrunk to a 1024 px longest side.
    processed = sorted(n for n in paths if n not in ("corrupt.jpg", "empty.jpg", "missing.jpg"))
    images = dict(zip(processed, generator.seen))
    assert np.array_equal(images["gray.png"][..., 0], images["gray.png"][..., 2])
    assert images["gray.png"][0, 29, 1] == 29 * 8
    assert images["rgba.png"][0, 0].tolist() == [200, 0, 0]
    assert images["rgba.png"][0, 29].tolist() == [0, 0, 0]
    assert images["deep16.png"][0, [0, 10, 20], 0].tolist() == [0, 255, 128]
    original = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    assert np.array_equal(images["exif.png"], np.rot90(original, k=-1))
    assert reader.get("exif.png").height == 30
    assert images["tiny.png"].shape == (8, 8, 3)
    assert images["huge.png"].shape == (38, 1024, 3)
    assert (reader.get("huge.png").height, reader.get("huge.png").width) == (38, 1024)
    assert images["huge.png"].min() == 90  # INTER_AREA of a flat image stays flat
