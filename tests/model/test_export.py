"""Export: a few real training steps (ZeRO-2, ZeRO-3, zero_to_fp32 shards) -> export -> reload.

The reference is the model ``eval.py --checkpoint`` evaluates (LoRA unmerged, weights loaded with
``load_trainable_weights``); every export must predict what it predicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as eval_script
import training
from model.builder import LLMSegConfig, build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.export import ExportConfig, export_training_run, load_exported, main
from model.export_manifest import MANIFEST, read_manifest
from tests.data_fixtures import write_reason_seg
from tests.model.batches import BatchSpec, make_batch
from utils.checkpoint import CheckpointError
from utils.deepspeed_files import (
    _merge_zero3,
    _merge_zero12,
    consolidate_zero_weights,
    load_deepspeed_file,
)
from utils.run_checkpoints import load_trainable_weights, read_training_weights

REPO = Path(__file__).resolve().parents[2]
SPEC = BatchSpec(rows=[[1], [2, 1]], proposals=[4, 6])


def _train(tiny_checkpoints, data, log_dir: Path, stage: int) -> Path:
    model = tiny_llm_seg_config(tiny_checkpoints)
    dataset_dir, masks_dir = data
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(LLMSegConfig)}
    fields.update(
        dataset_dir=str(dataset_dir), sam_masks_dir=str(masks_dir), dataset="reason_seg",
        sample_rates="1", epochs=1, steps_per_epoch=3, grad_accumulation_steps=1,
        warmup_steps=1, lr=3e-3, workers=0, log_base_dir=str(log_dir), exp_name=f"zero{stage}",
        device="cpu", zero_stage=stage, no_eval=True,
    )  # fmt: skip
    training.main(training.TrainConfig(**fields))
    return log_dir / f"zero{stage}"


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory):
    """Two 3-step runs on the tiny model: ZeRO-2 and ZeRO-3 (whose module file is empty)."""
    root = tmp_path_factory.mktemp("runs")
    data = write_reason_seg(root / "data", "train", 3, seed=0)
    return {stage: _train(tiny_checkpoints, data, root, stage) for stage in (2, 3)}


def _reference(run: Path, source: str = "auto"):
    """The model eval.py builds from a run: LoRA unmerged, trained weights loaded."""
    config = json.loads((run / "config.json").read_text())
    model_config = LLMSegConfig(
        **{f.name: config[f.name] for f in dataclasses.fields(LLMSegConfig)}
    )
    model, tokenizer = build_llm_seg(model_config)
    setup_trainable(model, model_config)
    load_trainable_weights(model, run, "latest", source)
    return model.eval(), tokenizer


def _assert_same_predictions(reference, tokenizer, exported, exact: bool = False):
    batch = make_batch(tokenizer, reference.num_image_tokens, SPEC)
    masks = [(m > 0.5) for m in batch.proposal_masks]
    want, got = reference.score(batch), exported.model.score(batch)
    pairs = list(zip(want.similarities + want.iop_scores, got.similarities + got.iop_scores))
    for expected, actual in pairs:
        if exact:
            assert torch.equal(actual, expected)
        else:
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for strategy in ("argmax", "iop"):
        expected = reference.predict_masks(batch, masks, strategy)
        actual = exported.model.predict_masks(batch, masks, strategy)
        for image_want, image_got in zip(expected, actual):
            assert [r.selected for r in image_got] == [r.selected for r in image_want]


def test_zero2_run_exports_and_reloads_with_identical_predictions(runs, tmp_path):
    run = runs[2]
    trained = read_training_weights(run, "latest")
    assert trained.kind == "module"
    assert trained.client_state["global_step"] == 3
    lora_b = [v for k, v in trained.state.items() if "lora_B" in k]
    assert lora_b
    assert all(v.abs().max() > 0 for v in lora_b)  # the LoRA did train

    reference, tokenizer = _reference(run)
    out = export_training_run(run, tmp_path / "merged", which="latest")
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST, "llm", "proposal_head.safetensors", "vision_projector.safetensors"
    ]  # fmt: skip
    assert (out / "llm" / "model.safetensors").is_file()
    assert (out / "llm" / "tokenizer.json").is_file()
    assert not list(out.rglob("*.bin"))  # safetensors only
    assert not list(out.rglob("*.pt"))
    manifest = read_manifest(out)
    assert manifest.kind == "merged"
    assert (manifest.model.out_dim, manifest.model.dino_image_size) == (32, 112)
    assert manifest.architecture.seg_token_id == tokenizer.convert_tokens_to_ids("[SEG]")
    assert (manifest.source["global_step"], manifest.source["weights"]) == (3, "module")
    # frozen encoders by (absolute) path, not copied
    assert Path(manifest.model.dinov2).is_absolute()
    assert not (out / "dinov2").exists()
    assert manifest.model.tokenization == "hf"  # the tiny tokenizer has no tokenizer.model
    # Exports written before the setting existed: this project's training used hf, converted
    # upstream checkpoints were trained with the slow LLaMA tokenizer.
    old = tmp_path / "old_export"
    shutil.copytree(out, old)
    data = json.loads((old / MANIFEST).read_text())
    del data["model"]["tokenization"]
    (old / MANIFEST).write_text(json.dumps(data))
    assert read_manifest(old).model.tokenization == "hf"
    (old / "conversion_report.json").write_text("{}")
    assert read_manifest(old).model.tokenization == "llava_legacy"
    exported = load_exported(out)
    _assert_same_predictions(reference, tokenizer, exported)
    # The merged LLM is a plain transformers folder.
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(out / "llm")
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(
        plain(ids).logits, exported.model.backbone.language_model(ids).logits
    )

    adapter = export_training_run(run, tmp_path / "adapter", which="latest", kind="adapter")
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.safetensors", MANIFEST]
    unmerged = load_exported(adapter, merge_adapter=False)
    _assert_same_predictions(reference, tokenizer, unmerged, exact=True)
    _assert_same_predictions(reference, tokenizer, load_exported(adapter))


def test_zero3_and_zero_to_fp32_shards_export_the_same_model(runs, tmp_path):
    from deepspeed.utils.zero_to_fp32 import (
        convert_zero_checkpoint_to_fp32_state_dict,
        get_fp32_state_dict_from_zero_checkpoint,
    )

    run = runs[3]
    trained = read_training_weights(run, "latest")
    assert trained.kind == "zero_fp32"  # ZeRO-3 leaves the module file empty
    with pytest.raises(CheckpointError, match="ZeRO-3"):
        read_training_weights(run, "latest", source="module")
    # Our weights-only consolidation equals DeepSpeed's own (which unpickles everything).
    for stage, folder in runs.items():
        theirs = get_fp32_state_dict_from_zero_checkpoint(
            str(folder / "ckpt_model"), exclude_frozen_parameters=True
        )
        ours = consolidate_zero_weights(read_training_weights(folder, "latest").path)
        assert set(ours) == set(theirs), stage
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), stage

    reference, tokenizer = _reference(run)
    exported = load_exported(export_training_run(run, tmp_path / "zero3", which="latest"))
    _assert_same_predictions(reference, tokenizer, exported)

    # The layout newer DeepSpeed's zero_to_fp32.py writes: safetensors shards + index.
    shards = tmp_path / "consolidated"
    convert_zero_checkpoint_to_fp32_state_dict(
        str(runs[2] / "ckpt_model"), str(shards), max_shard_size="200KB",
        safe_serialization=True, exclude_frozen_parameters=True,
    )  # fmt: skip
    assert len(list(shards.glob("*.safetensors"))) > 1
    assert read_training_weights(shards).kind == "consolidated"
    out = export_training_run(shards, tmp_path / "from_shards", run_config=runs[2] / "config.json")
    reference, tokenizer = _reference(runs[2])
    _assert_same_predictions(reference, tokenizer, load_exported(out))
    with pytest.raises(CheckpointError, match="no training config.json"):
        export_training_run(shards, tmp_path / "no_config")


def test_eval_accepts_an_export(runs, tiny_checkpoints, tmp_path):
    data = write_reason_seg(tmp_path / "data", "val", 2, seed=1)
    out = export_training_run(runs[2], tmp_path / "export", which="latest")
    model = tiny_llm_seg_config(tiny_checkpoints)
    common = dict(dataset_dir=str(data[0]), sam_masks_dir=str(data[1]), device="cpu")
    by_checkpoint = eval_script.main(
        eval_script.EvalConfig(
            **{f.name: getattr(model, f.name) for f in dataclasses.fields(LLMSegConfig)},
            checkpoint=str(runs[2]), checkpoint_tag="latest", out_dir=str(tmp_path / "a"),
            **common,
        )
    )  # fmt: skip
    by_export = eval_script.main(
        eval_script.EvalConfig(
            model_dir=str(out), out_dir=str(tmp_path / "b"), precision="fp32", **common
        )
    )
    for key in ("giou", "ciou", "nciou"):
        assert by_export[key] == pytest.approx(by_checkpoint[key])
    rows_a = (tmp_path / "a" / "per_image.csv").read_text()
    assert (tmp_path / "b" / "per_image.csv").read_text() == rows_a


def test_export_cli_and_errors(runs, tmp_path):
    out = main(ExportConfig(checkpoint=str(runs[2]), out_dir=str(tmp_path / "e"), which="latest"))
    assert json.loads((out / "export_command.json").read_text())["which"] == "latest"
    with pytest.raises(FileExistsError, match="exists"):
        export_training_run(runs[2], out, which="latest")
    export_training_run(runs[2], out, which="latest", kind="adapter", overwrite=True)
    assert read_manifest(out).kind == "adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no staging leftovers
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export_training_run(tmp_path / "missing", tmp_path / "x")

    with pytest.raises(RuntimeError, match="bitsandbytes"):  # not installed here: a clear error
        load_exported(out, load_in_4bit=True)

    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="newer than this code"):
        load_exported(out)
    with pytest.raises(CheckpointError, match="not an LLM-Seg export"):
        load_exported(tmp_path)


def test_zero_partition_merges_by_hand():
    # ZeRO-1/2: two ranks each hold half of one flat group; parameters follow each other,
    # each followed by its alignment padding.
    a, b = torch.arange(6.0).view(2, 3), torch.arange(6.0, 10.0)
    flat = torch.cat([a.flatten(), torch.zeros(2), b, torch.zeros(4)])  # pads 2 and 4
    osds = [
        {"single_partition_of_fp32_groups": [flat[:8]], "param_alignment_paddings": [[2, 4]]},
        {"single_partition_of_fp32_groups": [flat[8:]]},
    ]
    state = _merge_zero12(osds, [{"a": torch.Size([2, 3]), "b": torch.Size([4])}])
    assert torch.equal(state["a"], a)
    assert torch.equal(state["b"], b)
    # ZeRO-3: every parameter split in world-size pieces, zero-padded; rank r holds piece r of
    # each, one after the other.
    c = torch.arange(5.0)  # 5 over 2 ranks: pieces of 3, the last padded by 1
    ranks = [
        torch.cat([a.flatten()[:3], c[:3]]),
        torch.cat([a.flatten()[3:], c[3:], torch.zeros(1)]),
    ]
    state = _merge_zero3([{"fp32_flat_groups": [r]} for r in ranks], [{"a": (2, 3), "c": (5,)}])
    assert torch.equal(state["a"], a)
    assert torch.equal(state["c"], c)


def test_deepspeed_files_load_weights_only(tmp_path):
    path = tmp_path / "evil_model_states.pt"
    torch.save({"module": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_deepspeed_file(path)


@pytest.mark.slow
def test_two_rank_zero3_run_exports(tiny_checkpoints, tmp_path):
    """2 CPU processes under torchrun (each rank holds half of every parameter)."""
    data = write_reason_seg(tmp_path / "data", "train", 3, seed=0)
    model = tiny_llm_seg_config(tiny_checkpoints)
    args = [
        "--version", model.version, "--vision-tower", model.vision_tower, "--dinov2", model.dinov2,
        "--dino_image_size", "112", "--out_dim", "32", "--scorer_heads", "4",
        "--scorer_mlp_dim", "64", "--proposal_map_size", "32", "--precision", "fp32",
        "--no-gradient_checkpointing", "--dataset_dir", str(data[0]),
        "--sam_masks_dir", str(data[1]), "--dataset", "reason_seg", "--sample_rates", "1",
        "--epochs", "1", "--steps_per_epoch", "2", "--grad_accumulation_steps", "1",
        "--warmup_steps", "1", "--workers", "0", "--device", "cpu", "--no_eval",
        "--zero_stage", "3", "--log_base_dir", str(tmp_path), "--exp_name", "ddp",
    ]  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", port, str(REPO / "training.py"), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tag = tmp_path / "ddp" / "ckpt_model" / "global_step2"
    assert len(list(tag.glob("*optim_states.pt"))) == 2
    reference, tokenizer = _reference(tmp_path / "ddp")
    exported = load_exported(export_training_run(tmp_path / "ddp", tmp_path / "e", which="latest"))
    _assert_same_predictions(reference, tokenizer, exported)


def test_vision_tower_from_a_transformers_llava_folder(tmp_path):
    """A LLaVA-1.5 base in the transformers layout holds its CLIP: the export can point there."""
    from model.backbones.llava_checkpoint import save_llava_transformers
    from model.export import load_vision_tower
    from model.tiny import build_tiny_llava

    backbone, tokenizer, _ = build_tiny_llava(projector_type="mlp2x_gelu")
    save_llava_transformers(tmp_path / "llava-hf", backbone, tokenizer)
    tower = load_vision_tower(tmp_path / "llava-hf", torch.float32).state_dict()
    expected = backbone.vision_tower.state_dict()
    assert set(tower) == set(expected)
    assert all(torch.equal(tower[k], v) for k, v in expected.items())
