"""Every tiny component round-trips through its real on-disk layout bit-identically."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.backbones.dinov2 import load_dinov2_folder
from model.backbones.llava_checkpoint import load_clip_vision_tower, load_llava_original
from model.backbones.sam import load_sam
from model.tiny import (
    build_tiny_dinov2,
    build_tiny_llava,
    tiny_sam_architecture,
    write_tiny_checkpoints,
)
from utils.checkpoint import CheckpointError
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _prompt_ids(tokenizer, num_image_tokens):
    text = "<im_start>" + IMAGE_TOKEN * num_image_tokens + "<im_end> what is it? " + SEG_TOKEN
    return tokenizer(text, return_tensors="pt")


@pytest.mark.parametrize("projector_type", ["linear", "mlp2x_gelu"])
def test_llava_original_layout_round_trip(tmp_path, projector_type):
    paths = write_tiny_checkpoints(tmp_path, projector_type=projector_type)
    original, tokenizer, _ = build_tiny_llava(projector_type=projector_type)
    loaded, loaded_tokenizer, raw = load_llava_original(paths.llava)

    assert raw["mm_hidden_size"] == 24
    assert ("mm_projector_type" in raw) == (projector_type != "linear")
    assert len(list(paths.llava.glob("pytorch_model-*-of-00002.bin"))) == 2
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    _assert_same_state(original, loaded)
    assert loaded.num_image_tokens == 16  # (32 / 8)^2, from the vision config

    ids = _prompt_ids(tokenizer, loaded.num_image_tokens)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = original(ids.input_ids, ids.attention_mask, pixels)
        actual = loaded(ids.input_ids, ids.attention_mask, pixels)
    assert torch.equal(expected.logits, actual.logits)
    assert actual.hidden_states.shape == (1, ids.input_ids.shape[1], 32)


def test_clip_folder_has_real_layout_and_round_trips(tiny_checkpoints, tiny_llava):
    keys = load_file(tiny_checkpoints.clip / "model.safetensors")
    assert any(k.startswith("vision_model.") for k in keys)
    assert any(k.startswith("text_model.") for k in keys)
    tower = load_clip_vision_tower(tiny_checkpoints.clip, torch.float32)
    _assert_same_state(tiny_llava[0].vision_tower, tower)


def test_dinov2_folder_round_trip(tiny_checkpoints):
    loaded = load_dinov2_folder(tiny_checkpoints.dinov2)
    _assert_same_state(build_tiny_dinov2(), loaded)
    config = json.loads((tiny_checkpoints.dinov2 / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    assert "encoder.layer.0.norm1.weight" in load_file(
        tiny_checkpoints.dinov2 / "model.safetensors"
    )


def test_sam_checkpoint_round_trip(tiny_checkpoints):
    sam = load_sam(tiny_checkpoints.sam)
    state = torch.load(tiny_checkpoints.sam, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    for key, value in sam.state_dict().items():
        assert torch.equal(state[key], value), key
    assert sam.image_encoder.img_size == tiny_sam_architecture().image_size


def test_sam_key_errors_name_the_key(tmp_path, tiny_checkpoints):
    state = torch.load(tiny_checkpoints.sam, weights_only=True)
    arch = tiny_checkpoints.sam.with_suffix(".json").read_text()
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    (tmp_path / "missing.json").write_text(arch)
    with pytest.raises(CheckpointError, match=r"missing keys: mask_decoder\.iou_token\.weight"):
        load_sam(tmp_path / "missing.pth")
    extra = dict(state, **{"visual_model.foo": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    (tmp_path / "extra.json").write_text(arch)
    with pytest.raises(CheckpointError, match=r"unexpected keys: visual_model\.foo"):
        load_sam(tmp_path / "extra.pth")


def test_sam_preset_shape_mismatch(tiny_checkpoints, tmp_path):
    # A tiny state dict read as ViT-B (no architecture JSON beside it) must not load.
    plain = tmp_path / "sam_vit_b.pth"
    plain.write_bytes(tiny_checkpoints.sam.read_bytes())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_sam(plain, model_type="vit_b")


def test_llava_missing_and_unexpected_keys_are_named(tmp_path):
    paths = write_tiny_checkpoints(tmp_path)
    index = json.loads((paths.llava / "pytorch_model.bin.index.json").read_text())
    shard = paths.llava / index["weight_map"]["model.norm.weight"]
    state = torch.load(shard, weights_only=True)
    del state["model.norm.weight"]
    state["model.extra_head.weight"] = torch.zeros(2)
    index["weight_map"]["model.extra_head.weight"] = shard.name
    del index["weight_map"]["model.norm.weight"]
    torch.save(state, shard)
    (paths.llava / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        load_llava_original(paths.llava)
    assert "model.norm.weight" in str(error.value)
    assert "model.extra_head.weight" in str(error.value)


def test_dinov2_unexpected_key_is_named(tmp_path, tiny_checkpoints):
    folder = tmp_path / "dino"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoints.dinov2 / "config.json").read_text())
    state = load_file(tiny_checkpoints.dinov2 / "model.safetensors")
    state["head.weight"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="head.weight"):
        load_dinov2_folder(folder)


def test_vision_tower_must_be_local(tmp_path):
    with pytest.raises(CheckpointError, match="not a local CLIP folder"):
        load_clip_vision_tower(tmp_path / "openai/clip-vit-large-patch14", torch.float32)
