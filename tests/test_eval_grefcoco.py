"""``eval.py`` on gRefCOCO: ``--pred_dir`` PNGs per sentence end to end, and a tiny model's
teacher-forced evaluation reporting N-acc / T-acc."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import model.evaluation as evaluation
from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from tests.utils.data.loader_fixtures import HEIGHT, WIDTH, box
from tests.utils.data.test_grefcoco import LEFT, RIGHT, write_grefcoco
from utils.data.builders import build_encoder, build_eval_dataset

REPO = Path(__file__).resolve().parents[1]
GIOU = (1 + 1 + 0 + 1 + 0 + 0.5) / 6
CIOU = (100 + 200 + 0 + 0 + 0 + 100) / (100 + 200 + 200 + 0 + 20 + 200)


def _save(path: Path, mask: np.ndarray, mode: str = "L") -> None:
    pixels = (mask * 255).astype(np.uint8)
    if mode == "RGBA":  # colour in red only, alpha opaque everywhere: alpha is not a label
        pixels = np.stack([pixels, 0 * pixels, 0 * pixels, np.full_like(pixels, 255)], axis=2)
    Image.fromarray(pixels, mode).save(path)


@pytest.fixture
def predictions(tmp_path):
    """The fixture's val sentences with: 1000 right, 1001 right (RGBA), 1002 missing (a target
    rejected), 1003 all zero (a right rejection), 1004 a 20-pixel mask on a no-target query,
    1005 half of the strip."""
    root = tmp_path / "dataset"
    write_grefcoco(root, tmp_path / "sam_masks")
    preds = tmp_path / "preds"
    preds.mkdir()
    _save(preds / "1000.png", LEFT)
    _save(preds / "1001.png", np.maximum(LEFT, RIGHT), "RGBA")
    _save(preds / "1003.png", np.zeros_like(LEFT))
    _save(preds / "1004.png", box(0, 0, 5, 4))
    _save(preds / "1005.png", box(5, 5, 15, 15))
    return root, preds


def _check(results: dict) -> None:
    assert results["giou"] == pytest.approx(GIOU)
    assert results["ciou"] == pytest.approx(CIOU)
    assert results["n_acc"] == 0.5  # 1003 rejected rightly, 1004 not
    assert results["t_acc"] == 0.75  # 1002 (missing) is the rejected target
    assert (results["num_samples"], results["num_no_target"]) == (6, 2)
    assert results["missing_predictions"] == [1002]


def test_pred_dir_scores_sentences(predictions, tmp_path):
    root, preds = predictions
    out_json = tmp_path / "out" / "scores.json"
    config = eval_script.EvalConfig(
        dataset_dir=str(root), val_dataset="grefcoco|unc|val", pred_dir=str(preds),
        out_json=str(out_json),
    )  # fmt: skip
    _check(eval_script.main(config))
    _check(json.loads(out_json.read_text()))
    with open(out_json.with_suffix(".csv")) as handle:
        rows = {row["sent_id"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["1000", "1001", "1002", "1003", "1004", "1005"]
    assert (rows["1004"]["no_target"], rows["1004"]["rejected"], rows["1004"]["union"]) == (
        "1", "0", "20",
    )  # fmt: skip
    assert rows["1005"]["query"] == "middle strip"
    assert (out_json.parent / "eval_config.json").is_file()


def test_pred_dir_command_line(predictions, tmp_path):
    root, preds = predictions
    out_json = tmp_path / "cli.json"
    argv = [sys.executable, "eval.py", "--pred_dir", str(preds), "--dataset_dir", str(root),
            "--val_dataset", "grefcoco|unc|val", "--out_json", str(out_json)]  # fmt: skip
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _check(json.loads(out_json.read_text()))
    argv[argv.index("--pred_dir") + 1] = str(tmp_path / "nowhere")
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: prediction folder {tmp_path / 'nowhere'} does not exist"
    )


def test_unreadable_png_names_the_file(predictions, tmp_path):
    root, preds = predictions
    (preds / "1002.png").write_bytes(b"not a png")
    config = eval_script.EvalConfig(
        dataset_dir=str(root), val_dataset="grefcoco|val", pred_dir=str(preds),
        out_json=str(tmp_path / "s.json"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="1002.png: unreadable PNG"):
        eval_script.main(config)


def test_model_evaluation_reports_rejections(tiny_checkpoints, tmp_path, monkeypatch):
    """The teacher-forced path on ``grefcoco|unc|val``: a model whose masks are all empty
    rejects every query (N-acc 1, T-acc 0, gIoU = the no-target share)."""
    root = tmp_path / "dataset"
    write_grefcoco(root, tmp_path / "sam_masks")
    config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    data = eval_script.EvalConfig(
        dataset_dir=str(root), sam_masks_dir=str(tmp_path / "sam_masks"),
        val_dataset="grefcoco|unc|val", vision_tower=config.vision_tower,
        dino_image_size=config.dino_image_size, proposal_map_size=config.proposal_map_size,
        model_max_length=config.model_max_length,
    )  # fmt: skip
    encoder = build_encoder(data, tokenizer, model.num_image_tokens)
    dataset = build_eval_dataset(data, encoder, data.val_dataset)

    def empty_masks(sample, output, selection, head, rejected=None):
        return [(torch.zeros(HEIGHT, WIDTH, dtype=torch.bool), 0)] * sample.masks.shape[0]

    monkeypatch.setattr(evaluation, "head_masks", empty_masks)
    results = evaluation.evaluate(
        model, dataset, evaluation.SelectionSettings("iop"), torch.device("cpu"),
        torch.float32, tokenizer.pad_token_id, tmp_path / "eval",
    )  # fmt: skip
    assert results["grefcoco"] == {
        "giou": pytest.approx(2 / 6), "ciou": 0.0, "n_acc": 1.0, "t_acc": 0.0,
        "num_samples": 6, "num_no_target": 2, "num_target": 4,
    }  # fmt: skip
    assert (results["n_acc"], results["t_acc"], results["num_no_target"]) == (1.0, 0.0, 2)
    assert results["giou"] == pytest.approx(2 / 6)  # LISA's gIoU agrees here
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["grefcoco"]["n_acc"] == 1.0
