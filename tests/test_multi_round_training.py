"""The multi-round path end to end: MRSeg files -> training.py (``multi_round`` family,
DeepSpeed on the CPU) -> eval.py per round with each ``--history``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import eval as eval_script
import training
from model.builder import tiny_llm_seg_config
from tests.utils.data.loader_fixtures import write_store
from tests.utils.data.test_mrseg import (
    EXPECTED,
    IMG1,
    IMG2,
    again_rounds,
    three_rounds,
    write_coco,
    write_mrseg,
)
from utils.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def mrseg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mrseg")
    dataset, masks = root / "dataset", root / "sam_masks"
    write_coco(dataset)
    for stem in ("mr_refcoco", "mr_refcoco_val"):
        write_mrseg(dataset, stem, [three_rounds(), again_rounds()])
    background = lambda boxes: 1 - np.maximum.reduce(boxes)  # noqa: E731
    image1 = [EXPECTED[i] for i in (101, 102, 103)]
    image2 = [EXPECTED[i] for i in (201, 301)]
    write_store(
        masks / "coco2014",
        {
            IMG1: np.stack([*image1, background(image1)]),
            IMG2: np.stack([*image2, background(image2)]),
        },
    )
    return dataset, masks


def _fields(tiny_checkpoints, mrseg_data, **overrides) -> dict:
    model = tiny_llm_seg_config(tiny_checkpoints, mask_encoder="pooled")
    dataset_dir, masks_dir = mrseg_data
    fields = {f: getattr(model, f) for f in model.__dataclass_fields__}
    fields.update(
        dataset_dir=str(dataset_dir), sam_masks_dir=str(masks_dir), device="cpu",
        val_dataset="MRSeg|mr_refcoco_val",
    )  # fmt: skip
    fields.update(overrides)
    return fields


def test_train_multi_round_and_evaluate_per_round(tiny_checkpoints, mrseg_data, tmp_path):
    config = training.TrainConfig(
        **_fields(
            tiny_checkpoints, mrseg_data, dataset="multi_round", sample_rates="1",
            multi_round_data="mr_refcoco", max_rounds=2, epochs=1, steps_per_epoch=3,
            grad_accumulation_steps=1, warmup_steps=1, lr=1e-3, workers=0,
            log_base_dir=str(tmp_path), exp_name="run", selection="argmax",
        )
    )  # fmt: skip
    metrics = training.main(config)
    run = config.log_dir
    assert json.loads((run / "config.json").read_text())["mask_encoder"] == "pooled"
    # Validation: both conversations, three rounds each, per round and over rounds >= 2.
    assert [r["round"] for r in metrics["per_round"]] == [1, 2, 3]
    assert [r["count"] for r in metrics["per_round"]] == [2, 2, 2]
    assert metrics["rounds_2plus"]["count"] == 4
    assert 0 <= metrics["overall"]["giou"] <= 1
    saved = json.loads((run / "eval" / "step3" / "metrics.json").read_text())
    assert saved["history"] == "gt"
    # The trained mask encoder and relation weights are in the save.
    tag = (run / "ckpt_model" / "latest").read_text().strip()
    state = torch.load(run / "ckpt_model" / tag / "mp_rank_00_model_states.pt", weights_only=True)[
        "module"
    ]
    assert any(k.startswith("mask_encoder.") for k in state)
    assert "proposal_scorer.relation_embedding.weight" in state

    results = {}
    for history in ("gt", "predicted", "none"):
        eval_config = eval_script.EvalConfig(
            **_fields(
                tiny_checkpoints, mrseg_data, checkpoint=str(run), checkpoint_tag="latest",
                selection="argmax", history=history, out_dir=str(tmp_path / f"eval_{history}"),
            )
        )  # fmt: skip
        results[history] = eval_script.main(eval_config)
        assert [r["count"] for r in results[history]["per_round"]] == [2, 2, 2]
    # The same weights as the run's own validation with GT history.
    assert results["gt"]["per_round"] == metrics["per_round"]
    # Round 1 never reads history: identical in every mode.
    assert results["predicted"]["per_round"][0] == results["gt"]["per_round"][0]
    assert results["none"]["history"] == "none"


def test_a_single_round_run_starts_a_multi_round_model(
    tiny_checkpoints, mrseg_data, tmp_path, monkeypatch
):
    """SegLLM fine-tuned from LLM-Seg weights (--init_weights): every saved weight is loaded,
    the new parts keep their initialisation, and the <ref> row is added after the saved rows."""
    common = dict(
        dataset="multi_round", sample_rates="1", multi_round_data="mr_refcoco", max_rounds=2,
        epochs=1, steps_per_epoch=1, grad_accumulation_steps=1, warmup_steps=1, lr=1e-2,
        workers=0, log_base_dir=str(tmp_path), selection="argmax", no_eval=True,
    )  # fmt: skip
    single = training.TrainConfig(
        **_fields(
            tiny_checkpoints, mrseg_data, mask_encoder="none", history="none",
            exp_name="single", **common,
        )
    )  # fmt: skip
    training.main(single)
    tag = (single.log_dir / "ckpt_model" / "latest").read_text().strip()
    saved = torch.load(
        single.log_dir / "ckpt_model" / tag / "mp_rank_00_model_states.pt", weights_only=True
    )["module"]
    assert not any(k.startswith("mask_encoder.") for k in saved)

    captured = {}
    original_engine = training.initialize_engine

    def capture(model, settings, device):
        captured.update({n: p.detach().clone() for n, p in model.named_parameters()})
        captured["ref_token_id"] = model.ref_token_id
        return original_engine(model, settings, device)

    monkeypatch.setattr(training, "initialize_engine", capture)
    multi = training.TrainConfig(
        **_fields(
            tiny_checkpoints, mrseg_data, init_weights=str(single.log_dir), exp_name="multi",
            **common,
        )
    )  # fmt: skip
    training.main(multi)
    embed = "backbone.language_model.model.embed_tokens.weight"
    for name, value in saved.items():
        if name in (embed, "backbone.language_model.lm_head.weight"):
            vocabulary = value.shape[0]
            assert captured[name].shape[0] == vocabulary + 1 == captured["ref_token_id"] + 1
            torch.testing.assert_close(captured[name][:vocabulary], value, msg=name)
        else:
            torch.testing.assert_close(captured[name], value, msg=name)
    # SegLLM's new parts start as built: zero relation and geometry weights, a copied projector.
    assert captured["proposal_scorer.relation_embedding.weight"].abs().sum() == 0
    assert captured["mask_encoder.geometry.weight"].abs().sum() == 0

    # A [REJ] model's rows would not line up ([REJ] follows <ref>): one error naming the key.
    monkeypatch.setattr(training, "initialize_engine", original_engine)
    rejecting = training.TrainConfig(
        **_fields(
            tiny_checkpoints, mrseg_data, init_weights=str(single.log_dir), exp_name="rejecting",
            rejection="token", **common,
        )
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"size mismatch for .*embed_tokens\.weight"):
        training.main(rejecting)
