"""Options outside the paper's set-up, for tiny random models: training DINOv2 or the whole LLM."""

from __future__ import annotations

import dataclasses

import torch
from peft.tuners.lora import LoraLayer

from model.builder import LLMSegConfig, build_llm_seg, setup_trainable
from tests.model.batches import BatchSpec, make_batch


def _trainable(module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_paper_defaults_keep_dinov2_and_the_llm_base_frozen(tiny_model, tiny_config):
    model, _ = tiny_model
    setup_trainable(model, tiny_config)
    assert not _trainable(model.dino)
    assert not model.dino.trainable
    language_model = model.backbone.language_model
    base = {n for n in _trainable(language_model) if "lora_" not in n and "embed" not in n}
    assert base == {"lm_head.weight"}
    assert LLMSegConfig().train_dinov2 is False
    assert LLMSegConfig().train_language_model is False


def test_train_dinov2_lets_gradients_reach_it(tiny_config):
    config = dataclasses.replace(tiny_config, train_dinov2=True)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    dino_parameters = dict(model.dino.named_parameters())
    assert set(dino_parameters) == _trainable(model.dino)
    model.train()
    assert not model.dino.dinov2.training  # still no dropout
    batch = make_batch(tokenizer, model.num_image_tokens, BatchSpec(rows=[[1]], proposals=[3]))
    model(batch).loss.backward()
    gradient = dino_parameters["dinov2.embeddings.patch_embeddings.projection.weight"].grad
    assert gradient is not None
    assert gradient.abs().sum() > 0
    with torch.no_grad():  # evaluation still builds no graph
        assert not model.dino(batch.dino_pixels).requires_grad


def test_train_language_model_unfreezes_every_llm_weight(tiny_config):
    config = dataclasses.replace(tiny_config, train_language_model=True)
    model, _ = build_llm_seg(config)
    setup_trainable(model, config)
    language_model = model.backbone.language_model
    assert _trainable(language_model) == {n for n, _ in language_model.named_parameters()}
    assert any(isinstance(m, LoraLayer) for m in language_model.modules())  # lora_r still 8
    assert not _trainable(model.backbone.vision_tower)
    assert not _trainable(model.dino)
