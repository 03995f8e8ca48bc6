"""Every checkpoint layout loads and computes what plain ``transformers`` classes compute.

Fixtures are written in the real on-disk layouts: LLaVA-v1 lightning and LLaVA-1.5 (original
repo), ``transformers`` llava in both key styles and as ``save_pretrained`` writes it, the
``facebook/dinov2-*`` folder and the official hub ``dinov2_vit*14_pretrain.pth``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from model.backbones.dinov2 import dinov2_config_from_hub_state, load_dinov2, load_dinov2_hub
from model.backbones.llava_checkpoint import (
    detect_llava_layout,
    load_llava,
    save_llava_transformers,
)
from model.tiny import build_tiny_dinov2, build_tiny_llava, write_tiny_checkpoints
from tests.model.dinov2_hub import hub_state_of
from utils.checkpoint import CheckpointError, load_state_dict
from utils.tokenizer import IMAGE_TOKEN

ATOL = 1e-5


def _prompt(tokenizer, num_image_tokens: int) -> torch.Tensor:
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = tokenizer(" what is the red one? [SEG]", add_special_tokens=False)["input_ids"]
    return torch.tensor([[tokenizer.bos_token_id] + [image] * num_image_tokens + text])


def _llava_reference(folder, vision_tower_state: dict, raw: dict) -> LlavaForConditionalGeneration:
    """A plain ``LlavaForConditionalGeneration`` holding an original-layout folder's weights."""
    lm = LlamaForCausalLM.from_pretrained(folder)
    tower_config = CLIPVisionModel.config_class.from_pretrained(raw["mm_vision_tower"])
    config = LlavaConfig(
        text_config=lm.config.to_dict(),
        vision_config=tower_config.to_dict(),
        image_token_id=raw["image_token_id"],
        vision_feature_layer=raw["mm_vision_select_layer"],
        vision_feature_select_strategy="default",
    )
    reference = LlavaForConditionalGeneration(config)
    state = {
        f"model.language_model.{k[6:]}": v
        for k, v in lm.state_dict().items()
        if k != "lm_head.weight"
    }
    state["lm_head.weight"] = lm.lm_head.weight
    state.update({f"model.vision_tower.{k}": v for k, v in vision_tower_state.items()})
    projector = {
        k: v for k, v in load_state_dict(folder).items() if k.startswith("model.mm_projector.")
    }
    for index, name in (("0", "linear_1"), ("2", "linear_2")):
        for kind in ("weight", "bias"):
            state[f"model.multi_modal_projector.{name}.{kind}"] = projector[
                f"model.mm_projector.{index}.{kind}"
            ]
    reference.load_state_dict(state, strict=True)
    return reference.eval()


def test_llava_v1_lightning_matches_plain_llama_and_clip(tmp_path):
    # LLaVA-v1: one Linear projector, CLS dropped, layer -2; computed here by concatenation.
    paths = write_tiny_checkpoints(tmp_path, projector_type="linear")
    raw = json.loads((paths.llava / "config.json").read_text())
    assert "mm_projector_type" not in raw
    assert raw["mm_use_im_start_end"] is True
    backbone, tokenizer, _ = load_llava(paths.llava)
    ids = _prompt(tokenizer, backbone.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)

    lm = LlamaForCausalLM.from_pretrained(paths.llava).eval()
    tower = CLIPVisionModel.from_pretrained(paths.clip).eval()
    projector = torch.nn.Linear(24, 32)
    state = load_state_dict(paths.llava)
    projector.load_state_dict(
        {"weight": state["model.mm_projector.weight"], "bias": state["model.mm_projector.bias"]}
    )
    with torch.no_grad():
        features = projector(tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        text = lm.get_input_embeddings()(ids)
        n = backbone.num_image_tokens
        embeds = torch.cat([text[:, :1], features, text[:, 1 + n :]], dim=1)
        expected = lm(inputs_embeds=embeds).logits
        actual = backbone(ids, torch.ones_like(ids), pixels).logits
    assert torch.allclose(actual, expected, atol=ATOL)


def test_llava_15_original_layout_matches_transformers_llava(tmp_path):
    paths = write_tiny_checkpoints(tmp_path, projector_type="mlp2x_gelu")
    backbone, tokenizer, raw = load_llava(paths.llava)
    assert detect_llava_layout(paths.llava) == "original"
    raw = dict(raw, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    tower_state = CLIPVisionModel.from_pretrained(paths.clip).state_dict()
    reference = _llava_reference(paths.llava, tower_state, raw)
    ids = _prompt(tokenizer, backbone.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        actual = backbone(ids, torch.ones_like(ids), pixels).logits
    assert torch.allclose(actual, expected, atol=ATOL)


def _write_transformers_llava(folder, style: str):
    """A tiny llava-1.5 in the transformers layout; ``style`` picks who writes it."""
    backbone, tokenizer, _ = build_tiny_llava(projector_type="mlp2x_gelu", seed=1)
    if style == "save_pretrained":
        save_llava_transformers(folder, backbone, tokenizer, key_style="v5")
        # Round-trip through transformers' own writer, whatever key style it uses.
        model = LlavaForConditionalGeneration.from_pretrained(folder)
        for file in folder.glob("*.safetensors"):
            file.unlink()
        model.save_pretrained(folder)
    else:
        save_llava_transformers(folder, backbone, tokenizer, key_style=style)
    return backbone, tokenizer


@pytest.mark.parametrize("style", ["v4", "v5", "save_pretrained"])
def test_transformers_llava_layout_matches_transformers(tmp_path, style):
    folder = tmp_path / "llava-hf"
    original, tokenizer = _write_transformers_llava(folder, style)
    keys = set(load_file(next(folder.glob("*.safetensors"))))
    if style == "v4":
        assert "language_model.model.norm.weight" in keys
        assert "vision_tower.vision_model.post_layernorm.weight" in keys
        assert "multi_modal_projector.linear_1.weight" in keys
    if style == "v5":
        assert {"model.language_model.norm.weight", "lm_head.weight"} <= keys
        assert "model.vision_tower.vision_model.post_layernorm.weight" in keys
    assert detect_llava_layout(folder) == "transformers"

    backbone, loaded_tokenizer, _ = load_llava(folder, vision_tower="/nonexistent/is/ignored")
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert backbone.num_image_tokens == 16
    reference = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    ids = _prompt(tokenizer, backbone.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        actual = backbone(ids, torch.ones_like(ids), pixels).logits
        plain = original(ids, torch.ones_like(ids), pixels).logits
    assert torch.allclose(actual, expected, atol=ATOL)
    assert torch.allclose(actual, plain, atol=ATOL)


def test_transformers_llava_missing_and_unexpected_keys_are_named(tmp_path):
    folder = tmp_path / "llava-hf"
    _write_transformers_llava(folder, "v4")
    weights = folder / "model.safetensors"
    state = load_file(weights)
    del state["language_model.model.layers.1.mlp.up_proj.weight"]
    state["language_model.model.extra_adapter.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(CheckpointError) as error:
        load_llava(folder)
    assert "model.layers.1.mlp.up_proj.weight" in str(error.value)
    assert "extra_adapter" in str(error.value)

    state = load_file(weights)
    state = {k: v for k, v in state.items() if "extra_adapter" not in k}
    state["language_model.model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 32)
    del state["multi_modal_projector.linear_2.bias"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"missing keys: \['multi_modal_projector.linear_2"):
        load_llava(folder)

    state["multi_modal_projector.linear_2.bias"] = torch.zeros(32)
    state["vision_tower.vision_model.extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_llava(folder)


def test_unknown_llava_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="neither an original LLaVA config"):
        load_llava(tmp_path)


# ------------------------------------------------------------------------------------- DINOv2


def test_dinov2_folder_matches_dinov2model(tiny_checkpoints):
    reference = Dinov2Model.from_pretrained(tiny_checkpoints.dinov2).eval()
    loaded = load_dinov2(tiny_checkpoints.dinov2)
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(
            loaded(pixels).last_hidden_state, reference(pixels).last_hidden_state, atol=ATOL
        )


@pytest.mark.parametrize("swiglu", [False, True])
def test_dinov2_hub_pth_matches_dinov2model(tmp_path, swiglu):
    if swiglu:  # ViT-g style SwiGLU MLP (w12 / w3)
        torch.manual_seed(0)
        config = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=4,
            patch_size=14,
            image_size=56,
            use_swiglu_ffn=True,
        )
        reference = Dinov2Model(config).eval()
    else:
        reference = build_tiny_dinov2()
    for parameter in reference.parameters():  # layer scales and mask token start constant
        torch.nn.init.normal_(parameter, std=0.1)
    hub = hub_state_of(reference, tmp_path / "folder")
    assert ("blocks.1.mlp.w12.weight" in hub) == swiglu
    torch.save(hub, tmp_path / "dinov2_vitt14_pretrain.pth")

    loaded = load_dinov2(tmp_path / "dinov2_vitt14_pretrain.pth", num_heads=4)
    config = loaded.config
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (32, 2, 14)
    assert config.image_size == 56  # from the 4x4 position-embedding grid
    assert config.use_swiglu_ffn == swiglu
    pixels = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        expected = reference(pixels).last_hidden_state
        assert torch.allclose(loaded(pixels).last_hidden_state, expected, atol=ATOL)


def test_dinov2_hub_missing_and_unexpected_keys_are_named(tmp_path):
    hub = hub_state_of(build_tiny_dinov2(), tmp_path / "folder")
    del hub["blocks.1.ls2.gamma"]
    hub["register_tokens"] = torch.zeros(1, 4, 32)
    torch.save(hub, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError) as error:
        load_dinov2_hub(tmp_path / "broken.pth", num_heads=4)
    assert "encoder.layer.1.layer_scale2.lambda1" in str(error.value)  # missing
    assert "register_tokens" in str(error.value)  # unexpected
    with pytest.raises(CheckpointError, match="not found"):
        load_dinov2(tmp_path / "absent.pth")


def test_dinov2_hub_architecture_inference():
    state = {
        "cls_token": torch.zeros(1, 1, 1024),
        "pos_embed": torch.zeros(1, 37 * 37 + 1, 1024),
        "patch_embed.proj.weight": torch.zeros(1024, 3, 14, 14),
        "blocks.0.mlp.fc1.weight": torch.zeros(4096, 1024),
        "blocks.23.norm1.weight": torch.zeros(1024),
    }
    config = dinov2_config_from_hub_state(state)  # ViT-L/14 as dinov2_vitl14_pretrain.pth
    assert config.num_attention_heads == 16
    assert config.num_hidden_layers == 24
    assert config.image_size == 518
    assert config.mlp_ratio == 4
    assert dinov2_config_from_hub_state(state, arch="vitl14").num_attention_heads == 16
    with pytest.raises(CheckpointError, match="vitb14 has hidden size 768"):
        dinov2_config_from_hub_state(state, arch="vitb14")
    with pytest.raises(CheckpointError, match="missing key 'cls_token'"):
        dinov2_config_from_hub_state({})


def test_llava_15_projector_key_errors_are_named(tmp_path):
    paths = write_tiny_checkpoints(tmp_path, projector_type="mlp2x_gelu")
    index = json.loads((paths.llava / "pytorch_model.bin.index.json").read_text())
    shard = paths.llava / index["weight_map"]["model.mm_projector.2.bias"]
    state = torch.load(shard, weights_only=True)
    del state["model.mm_projector.2.bias"]
    torch.save(state, shard)
    with pytest.raises(
        CheckpointError, match=r"projector keys \['0.bias', '0.weight', '2.weight'\]"
    ):
        load_llava(paths.llava)


def test_dinov2_folder_missing_key_is_named(tmp_path, tiny_checkpoints):
    folder = tmp_path / "dino"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoints.dinov2 / "config.json").read_text())
    state = load_file(tiny_checkpoints.dinov2 / "model.safetensors")
    del state["encoder.layer.1.mlp.fc2.bias"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.mlp\.fc2\.bias"):
        load_dinov2(folder)
