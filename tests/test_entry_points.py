"""Every entry point as a user runs it (its ``__main__`` block, in this process):

- it ends in ``utils.cli.run_cli``, so a missing input is one ``error: ...: <path>`` line and exit
  1, no traceback, and nothing is written;
- every spelling of every boolean flag means what it says, or is a usage error;
- an output path holding something the command did not write stops it before it writes,
  naming the path and ``--overwrite``;
- training's numeric flags, its families and its evaluation set are checked before anything is
  built or written;
- eval.py replaces its own earlier results, nothing else unless ``--overwrite``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import runpy
import sys
import typing
import warnings
from pathlib import Path

import pytest

from tests.data_fixtures import write_reason_seg
from utils.config import BooleanFlag, build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("training.py", "eval.py", "chat.py", "app.py")
NOT_ENTRY_POINTS = ("benchmarks", "tests")  # developer tools with their own argparse


def _discover() -> dict[str, ast.Call]:
    """Entry point (script file or module name) -> the call its ``__main__`` block makes."""
    found = {}
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0] in NOT_ENTRY_POINTS or relative.parts[0].startswith("."):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                (statement,) = node.body  # nothing but the run_cli call
                name = str(relative) if len(relative.parts) == 1 else ".".join(relative.parts)
                found[name.removesuffix(".py") if name not in SCRIPTS else name] = statement.value
    return found


ENTRY_POINTS = _discover()


def _module(name: str):
    return importlib.import_module(name.removesuffix(".py"))


def _boolean_fields(config_cls) -> list[str]:
    hints = typing.get_type_hints(config_cls)
    return [f.name for f in dataclasses.fields(config_cls) if hints[f.name] is bool]


def _config_and_aliases(name: str):
    call = ENTRY_POINTS[name]
    module = _module(name)
    config_cls = getattr(module, ast.unparse(call.args[1]))
    aliases = {}
    for keyword in call.keywords:
        if keyword.arg == "aliases":
            aliases = eval(ast.unparse(keyword.value), vars(module))  # noqa: S307 (our source)
    return config_cls, aliases


def _run_main_block(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        if name in SCRIPTS:
            runpy.run_path(str(REPO / name), run_name="__main__")
        else:
            runpy.run_module(name, run_name="__main__", alter_sys=True)


@pytest.fixture
def run(capsys, monkeypatch):
    """Run an entry point's ``__main__`` block with ``argv``; return (exit code, stderr): 0 when
    it returns."""
    monkeypatch.setattr(os, "environ", os.environ.copy())  # training sets rendezvous variables

    def run_entry_point(name: str, argv: list[str]) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", [name, *argv])
        try:
            _run_main_block(name)
        except SystemExit as exit_info:
            return exit_info.code, capsys.readouterr().err
        return 0, capsys.readouterr().err  # run_cli returns when the command succeeds

    return run_entry_point


def _listing(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


def _assert_one_error_line(code: int, err: str, *needles: str, exit_code: int = 1) -> str:
    assert code == exit_code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, last
    return last


def test_every_entry_point_ends_in_run_cli():
    expected = {
        "model.export",
        "model.convert_lisa_checkpoint",
        "model.convert_llmseg_checkpoint",
        "prepare_datasets.prepare_synthetic",
        "prepare_datasets.convert_h5_to_json",
    }
    assert set(SCRIPTS) | expected <= set(ENTRY_POINTS)
    for name, call in ENTRY_POINTS.items():
        assert isinstance(call, ast.Call), name
        assert ast.unparse(call.func) == "run_cli", name


# An input that does not exist, per entry point ({m}: the missing path, {t}: a scratch folder).
MISSING_INPUT = {
    "training.py": ["--version", "{t}", "--log_base_dir", "{t}/runs", "--dataset", "reason_seg",
                    "--sample_rates", "1", "--dataset_dir", "{m}"],
    "eval.py": ["--checkpoint", "{m}", "--version", "{m}", "--vision-tower", "{m}", "--dinov2",
                "{m}", "--dataset_dir", "{m}", "--out_dir", "{t}/eval"],
    "chat.py": ["--model_dir", "{m}", "--image", "{t}/picture.png", "--query", "q", "--out_dir",
                "{t}/chat"],
    "app.py": ["--model_dir", "{m}", "--out_dir", "{t}/app"],
    "model.export": ["--checkpoint", "{m}", "--out_dir", "{t}/export"],
    "model.convert_lisa_checkpoint": ["--checkpoint", "{m}", "--out_dir", "{t}/export"],
    "model.convert_llmseg_checkpoint": ["--checkpoint", "{m}", "--version", "{m}",
                                        "--vision_tower", "{m}", "--out_dir", "{t}/export"],
    "model.presets": ["--dataset_dir", "{m}", "--out_dir", "{t}/checkpoints"],
    "prepare_datasets.convert_h5_to_json": ["--sam_masks_dir", "{m}"],
    "prepare_datasets.demo_report": ["--eval_dir", "{m}", "--out_dir", "{t}/report"],
    "prepare_datasets.multiround_report": ["--eval_dirs", "gt={m}", "--dataset_dir", "{m}",
                                           "--sam_masks_dir", "{m}", "--out_dir", "{t}/report"],
    "prepare_datasets.proposal_report": ["--dataset_dir", "{m}", "--sam_masks_dir", "{m}",
                                         "--output", "{t}/report.json"],
    "prepare_datasets.prepare_mrseg": ["--dataset_dir", "{m}", "--out_dir", "{t}/mrseg"],
    "prepare_datasets.prepare_sam_embeddings": ["--sam_checkpoint", "{m}", "--image_dirs", "{t}",
                                                "--out", "{t}/embeddings.h5"],
    **{
        f"prepare_datasets.prepare_{name}": ["--dataset_dir", "{m}", "--sam_masks_dir",
                                             "{t}/sam_masks", "--backend", "weightfree"]
        for name in ("ade20k", "coco2017", "ego_objects", "mapillary", "reason_seg", "refclef",
                     "refcoco", "voc2010")
    },
}  # fmt: skip
READS_NO_INPUT = ("model.tiny", "prepare_datasets.prepare_synthetic")  # generators from nothing


def test_the_missing_input_table_covers_every_entry_point():
    assert set(MISSING_INPUT) | set(READS_NO_INPUT) == set(ENTRY_POINTS)


@pytest.mark.parametrize("name", sorted(MISSING_INPUT))
def test_missing_input_is_one_line_naming_it_and_writes_nothing(name, run, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "picture.png")
    missing = str(tmp_path / "not_there")
    argv = [a.format(m=missing, t=tmp_path) for a in MISSING_INPUT[name]]
    before = _listing(tmp_path)
    code, err = run(name, argv)
    _assert_one_error_line(code, err, missing)
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_every_boolean_spelling_means_what_it_says(name):
    config_cls, aliases = _config_and_aliases(name)
    parser = build_parser(config_cls, aliases=aliases)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    booleans = [a for a in flags if isinstance(a, BooleanFlag)]
    assert {a.dest for a in flags if a.nargs == 0} == set()  # no store_true: --x=false works
    for action in booleans:
        for option in action.option_strings:
            negative = option in action.negative
            assert getattr(parser.parse_args([option]), action.dest) is (not negative), option
            if not negative:
                assert getattr(parser.parse_args([f"{option}=false"]), action.dest) is False
                assert getattr(parser.parse_args([f"{option}=true"]), action.dest) is True
        name_ = action.dest
        for spelling in (f"--no_{name_}", f"--no-{name_.replace('_', '-')}"):
            assert spelling in action.negative, spelling
    assert set(_boolean_fields(config_cls)) == {a.dest for a in booleans}


@pytest.mark.parametrize("name", ["training.py", "chat.py", "model.export"])
def test_a_negated_boolean_with_a_value_is_a_usage_error(name, run):
    config_cls, _ = _config_and_aliases(name)
    flag = _boolean_fields(config_cls)[0]
    code, err = run(name, [f"--no_{flag}=true"])
    assert code == 2
    assert f"--no_{flag} takes no value" in err
    assert "Traceback" not in err


def _foreign(path: Path, content: str = '{"from": "somebody else"}') -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def _hf_folder(root: Path) -> Path:
    """A real-looking checkpoint folder (a Hugging Face config.json) under ``root``."""
    _foreign(root / "config.json", json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return _foreign(root / "llava" / "config.json", json.dumps({"model_type": "llava"})).parent


def _mrseg_file(t: Path) -> Path:
    from prepare_datasets.prepare_mrseg import MRSegPrepareConfig

    return _foreign(t / "mrseg" / f"mr_{MRSegPrepareConfig().name}_train.json")


def _upstream_json_store(t: Path) -> Path:
    _foreign(t / "masks" / "val" / "masks.h5")
    return _foreign(t / "masks" / "val" / "masks.json")  # e.g. upstream's released proposals


def _annotated_picture(t: Path) -> Path:
    _foreign(t / "data" / "picture.png", "png")
    return _foreign(t / "data" / "picture.json")  # its annotation, named as chat's record


def _existing_folder(t: Path) -> Path:
    _foreign(t / "run" / "config.json")
    return _foreign(t / "out" / "mine.txt").parent


# Entry point -> (make what is in the way and return the path to name, argv).
FOREIGN_OUTPUTS = {
    "prepare_datasets.prepare_sam_embeddings": (
        lambda t: _foreign(t / "embeddings.h5"),
        ["--sam_checkpoint", "{m}", "--image_dirs", "{t}", "--out", "{t}/embeddings.h5"],
    ),
    "prepare_datasets.convert_h5_to_json": (_upstream_json_store, ["--sam_masks_dir", "{t}/masks"]),
    "model.tiny": (_hf_folder, ["--out_dir", "{t}"]),
    "model.presets": (_hf_folder, ["--dataset_dir", "{m}", "--out_dir", "{t}"]),
    "prepare_datasets.demo_report": (  # pointed at the evaluation it reports on
        lambda t: _foreign(t / "eval" / "metrics.json", '{"giou": 0.5}'),
        ["--eval_dir", "{t}/eval", "--out_dir", "{t}/eval"],
    ),
    "prepare_datasets.multiround_report": (
        lambda t: _foreign(t / "metrics.json"),
        ["--eval_dirs", "gt={t}/eval", "--out_dir", "{t}"],
    ),
    "prepare_datasets.proposal_report": (
        lambda t: _foreign(t / "report.json"), ["--output", "{t}/report.json"],
    ),
    "chat.py": (  # --out_dir is the dataset folder
        _annotated_picture,
        ["--model_dir", "{m}", "--image", "{t}/data/picture.png", "--query", "q",
         "--out_dir", "{t}/data"],
    ),
    "prepare_datasets.prepare_synthetic": (
        lambda t: _foreign(t / "reason_seg" / "ReasonSeg" / "val" / "real.json").parent,
        ["--out_dir", "{t}", "--num_train", "2", "--num_val", "1", "--num_test", "0"],
    ),
    "prepare_datasets.prepare_mrseg": (
        _mrseg_file, ["--dataset_dir", "{m}", "--out_dir", "{t}/mrseg"],
    ),
    "model.export": (_existing_folder, ["--checkpoint", "{t}/run", "--out_dir", "{t}/out"]),
    "model.convert_lisa_checkpoint": (
        _existing_folder, ["--checkpoint", "{m}", "--out_dir", "{t}/out"],
    ),
    "model.convert_llmseg_checkpoint": (
        _existing_folder,
        ["--checkpoint", "{m}", "--version", "{m}", "--vision_tower", "{m}", "--out_dir",
         "{t}/out"],
    ),
    "eval.py": (  # another tool's results where eval.py would write its own
        lambda t: _foreign(t / "eval" / "metrics.json", '{"giou": 0.5}'),
        ["--model_dir", "{m}", "--out_dir", "{t}/eval"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(FOREIGN_OUTPUTS))
def test_what_the_command_did_not_write_is_never_replaced(name, run, tmp_path):
    make, argv = FOREIGN_OUTPUTS[name]
    in_the_way = make(tmp_path)
    argv = [a.format(m=tmp_path / "not_there", t=tmp_path) for a in argv]
    before = _listing(tmp_path)
    code, err = run(name, argv)
    _assert_one_error_line(code, err, str(in_the_way), "--overwrite")
    assert _listing(tmp_path) == before


def _eval_config(folder: Path, **fields) -> None:
    from eval import EvalConfig
    from utils.config import save_config

    save_config(EvalConfig(**fields), folder / "eval_config.json")


# eval.py's other outputs: (make what is in the way, return the path to name; argv).
EVAL_FOREIGN = {
    "pred_dir json": (lambda t: _foreign(t / "scores.json"), ["--out_json", "{t}/scores.json"]),
    "pred_dir csv": (
        lambda t: _foreign(t / "scores.csv", "a,b"), ["--out_json", "{t}/scores.json"],
    ),
    "pred_dir out_dir": (
        lambda t: _foreign(t / "out" / "metrics.json"), ["--out_dir", "{t}/out"],
    ),
    "per_image.csv": (
        lambda t: _foreign(t / "eval" / "per_image.csv", "a,b"),
        ["--model_dir", "{m}", "--out_dir", "{t}/eval"],
    ),
    "vis": (
        lambda t: _foreign(t / "eval" / "vis" / "mine.png", "png").parent,
        ["--model_dir", "{m}", "--out_dir", "{t}/eval", "--visualize"],
    ),
    "training's eval_config.json": (  # a TrainConfig is not eval.py's marker
        lambda t: _foreign(t / "eval" / "eval_config.json", '{"exp_name": "llmseg"}'),
        ["--model_dir", "{m}", "--out_dir", "{t}/eval"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EVAL_FOREIGN))
def test_eval_never_replaces_results_it_did_not_write(case, run, tmp_path):
    make, argv = EVAL_FOREIGN[case]
    in_the_way = make(tmp_path)
    write_reason_seg(tmp_path / "data", "val", 1)
    (tmp_path / "preds").mkdir()
    common = ["--dataset_dir", "{t}/data/dataset", "--sam_masks_dir", "{t}/data/sam_masks"]
    if "pred_dir" in case:
        common += ["--pred_dir", "{t}/preds"]
    argv = [a.format(m=tmp_path / "not_there", t=tmp_path) for a in common + argv]
    before = _listing(tmp_path)
    code, err = run("eval.py", argv)
    _assert_one_error_line(code, err, str(in_the_way), "not written by eval.py", "--overwrite")
    assert _listing(tmp_path) == before

    # With --overwrite the same command goes on (pred_dir: scores; a model: stops at the
    # missing export, past the check).
    code, err = run("eval.py", [*argv, "--overwrite"])
    if "pred_dir" in case:
        assert code == 0, err
    else:
        _assert_one_error_line(code, err, str(tmp_path / "not_there"))


def test_eval_replaces_its_own_earlier_results(run, tmp_path):
    dataset_dir, masks_dir = write_reason_seg(tmp_path / "data", "val", 1)
    (tmp_path / "preds").mkdir()
    argv = ["--dataset_dir", str(dataset_dir), "--pred_dir", str(tmp_path / "preds"),
            "--out_json", str(tmp_path / "scores" / "scores.json")]  # fmt: skip
    assert run("eval.py", argv)[0] == 0
    first = (tmp_path / "scores" / "scores.json").read_bytes()
    assert run("eval.py", argv)[0] == 0  # a rerun, no --overwrite
    assert (tmp_path / "scores" / "scores.json").read_bytes() == first

    # A model's evaluation folder from an earlier eval.py run (metrics, rows, overlays): the
    # rerun passes the check and stops only at the missing export.
    eval_dir = tmp_path / "eval"
    for path in ("metrics.json", "per_image.csv", "vis/img_000.png"):
        _foreign(eval_dir / path)
    _eval_config(eval_dir, out_dir=str(eval_dir), visualize=True)
    missing = str(tmp_path / "not_there")
    argv = ["--model_dir", missing, "--dataset_dir", str(dataset_dir), "--sam_masks_dir",
            str(masks_dir), "--out_dir", str(eval_dir), "--visualize"]  # fmt: skip
    code, err = run("eval.py", argv)
    _assert_one_error_line(code, err, missing)


@pytest.mark.parametrize(
    ("name", "out_flag"),
    [("prepare_datasets.prepare_refcoco", "--sam_masks_dir"),
     ("prepare_datasets.prepare_mrseg", "--out_dir")],
)  # fmt: skip
def test_a_corrupt_refs_pickle_is_one_line_naming_it(name, out_flag, run, tmp_path):
    for dataset in ("refcoco", "refcoco+", "refcocog"):
        folder = tmp_path / "refer_seg" / dataset
        folder.mkdir(parents=True)
        for split_by in ("unc", "umd", "google"):
            (folder / f"refs({split_by}).p").write_bytes(b"\x80\x04 cut short")
        (folder / "instances.json").write_text('{"images": [], "annotations": []}')
    before = _listing(tmp_path)
    code, err = run(name, ["--dataset_dir", str(tmp_path), out_flag, str(tmp_path / "out")])
    _assert_one_error_line(code, err, "refcoco/refs(unc).p: not a refer refs pickle")
    assert _listing(tmp_path) == before


def test_a_ref_to_an_image_missing_from_the_instances_is_named(run, tmp_path):
    import pickle

    folder = tmp_path / "refer_seg" / "refcoco"
    folder.mkdir(parents=True)
    refs = [{"ref_id": 0, "image_id": 7, "ann_id": 1, "split": "val", "sentences": []}]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (folder / "instances.json").write_text('{"images": [], "annotations": []}')
    argv = ["--dataset_dir", str(tmp_path), "--sam_masks_dir", str(tmp_path / "out"),
            "--refer_datasets", "refcoco"]  # fmt: skip
    code, err = run("prepare_datasets.prepare_refcoco", argv)
    _assert_one_error_line(code, err, "refs(unc).p: refs[0] names no image of", "instances.json")


TRAINING = ["--version", "{t}", "--log_base_dir", "{t}/runs", "--dataset", "reason_seg",
            "--sample_rates", "1", "--dataset_dir", "{t}", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr=-1e-4"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--steps_per_epoch", "0"], "--steps_per_epoch"),
        (["--batch_size", "0"], "--batch_size"),
        (["--grad_accumulation_steps", "0"], "--grad_accumulation_steps"),
        (["--conversations_per_sample", "0"], "--conversations_per_sample"),
        (["--sample_rates", "1,1"], "--sample_rates"),
        (["--sample_rates", "0"], "--sample_rates"),
        (["--sample_rates", "one"], "--sample_rates"),
        # checked for every --rejection mode (no-target data checks return early for token)
        (["--dataset", "nosuch", "--rejection", "token"], "--dataset"),
        (["--dataset", "reason_seg||vqa", "--rejection", "token"], "--sample_rates"),
        (["--sample_rates", "1,1", "--rejection", "answer"], "--sample_rates"),
        (["--val_dataset", "nosuch|val", "--rejection", "token"], "--val_dataset"),
        (["--val_dataset", "MRSeg", "--rejection", "token"], "--val_dataset"),
    ],
)
def test_training_checks_its_numbers_before_building_anything(argv, flag, run, tmp_path):
    before = _listing(tmp_path)
    code, err = run("training.py", [a.format(t=tmp_path) for a in TRAINING] + argv)
    _assert_one_error_line(code, err, flag)
    assert _listing(tmp_path) == before
