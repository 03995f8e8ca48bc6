"""build_llm_seg / setup_trainable: local loading, sizes, LoRA placement, config parsing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import Dinov2Config, Dinov2Model

from model.backbones.llava_checkpoint import save_llava_transformers
from model.builder import (
    CONFIG_ALIASES,
    LLMSegConfig,
    build_llm_seg,
    setup_trainable,
    tiny_llm_seg_config,
)
from model.tiny import build_tiny_llava
from tests.model.batches import BatchSpec, make_batch
from tests.model.dinov2_hub import hub_state_of
from utils.checkpoint import CheckpointError
from utils.config import parse_config
from utils.tokenizer import SEG_TOKEN


def test_config_parses_upstream_spellings():
    config = parse_config(
        LLMSegConfig,
        [
            "--version",
            "/ckpt/llava",
            "--vision-tower",
            "/ckpt/clip",
            "--dinov2",
            "/d.pth",
            "--regression_loss_weight",
            "2.5",
            "--no-gradient_checkpointing",
            "--lora_r",
            "0",
        ],
        aliases=CONFIG_ALIASES,
    )
    assert config.vision_tower == "/ckpt/clip"
    assert config.iop_loss_weight == 2.5
    assert config.gradient_checkpointing is False
    assert config.lora_r == 0
    assert LLMSegConfig().dino_image_size == 896
    assert (LLMSegConfig().lora_r, LLMSegConfig().lora_alpha) == (8, 16)
    loss = LLMSegConfig(align_temperature=0.1).loss_config()
    assert (loss.ce_weight, loss.align_weight, loss.iop_weight, loss.temperature) == (1, 1, 1, 0.1)


def test_build_from_tiny_folders(tiny_model, tiny_config):
    model, tokenizer = tiny_model
    assert model.seg_token_id == tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    assert model.num_image_tokens == 16
    assert not model.training
    assert model.proposal_scorer.config.feature_dim == 32  # from the DINOv2 config
    assert model.proposal_scorer.config.map_size == tiny_config.proposal_map_size
    assert model.text_projection[2].out_features == tiny_config.out_dim
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_build_in_bf16_puts_every_parameter_in_bf16(tiny_config):
    model, _ = build_llm_seg(dataclasses.replace(tiny_config, precision="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_build_from_transformers_llava_and_hub_dinov2(tmp_path, tiny_config):
    backbone, tokenizer, _ = build_tiny_llava(projector_type="mlp2x_gelu")
    save_llava_transformers(tmp_path / "llava-hf", backbone, tokenizer)
    # A 128-d DINOv2 so the official head rule (hidden // 64 = 2) applies.
    dinov2 = Dinov2Model(
        Dinov2Config(
            hidden_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=14,
            image_size=56,
        )
    )
    torch.save(hub_state_of(dinov2, tmp_path / "dino_folder"), tmp_path / "dinov2_pretrain.pth")
    config = dataclasses.replace(
        tiny_config,
        version=str(tmp_path / "llava-hf"),
        vision_tower="",
        dinov2=str(tmp_path / "dinov2_pretrain.pth"),
    )
    model, tokenizer = build_llm_seg(config)
    assert model.dino.dinov2.config.num_attention_heads == 2
    assert model.proposal_scorer.config.feature_dim == 128
    batch = make_batch(tokenizer, model.num_image_tokens, BatchSpec(rows=[[1]], proposals=[3]))
    out = model.score(batch)
    assert out.similarities[0].shape == (1, 3)
    assert torch.isfinite(out.loss)
    with pytest.raises(CheckpointError, match="vitl14 has hidden size 1024"):
        build_llm_seg(dataclasses.replace(config, dinov2_arch="vitl14"))


def test_build_errors_are_specific(tiny_config):
    with pytest.raises(ValueError, match="LLMSegConfig.version is required"):
        build_llm_seg(dataclasses.replace(tiny_config, version=""))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        build_llm_seg(dataclasses.replace(tiny_config, dino_image_size=100))


def test_lora_lands_only_on_the_language_model(tiny_model, tiny_config):
    model, _ = tiny_model
    setup_trainable(model, tiny_config)
    lora_layers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert sorted(lora_layers) == [
        f"backbone.language_model.model.layers.{i}.self_attn.{p}"
        for i in range(2)
        for p in ("q_proj", "v_proj")
    ]
    lora = model.backbone.language_model.model.layers[0].self_attn.q_proj
    assert lora.r["default"] == 8
    assert lora.scaling["default"] == 16 / 8
    assert lora.lora_dropout["default"].p == 0.05
    assert not any(isinstance(m, LoraLayer) for m in model.proposal_scorer.modules())
    assert not any(isinstance(m, LoraLayer) for m in model.backbone.vision_tower.modules())

    def trainable(module):
        return {p.requires_grad for p in module.parameters()}

    assert trainable(model.backbone.vision_tower) == {False}
    assert trainable(model.backbone.projector) == {False}
    assert trainable(model.dino) == {False}
    assert trainable(model.text_projection) == {True}
    assert trainable(model.proposal_scorer) == {True}
    assert trainable(model.backbone.language_model.get_input_embeddings()) == {True}
    assert trainable(model.backbone.language_model.lm_head) == {True}
    assert trainable(model.backbone.language_model.model.norm) == {False}
    with pytest.raises(RuntimeError, match="already applied"):
        setup_trainable(model, tiny_config)


def test_lora_can_be_disabled_and_checkpointing_switched(tiny_model, tiny_config):
    model, _ = tiny_model
    setup_trainable(model, dataclasses.replace(tiny_config, lora_r=0, gradient_checkpointing=True))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert model.gradient_checkpointing
    assert model.backbone.language_model.get_input_embeddings().weight.requires_grad
    assert not model.backbone.language_model.model.layers[0].self_attn.q_proj.weight.requires_grad


def test_tiny_preset_overrides(tiny_checkpoints):
    config = tiny_llm_seg_config(tiny_checkpoints, out_dim=16, scorer_heads=2)
    assert (config.out_dim, config.scorer_heads, config.dino_image_size) == (16, 2, 112)
