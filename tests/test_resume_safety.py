"""Resuming never runs code from a save, never restarts silently, and never deletes a save."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import training
from tests.test_training import _config
from tests.test_training import reason_seg as reason_seg  # noqa: F401 (module fixture)
from utils.checkpoint import CheckpointError

MARKER = "pwned_marker"


class _Payload:
    """Unpickling this creates a marker file: what a malicious save would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def saved_run(tiny_checkpoints, reason_seg, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("saved")
    config = _config(tiny_checkpoints, reason_seg, base, stop_at_step=1, no_eval=True)
    training.main(config)
    return config.log_dir


@pytest.fixture
def run_copy(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def _resume(tiny_checkpoints, reason_seg, run: Path, **overrides):  # noqa: F811
    config = _config(tiny_checkpoints, reason_seg, run.parent, no_eval=True, **overrides)
    return training.main(config)


def _tag_dir(run: Path) -> Path:
    return run / "ckpt_model" / "global_step1"


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda run: (run / "ckpt_model" / "latest").write_text(""), "latest: empty or garbled"),
        (lambda run: (run / "ckpt_model" / "latest").write_bytes(b"\xff\x00gl"), "latest:"),
        (
            lambda run: (run / "ckpt_model" / "latest").write_text("global_step9"),
            "names global_step9, which does not exist",
        ),
        (lambda run: (run / "ckpt_model" / "latest").unlink(), "holds saves ['global_step1']"),
        (
            lambda run: (_tag_dir(run) / "mp_rank_00_model_states.pt").unlink(),
            "global_step1: no module file",
        ),
        (
            lambda run: (
                (run / "ckpt_model" / "global_step1" / "mp_rank_00_model_states.pt")
                .open("r+b")
                .truncate(200)
            ),
            "mp_rank_00_model_states.pt: truncated or corrupt",
        ),
    ],
    ids=["empty_latest", "garbled_latest", "dangling_latest", "no_latest", "no_module", "trunc"],
)
def test_broken_save_stops_the_run_and_deletes_nothing(
    damage,
    expected,
    run_copy,
    tiny_checkpoints,
    reason_seg,  # noqa: F811
):
    damage(run_copy)
    before = _listing(run_copy)
    with pytest.raises(CheckpointError) as error:
        _resume(tiny_checkpoints, reason_seg, run_copy)
    message = str(error.value)
    assert expected in message
    assert str(run_copy / "ckpt_model") in message
    assert "--resume" in message
    assert "nothing was deleted" in message
    assert _listing(run_copy) == before


def test_unsafe_save_is_refused_without_running_it(
    run_copy, tiny_checkpoints, reason_seg, tmp_path
):  # noqa: F811
    marker = tmp_path / MARKER
    optimizer_files = sorted(_tag_dir(run_copy).glob("*optim_states.pt"))
    target = optimizer_files[0] if optimizer_files else _tag_dir(run_copy) / "extra.pt"
    torch.save({"optimizer_state_dict": _Payload(str(marker))}, target)
    before = _listing(run_copy)
    with pytest.raises(CheckpointError, match="refusing to unpickle") as error:
        _resume(tiny_checkpoints, reason_seg, run_copy)
    assert target.name in str(error.value)
    assert "system" in str(error.value)
    assert not marker.exists()
    assert _listing(run_copy) == before


def test_fresh_start_over_saves_needs_overwrite(run_copy, tiny_checkpoints, reason_seg):  # noqa: F811
    before = _listing(run_copy)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _resume(tiny_checkpoints, reason_seg, run_copy, auto_resume=False)
    assert _listing(run_copy) == before
    _resume(
        tiny_checkpoints, reason_seg, run_copy, auto_resume=False, overwrite=True, stop_at_step=2
    )
    # the earlier save is gone only because --overwrite said so; the new run counts from step 1
    assert (run_copy / "ckpt_model" / "latest").read_text().strip() == "global_step2"


def test_intact_save_resumes(run_copy, tiny_checkpoints, reason_seg):  # noqa: F811
    _resume(tiny_checkpoints, reason_seg, run_copy, stop_at_step=2)
    assert (run_copy / "ckpt_model" / "latest").read_text().strip() == "global_step2"
    assert not _tag_dir(run_copy).exists()  # pruned only after global_step2 was verified
