"""The official LLM-Seg checkpoint converter, on a tiny fixture with upstream's exact layout.

The fixture is an upstream-style DeepSpeed save (``global_stepN/mp_rank_00_model_states.pt``,
``module`` = peft 0.4 ``PeftModelForCausalLM`` around ``LISAForCausalLM``, bf16, frozen weights
included) of a tiny reference model: ours, with unmerged LoRA and random heads. Its key names are
written here from upstream's ``model/LISA.py`` and ``training.py`` (independently of the
converter's rules); the converted export must score exactly like the reference model.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from model.backbones.llava_checkpoint import save_llava_original
from model.backbones.sam import load_sam
from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from model.convert_llmseg_checkpoint import (
    ConvertConfig,
    main,
    map_upstream_keys,
    merge_lora,
    reorder_vocabulary_rows,
)
from model.export import load_exported
from model.inference import InferenceSettings, Segmenter, readable_ids
from model.tiny import build_tiny_llava, train_tiny_tokenizer
from tests.model.batches import BatchSpec, make_batch
from tests.model.dinov2_hub import hub_state_of
from tests.utils.test_legacy_tokenizer import CASES, REFERENCE, encode_like_upstream
from utils.checkpoint import CheckpointError
from utils.config import parse_config
from utils.data.conversation import VALIDATION_ANSWER
from utils.legacy_tokenizer import LegacyLlamaTokenizer
from utils.tokenizer import (
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_TOKEN,
    SEG_TOKEN,
    load_tokenizer,
)

PEFT = "base_model.model."
SENTENCEPIECE_TOKENIZER = (
    Path(__file__).resolve().parents[1] / "data" / "upstream_tokenization" / "tokenizer"
)
ADDED = (SEG_TOKEN, IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)
# Upstream module names (model/LISA.py) of our heads.
HEAD_NAMES = {
    "text_projection.": "model.text_hidden_fcs.0.",
    "proposal_scorer.feature_proj.": "model.lisa_dino_conv.",
    "proposal_scorer.blocks.": "model.lisa_attention_layers.",
    "proposal_scorer.final_attn.": "model.lisa_final_attn.",
    "proposal_scorer.final_norm.": "model.lisa_norm_final_attn.",
    "proposal_scorer.iop_head.": "model.lisa_iou_head.",
    "proposal_scorer.embedding_head.": "model.lisa_embedding_head.",
}


def base_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer as a base LLaVA ships it: none of LLM-Seg's tokens yet."""
    data = json.loads(train_tiny_tokenizer().backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ADDED]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        padding_side="right",
    )


def upstream_vocabulary(base) -> dict[str, int]:
    """Upstream's ids: the base vocabulary, then those of [SEG], <im_start>, <im_end> it lacks
    (training.py; LLaVA-Lightning's folder already holds the image tags)."""
    vocab = dict(base.get_vocab())
    for token in (SEG_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN):
        vocab.setdefault(token, len(vocab))
    return vocab


def upstream_module(model, tokenizer, base, sam_state, dinov2_hub) -> dict[str, torch.Tensor]:
    """``model``'s weights under upstream's names, rows in upstream's vocabulary order, bf16."""
    module = {}
    rows = [tokenizer.convert_tokens_to_ids(t) for t, _ in sorted(
        upstream_vocabulary(base).items(), key=lambda item: item[1])]  # fmt: skip
    for key, value in model.backbone.language_model.state_dict().items():
        key = key.replace(".base_layer.weight", ".weight")  # peft 0.4: lora.Linear is the Linear
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            value = value[rows]
        module[PEFT + key] = value
    for layer in range(model.backbone.language_model.config.num_hidden_layers):
        module[f"{PEFT}model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    for key, value in model.backbone.projector.state_dict().items():
        module[f"{PEFT}model.mm_projector.{key}"] = value
    for key, value in model.backbone.vision_tower.state_dict().items():
        key = key if key.startswith("vision_model.") else "vision_model." + key  # transformers 4.29
        module[f"{PEFT}model.vision_tower.vision_tower.{key}"] = value
    for key, value in dinov2_hub.items():
        module[f"{PEFT}model.visual_model_dinov2.{key}"] = value
    for key, value in sam_state.items():
        module[f"{PEFT}model.visual_model.{key}"] = value
    for key, value in model.state_dict().items():
        for ours, theirs in HEAD_NAMES.items():
            if key.startswith(ours):
                module[PEFT + theirs + key[len(ours) :]] = value
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in module.items()}


def write_deepspeed_save(folder, module: dict, step: int = 5000) -> None:
    """``ckpt_model/{latest, global_step<step>/mp_rank_00_model_states.pt}`` as DeepSpeed 0.10."""
    tag = folder / f"global_step{step}"
    tag.mkdir(parents=True)
    states = {
        "module": module,
        "buffer_names": [k for k in module if k.endswith("inv_freq")],
        "optimizer": None,
        "param_shapes": [OrderedDict((k, v.shape) for k, v in module.items() if "lora_" in k)],
        "lr_scheduler": {"last_batch_iteration": step - 1},
        "global_steps": step,
        "global_samples": 10 * step,
        "dp_world_size": 2,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
        "ds_version": "0.10.0",
    }
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text(f"global_step{step}")


def sentencepiece_base_folder(folder: Path) -> Path:
    """A LLaVA-Lightning-style tokenizer folder: a sentencepiece ``tokenizer.model`` saved by
    transformers 4.31 with ``<im_patch>``, ``<im_start>``, ``<im_end>`` added, no ``[SEG]`` and
    no ``tokenizer.json`` (the test data of ``tests/utils/test_legacy_tokenizer.py``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(SENTENCEPIECE_TOKENIZER / name, folder / name)
    added = json.loads((SENTENCEPIECE_TOKENIZER / "added_tokens.json").read_text())
    added.pop(SEG_TOKEN)
    (folder / "added_tokens.json").write_text(json.dumps(added))
    return folder


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def official(tiny_checkpoints, tmp_path_factory, request):
    """``(paths, reference model, tokenizer, module)``: a tiny official checkpoint and what it
    holds, on a base LLaVA whose tokenizer is the tiny BPE one or a released-style
    sentencepiece folder (``tokenizer.model`` only)."""
    root = tmp_path_factory.mktemp("official")
    if request.param == "bpe":
        base, new_base = base_tokenizer(), base_tokenizer
    else:
        folder = sentencepiece_base_folder(root / "base_tokenizer")
        base, new_base = load_tokenizer(str(folder)), lambda: load_tokenizer(str(folder))
    backbone, _, _ = build_tiny_llava(tokenizer=new_base(), seed=3)
    # build_tiny_llava added our tokens to its tokenizer; the base folder gets the plain one.
    language_model = backbone.language_model
    language_model.resize_token_embeddings(len(base))
    save_llava_original(root / "llava", backbone, base, tiny_checkpoints.clip, "linear")
    if request.param == "sentencepiece":  # the released folder's files, not transformers 5's
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (root / "llava" / name).unlink(missing_ok=True)
        sentencepiece_base_folder(root / "llava")

    torch.manual_seed(1)
    # Upstream's proposal maps are 256 x 256 (the converter records that size); the heads
    # narrower than upstream's 2048 and 128, which the converter reads from the weights.
    config = tiny_llm_seg_config(
        tiny_checkpoints,
        version=str(root / "llava"),
        proposal_map_size=256,
        scorer_embedding_hidden_dim=48,
        scorer_iop_hidden_dim=24,
    )
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # LoRA B starts at 0: give the adapters an effect
                parameter.normal_(0, 0.2)
        for name, parameter in model.named_parameters():  # what bf16 can hold exactly
            if not name.startswith("backbone.vision_tower."):  # CLIP comes from its folder
                parameter.copy_(parameter.to(torch.bfloat16).float())
    model.requires_grad_(False).eval()
    sam_state = load_sam(tiny_checkpoints.sam).state_dict()
    module = upstream_module(
        model, tokenizer, base, sam_state, hub_state_of(model.dino.dinov2, root / "dinov2_tmp")
    )
    write_deepspeed_save(root / "ckpt_model", module)
    return root, model, tokenizer, module


def _convert(root, tiny_checkpoints, out_name, **overrides) -> dict:
    config = ConvertConfig(
        checkpoint=str(root / "ckpt_model"),
        version=str(root / "llava"),
        vision_tower=str(tiny_checkpoints.clip),
        out_dir=str(root / out_name),
        dtype="fp32",
        scorer_heads=4,
        dinov2_num_heads=4,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return main(config)


def test_converted_scores_equal_the_checkpoint_weights(official, tiny_checkpoints):
    root, reference, tokenizer, module = official
    report = _convert(root, tiny_checkpoints, "export")
    sentencepiece = (root / "llava" / "tokenizer.model").is_file()
    assert report["tokenization"] == ("llava_legacy" if sentencepiece else "hf")

    assert report["unmapped"] == []
    assert report["dropped"] == {
        "dropped_rotary": 2,
        "dropped_sam": sum("visual_model." in k for k in module),
    }
    assert report["lora_merged"] == 4  # q_proj and v_proj of 2 layers
    assert report["lora_rank"] == 8
    assert report["new_tokens"] == [IMAGE_TOKEN]
    check = report["vision_tower_check"]
    assert check["compared"] > 0
    assert check["equal"] == check["compared"]
    export = root / "export"
    assert (export / "dinov2" / "config.json").is_file()  # the checkpoint's own DINOv2
    assert json.loads((export / "conversion_report.json").read_text()) == report

    loaded = load_exported(export)
    assert loaded.manifest.model.tokenization == report["tokenization"]
    assert loaded.manifest.model.scorer_embedding_hidden_dim == 48
    assert loaded.manifest.model.scorer_iop_hidden_dim == 24
    assert (export / "llm" / "tokenizer.model").is_file() == sentencepiece
    if sentencepiece:  # prompts token for token as upstream's transformers made them
        case = next(c for c in REFERENCE["cases"] if c["name"] == "reasonseg_val_long")
        legacy = LegacyLlamaTokenizer.from_tokenizer(loaded.tokenizer)
        ids, _, seg_positions = encode_like_upstream(loaded.tokenizer, case, legacy)
        assert ids == case["input_ids"]
        assert seg_positions == case["seg_positions"]
        # chat.py's path reads the same ids
        segmenter = Segmenter(loaded, proposals=None, settings=InferenceSettings())
        question = CASES[case["name"]]["turns"][0][0]
        input_ids, _ = segmenter.encode(question, VALIDATION_ANSWER)
        image_id = loaded.model.backbone.image_token_id
        assert readable_ids(loaded.tokenizer, input_ids.tolist(), image_id)[0] == ids
    assert loaded.manifest.model.dinov2 == str((export / "dinov2").resolve())
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    batch = make_batch(
        tokenizer, reference.num_image_tokens, BatchSpec([[1], [2, 1]], [5, 6], map_size=256)
    )
    expected, got = reference.score(batch), loaded.model.score(batch)
    for want, have in zip(
        expected.similarities + expected.iop_scores, got.similarities + got.iop_scores
    ):
        torch.testing.assert_close(have, want, atol=2e-5, rtol=1e-4)
    # Every logit but <image>'s (a row upstream never had: the mean row here).
    keep = torch.arange(len(tokenizer)) != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    torch.testing.assert_close(
        got.logits[..., keep], expected.logits[..., keep], atol=2e-5, rtol=1e-4
    )
    # Upstream's [SEG] row is the one the converted lm_head predicts [SEG] with.
    seg_up = upstream_vocabulary(load_tokenizer(str(root / "llava")))[SEG_TOKEN]
    lm_head = loaded.model.backbone.language_model.lm_head.weight
    assert torch.equal(
        lm_head[loaded.model.seg_token_id], module[PEFT + "lm_head.weight"][seg_up].float()
    )


def test_unmapped_keys_are_reported_and_refused(official, tiny_checkpoints, tmp_path):
    root, _, _, module = official
    extra = dict(module)
    extra[PEFT + "model.lisa_temperature"] = torch.ones(1)
    write_deepspeed_save(tmp_path / "ckpt_model", extra, step=7)
    (tmp_path / "llava").symlink_to(root / "llava")
    with pytest.raises(CheckpointError, match="lisa_temperature"):
        _convert(tmp_path, tiny_checkpoints, "refused")
    assert not (tmp_path / "refused").exists()
    report = _convert(tmp_path, tiny_checkpoints, "allowed", allow_unmapped=True)
    assert report["unmapped"] == [PEFT + "model.lisa_temperature"]
    assert (tmp_path / "allowed" / "export_config.json").is_file()


def test_wrong_base_llava_is_a_clear_error(official, tiny_checkpoints, tmp_path):
    root, *_ = official
    # The tiny kit's LLaVA already holds [SEG] & co: its vocabulary cannot be upstream's base.
    config = ConvertConfig(
        checkpoint=str(root / "ckpt_model"),
        version=str(tiny_checkpoints.llava),
        vision_tower=str(tiny_checkpoints.clip),
        out_dir=str(tmp_path / "out"),
        scorer_heads=4,
        dinov2_num_heads=4,
    )
    with pytest.raises(CheckpointError, match="vocabulary rows"):
        main(config)


def test_key_rules_by_hand():
    p, layer, block = PEFT + "model.", "model.layers.3.self_attn.", "lisa_attention_layers."
    keys = {
        f"{p}layers.3.self_attn.q_proj.lora_A.default.weight": ("lora", f"{layer}q_proj A"),
        f"{p}layers.3.self_attn.v_proj.lora_B.weight": ("lora", f"{layer}v_proj B"),
        f"{p}layers.3.self_attn.q_proj.base_layer.weight": ("llm", f"{layer}q_proj.weight"),
        f"{p}layers.0.mlp.down_proj.weight": ("llm", "model.layers.0.mlp.down_proj.weight"),
        f"{PEFT}lm_head.weight": ("llm", "lm_head.weight"),
        f"{p}text_hidden_fcs.0.2.bias": ("head", "text_projection.2.bias"),
        f"{p}{block}1.cross_attn_image_to_token.out_proj.weight": (
            "head",
            "proposal_scorer.blocks.1.cross_attn_image_to_token.out_proj.weight",
        ),
        f"{p}{block}0.mlp.lin2.bias": ("head", "proposal_scorer.blocks.0.mlp.lin2.bias"),
        f"{p}lisa_norm_final_attn.weight": ("head", "proposal_scorer.final_norm.weight"),
        f"{p}lisa_iou_head.2.weight": ("head", "proposal_scorer.iop_head.2.weight"),
        f"{p}mm_projector.bias": ("projector", "bias"),
        f"{p}visual_model_dinov2.blocks.0.attn.qkv.weight": ("dinov2", "blocks.0.attn.qkv.weight"),
    }
    mapped = map_upstream_keys(dict.fromkeys(keys, torch.zeros(1)))
    for key, (part, name) in keys.items():
        assert name in mapped.parts[part], key
    dropped = map_upstream_keys(
        {
            "base_model.model.model.visual_model.mask_decoder.iou_token.weight": torch.zeros(1),
            "base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(1),
            "base_model.model.model.lisa_iou_head.1.weight": torch.zeros(1),  # ReLU: no weights
        }
    )
    assert dropped.dropped == {"dropped_sam": 1, "dropped_rotary": 1}
    assert dropped.unmapped == ["base_model.model.model.lisa_iou_head.1.weight"]


def test_lora_merge_by_hand():
    base, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    llm = {"model.layers.0.self_attn.q_proj.weight": base.clone()}
    merged = merge_lora(
        llm,
        {"model.layers.0.self_attn.q_proj A": a, "model.layers.0.self_attn.q_proj B": b},
        alpha=16,
    )
    assert merged == ["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, 5)
    # LoRA's forward: x W^T + alpha / r * (x A^T) B^T, r = 2
    torch.testing.assert_close(
        x @ llm["model.layers.0.self_attn.q_proj.weight"].T, x @ base.T + 8 * (x @ a.T) @ b.T
    )
    with pytest.raises(CheckpointError, match="lora_A, lora_B"):
        merge_lora({}, {"model.layers.0.self_attn.v_proj A": a}, alpha=16)


def test_vocabulary_rows_follow_the_tokens():
    base = base_tokenizer()
    ours = train_tiny_tokenizer()
    ours.add_tokens([IMAGE_START_TOKEN, IMAGE_END_TOKEN], special_tokens=True)
    upstream = upstream_vocabulary(base)
    matrix = torch.arange(len(upstream), dtype=torch.float32)[:, None].repeat(1, 3)
    rows, new = reorder_vocabulary_rows(matrix, base, ours)
    assert new == [IMAGE_TOKEN]
    for token in (SEG_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN, "<s>"):
        assert rows[ours.convert_tokens_to_ids(token), 0] == upstream[token]
    assert rows[ours.convert_tokens_to_ids(IMAGE_TOKEN), 0] == pytest.approx(matrix[:, 0].mean())


def test_cli_flags():
    config = parse_config(
        ConvertConfig,
        ["--checkpoint", "ck", "--version", "llava", "--vision-tower", "clip", "--out_dir", "o"],
    )
    assert (config.vision_tower, config.dtype, config.lora_alpha, config.scorer_heads) == (
        "clip",
        "bf16",
        16.0,
        8,
    )
    with pytest.raises(ValueError, match="--out_dir is required"):
        main(ConvertConfig(checkpoint="ck", version="v", vision_tower="c"))
