"""training.py and eval.py end to end on tiny models and a tiny ReasonSeg fixture."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import eval as eval_script
import training
from model.builder import tiny_llm_seg_config
from tests.data_fixtures import write_reason_seg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reason_seg(tmp_path_factory):
    root = tmp_path_factory.mktemp("reason_seg")
    write_reason_seg(root, "train", 6, seed=0)
    return write_reason_seg(root, "val", 3, seed=1)


def _config(tiny_checkpoints, reason_seg, log_dir, **overrides):
    model = tiny_llm_seg_config(tiny_checkpoints)
    dataset_dir, masks_dir = reason_seg
    fields = {f: getattr(model, f) for f in model.__dataclass_fields__}
    fields.update(
        dataset_dir=str(dataset_dir),
        sam_masks_dir=str(masks_dir),
        dataset="reason_seg",
        sample_rates="1",
        epochs=2,
        steps_per_epoch=2,
        grad_accumulation_steps=2,
        warmup_steps=1,
        lr=1e-3,
        workers=0,
        log_base_dir=str(log_dir),
        exp_name="run",
        device="cpu",
    )
    fields.update(overrides)
    return training.TrainConfig(**fields)


def _module_state(run_dir: Path) -> dict:
    tag = (run_dir / "ckpt_model" / "latest").read_text().strip()
    path = run_dir / "ckpt_model" / tag / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=True)["module"]


def _optimizer_state(run_dir: Path) -> dict:
    tag = (run_dir / "ckpt_model" / "latest").read_text().strip()
    path = run_dir / "ckpt_model" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    # DeepSpeed's own optimizer file holds its config objects: trusted here (we just wrote it).
    return torch.load(path, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]


def test_train_resume_and_evaluate(tiny_checkpoints, reason_seg, tmp_path, monkeypatch):
    full = _config(tiny_checkpoints, reason_seg, tmp_path / "full")
    metrics = training.main(full)
    run = full.log_dir
    assert json.loads((run / "config.json").read_text())["steps_per_epoch"] == 2
    assert (run / "ckpt_model" / "latest").read_text().strip() == "global_step4"
    assert set(metrics) >= {"giou", "ciou", "nciou", "short/giou", "long/giou"}
    assert json.loads((run / "eval" / "step4" / "metrics.json").read_text())["num_images"] == 3
    assert (run / "eval" / "step4" / "per_image.csv").read_text().startswith("name,")
    assert list((run / "eval" / "step4" / "vis").glob("*.png"))
    best = json.loads((run / "ckpt_model" / "best.json").read_text())
    assert best["tag"] in {p.name for p in (run / "ckpt_model").glob("global_step*")}

    events = EventAccumulator(str(run)).Reload()
    assert {"train/loss", "train/align_loss", "train/lr", "val/giou", "val/ciou"} <= set(
        events.Tags()["scalars"]
    )
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]

    # Interrupted at step 3, then resumed with the same command: identical end state.
    split = _config(tiny_checkpoints, reason_seg, tmp_path / "split", stop_at_step=3)
    training.main(split)
    assert (split.log_dir / "ckpt_model" / "latest").read_text().strip() == "global_step3"
    training.main(_config(tiny_checkpoints, reason_seg, tmp_path / "split"))
    resumed_steps = EventAccumulator(str(split.log_dir)).Reload().Scalars("train/loss")
    assert sorted({e.step for e in resumed_steps}) == [1, 2, 3, 4]
    full_state, split_state = _module_state(run), _module_state(split.log_dir)
    assert set(full_state) == set(split_state)
    for key in full_state:
        torch.testing.assert_close(split_state[key], full_state[key], msg=key)
    full_opt, split_opt = _optimizer_state(run), _optimizer_state(split.log_dir)
    assert full_opt["state"][0]["step"] == split_opt["state"][0]["step"]
    torch.testing.assert_close(split_opt["state"][0]["exp_avg"], full_opt["state"][0]["exp_avg"])

    # eval.py reproduces the final evaluation from the checkpoint, with the same code.
    model = tiny_llm_seg_config(tiny_checkpoints)
    eval_config = eval_script.EvalConfig(
        **{f: getattr(model, f) for f in model.__dataclass_fields__},
        checkpoint=str(run),
        checkpoint_tag="latest",
        dataset_dir=full.dataset_dir,
        sam_masks_dir=full.sam_masks_dir,
        out_dir=str(tmp_path / "eval"),
        device="cpu",
    )
    with pytest.raises(ValueError, match="not both: --checkpoint"):
        eval_script.main(dataclasses.replace(eval_config, model_dir=str(run)))

    def no_group(device):  # one process evaluates without DeepSpeed's process group
        raise AssertionError("single-process evaluation joined a process group")

    monkeypatch.setattr(eval_script, "init_process_group", no_group)
    evaluated = eval_script.main(eval_config)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    final = json.loads((run / "eval" / "step4" / "metrics.json").read_text())
    assert evaluated["giou"] == pytest.approx(final["giou"])
    assert saved["ciou"] == pytest.approx(final["ciou"])


def test_two_cpu_processes_under_torchrun(tiny_checkpoints, reason_seg, tmp_path):
    model = tiny_llm_seg_config(tiny_checkpoints)
    dataset_dir, masks_dir = reason_seg
    args = [
        "--version", model.version, "--vision-tower", model.vision_tower,
        "--dinov2", model.dinov2, "--dino_image_size", "112", "--out_dim", "32",
        "--scorer_heads", "4", "--scorer_mlp_dim", "64", "--proposal_map_size", "32",
        "--precision", "fp32", "--no-gradient_checkpointing",
        "--dataset_dir", str(dataset_dir), "--sam_masks_dir", str(masks_dir),
        "--dataset", "reason_seg", "--sample_rates", "1", "--epochs", "1",
        "--steps_per_epoch", "2", "--grad_accumulation_steps", "1", "--warmup_steps", "1",
        "--workers", "1", "--device", "cpu", "--log_base_dir", str(tmp_path), "--exp_name", "ddp",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", port, str(REPO / "training.py"), *args]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "ckpt_model" / "global_step2" / "mp_rank_00_model_states.pt").is_file()
    optim_shards = list((run / "ckpt_model" / "global_step2").glob("*optim_states.pt"))
    assert len(optim_shards) == 2  # ZeRO-2 partitions the optimizer over the two ranks
    metrics = json.loads((run / "eval" / "step2" / "metrics.json").read_text())
    assert metrics["num_images"] == 3  # every val image scored once across the two ranks
    assert len((run / "eval" / "step2" / "per_image.csv").read_text().splitlines()) == 4


def test_pred_dir_scores_other_methods(reason_seg, tmp_path):
    import numpy as np
    from PIL import Image

    dataset_dir, _ = reason_seg
    val = dataset_dir / "reason_seg" / "ReasonSeg" / "val"
    preds = tmp_path / "preds"
    preds.mkdir()
    from utils.masks import labelme_to_mask

    # a perfect prediction for img_000, an empty one for img_001, none for img_002
    first = json.loads((val / "img_000.json").read_text())
    size = Image.open(val / "img_000.jpg").size
    perfect = (labelme_to_mask(first["shapes"], size[1], size[0]) == 1).astype(np.uint8) * 255
    Image.fromarray(perfect).save(preds / "img_000.png")
    Image.fromarray(np.zeros_like(perfect)).save(preds / "img_001.png")
    config = eval_script.EvalConfig(
        dataset_dir=str(dataset_dir), pred_dir=str(preds), out_json=str(tmp_path / "s.json")
    )
    result = eval_script.main(config)
    assert result["giou"] == pytest.approx(1 / 3)
    assert result["num_images"] == 3
    assert result["missing_predictions"] == ["img_002.png"]
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["nciou"] == pytest.approx(result["nciou"])
