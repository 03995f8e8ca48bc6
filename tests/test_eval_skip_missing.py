"""``--skip_missing``: a ReasonSeg json without its image is left out of the scores and listed
(``skipped_missing``) in what every evaluation writes, never dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
from model.builder import build_llm_seg, tiny_llm_seg_config
from model.evaluation import SelectionSettings, evaluate
from model.free_evaluation import GenerationSettings, evaluate_free
from tests.data_fixtures import write_reason_seg
from utils.data.builders import build_encoder, build_eval_dataset
from utils.text_files import DatasetFormatError


@pytest.fixture
def unpaired(tmp_path) -> tuple[Path, Path, Path]:
    """A 3-image ReasonSeg val split whose ``img_001.json`` has lost its image; returns
    ``(dataset_dir, sam_masks_dir, the unpaired json)``."""
    dataset_dir, masks_dir = write_reason_seg(tmp_path / "data", "val", 3, seed=3)
    folder = dataset_dir / "reason_seg" / "ReasonSeg" / "val"
    (folder / "img_001.jpg").unlink()
    return dataset_dir, masks_dir, folder / "img_001.json"


def test_pred_dir_lists_the_skipped_files_in_its_json(unpaired, tmp_path):
    dataset_dir, _, json_path = unpaired
    preds = tmp_path / "preds"
    preds.mkdir()
    for name in ("img_000", "img_002"):
        width, height = Image.open(dataset_dir / "reason_seg/ReasonSeg/val" / f"{name}.jpg").size
        Image.fromarray(np.zeros((height, width), np.uint8)).save(preds / f"{name}.png")
    config = eval_script.EvalConfig(
        dataset_dir=str(dataset_dir), pred_dir=str(preds), out_json=str(tmp_path / "s.json")
    )
    with pytest.raises(DatasetFormatError, match="img_001.json"):
        eval_script.main(config)
    assert not (tmp_path / "s.json").exists()

    config.skip_missing = True
    result = eval_script.main(config)
    saved = json.loads((tmp_path / "s.json").read_text())
    assert result["skipped_missing"] == saved["skipped_missing"] == [str(json_path)]
    assert (saved["num_images"], saved["missing_predictions"]) == (2, [])


@pytest.mark.parametrize("mode", ["teacher_forced", "free"])
def test_model_evaluation_lists_the_skipped_files_in_metrics_json(
    mode, unpaired, tiny_checkpoints, tmp_path
):
    dataset_dir, masks_dir, json_path = unpaired
    model_config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(model_config)
    config = eval_script.EvalConfig(
        **{name: getattr(model_config, name) for name in model_config.__dataclass_fields__},
        dataset_dir=str(dataset_dir), sam_masks_dir=str(masks_dir), skip_missing=True,
    )  # fmt: skip
    encoder = build_encoder(config, tokenizer, model.num_image_tokens)
    dataset = build_eval_dataset(config, encoder, "ReasonSeg|val")
    selection = SelectionSettings("argmax", 0.5, 5)
    device, dtype = torch.device("cpu"), torch.float32
    if mode == "free":
        generation = GenerationSettings(max_new_tokens=3, batch_size=2)
        results = evaluate_free(
            model, dataset, tokenizer, selection, device, dtype, tmp_path, generation
        )
    else:
        results = evaluate(
            model, dataset, selection, device, dtype, tokenizer.pad_token_id, tmp_path
        )
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert results["skipped_missing"] == saved["skipped_missing"] == [str(json_path)]
    assert saved["num_images"] == 2
