"""Convert LISA's released checkpoints (``xinlai/LISA-7B-v1``, ``LISA-13B-llama2-v1``, ...) into an
export folder whose only mask head is SAM's decoder (``--mask_head sam``).

LISA's folders are ``LISAForCausalLM`` saved by ``save_pretrained`` (LoRA already merged): a
``config.json`` with LLaVA's ``mm_*`` fields, weight shards (``.bin`` or ``.safetensors`` with an
index) and a sentencepiece tokenizer holding ``<im_patch>``, ``<im_start>``, ``<im_end>`` and
``[SEG]``. Every key is sorted by an explicit rule (the first match wins):

=====================================================  ========================================
LISA key                                               here
=====================================================  ========================================
``model.embed_tokens.weight``, ``model.layers.*``,     the language model (rows re-ordered by
``model.norm.weight``, ``lm_head.weight``              token; our ``<image>`` row gets the mean)
``model.mm_projector.*``                               LLaVA's projector (linear or mlp2x_gelu)
``model.text_hidden_fcs.0.{0,2}.*``                    ``text_projection.{0,2}.*``
``model.visual_model.{image,prompt}_encoder.*``        SAM, written to ``<export>/sam/`` (frozen)
``model.visual_model.mask_decoder.*``                  ``sam_head.mask_decoder.*`` (trained)
``model.vision_tower.*``                               dropped: CLIP comes from ``--vision-tower``
                                                       (compared, reported)
``*.rotary_emb.*``                                     dropped (recomputed)
=====================================================  ========================================

Anything else is *unmapped*: listed in ``conversion_report.json`` and, unless
``--allow_unmapped``, an error. SAM's size comes from its weights
(:func:`~model.backbones.sam.infer_sam_architecture`), never assumed to be ViT-H at 1024. The
export records ``tokenization: llava_legacy`` (LISA pinned transformers 4.31's slow tokenizer),
so prompts reach the model token for token as in LISA's evaluation.

CLI::

    python -m model.convert_lisa_checkpoint --checkpoint LISA-7B-v1 \\
        --vision-tower clip-vit-large-patch14 --out_dir exported/lisa-7b-v1
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.backbones.llava import LlavaBackbone, build_projector
from model.backbones.llava_checkpoint import read_llava_config
from model.backbones.sam import build_sam, infer_sam_architecture, save_sam
from model.builder import LLMSegConfig
from model.convert_llmseg_checkpoint import MappedCheckpoint, _compare, _language_model, sort_keys
from model.export import check_export_target, load_vision_tower, save_export
from model.export_manifest import ExportManifest, ExportPreprocessing, describe_model
from model.heads.sam_decoder import SamMaskHead
from model.llm_seg import LLMSegModel
from utils.checkpoint import CheckpointError, load_state_dict, load_state_dict_strict
from utils.cli import run_cli
from utils.config import save_config
from utils.device import PRECISIONS, resolve_dtype
from utils.legacy_tokenizer import sentencepiece_file
from utils.tokenizer import IMAGE_TOKEN, SEG_TOKEN, add_llm_seg_tokens, load_tokenizer

logger = logging.getLogger(__name__)

SAM_FILE = "sam/sam_lisa.pth"  # inside the export; the manifest refers to it relatively
_LLAMA_LAYER = (
    r"(?:self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj"
    r"|input_layernorm|post_attention_layernorm)"
)
_RULES = [
    (r"^model\.text_hidden_fcs\.0\.([02])\.(weight|bias)$", "head", r"\1.\2"),
    (r"^model\.visual_model\.mask_decoder\.(.+)$", "sam", r"mask_decoder.\1"),
    (r"^model\.visual_model\.((?:image|prompt)_encoder\..+)$", "sam", r"\1"),
    (r"^model\.mm_projector\.(.+)$", "projector", r"\1"),
    (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.(?:inv_freq|cos_cached|sin_cached)$",
     "dropped_rotary", None),
    (rf"^(model\.layers\.\d+\.{_LLAMA_LAYER})\.(weight|bias)$", "llm", r"\1.\2"),
    (r"^(model\.(?:embed_tokens|norm)\.weight|lm_head\.weight)$", "llm", r"\1"),
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)$", "vision_tower", r"\1"),
]  # fmt: skip
KEY_RULES = [(re.compile(pattern), category, target) for pattern, category, target in _RULES]


def map_lisa_keys(state: dict[str, torch.Tensor]) -> MappedCheckpoint:
    """Sort a LISA state dict by :data:`KEY_RULES` (first match wins)."""
    return sort_keys(state, KEY_RULES)


def _vocabulary(llm: dict, tokenizer) -> list[str]:
    """Give the embedding and ``lm_head`` matrices one row per token of ``tokenizer`` (LISA's
    rows keep their ids; tokens LISA never had, our ``<image>``, get the mean row)."""
    new_tokens = []
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        matrix = llm[key]
        if matrix.shape[0] > len(tokenizer):
            raise CheckpointError(
                f"the checkpoint has {matrix.shape[0]} vocabulary rows but its tokenizer only "
                f"{len(tokenizer)} tokens"
            )
        extra = len(tokenizer) - matrix.shape[0]
        mean = matrix.float().mean(0, keepdim=True).to(matrix.dtype)
        llm[key] = torch.cat([matrix, mean.expand(extra, -1)])
        new_tokens = [tokenizer.convert_ids_to_tokens(matrix.shape[0] + i) for i in range(extra)]
    return new_tokens


@dataclass
class ConvertLisaConfig:
    """Convert a released LISA checkpoint folder into an export (SAM head only)."""

    checkpoint: str = field(default="", metadata={"help": "LISA folder (config.json, shards)"})
    vision_tower: str = field(
        default="", metadata={"help": "CLIP folder (default: the config's mm_vision_tower)"}
    )
    out_dir: str = field(default="", metadata={"help": "export folder to create"})
    dtype: str = field(
        default="bf16", metadata={"help": "weights on disk", "choices": list(PRECISIONS)}
    )
    conv_type: str = field(
        default="llava_v1", metadata={"help": "prompt format (LISA-7B-v1: llava_v1)"}
    )
    sam_decoder_heads: int = field(
        default=8, metadata={"help": "SAM decoder attention heads (not in the weights; 8 in SAM)"}
    )
    allow_unmapped: bool = field(default=False, metadata={"help": "convert despite unknown keys"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out_dir"})


def main(config: ConvertLisaConfig) -> dict:
    """Convert; return the report also written to ``<out_dir>/conversion_report.json``."""
    for name in ("checkpoint", "out_dir"):
        if not getattr(config, name):
            raise ValueError(f"--{name} is required")
    check_export_target(config.out_dir, config.overwrite)
    folder = Path(config.checkpoint)
    raw = read_llava_config(folder)
    vision_tower = config.vision_tower or raw.get("mm_vision_tower", "")
    if not vision_tower or not Path(vision_tower).is_dir():
        raise FileNotFoundError(f"CLIP folder {vision_tower!r} not found; pass --vision-tower")
    dtype = resolve_dtype(config.dtype)
    mapped = map_lisa_keys(load_state_dict(folder))
    report = {
        "mapped": {part: len(tensors) for part, tensors in sorted(mapped.parts.items())},
        "dropped": dict(sorted(mapped.dropped.items())),
        "unmapped": sorted(mapped.unmapped),
    }
    if mapped.unmapped and not config.allow_unmapped:
        raise CheckpointError(
            f"{folder}: {len(mapped.unmapped)} keys have no rule: {report['unmapped'][:10]} "
            "(--allow_unmapped converts anyway)"
        )
    missing = [p for p in ("llm", "projector", "head", "sam") if p not in mapped.parts]
    if missing:
        raise CheckpointError(f"{folder}: no {missing} weights; is this a LISA checkpoint?")
    parts = mapped.parts

    tokenizer = load_tokenizer(str(folder))
    if SEG_TOKEN not in tokenizer.get_vocab():
        raise CheckpointError(f"{folder}: the tokenizer has no {SEG_TOKEN}")
    add_llm_seg_tokens(tokenizer, use_im_start_end=True)
    report["new_tokens"] = _vocabulary(parts["llm"], tokenizer)
    report["tokenization"] = "llava_legacy" if sentencepiece_file(tokenizer) else "hf"
    llm = {k: v.to(dtype) for k, v in parts["llm"].items()}
    language_model = _language_model(raw, llm, len(tokenizer))

    tower = load_vision_tower(vision_tower, dtype)
    tower_state = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    report["vision_tower_check"] = _compare(parts.get("vision_tower", {}), tower_state)
    kind = "mlp2x_gelu" if "0.weight" in parts["projector"] else "linear"
    projector = build_projector(kind, tower.config.hidden_size, raw["hidden_size"])
    load_state_dict_strict(projector, parts["projector"], "model.mm_projector")
    backbone = LlavaBackbone(
        language_model, tower, projector.to(dtype),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_select_layer=raw.get("mm_vision_select_layer", -2), vision_select_feature="patch",
    )  # fmt: skip
    arch = infer_sam_architecture(parts["sam"], config.sam_decoder_heads)
    report["sam_architecture"] = arch.__dict__
    sam = build_sam(arch)
    load_state_dict_strict(sam, parts["sam"], "model.visual_model")
    model = LLMSegModel(
        backbone, None, None, tokenizer.convert_tokens_to_ids(SEG_TOKEN),
        sam_head=SamMaskHead(sam).to(dtype), mask_head="sam",
    )  # fmt: skip
    load_state_dict_strict(model.text_projection, parts["head"], "model.text_hidden_fcs.0")
    model.text_projection.to(dtype)

    model_config = LLMSegConfig(
        version=str(folder.resolve()),
        vision_tower=str(Path(vision_tower).resolve()),
        mask_head="sam",
        sam_checkpoint=SAM_FILE,
        out_dim=arch.prompt_embed_dim,
        lora_r=0,
        precision=config.dtype,
        tokenization=report["tokenization"],
    )
    manifest = ExportManifest(
        kind="merged",
        model=model_config,
        architecture=describe_model(model, tokenizer),
        preprocessing=ExportPreprocessing(conv_type=config.conv_type),
        source={"converted_from": str(folder.resolve()), "upstream": "dvlab-research/LISA"},
    )

    def write_extra(export: Path) -> None:
        (export / SAM_FILE).parent.mkdir(parents=True, exist_ok=True)
        save_sam(sam, arch, export / SAM_FILE)
        (export / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
        save_config(config, export / "convert_command.json")

    save_export(model, tokenizer, manifest, config.out_dir, dtype, config.overwrite, write_extra)
    logger.info("converted %s -> %s: %s", folder, config.out_dir, report["mapped"])
    return report


if __name__ == "__main__":
    run_cli(main, ConvertLisaConfig)
