"""LISA's released checkpoints: a tiny fixture in LISA's exact folder layout, converted and run.

The fixture is what ``LISAForCausalLM.save_pretrained`` writes (two ``.bin`` shards + index,
``config.json`` with LLaVA's ``mm_*`` fields, the 4.31-saved sentencepiece tokenizer holding
``<im_patch>``, ``<im_start>``, ``<im_end>``, ``[SEG]``) of a tiny reference model: a LLaVA with
a SAM head whose keys are written under LISA's names independently of the converter's rules.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as eval_script
from model.backbones.llava_checkpoint import load_clip_vision_tower, save_llava_original
from model.backbones.sam import load_sam
from model.convert_lisa_checkpoint import ConvertLisaConfig, main
from model.export import load_exported
from model.heads.sam_decoder import SamMaskHead
from model.llm_seg import LLMSegModel
from model.tiny import build_tiny_llava, tiny_sam_architecture
from tests.data_fixtures import write_reason_seg
from utils.checkpoint import CheckpointError
from utils.data.builders import build_encoder
from utils.data.reason_seg import load_reason_seg_split, reason_seg_eval_record
from utils.data.samples import collate
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN, load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "upstream_tokenization" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")  # fmt: skip


def lisa_state(model: LLMSegModel, lisa_vocab: int) -> dict[str, torch.Tensor]:
    """The reference model's weights under LISA's names (``LISAForCausalLM`` after merging)."""
    state = {}
    for key, value in model.backbone.language_model.state_dict().items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = value[:lisa_vocab]  # LISA has no <image> row: it writes -200 instead
        state[key] = value
    for layer in range(model.backbone.language_model.config.num_hidden_layers):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    for key, value in model.backbone.projector.state_dict().items():
        state[f"model.mm_projector.{key}"] = value
    for key, value in model.backbone.vision_tower.state_dict().items():
        key = key if key.startswith("vision_model.") else "vision_model." + key
        state[f"model.vision_tower.vision_tower.{key}"] = value
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        for key, value in getattr(model.sam_head, part).state_dict().items():
            state[f"model.visual_model.{part}.{key}"] = value
    for key, value in model.text_projection.state_dict().items():
        state[f"model.text_hidden_fcs.0.{key}"] = value
    return {k: v.clone() for k, v in state.items()}


def write_lisa_folder(folder: Path, model: LLMSegModel, clip: Path, tokenizer) -> None:
    save_llava_original(folder, model.backbone, tokenizer, clip, "linear")
    for stale in folder.iterdir():
        if stale.name.startswith(("pytorch_model", "tokenizer", "special", "added", "chat")):
            stale.unlink()
    lisa_vocab = len(tokenizer) - 1
    state = lisa_state(model, lisa_vocab)
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
              "pytorch_model-00002-of-00002.bin": keys[1::2]}  # fmt: skip
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, folder / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    raw = json.loads((folder / "config.json").read_text())
    raw.update(architectures=["LISAForCausalLM"], out_dim=32, train_mask_decoder=True,
               vision_pretrained="PATH_TO_SAM_ViT-H", vocab_size=lisa_vocab,
               use_mm_start_end=True)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(raw))
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER / name, folder / name)


@pytest.fixture(scope="module")
def lisa(tiny_checkpoints, tmp_path_factory):
    """``(folder, reference model, tokenizer)``."""
    root = tmp_path_factory.mktemp("lisa")
    tokenizer = load_tokenizer(str(TOKENIZER))
    backbone, tokenizer, _ = build_tiny_llava(tokenizer=tokenizer, seed=7)
    # The CLIP LISA was trained with is the one --vision-tower names.
    backbone.vision_tower = load_clip_vision_tower(tiny_checkpoints.clip, torch.float32)
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == len(tokenizer) - 1
    torch.manual_seed(2)
    model = LLMSegModel(
        backbone, None, None, tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        sam_head=SamMaskHead(load_sam(tiny_checkpoints.sam)), mask_head="sam",
    )  # fmt: skip
    model.eval()
    write_lisa_folder(root / "LISA-tiny", model, tiny_checkpoints.clip, tokenizer)
    return root, model, tokenizer


def _convert(root: Path, tiny_checkpoints, name: str, **overrides) -> dict:
    config = ConvertLisaConfig(
        checkpoint=str(root / "LISA-tiny"), vision_tower=str(tiny_checkpoints.clip),
        out_dir=str(root / name), dtype="fp32", sam_decoder_heads=2, **overrides,
    )  # fmt: skip
    return main(config)


def test_converted_lisa_equals_the_checkpoint(lisa, tiny_checkpoints, tmp_path):
    root, reference, tokenizer = lisa
    report = _convert(root, tiny_checkpoints, "export")
    assert report["unmapped"] == []
    assert report["dropped"] == {"dropped_rotary": 2}
    assert report["new_tokens"] == [IMAGE_TOKEN]
    assert report["tokenization"] == "llava_legacy"
    arch = tiny_sam_architecture()
    assert report["sam_architecture"] == arch.__dict__  # read from the weights
    check = report["vision_tower_check"]
    assert check["equal"] == check["compared"] > 0
    export = root / "export"
    assert (export / "sam" / "sam_lisa.pth").is_file()
    assert json.loads((export / "conversion_report.json").read_text()) == report

    loaded = load_exported(export)
    assert loaded.model.mask_head == "sam"
    assert loaded.model.proposal_scorer is None
    assert loaded.model.dino is None
    assert loaded.manifest.model.tokenization == "llava_legacy"
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    # The same masks as the checkpoint's own weights, on a real encoded ReasonSeg prompt.
    write_reason_seg(tmp_path, "val", 2)
    settings = _settings(loaded)
    encoder = build_encoder(settings, loaded.tokenizer, loaded.model.num_image_tokens,
                            loaded.model.sam_image_size)  # fmt: skip
    items = load_reason_seg_split(tmp_path / "dataset", None, "val")
    batch = collate([encoder(reason_seg_eval_record(item)) for item in items], 0)[0]
    assert batch.sam_pixels.shape[-1] == arch.image_size
    with torch.no_grad():
        expected, got = reference.score(batch), loaded.model.score(batch)
    for want, have in zip(expected.sam_logits, got.sam_logits):
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4)
    keep = torch.arange(len(tokenizer)) != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.testing.assert_close(got.logits[..., keep], expected.logits[..., keep], atol=2e-5,
                               rtol=1e-4)  # fmt: skip

    # eval.py on the export: no proposal store, no DINOv2, logits > 0 (LISA's evaluation).
    metrics = eval_script.main(eval_script.EvalConfig(
        model_dir=str(export), dataset_dir=str(tmp_path / "dataset"),
        sam_masks_dir=str(tmp_path / "no_store_here"), val_dataset="ReasonSeg|val",
        precision="fp32", device="cpu", out_dir=str(tmp_path / "eval"),
    ))  # fmt: skip
    assert metrics["head"] == "sam"
    assert metrics["num_images"] == 2
    ious = []
    for index, logits in enumerate(expected.sam_logits):
        pred, gt = logits[0] > 0, batch.target_masks[index][0].bool()
        union = (pred | gt).sum()
        ious.append(float((pred & gt).sum() / union) if union else 1.0)
    assert metrics["giou"] == pytest.approx(np.mean(ious), abs=1e-6)


def _settings(loaded):
    from types import SimpleNamespace

    model = loaded.manifest.model
    return SimpleNamespace(
        vision_tower=model.vision_tower, dino_image_size=model.dino_image_size,
        proposal_map_size=model.proposal_map_size, model_max_length=model.model_max_length,
        tokenization=model.tokenization, top_k_proposals=50, proposal_order="area",
        antialias=True, conv_type="llava_v1",
    )  # fmt: skip


def test_unmapped_keys_are_refused_unless_allowed(lisa, tiny_checkpoints, tmp_path):
    root, _, _ = lisa
    copy = tmp_path / "LISA-tiny"
    shutil.copytree(root / "LISA-tiny", copy)
    shard = copy / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.lisa_extra.weight"] = torch.ones(1)
    torch.save(state, shard)
    index = json.loads((copy / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.lisa_extra.weight"] = shard.name
    (copy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lisa_extra"):
        _convert(tmp_path, tiny_checkpoints, "refused")
    assert not (tmp_path / "refused").exists()
    report = _convert(tmp_path, tiny_checkpoints, "allowed", allow_unmapped=True)
    assert report["unmapped"] == ["model.lisa_extra.weight"]
