"""The demos' shared bash stages (scripts/lib/demo_stages.sh): commands run beside each other."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "scripts" / "lib" / "demo_stages.sh"


def _bash(script: str, out: Path, jobs: int) -> subprocess.CompletedProcess:
    prelude = (
        f'set -euo pipefail\nPYTHON=python OUT="{out}" JOBS={jobs} NUM_STAGES=1\nsource "{LIB}"\n'
    )
    return subprocess.run(
        ["bash", "-c", prelude + script], capture_output=True, text=True, timeout=60
    )


def test_beside_runs_next_to_the_foreground_and_waits(tmp_path):
    # The two commands wait for each other's marks, so they can only finish if they overlap;
    # wait_beside returns only when the side command has finished.
    script = f"""
    log={tmp_path}/order
    until_exists() {{
      for _ in $(seq 100); do [[ -e $1 ]] && return 0; sleep 0.05; done; return 1
    }}
    beside {tmp_path}/side.log bash -c "echo side-start >> $log; touch {tmp_path}/started
      for _ in \\$(seq 100); do [[ -e {tmp_path}/fore_done ]] && break; sleep 0.05; done
      sleep 0.2; echo side-end >> $log"
    until_exists {tmp_path}/started
    echo fore >> $log; touch {tmp_path}/fore_done
    wait_beside
    echo after-wait >> $log
    """
    result = _bash(script, tmp_path, jobs=2)
    assert result.returncode == 0, result.stderr
    order = (tmp_path / "order").read_text().split()
    assert order == ["side-start", "fore", "side-end", "after-wait"]


def test_with_one_job_beside_runs_before_the_next_command(tmp_path):
    script = f"""
    log={tmp_path}/order
    beside {tmp_path}/side.log bash -c "sleep 0.5; echo side >> $log"
    echo fore >> $log
    """
    result = _bash(script, tmp_path, jobs=1)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "order").read_text().split() == ["side", "fore"]


def test_a_failing_side_command_stops_the_demo_with_its_log(tmp_path):
    script = f"""
    beside {tmp_path}/side.log bash -c "echo the reason it failed; exit 3"
    wait_beside
    echo not reached
    """
    result = _bash(script, tmp_path, jobs=2)
    assert result.returncode == 1
    assert "not reached" not in result.stdout
    assert f"failed; the end of {tmp_path}/side.log" in result.stderr
    assert "the reason it failed" in result.stderr


def test_no_side_command_outlives_a_failed_demo(tmp_path):
    script = f"""
    beside {tmp_path}/side.log bash -c "sleep 1.5; echo survived > {tmp_path}/survivor"
    false
    """
    result = _bash(script, tmp_path, jobs=2)
    assert result.returncode == 1
    time.sleep(2)
    assert not (tmp_path / "survivor").exists()


def test_a_shell_function_beside_is_stopped_with_its_children(tmp_path):
    script = f"""
    late() {{ bash -c "sleep 1.5; echo survived > {tmp_path}/survivor"; }}
    beside {tmp_path}/side.log late
    sleep 0.5
    false
    """
    result = _bash(script, tmp_path, jobs=2)
    assert result.returncode == 1
    time.sleep(2)
    assert not (tmp_path / "survivor").exists()
