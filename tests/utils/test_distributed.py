"""Single-process rendezvous: a port taken between choosing it and binding it is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: a process group can be initialised once per process.
SCRIPT = """
import json, socket, torch
import utils.distributed as distributed

busy = socket.socket()
busy.bind(("127.0.0.1", 0))
busy.listen()
taken = busy.getsockname()[1]
real_free_port = distributed._free_port
ports = iter([taken])
distributed._free_port = lambda: next(ports, None) or real_free_port()
distributed.init_process_group(torch.device("cpu"))
print(json.dumps({"taken": taken, "port": int(__import__("os").environ["MASTER_PORT"]),
                  "world": distributed.world_size(), "distributed": distributed.is_distributed()}))
"""


def _run(env_overrides: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_a_port_taken_meanwhile_is_replaced_by_a_free_one():
    result = _run({})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["distributed"]
    assert report["world"] == 1
    assert report["port"] != report["taken"]
    assert "was taken meanwhile" in result.stderr


def test_a_launcher_port_is_never_changed():
    # RANK/WORLD_SIZE from a launcher: its MASTER_PORT is used as given, so a busy one fails.
    script_port_env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.replace("distributed.init_process_group", "import os; "
         "os.environ['MASTER_PORT'] = str(taken); distributed.init_process_group")],
        cwd=REPO, env={**os.environ, **script_port_env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "DistNetworkError" in result.stderr
