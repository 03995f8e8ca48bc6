"""run_cli: expected failures end in one ``error:`` line; ``--debug`` keeps the traceback."""

from __future__ import annotations

import errno
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from utils.cli import run_cli
from utils.text_files import DatasetFormatError

REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Config:
    """A toy entry point's config."""

    path: str = "x"
    steps: int = 1

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}: --steps")


def _raise(error: BaseException):
    def main(config):
        raise error

    return main


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (FileNotFoundError("no such file: /data/a.json"), "error: no such file: /data/a.json"),
        (DatasetFormatError("bad polygon: a.json"), "error: bad polygon: a.json"),
        (ValueError("--lr must be positive: --lr\nmore"), "error: --lr must be positive: --lr"),
        (OSError(errno.ENOSPC, "No space", "/out/c"), "error: no space left on the device: /out/c"),
    ],
)
def test_expected_errors_are_one_line_and_exit_1(error, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_raise(error), _Config, argv=[])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == line + "\n"


def test_debug_flag_keeps_the_traceback():
    with pytest.raises(FileNotFoundError):
        run_cli(_raise(FileNotFoundError("gone")), _Config, argv=["--debug"])


def test_debug_environment_variable_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("LLMSEG_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(_raise(FileNotFoundError("gone")), _Config, argv=[])


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(_raise(ZeroDivisionError("bug")), _Config, argv=[])


def test_rejected_config_value_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda config: config, _Config, argv=["--steps", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --steps must be at least 1, got 0: --steps\n"


def test_returns_what_main_returns():
    assert run_cli(lambda config: config.steps * 10, _Config, argv=["--steps", "3"]) == 30


@pytest.mark.parametrize(
    ("module", "argv", "needle"),
    [
        ("eval", ["--val_dataset", "ReasonSeg|val", "--dataset_dir", "/no"], "--checkpoint"),
        (
            "prepare_datasets.convert_h5_to_json",
            ["--sam_masks_dir", "/nonexistent"],
            "/nonexistent",
        ),
    ],
)
def test_entry_points_print_one_error_line(module, argv, needle):
    result = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), result.stderr
    assert needle in last
