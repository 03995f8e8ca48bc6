"""training.py with VQA mixed into segmentation batches, and fine-tuning from a run's weights."""

import pytest
import torch

import training
from model.builder import tiny_llm_seg_config
from tests.data_fixtures import write_reason_seg
from tests.utils.data.loader_fixtures import write_vqa
from utils.data.samples import collate_batch


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    write_reason_seg(root, "train", 4, seed=0)
    dataset_dir, masks_dir = write_reason_seg(root, "val", 2, seed=1)
    write_vqa(dataset_dir)
    return dataset_dir, masks_dir


def _config(tiny_checkpoints, data, log_dir, **overrides):
    model = tiny_llm_seg_config(tiny_checkpoints)
    fields = {f: getattr(model, f) for f in model.__dataclass_fields__}
    fields.update(
        dataset_dir=str(data[0]),
        sam_masks_dir=str(data[1]),
        dataset="reason_seg||vqa",
        sample_rates="1,1",
        epochs=1,
        steps_per_epoch=2,
        grad_accumulation_steps=2,
        batch_size=2,
        warmup_steps=1,
        lr=1e-3,
        workers=0,
        no_eval=True,
        log_base_dir=str(log_dir),
        exp_name="mixed",
        device="cpu",
    )
    fields.update(overrides)
    return training.TrainConfig(**fields)


def _saved_module(run_dir):
    tag = (run_dir / "ckpt_model" / "latest").read_text().strip()
    path = run_dir / "ckpt_model" / tag / "mp_rank_00_model_states.pt"
    return tag, torch.load(path, weights_only=True)["module"]


def test_vqa_mixed_into_batches_trains_then_finetune_from_weights(
    tiny_checkpoints, mixed_data, tmp_path, monkeypatch
):
    batches = []

    def recording_collate(samples, pad_token_id):
        batches.append(sorted({s.record.dataset for s in samples}))
        return collate_batch(samples, pad_token_id)

    monkeypatch.setattr(training, "collate_batch", recording_collate)
    config = _config(tiny_checkpoints, mixed_data, tmp_path)
    training.main(config)
    assert len(batches) == 4  # 2 steps x 2 micro-batches of 2 images
    assert ["ReasonSeg", "llava_instruct_150k"] in batches  # both families in one batch
    tag, trained = _saved_module(config.log_dir)
    assert tag == "global_step2"

    # Fine-tuning starts from those weights with a fresh step (upstream's finetune recipe).
    captured = {}
    original_engine = training.initialize_engine

    def capture(model, settings, device):
        captured.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return original_engine(model, settings, device)

    monkeypatch.setattr(training, "initialize_engine", capture)
    finetune = _config(
        tiny_checkpoints, mixed_data, tmp_path, exp_name="finetune", dataset="reason_seg",
        sample_rates="1", steps_per_epoch=1, init_weights=str(config.log_dir),
    )  # fmt: skip
    training.main(finetune)
    assert _saved_module(finetune.log_dir)[0] == "global_step1"
    for name, value in trained.items():
        torch.testing.assert_close(captured[name], value, msg=name)
