"""scripts/*.sh run as written: valid bash, an existing entry point, and only flags it accepts.

Each script is executed with ``deepspeed`` and ``python`` replaced by stubs that record their
arguments; the launcher's part is parsed by DeepSpeed's own runner parser and the entry point's
part by the entry point's parser, and the recipe's hyper-parameters are checked (reference §6).
"""

import os
import stat
import subprocess
from pathlib import Path

import pytest

import eval as eval_script
import training
from model.builder import CONFIG_ALIASES
from utils.config import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
STUB = """#!/usr/bin/env bash
out="$(mktemp "$RECORD_DIR/call.XXXXXX")"
printf '%s\\0' "$(basename "$0")" "$@" > "$out"
"""
TRAIN_RECIPE = dict(
    lr=1e-4, epochs=10, steps_per_epoch=500, batch_size=1, grad_accumulation_steps=10,
    precision="bf16", dataset="sem_seg||refer_seg||reason_seg", sample_rates="9,3,1",
    val_dataset="ReasonSeg|val",
)  # fmt: skip
EXPECTED = {
    "train_10epoch.sh": [TRAIN_RECIPE],
    "train_20epoch.sh": [{**TRAIN_RECIPE, "epochs": 20}],
    "train_zero_shot.sh": [
        {**TRAIN_RECIPE, "dataset": "sem_seg||refer_seg", "sample_rates": "9,3"}
    ],
    "finetune_llmseg40k.sh": [
        {**TRAIN_RECIPE, "lr": 1e-5, "epochs": 5, "dataset": "llmseg40k", "sample_rates": "1",
         "val_dataset": "LLMSeg40K|validation", "init_weights": "./runs/10epoch"}
    ],
    "eval_reasonseg.sh": [
        {"val_dataset": "ReasonSeg|val", "selection": "iop", "checkpoint": "./runs/10epoch"},
        {"val_dataset": "ReasonSeg|test", "selection": "iop", "checkpoint": "./runs/10epoch"},
    ],
}  # fmt: skip
ENTRY_POINTS = {"training.py": training.TrainConfig, "eval.py": eval_script.EvalConfig}


@pytest.fixture(scope="module")
def launcher_parser():
    from deepspeed.launcher.runner import parse_args  # the launcher's own flags

    return parse_args


def run_with_stubs(
    script: Path, tmp_path: Path, env: dict | None = None, args: tuple = ()
) -> list[list[str]]:
    """Run ``script`` with recording ``deepspeed``/``python``; return each call's argv."""
    bin_dir, record_dir = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    record_dir.mkdir(exist_ok=True)
    for tool in ("deepspeed", "python"):
        stub = bin_dir / tool
        stub.write_text(STUB)
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    full_env.update(RECORD_DIR=str(record_dir), **(env or {}))
    result = subprocess.run(
        ["bash", str(script), *args], cwd=tmp_path, env=full_env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    calls = sorted(record_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    return [p.read_bytes().decode().split("\0")[:-1] for p in calls]


def entry_point_config(call: list[str], launcher_parser):
    """``(launcher args, entry point path, parsed config)`` of one recorded call."""
    tool, *args = call
    if tool == "deepspeed":
        launched = launcher_parser(args)
        script, user_args = Path(launched.user_script), launched.user_args
    else:
        launched, script, user_args = None, Path(args[0]), args[1:]
    assert script.is_file(), f"{script} does not exist"
    assert script.parent == REPO
    config_cls = ENTRY_POINTS[script.name]
    parser = build_parser(config_cls, aliases=CONFIG_ALIASES)
    try:
        namespace = parser.parse_args(user_args)
    except SystemExit:
        pytest.fail(f"{script.name} rejects the arguments {user_args}")
    return launched, script, config_cls(**vars(namespace))


# Run for real (not with stubs) by tests/test_demo.py and tests/test_demo_multiround.py: their
# stages read each other's outputs.
RUN_FOR_REAL = {"demo.sh", "demo_multiround.sh"}


def test_every_script_is_covered_and_valid_bash():
    scripts = sorted(p.name for p in SCRIPTS.glob("*.sh"))
    assert scripts == sorted({*EXPECTED, *RUN_FOR_REAL})
    for name in scripts:
        result = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert os.access(SCRIPTS / name, os.X_OK), f"{name} is not executable"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_script_calls_an_entry_point_with_accepted_flags(name, tmp_path, launcher_parser):
    calls = run_with_stubs(SCRIPTS / name, tmp_path)
    assert len(calls) == len(EXPECTED[name])
    for call, expected in zip(calls, EXPECTED[name]):
        launched, script, config = entry_point_config(call, launcher_parser)
        if launched is not None:
            assert launched.include == "localhost:0,1"  # upstream's 2 GPUs
            assert script.name == "training.py"
        for field, value in expected.items():
            assert getattr(config, field) == value, f"{name}: --{field}"
        assert config.version == "./pretrained/LLaVA-Lightning-7B-v1"
        assert config.vision_tower == "./pretrained/clip-vit-large-patch14"


def test_paths_and_extra_flags_come_from_the_caller(tmp_path, launcher_parser):
    env = {"LLAVA_PATH": "/models/llava", "DATASET_DIR": "/data", "GPUS": "localhost:2,3"}
    (call,) = run_with_stubs(SCRIPTS / "train_10epoch.sh", tmp_path, env, ("--workers", "4"))
    launched, _, config = entry_point_config(call, launcher_parser)
    assert launched.include == "localhost:2,3"
    assert (config.version, config.dataset_dir, config.workers) == ("/models/llava", "/data", 4)

    other = tmp_path / "eval"
    other.mkdir()
    (call,) = run_with_stubs(
        SCRIPTS / "eval_reasonseg.sh", other, {"SPLITS": "test"}, ("--visualize",)
    )
    _, _, eval_config = entry_point_config(call, launcher_parser)
    assert eval_config.val_dataset == "ReasonSeg|test"
    assert eval_config.visualize
