"""Convert the official LLM-Seg DeepSpeed checkpoint into an export folder (:mod:`model.export`).

The released checkpoints (``JCdesu/LLM-Seg-deepspeed``, 20 epochs; ``...-10epoch``) are DeepSpeed
ZeRO-2 saves of the whole training model: ``global_stepN/mp_rank_00_model_states.pt`` whose
``module`` is a peft 0.4 ``PeftModelForCausalLM`` around upstream's ``LISAForCausalLM`` (LLaVA-v1
+ SAM + DINOv2 + the proposal head), in bf16, frozen weights included. Every key is mapped
explicitly (after the peft prefix ``base_model.model.``):

=====================================================  ========================================
upstream key                                           here
=====================================================  ========================================
``model.embed_tokens.weight``, ``lm_head.weight``      LLM, rows re-ordered by token (below)
``model.layers.{i}.*``, ``model.norm.weight``          LLM, same names
``model.layers.{i}.self_attn.{q,v}_proj.weight``       LLM ``...{q,v}_proj.weight`` with LoRA
+ ``...lora_A[.default].weight``                       folded in: ``W + alpha / r * B @ A``
+ ``...lora_B[.default].weight``                       (peft 0.4 names; ``base_layer`` accepted)
``model.layers.{i}.self_attn.rotary_emb.inv_freq``     dropped (recomputed by transformers)
``model.mm_projector.{weight,bias}``                   ``vision_projector`` (LLaVA-v1 Linear)
``model.text_hidden_fcs.0.{0,2}.*``                    ``text_projection.{0,2}.*``
``model.lisa_dino_conv.*``                             ``proposal_scorer.feature_proj.*``
``model.lisa_attention_layers.{i}.<part>.*`` with      ``proposal_scorer.blocks.{i}.<part>.*``
<part> ``self_attn``, ``cross_attn_token_to_image``,
``cross_attn_image_to_token`` (``{q,k,v,out}_proj``),
``mlp.lin{1,2}``, ``norm{1..4}``
``model.lisa_final_attn.*``                            ``proposal_scorer.final_attn.*``
``model.lisa_norm_final_attn.*``                       ``proposal_scorer.final_norm.*``
``model.lisa_iou_head.{0,2}.*``                        ``proposal_scorer.iop_head.{0,2}.*``
``model.lisa_embedding_head.{0,2}.*``                  ``proposal_scorer.embedding_head.{0,2}.*``
``model.visual_model_dinov2.*`` (torch.hub names)      DINOv2, written to ``<export>/dinov2``
                                                       (the weights upstream trained with)
                                                       unless ``--dinov2`` names one to use
``model.vision_tower.vision_tower.vision_model.*``     dropped: frozen CLIP, read from
                                                       ``--vision-tower`` (compared, reported)
``model.visual_model.*``                               dropped: SAM, never run by LLM-Seg
=====================================================  ========================================

Anything else is *unmapped*: listed in ``conversion_report.json`` and, unless
``--allow_unmapped``, an error. Vocabulary: upstream added ``[SEG]`` then ``<im_start>``/
``<im_end>`` (those missing from the base tokenizer) and used no ``<image>`` token; here
``<image>`` placeholders exist too, so embedding and ``lm_head`` rows are copied by token string,
and ``<image>``'s rows (overwritten by CLIP features; never predicted) get the mean row.
The export records ``tokenization: llava_legacy`` (prompts token for token as upstream's
transformers 4.29 made them; :mod:`utils.legacy_tokenizer`) and keeps the base's
``tokenizer.model`` for it.

CLI::

    python -m model.convert_llmseg_checkpoint --checkpoint LLM-Seg-deepspeed/ckpt_model \\
        --version LLaVA-Lightning-7B-v1 --vision-tower clip-vit-large-patch14 \\
        --out_dir exported/llmseg-20ep
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Dinov2Model, LlamaForCausalLM

from model.backbones.dinov2 import (
    convert_dinov2_hub_state,
    dinov2_config_from_hub_state,
    load_dinov2,
)
from model.backbones.features import DinoFeatureExtractor
from model.backbones.llava import LlavaBackbone, build_projector
from model.backbones.llava_checkpoint import llama_config_from_llava, read_llava_config
from model.builder import LLMSegConfig
from model.export import check_export_target, load_vision_tower, save_export
from model.export_manifest import (
    ExportManifest,
    ExportPreprocessing,
    ExportSelection,
    describe_model,
)
from model.heads.proposal_scorer import ProposalScorer, ProposalScorerConfig
from model.llm_seg import LLMSegModel
from utils.checkpoint import CheckpointError, load_state_dict_strict, quiet_transformers
from utils.cli import run_cli
from utils.config import save_config
from utils.device import PRECISIONS, resolve_dtype
from utils.legacy_tokenizer import sentencepiece_file
from utils.run_checkpoints import read_training_weights
from utils.tokenizer import (
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    IMAGE_TOKEN,
    SEG_TOKEN,
    add_llm_seg_tokens,
    load_tokenizer,
)

logger = logging.getLogger(__name__)

PEFT_PREFIXES = ("module.", "base_model.model.")
_ATTN = r"(?:q|k|v|out)_proj"
_BLOCK_PART = (
    rf"(?:(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)\.{_ATTN}"
    r"|mlp\.lin[12]|norm[1-4])"
)
_LLAMA_LAYER = (
    r"(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
    r"|input_layernorm|post_attention_layernorm)"
)
# (pattern, category, target): the target is a re.sub template for the key inside its part;
# None drops the tensor. The first matching rule wins.
_RULES = [
    (r"^model\.text_hidden_fcs\.0\.([02])\.(weight|bias)$", "head", r"text_projection.\1.\2"),
    (r"^model\.lisa_dino_conv\.(weight|bias)$", "head", r"proposal_scorer.feature_proj.\1"),
    (rf"^model\.lisa_attention_layers\.(\d+)\.({_BLOCK_PART})\.(weight|bias)$", "head",
     r"proposal_scorer.blocks.\1.\2.\3"),
    (rf"^model\.lisa_final_attn\.({_ATTN})\.(weight|bias)$", "head",
     r"proposal_scorer.final_attn.\1.\2"),
    (r"^model\.lisa_norm_final_attn\.(weight|bias)$", "head", r"proposal_scorer.final_norm.\1"),
    (r"^model\.lisa_iou_head\.([02])\.(weight|bias)$", "head", r"proposal_scorer.iop_head.\1.\2"),
    (r"^model\.lisa_embedding_head\.([02])\.(weight|bias)$", "head",
     r"proposal_scorer.embedding_head.\1.\2"),
    (r"^model\.mm_projector\.(weight|bias)$", "projector", r"\1"),
    (r"^(model\.layers\.\d+\.self_attn\.[qkvo]_proj)\.lora_([AB])(?:\.default)?\.weight$", "lora",
     r"\1 \2"),
    (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.(?:inv_freq|cos_cached|sin_cached)$",
     "dropped_rotary", None),
    (rf"^(model\.layers\.\d+\.{_LLAMA_LAYER})(?:\.base_layer)?\.(weight|bias)$", "llm", r"\1.\2"),
    (r"^(model\.(?:embed_tokens|norm)\.weight|lm_head\.weight)$", "llm", r"\1"),
    (r"^model\.visual_model_dinov2\.(.+)$", "dinov2", r"\1"),
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)$", "vision_tower", r"\1"),
    (r"^model\.visual_model\..+$", "dropped_sam", None),
]  # fmt: skip
KEY_RULES: list[tuple[re.Pattern, str, str | None]] = [
    (re.compile(pattern), category, target) for pattern, category, target in _RULES
]


@dataclass
class MappedCheckpoint:
    """Upstream tensors sorted into parts, under their names inside each part."""

    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)


def strip_prefix(key: str) -> str:
    """Remove DeepSpeed's ``module.`` and peft's ``base_model.model.`` prefixes."""
    for prefix in PEFT_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def sort_keys(state: dict[str, torch.Tensor], rules, rename=lambda key: key) -> MappedCheckpoint:
    """Sort a state dict by ``(pattern, category, target)`` rules, first match wins: a match
    with a target goes to ``parts[category]`` renamed by ``pattern.sub``, one without is
    counted as dropped, no match is listed as unmapped. ``rename`` is applied before matching."""
    mapped = MappedCheckpoint()
    for key, value in state.items():
        name = rename(key)
        for pattern, category, target in rules:
            if pattern.match(name):
                if target is None:
                    mapped.dropped[category] = mapped.dropped.get(category, 0) + 1
                else:
                    mapped.parts.setdefault(category, {})[pattern.sub(target, name)] = value
                break
        else:
            mapped.unmapped.append(key)
    return mapped


def map_upstream_keys(state: dict[str, torch.Tensor]) -> MappedCheckpoint:
    """Sort an upstream ``module`` state dict by :data:`KEY_RULES` (first match wins)."""
    return sort_keys(state, KEY_RULES, strip_prefix)


def merge_lora(llm: dict, lora: dict, alpha: float) -> list[str]:
    """Fold LoRA pairs into ``llm`` in place (``W + alpha / r * B @ A``, in fp32).

    Args:
        llm: base weights, ``model.layers.{i}.self_attn.q_proj.weight`` etc.
        lora: ``"<module> A"`` / ``"<module> B"`` -> ``(r, in)`` / ``(out, r)`` tensors.
        alpha: LoRA alpha (upstream 16); the rank ``r`` comes from the shapes.
    Returns:
        the merged modules.
    """
    modules = sorted({key.rsplit(" ", 1)[0] for key in lora})
    for module in modules:
        a, b = lora.get(f"{module} A"), lora.get(f"{module} B")
        base = llm.get(f"{module}.weight")
        if a is None or b is None or base is None:
            raise CheckpointError(f"{module}: needs lora_A, lora_B and the base weight")
        delta = b.float() @ a.float() * (alpha / a.shape[0])
        llm[f"{module}.weight"] = base.float() + delta  # fp32; cast once, to the output dtype
    return modules


def _upstream_tokenization(base_tokenizer, version: str) -> str:
    """``llava_legacy``: upstream trained with transformers 4.29's slow LLaMA tokenizer, which
    that tokenization reproduces from the base's ``tokenizer.model``. A base folder without one
    cannot give upstream's ids: ``hf``, with a warning."""
    if sentencepiece_file(base_tokenizer) is not None:
        return "llava_legacy"
    logger.warning(
        "%s has no sentencepiece tokenizer.model: prompts are tokenized with transformers "
        "(tokenization hf), not token for token as upstream trained",
        version,
    )
    return "hf"


def upstream_added_tokens(base_tokenizer) -> list[str]:
    """Tokens upstream appended to the base tokenizer, in order (``[SEG]``, then image tags)."""
    vocab = base_tokenizer.get_vocab()
    return [t for t in (SEG_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN) if t not in vocab]


def reorder_vocabulary_rows(
    matrix: torch.Tensor, base_tokenizer, tokenizer
) -> tuple[torch.Tensor, list[str]]:
    """Rows of an upstream ``(V_up, h)`` embedding / ``lm_head`` matrix in ``tokenizer``'s order.

    Returns:
        ``(matrix (V, h), new_tokens)``; tokens upstream never had get the mean row.
    """
    upstream = dict(base_tokenizer.get_vocab())
    for offset, token in enumerate(upstream_added_tokens(base_tokenizer)):
        upstream[token] = len(base_tokenizer) + offset
    if matrix.shape[0] != len(upstream):
        raise CheckpointError(
            f"the checkpoint has {matrix.shape[0]} vocabulary rows but the base tokenizer plus "
            f"upstream's added tokens give {len(upstream)}: is --version the LLaVA it was trained "
            "from?"
        )
    ours = tokenizer.get_vocab()
    source = torch.zeros(len(tokenizer), dtype=torch.long)
    new_tokens = sorted(token for token in ours if token not in upstream)
    for token, index in ours.items():
        source[index] = upstream.get(token, 0)
    out = matrix.index_select(0, source)
    for token in new_tokens:
        out[ours[token]] = matrix.float().mean(0).to(matrix.dtype)
    return out, new_tokens


def _compare(checkpoint_part: dict, reference: dict) -> dict:
    """How many checkpoint tensors equal ``reference`` once cast to the checkpoint's dtype."""
    shared = sorted(set(checkpoint_part) & set(reference))
    equal = [
        k
        for k in shared
        if torch.equal(checkpoint_part[k], reference[k].to(checkpoint_part[k].dtype))
    ]
    return {
        "compared": len(shared),
        "equal": len(equal),
        "differ": sorted(set(shared) - set(equal))[:10],
    }


def _scorer_config(head: dict, heads: int) -> ProposalScorerConfig:
    """Scorer sizes read from the tensor shapes (the head count cannot be seen; given)."""
    conv = head["proposal_scorer.feature_proj.weight"]
    depth = len({k.split(".")[2] for k in head if k.startswith("proposal_scorer.blocks.")})
    return ProposalScorerConfig(
        feature_dim=conv.shape[1],
        embed_dim=conv.shape[0],
        num_heads=heads,
        mlp_dim=head["proposal_scorer.blocks.0.mlp.lin1.weight"].shape[0],
        depth=depth,
        iop_hidden_dim=head["proposal_scorer.iop_head.0.weight"].shape[0],
        embedding_hidden_dim=head["proposal_scorer.embedding_head.0.weight"].shape[0],
    )


def _language_model(raw: dict, llm: dict, vocab_size: int) -> LlamaForCausalLM:
    config = llama_config_from_llava(raw)
    config.vocab_size = vocab_size
    with torch.device("meta"):  # no second copy of the weights: they are assigned below
        model = LlamaForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in llm.items()}
    if found != expected:
        wrong = sorted(set(expected.items()) ^ set(found.items()))
        raise CheckpointError(f"the checkpoint's language model differs in: {wrong[:10]}")
    model.load_state_dict(llm, assign=True)
    return model


def _dinov2_from_checkpoint(hub: dict, num_heads: int, dtype) -> Dinov2Model:
    config = dinov2_config_from_hub_state(hub, num_heads=num_heads or None)
    converted, unknown = convert_dinov2_hub_state(hub)
    with quiet_transformers():  # the loading info is checked strictly below
        model, info = Dinov2Model.from_pretrained(
            None, config=config, state_dict=converted, dtype=dtype, output_loading_info=True
        )
    problems = {k: sorted(v)[:10] for k, v in info.items() if k != "error_msgs" and v}
    if unknown or problems:
        raise CheckpointError(f"the checkpoint's DINOv2: {problems}, unknown keys {unknown[:10]}")
    return model.eval()


@dataclass
class ConvertConfig:
    """Convert the official LLM-Seg DeepSpeed checkpoint into an export folder."""

    checkpoint: str = field(
        default="", metadata={"help": "ckpt_model / global_stepN folder, model_states.pt, or a "
                              "zero_to_fp32 output"},
    )  # fmt: skip
    version: str = field(
        default="", metadata={"help": "base LLaVA folder it was trained from (tokenizer, config)"}
    )
    vision_tower: str = field(default="", metadata={"help": "CLIP folder (clip-vit-large-patch14)"})
    dinov2: str = field(
        default="", metadata={"help": "DINOv2 to use (default: the copy in the checkpoint)"}
    )
    out_dir: str = field(default="", metadata={"help": "export folder to create"})
    dtype: str = field(
        default="bf16", metadata={"help": "weights on disk", "choices": list(PRECISIONS)}
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha used in training"})
    scorer_heads: int = field(default=8, metadata={"help": "scorer attention heads"})
    dinov2_num_heads: int = field(
        default=0, metadata={"help": "heads of the checkpoint's DINOv2 (0: hidden / 64)"}
    )
    which: str = field(default="latest", metadata={"help": "tag", "choices": ["best", "latest"]})
    allow_unmapped: bool = field(default=False, metadata={"help": "convert despite unknown keys"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out_dir"})


def main(config: ConvertConfig) -> dict:
    """Convert; return the report also written to ``<out_dir>/conversion_report.json``."""
    for name in ("checkpoint", "version", "vision_tower", "out_dir"):
        if not getattr(config, name):
            raise ValueError(f"--{name} is required")
    check_export_target(config.out_dir, config.overwrite)
    dtype = resolve_dtype(config.dtype)
    weights = read_training_weights(config.checkpoint, config.which, "module")
    mapped = map_upstream_keys(weights.state)
    report = {
        "checkpoint": str(weights.path),
        "tensors": len(weights.state),
        "mapped": {part: len(v) for part, v in mapped.parts.items()},
        "dropped": mapped.dropped,
        "unmapped": mapped.unmapped,
    }
    if mapped.unmapped and not config.allow_unmapped:
        raise CheckpointError(
            f"{weights.path}: {len(mapped.unmapped)} keys have no mapping: "
            f"{mapped.unmapped[:10]} (--allow_unmapped converts anyway)"
        )
    missing = [p for p in ("llm", "head", "projector") if p not in mapped.parts]
    if missing or ("dinov2" not in mapped.parts and not config.dinov2):
        raise CheckpointError(
            f"{weights.path}: no {missing or ['DINOv2 (pass --dinov2)']} weights found; "
            "is this an LLM-Seg checkpoint?"
        )
    parts = mapped.parts
    llm = parts["llm"]
    report["lora_merged"] = len(merge_lora(llm, parts.get("lora", {}), config.lora_alpha))
    if "lora" in parts:
        report["lora_rank"] = next(iter(parts["lora"].values())).shape[0]

    raw = read_llava_config(config.version)
    base_tokenizer = load_tokenizer(config.version)
    report["tokenization"] = _upstream_tokenization(base_tokenizer, config.version)
    tokenizer = load_tokenizer(config.version)
    add_llm_seg_tokens(tokenizer, use_im_start_end=True)  # upstream always used the image tags
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        llm[key], new_tokens = reorder_vocabulary_rows(llm[key], base_tokenizer, tokenizer)
    report["new_tokens"] = new_tokens
    language_model = _language_model(raw, {k: v.to(dtype) for k, v in llm.items()}, len(tokenizer))

    tower = load_vision_tower(config.vision_tower, dtype)
    # Older transformers name CLIP's weights vision_model.*, newer ones drop that level.
    tower_state = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    report["vision_tower_check"] = _compare(parts.get("vision_tower", {}), tower_state)
    projector = build_projector("linear", tower.config.hidden_size, raw["hidden_size"])
    load_state_dict_strict(projector, parts["projector"], "model.mm_projector")
    backbone = LlavaBackbone(
        language_model,
        tower,
        projector.to(dtype),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_select_layer=raw.get("mm_vision_select_layer", -2),
        vision_select_feature="patch",  # upstream's LisaModel forces it
    )
    if config.dinov2:
        dinov2 = load_dinov2(config.dinov2, dtype)
    else:
        dinov2 = _dinov2_from_checkpoint(parts["dinov2"], config.dinov2_num_heads, dtype)
    scorer_config = _scorer_config(parts["head"], config.scorer_heads)
    model = LLMSegModel(
        backbone,
        DinoFeatureExtractor(dinov2),
        ProposalScorer(scorer_config),
        seg_token_id=tokenizer.convert_tokens_to_ids(SEG_TOKEN),
    )
    head_modules = {
        "text_projection.": model.text_projection,
        "proposal_scorer.": model.proposal_scorer,
    }
    for prefix, module in head_modules.items():
        part = {k[len(prefix) :]: v for k, v in parts["head"].items() if k.startswith(prefix)}
        load_state_dict_strict(module, part, f"upstream {prefix.rstrip('.')}")

    model_config = LLMSegConfig(
        version=str(Path(config.version).resolve()),
        vision_tower=str(Path(config.vision_tower).resolve()),
        dinov2=str(Path(config.dinov2).resolve()) if config.dinov2 else "dinov2",
        out_dim=scorer_config.embed_dim,
        scorer_heads=scorer_config.num_heads,
        scorer_mlp_dim=scorer_config.mlp_dim,
        scorer_depth=scorer_config.depth,
        scorer_embedding_hidden_dim=scorer_config.embedding_hidden_dim,
        scorer_iop_hidden_dim=scorer_config.iop_hidden_dim,
        lora_r=report.get("lora_rank", 0),
        lora_alpha=int(config.lora_alpha),
        precision=config.dtype,
        tokenization=report["tokenization"],
    )
    manifest = ExportManifest(
        kind="merged",
        model=model_config,
        architecture=describe_model(model, tokenizer),
        selection=ExportSelection(),  # upstream evaluates with IoP > 0.5
        preprocessing=ExportPreprocessing(),
        source={
            "converted_from": str(Path(weights.path).resolve()),
            "upstream": "wangjunchi/LLMSeg",
            **weights.client_state,
        },
    )

    def write_extra(folder: Path) -> None:
        if not config.dinov2:
            dinov2.save_pretrained(folder / "dinov2")
        (folder / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
        save_config(config, folder / "convert_command.json")

    save_export(model, tokenizer, manifest, config.out_dir, dtype, config.overwrite, write_extra)
    logger.info("converted %s -> %s: %s", weights.path, config.out_dir, report["mapped"])
    return report


if __name__ == "__main__":
    run_cli(main, ConvertConfig)
