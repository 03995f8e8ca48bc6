"""Exporting a trained LLM-Seg into one self-describing folder, and loading it in one call.

A training run keeps DeepSpeed checkpoints that hold only the trainable weights (any ZeRO stage;
see :func:`utils.run_checkpoints.read_training_weights`). :func:`export_training_run` turns one
into a folder that needs neither the training config nor DeepSpeed::

    <export>/
        export_config.json          ExportManifest: sizes, [SEG]/image token ids, selection
                                    strategy, preprocessing, encoder paths, provenance
        llm/                        merged kind: LLaMA with LoRA folded in, transformers format
                                    (config.json, safetensors shards) + tokenizer with [SEG]
        vision_projector.safetensors   merged kind: LLaVA's CLIP -> LLM projector
        proposal_head.safetensors   merged kind: text projection + proposal scorer
        adapter.safetensors         adapter kind: LoRA A/B + every other trained tensor
                                    (embeddings, lm_head, text projection, scorer)

The frozen encoders (CLIP, DINOv2; for the adapter kind also the base LLaVA) are referenced by
absolute path, not copied; a relative path is read relative to the export folder (the converter
of the official checkpoint writes the DINOv2 it holds to ``<export>/dinov2``).
:func:`load_exported` rebuilds an :class:`~model.llm_seg.LLMSegModel` from either kind, optionally
with an 8-/4-bit language model (bitsandbytes, merged kind only).

CLI: ``python -m model.export --checkpoint runs/llmseg --out_dir exported/llmseg``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaConfig

from model.backbones.dinov2 import load_dinov2
from model.backbones.features import DinoFeatureExtractor
from model.backbones.llava import LlavaBackbone, build_projector
from model.backbones.llava_checkpoint import load_clip_vision_tower, read_llava_config
from model.backbones.sam import load_sam
from model.builder import (
    LLMSegConfig,
    build_llm_seg,
    configure_rejection,
    merge_lora_weights,
    setup_trainable,
)
from model.export_manifest import (
    ADAPTER_FILE,
    EXPORT_KINDS,
    HEAD_FILE,
    HEAD_PREFIXES,
    LLM_DIR,
    MANIFEST,
    PROJECTOR_FILE,
    ExportManifest,
    ExportPreprocessing,
    ExportSelection,
    describe_model,
    read_manifest,
)
from model.heads.proposal_scorer import ProposalScorer
from model.heads.sam_decoder import SamMaskHead
from model.llm_seg import LLMSegModel
from model.mask_encoder import build_mask_encoder
from utils.checkpoint import (
    CheckpointError,
    load_state_dict,
    load_state_dict_strict,
    quiet_transformers,
    save_state_dict,
)
from utils.cli import run_cli
from utils.config import config_to_dict, save_config
from utils.device import PRECISIONS, attention_implementation, require_bitsandbytes, resolve_dtype
from utils.legacy_tokenizer import SENTENCEPIECE_FILE, resolve_tokenization, sentencepiece_file
from utils.run_checkpoints import WEIGHT_SOURCES, best_record, load_trainable_weights
from utils.tokenizer import IMAGE_TOKEN, REF_TOKEN, SEG_TOKEN, load_tokenizer

logger = logging.getLogger(__name__)


def check_export_target(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` unless ``overwrite``: called before the model is built
    (a 7B model takes minutes), and again when the export is written."""
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite)")


class _StagedFolder:
    """Write into ``<out>.partial``, then move it to ``out`` in one rename (no half exports)."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool) -> None:
        self.out_dir = Path(out_dir)
        check_export_target(self.out_dir, overwrite)
        self.tmp = self.out_dir.with_name(f"{self.out_dir.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = self.out_dir.with_name(f"{self.out_dir.name}.old-{os.getpid()}")
        if self.out_dir.exists():
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        shutil.rmtree(old, ignore_errors=True)


def save_export(
    model: LLMSegModel,
    tokenizer,
    manifest: ExportManifest,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as an export of ``manifest.kind`` (the folder appears only when complete).

    ``merged``: LoRA is folded into the LLM, saved in ``transformers`` format with the tokenizer,
    beside the projector and the heads. ``adapter``: only the tensors ``requires_grad`` marks
    (LoRA A/B, embeddings, lm_head, heads: the model must come from
    :func:`~model.builder.setup_trainable`); the base LLaVA is ``manifest.model.version``.
    ``model`` is changed in place (LoRA merged, cast to ``dtype``).

    Args:
        model: the model with its trained weights loaded.
        tokenizer: its tokenizer (holding ``[SEG]`` and ``<image>``).
        manifest: ``architecture`` is recomputed here from the model.
        out_dir: the export folder.
        dtype: weight dtype on disk (default: as the model is).
        write_extra: called with the (staging) folder to add files, e.g. a DINOv2 copy.
    """
    if manifest.kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {manifest.kind!r}; expected {EXPORT_KINDS}")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if manifest.kind == "adapter" and not any("lora_" in name for name in trained):
        raise ValueError("the model has no trainable LoRA weights; call setup_trainable first")
    if manifest.kind == "adapter" and not manifest.model.version:
        raise ValueError("an adapter export needs the base LLaVA folder (model.version)")
    if dtype is not None:
        model.to(dtype)
    if manifest.kind == "merged":
        merge_lora_weights(model)
    manifest = dataclasses.replace(manifest, architecture=describe_model(model, tokenizer))
    with _StagedFolder(out_dir, overwrite) as folder:
        state = model.state_dict()
        if manifest.kind == "adapter":
            save_state_dict({k: v for k, v in state.items() if k in trained}, folder / ADAPTER_FILE)
        else:
            with quiet_transformers():  # no progress bar per shard
                model.backbone.language_model.save_pretrained(folder / LLM_DIR)
            tokenizer.save_pretrained(folder / LLM_DIR)
            _keep_sentencepiece_model(tokenizer, manifest.model.tokenization, folder / LLM_DIR)
            save_state_dict(model.backbone.projector.state_dict(), folder / PROJECTOR_FILE)
            head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
            save_state_dict(head, folder / HEAD_FILE)
        (folder / MANIFEST).write_text(json.dumps(config_to_dict(manifest), indent=2) + "\n")
        if write_extra is not None:
            write_extra(folder)
    logger.info("exported a %s model to %s", manifest.kind, out_dir)
    return Path(out_dir)


def _keep_sentencepiece_model(tokenizer, tokenization: str, llm_dir: Path) -> None:
    """Copy the sentencepiece ``tokenizer.model`` beside the saved tokenizer: transformers 5
    saves only ``tokenizer.json``, and ``llava_legacy`` (or ``auto``) encodes with the model."""
    source = sentencepiece_file(tokenizer)
    if source is None:
        if tokenization == "llava_legacy":
            raise ValueError("tokenization llava_legacy needs the tokenizer's tokenizer.model")
        return
    if not (llm_dir / SENTENCEPIECE_FILE).exists():
        shutil.copyfile(source, llm_dir / SENTENCEPIECE_FILE)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportedModel:
    """What :func:`load_exported` returns.

    Attributes:
        model: the :class:`LLMSegModel`, in eval mode, nothing trainable.
        tokenizer: its tokenizer.
        manifest: the folder's manifest, with encoder paths resolved to absolute paths.
        folder: the export folder.
    """

    model: LLMSegModel
    tokenizer: object
    manifest: ExportManifest
    folder: Path


def _resolve_encoder_path(folder: Path, path: str) -> str:
    if not path:
        return path
    candidate = Path(path)
    return str(candidate if candidate.is_absolute() else (folder / candidate).resolve())


def load_vision_tower(path: str | os.PathLike, dtype: torch.dtype) -> CLIPVisionModel:
    """The CLIP vision tower from a CLIP folder or from a ``transformers`` llava folder."""
    path = Path(path)
    raw = read_llava_config(path)
    if raw.get("model_type") != "llava":  # a CLIP folder (CLIP configs hold a text part too)
        return load_clip_vision_tower(path, dtype)
    with quiet_transformers():
        tower, info = CLIPVisionModel.from_pretrained(
            path,
            config=LlavaConfig.from_pretrained(path, local_files_only=True).vision_config,
            key_mapping={r"^(model\.)?vision_tower\.(vision_model\.)?": ""},
            dtype=dtype,
            output_loading_info=True,
            local_files_only=True,
        )
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: vision tower keys missing: {sorted(info['missing_keys'])}")
    return tower.eval()


def _quantization_config(load_in_8bit: bool, load_in_4bit: bool, dtype, device):
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise ValueError("choose one of load_in_8bit and load_in_4bit")
    flag = "--load_in_8bit" if load_in_8bit else "--load_in_4bit"
    require_bitsandbytes(flag)
    if device.type != "cuda":
        raise RuntimeError(f"{flag} needs a CUDA device (bitsandbytes), not {device}")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def _load_merged_language_model(folder: Path, dtype, device, quantization) -> LlamaForCausalLM:
    kwargs = {"quantization_config": quantization, "device_map": {"": device}}
    kwargs = kwargs if quantization is not None else {}
    with quiet_transformers():
        language_model, info = LlamaForCausalLM.from_pretrained(
            folder / LLM_DIR,
            dtype=dtype,
            attn_implementation=attention_implementation(device, dtype),
            output_loading_info=True,
            local_files_only=True,
            **kwargs,
        )
    problems = {k: sorted(v)[:10] for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise CheckpointError(f"{folder / LLM_DIR}: {problems}")
    return language_model.eval()


def _build_merged(folder: Path, manifest: ExportManifest, device, dtype, quantization):
    arch, config = manifest.architecture, manifest.model
    tokenizer = load_tokenizer(str(folder / LLM_DIR), model_max_length=config.model_max_length)
    for token, expected in ((SEG_TOKEN, arch.seg_token_id), (IMAGE_TOKEN, arch.image_token_id)):
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise CheckpointError(
                f"{folder}: tokenizer maps {token} to {tokenizer.convert_tokens_to_ids(token)}, "
                f"the manifest says {expected}"
            )
    language_model = _load_merged_language_model(folder, dtype, device, quantization)
    tower = load_vision_tower(config.vision_tower, dtype)
    projector = build_projector(arch.projector_type, tower.config.hidden_size, arch.hidden_size)
    load_state_dict_strict(projector, load_state_dict(folder / PROJECTOR_FILE), folder)
    backbone = LlavaBackbone(
        language_model,
        tower,
        projector.to(dtype),
        image_token_id=arch.image_token_id,
        vision_select_layer=arch.vision_select_layer,
        vision_select_feature=arch.vision_select_feature,
    )
    dino = scorer = None
    if config.mask_head != "sam":
        dinov2 = load_dinov2(config.dinov2, dtype, arch=config.dinov2_arch or None)
        dino = DinoFeatureExtractor(dinov2)
        scorer = ProposalScorer(config.scorer_config(dino.feature_dim))
    mask_encoder = ref_token_id = None
    if config.multi_round:  # SegLLM's parts; their weights are in HEAD_FILE
        mask_encoder = build_mask_encoder(config.mask_encoder, projector, arch.hidden_size)
        ref_token_id = tokenizer.convert_tokens_to_ids(REF_TOKEN)
    sam_head = None
    if config.mask_head != "proposals":
        sam_head = SamMaskHead(load_sam(config.sam_checkpoint, config.sam_model_type)).to(dtype)
    model = LLMSegModel(
        backbone, dino, scorer, arch.seg_token_id, config.loss_config(), mask_encoder,
        ref_token_id, config.ref_dropout, sam_head, config.mask_head,
    )  # fmt: skip
    configure_rejection(model, tokenizer, config.rejection)
    head = {HEAD_PREFIXES[0]: model.text_projection}
    if scorer is not None:
        head[HEAD_PREFIXES[1]] = scorer
    if mask_encoder is not None:
        head[HEAD_PREFIXES[2]] = mask_encoder
    if sam_head is not None:  # its frozen encoders come from the SAM checkpoint
        head[HEAD_PREFIXES[3]] = sam_head.mask_decoder
    if model.sam_prompt_groups is not None:
        head[HEAD_PREFIXES[4]] = model.sam_prompt_groups
    state = load_state_dict(folder / HEAD_FILE)
    for prefix, module in head.items():
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        load_state_dict_strict(module, part, folder / HEAD_FILE)
        module.to(dtype)
    unknown = sorted(k for k in state if not k.startswith(HEAD_PREFIXES))
    if unknown:
        raise CheckpointError(f"{folder / HEAD_FILE}: unexpected keys {unknown[:10]}")
    if quantization is None:
        model.to(device)
    else:  # the quantized LLM is already placed; `.to` would fail on it
        for part in (tower, projector, dino, model.text_projection, scorer, mask_encoder, sam_head):
            if part is not None:
                part.to(device)
    return model, tokenizer


def _build_adapter(folder: Path, manifest: ExportManifest, device, dtype, merge: bool):
    config = dataclasses.replace(manifest.model, gradient_checkpointing=False)
    model, tokenizer = build_llm_seg(config, device, dtype)
    setup_trainable(model, config)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    model.requires_grad_(False)
    state = load_state_dict(folder / ADAPTER_FILE)
    missing, unexpected = sorted(trainable - set(state)), sorted(set(state) - trainable)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / ADAPTER_FILE}: missing {missing[:10]}, unexpected {unexpected[:10]} "
            "(was it saved with other LoRA settings or another base model?)"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if merge:
        merge_lora_weights(model)
    return model, tokenizer


def load_exported(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    merge_adapter: bool = True,
    vision_tower: str = "",
    dinov2: str = "",
    version: str = "",
) -> ExportedModel:
    """Load an export folder (either kind) into an :class:`LLMSegModel` ready for inference.

    Args:
        folder: the export folder.
        device: where the model goes.
        dtype: parameter dtype (default: the exported model's ``precision``).
        load_in_8bit, load_in_4bit: quantize the language model with bitsandbytes (merged kind,
            CUDA only; a clear error otherwise).
        merge_adapter: adapter kind: fold LoRA into the weights after loading.
        vision_tower, dinov2, version: replace the recorded encoder / base paths (files moved).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    overrides = {
        "vision_tower": vision_tower, "dinov2": dinov2, "version": version, "sam_checkpoint": "",
    }  # fmt: skip
    model_config = manifest.model
    for name, value in overrides.items():
        path = value or _resolve_encoder_path(folder, getattr(model_config, name))
        model_config = dataclasses.replace(model_config, **{name: path})
    manifest = dataclasses.replace(manifest, model=model_config)
    device = torch.device(device)
    dtype = dtype or resolve_dtype(model_config.precision)
    quantization = _quantization_config(load_in_8bit, load_in_4bit, dtype, device)
    if manifest.kind == "adapter":
        if quantization is not None:
            raise ValueError("8/4-bit loading needs a merged export (python -m model.export)")
        model, tokenizer = _build_adapter(folder, manifest, device, dtype, merge_adapter)
    else:
        model, tokenizer = _build_merged(folder, manifest, device, dtype, quantization)
    model.requires_grad_(False)
    logger.info("loaded %s export %s (%s on %s)", manifest.kind, folder, dtype, device)
    return ExportedModel(model.eval(), tokenizer, manifest, folder)


# ---------------------------------------------------------------------------------------------
# Exporting a training run
# ---------------------------------------------------------------------------------------------


def find_run_config(checkpoint: str | os.PathLike) -> Path:
    """The training ``config.json`` of a run, searched from ``checkpoint`` upwards."""
    start = Path(checkpoint).resolve()
    for folder in [start, *start.parents][:4]:
        candidate = folder / "config.json"
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if {"version", "dinov2", "out_dim"} <= set(data):
                return candidate
    raise CheckpointError(
        f"no training config.json found at or above {checkpoint}; pass run_config (--run_config)"
    )


def _pick(cls, data: dict):
    return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def export_training_run(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    which: str = "best",
    kind: str = "merged",
    dtype: str = "",
    weights_source: str = "auto",
    run_config: str | os.PathLike = "",
    model_overrides: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a training checkpoint (see :func:`read_training_weights` for what it may be).

    Args:
        checkpoint: run folder, ``ckpt_model``, ``global_step*`` tag or a consolidated state dict.
        out_dir: the export folder.
        which: ``best`` or ``latest`` tag of a run.
        kind: ``merged`` (LLM with LoRA folded in) or ``adapter`` (trained tensors only).
        dtype: ``fp32``/``bf16``/``fp16`` on disk; default the run's precision.
        weights_source: ``auto``/``module``/``fp32`` (see :func:`read_training_weights`).
        run_config: the run's ``config.json`` (default: found beside the checkpoint).
        model_overrides: :class:`LLMSegConfig` fields to replace (e.g. moved encoder paths).
    """
    if kind not in EXPORT_KINDS:
        raise ValueError(f"unknown export kind {kind!r}; expected {EXPORT_KINDS}")
    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file or folder")
    check_export_target(out_dir, overwrite)
    config_path = Path(run_config) if run_config else find_run_config(checkpoint)
    run = {**json.loads(config_path.read_text()), **(model_overrides or {})}
    run.setdefault("tokenization", "hf")  # runs from before the setting: trained with hf
    model_config = _pick(LLMSegConfig, run)
    save_dtype = resolve_dtype(dtype or model_config.precision)
    for name in ("version", "vision_tower", "dinov2", "sam_checkpoint"):
        path = getattr(model_config, name)
        setattr(model_config, name, str(Path(path).resolve()) if path else path)
    model_config.precision = {v: k for k, v in PRECISIONS.items()}[save_dtype]
    build_config = dataclasses.replace(model_config, gradient_checkpointing=False)
    # Built in the output dtype (a 7B model in fp32 needs 28 GB); peft merges in fp32 anyway.
    model, tokenizer = build_llm_seg(build_config, "cpu", save_dtype)
    model_config.tokenization = resolve_tokenization(model_config.tokenization, tokenizer)
    setup_trainable(model, build_config)
    weights = load_trainable_weights(model, checkpoint, which, weights_source)
    model.eval()
    best = best_record(weights.path.parent) if weights.path.is_dir() else None
    source = {
        "checkpoint": str(weights.path.resolve()),
        "weights": weights.kind,
        "run_config": str(config_path.resolve()),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **{k: v for k, v in weights.client_state.items() if k in ("global_step", "epoch")},
    }
    if best and best.get("tag") == weights.path.name:
        source["val_giou"] = best.get("giou")
    manifest = ExportManifest(
        kind=kind,
        model=model_config,
        architecture=describe_model(model, tokenizer),
        selection=ExportSelection(
            run.get("selection", "iop"),
            run.get("iop_threshold", 0.5),
            run.get("selection_top_k", 5),
        ),
        preprocessing=_pick(ExportPreprocessing, run),
        source=source,
    )
    return save_export(model, tokenizer, manifest, out_dir, save_dtype, overwrite)


@dataclass
class ExportConfig:
    """Export a training checkpoint to a self-describing folder (merged LLM or adapter)."""

    checkpoint: str = field(
        default="",
        metadata={"help": "run / ckpt_model / global_step folder, or a zero_to_fp32 output"},
    )
    out_dir: str = field(default="", metadata={"help": "export folder to create"})
    which: str = field(default="best", metadata={"help": "tag", "choices": ["best", "latest"]})
    kind: str = field(default="merged", metadata={"help": "what to write", "choices": EXPORT_KINDS})
    dtype: str = field(default="", metadata={"help": "dtype on disk (default: run precision)"})
    weights_source: str = field(
        default="auto",
        metadata={"help": "module file, optimizer fp32 copy, or auto", "choices": WEIGHT_SOURCES},
    )
    run_config: str = field(default="", metadata={"help": "the run's config.json if not found"})
    version: str = field(default="", metadata={"help": "override: base LLaVA folder"})
    vision_tower: str = field(default="", metadata={"help": "override: CLIP folder"})
    dinov2: str = field(default="", metadata={"help": "override: DINOv2 folder or .pth"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing out_dir"})


def main(config: ExportConfig) -> Path:
    """Run the export ``config`` describes; the command is saved in ``export_command.json``."""
    if not config.checkpoint or not config.out_dir:
        raise ValueError("--checkpoint and --out_dir are required")
    if config.dtype and config.dtype not in PRECISIONS:
        raise ValueError(f"--dtype must be one of {sorted(PRECISIONS)}")
    overrides = {
        name: getattr(config, name)
        for name in ("version", "vision_tower", "dinov2")
        if getattr(config, name)
    }
    out = export_training_run(
        config.checkpoint, config.out_dir, config.which, config.kind, config.dtype,
        config.weights_source, config.run_config, overrides, config.overwrite,
    )  # fmt: skip
    save_config(config, out / "export_command.json")
    return out


if __name__ == "__main__":
    run_cli(main, ExportConfig)
