"""``eval.py --mode free`` from the command line: the flags, their one-line errors, and the files
a free evaluation writes beside the teacher-forced ones."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import eval as eval_script
from model.builder import CONFIG_ALIASES, build_llm_seg, tiny_llm_seg_config
from model.export import save_export
from model.export_manifest import ExportManifest, describe_model
from tests.data_fixtures import write_reason_seg
from utils.cli import run_cli


def _run(argv: list[str]):
    return run_cli(eval_script.main, eval_script.EvalConfig, argv=argv, aliases=CONFIG_ALIASES)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "bogus"],
         "error: unknown mode 'bogus'; expected one of ('teacher_forced', 'free'): --mode"),
        (["--mode", "free", "--val_dataset", "MRSeg|mr_refcoco_val"],
         "error: free generation scores single-round sets; MRSeg|mr_refcoco_val is multi-round "
         "(evaluate it teacher-forced): --mode"),
        (["--mode", "free", "--val_dataset", "ReasonSegMR|val"],
         "error: free generation scores single-round sets; ReasonSegMR|val is multi-round "
         "(evaluate it teacher-forced): --mode"),
        (["--mode", "free", "--pred_dir", "preds"],
         "error: --pred_dir scores saved masks, free generation needs a model: --mode"),
        (["--mode", "free", "--max_new_tokens", "0"],
         "error: must be at least 1, got 0: --max_new_tokens"),
        (["--mode", "free", "--history", "predicted"],
         "error: --history chooses the references of multi-round sets, which free generation "
         "does not score: --history predicted with --mode"),
    ],
)  # fmt: skip
def test_bad_mode_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(["--model_dir", "nowhere", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message]


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    """A tiny export and a 3-image ReasonSeg val split with its proposal store."""
    root = tmp_path_factory.mktemp("eval_free")
    config = tiny_llm_seg_config(tiny_checkpoints)
    torch.manual_seed(0)
    model, tokenizer = build_llm_seg(config)
    manifest = ExportManifest("merged", config, describe_model(model, tokenizer))
    save_export(model, tokenizer, manifest, root / "export")
    dataset_dir, masks_dir = write_reason_seg(root / "data", "val", 3, seed=2)
    return root / "export", dataset_dir, masks_dir


def test_free_mode_writes_answers_and_its_settings(exported, tmp_path):
    export, dataset_dir, masks_dir = exported
    common = ["--model_dir", str(export), "--dataset_dir", str(dataset_dir), "--sam_masks_dir",
              str(masks_dir), "--val_dataset", "ReasonSeg|val", "--device", "cpu",
              "--precision", "fp32", "--selection", "argmax"]  # fmt: skip
    free = _run([*common, "--out_dir", str(tmp_path / "free"), "--mode", "free",
                 "--max_new_tokens", "5", "--generation_batch_size", "2"])  # fmt: skip
    forced = _run([*common, "--out_dir", str(tmp_path / "tf")])
    saved = json.loads((tmp_path / "free" / "eval_config.json").read_text())
    assert (saved["mode"], saved["max_new_tokens"], saved["generation_batch_size"]) == (
        "free", 5, 2,
    )  # fmt: skip
    assert json.loads((tmp_path / "tf" / "eval_config.json").read_text())["mode"] == (
        "teacher_forced"
    )
    metrics = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(free))
    assert (metrics["mode"], metrics["max_new_tokens"], metrics["num_answers"]) == ("free", 5, 3)
    fractions = metrics["answers"]
    assert sorted(fractions) == ["no_seg", "one_seg", "several_seg"]
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert metrics["num_images"] == forced["num_images"] == 3
    assert not {"mode", "answers"} & set(forced)  # the default's files as before
    with open(tmp_path / "free" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["img_000", "img_001", "img_002"]
    counts = [int(row["num_seg"]) for row in rows]
    for row, count in zip(rows, counts):
        assert row["answer"].count("[SEG]") == count  # the text the model wrote, [SEG] kept
    no_seg = sum(count == 0 for count in counts) / 3
    assert fractions["no_seg"] == pytest.approx(no_seg)
    with open(tmp_path / "tf" / "per_image.csv") as handle:
        assert "answer" not in next(csv.DictReader(handle))
