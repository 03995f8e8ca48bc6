"""Reading and writing LLaVA checkpoints in the layouts their authors published.

Original LLaVA layout (LLaVA-v1 ``LLaVA-Lightning-7B-v1``, used by LISA and LLM-Seg, and
LLaVA-1.5): one folder with ``config.json`` (LLaMA fields plus ``mm_vision_tower``,
``mm_hidden_size``, ``mm_use_im_start_end``, ``mm_vision_select_layer``, optionally
``mm_projector_type`` and ``mm_vision_select_feature``), LLaMA weights under ``model.*`` and
``lm_head.*`` in sharded ``pytorch_model-*.bin`` files with an index, and the projector under
``model.mm_projector.*`` (one Linear in v1, ``0.*``/``2.*`` for 1.5's ``mlp2x_gelu``). The CLIP
vision tower is a separate ``openai/clip-vit-large-patch14``-style folder (a full ``CLIPModel``).

The ``transformers`` llava layout (``llava-hf/*``, ``LlavaForConditionalGeneration``) is read by
:func:`load_llava_transformers`; :func:`load_llava` picks the right loader for a folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
)

from model.backbones.llava import LlavaBackbone, build_projector
from utils.checkpoint import (
    CheckpointError,
    load_state_dict,
    load_state_dict_strict,
    quiet_transformers,
    resolve_weight_files,
    save_state_dict,
)
from utils.tokenizer import IMAGE_TOKEN, add_llm_seg_tokens, load_tokenizer

logger = logging.getLogger(__name__)

PROJECTOR_PREFIX = "model.mm_projector."
# Keys an original LLaVA checkpoint may carry that the backbone deliberately does not use: old
# LLaMA rotary buffers (recomputed) and a copy of the vision tower (loaded from its own folder).
_IGNORED_KEYS = re.compile(r"(.*rotary_emb\.inv_freq$|^model\.vision_tower\.)")

_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "rms_norm_eps",
    "max_position_embeddings",
    "initializer_range",
    "rope_theta",
    "tie_word_embeddings",
)


def read_llava_config(folder: str | os.PathLike) -> dict:
    """The raw ``config.json`` of a checkpoint folder, with a clear error when absent."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; is this a LLaVA checkpoint folder?")
    return json.loads(path.read_text())


def llama_config_from_llava(raw: dict) -> LlamaConfig:
    """Build the ``LlamaConfig`` of an original-layout LLaVA ``config.json``."""
    fields = {k: raw[k] for k in _LLAMA_FIELDS if k in raw}
    if "max_position_embeddings" not in fields and "max_sequence_length" in raw:
        fields["max_position_embeddings"] = raw["max_sequence_length"]
    fields.setdefault("tie_word_embeddings", False)
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = raw.get(token)
        fields[token] = value if isinstance(value, int) and value >= 0 else None
    return LlamaConfig(**fields)


def projector_type_of(raw: dict) -> str:
    """``linear`` for LLaVA-v1 configs (no ``mm_projector_type``), else the recorded type."""
    return raw.get("mm_projector_type", "linear")


def _check_loading_info(info: dict, source: Path, allowed_unexpected: re.Pattern) -> None:
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing keys: {sorted(info['missing_keys'])[:10]}")
    unexpected = sorted(
        k for k in info.get("unexpected_keys", ()) if not allowed_unexpected.match(k)
    )
    if unexpected:
        problems.append(f"unexpected keys: {unexpected[:10]}")
    if info.get("mismatched_keys"):
        problems.append(f"shape mismatch: {sorted(info['mismatched_keys'])[:10]}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_clip_vision_tower(path: str | os.PathLike, dtype: torch.dtype) -> CLIPVisionModel:
    """Load the vision half of a CLIP folder (``openai/clip-vit-large-patch14`` layout)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"vision tower {path} is not a local CLIP folder; pass --vision-tower /path/to/clip"
        )
    with quiet_transformers():
        tower, info = CLIPVisionModel.from_pretrained(
            path, dtype=dtype, output_loading_info=True, local_files_only=True
        )
    _check_loading_info(
        info, path, re.compile(r"^(text_model\.|text_projection|visual_projection|logit_scale)")
    )
    return tower.eval()


def save_clip_vision_tower(tower: CLIPModel, folder: str | os.PathLike) -> Path:
    """Write a full ``CLIPModel`` folder, the layout of ``openai/clip-vit-large-patch14``."""
    tower.save_pretrained(folder)
    return Path(folder)


def _load_projector_state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if k.startswith(PROJECTOR_PREFIX)})
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_state_dict(folder / name))
    else:
        state = load_state_dict(folder)
    return {
        k[len(PROJECTOR_PREFIX) :]: v for k, v in state.items() if k.startswith(PROJECTOR_PREFIX)
    }


def load_llava_original(
    folder: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    model_max_length: int = 512,
):
    """Load an original-layout LLaVA folder (v1 or 1.5) into a :class:`LlavaBackbone`.

    Args:
        folder: the checkpoint folder.
        vision_tower: local CLIP folder; defaults to the config's ``mm_vision_tower``.
        dtype: parameter dtype.
        attn_implementation: ``sdpa`` or ``flash_attention_2`` (see ``utils.device``).
        model_max_length: tokenizer length limit.
    Returns:
        ``(backbone, tokenizer, raw_config)``; the tokenizer already holds ``<image>``,
        ``[SEG]`` (and ``<im_start>``/``<im_end>`` when the config uses them) and the
        embeddings are resized to match.
    """
    folder = Path(folder)
    raw = read_llava_config(folder)
    if "mm_hidden_size" not in raw:
        raise CheckpointError(
            f"{folder}/config.json has no mm_hidden_size: not an original LLaVA checkpoint"
        )
    with quiet_transformers():
        language_model, info = LlamaForCausalLM.from_pretrained(
            folder,
            config=llama_config_from_llava(raw),
            dtype=dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            local_files_only=True,
        )
    projector_prefix = re.escape(PROJECTOR_PREFIX)
    _check_loading_info(info, folder, re.compile(f"({projector_prefix}|{_IGNORED_KEYS.pattern})"))

    projector = build_projector(projector_type_of(raw), raw["mm_hidden_size"], raw["hidden_size"])
    projector_state = _load_projector_state(folder)
    expected = set(projector.state_dict())
    if set(projector_state) != expected:
        raise CheckpointError(
            f"{folder}: projector keys {sorted(projector_state)} do not match the "
            f"{projector_type_of(raw)} projector's {sorted(expected)}"
        )
    projector.load_state_dict(projector_state)
    projector.to(dtype)

    tower = load_clip_vision_tower(vision_tower or raw["mm_vision_tower"], dtype)
    if tower.config.hidden_size != raw["mm_hidden_size"]:
        raise CheckpointError(
            f"vision tower hidden size {tower.config.hidden_size} != mm_hidden_size "
            f"{raw['mm_hidden_size']} in {folder}/config.json"
        )
    tokenizer = load_tokenizer(str(folder), model_max_length=model_max_length)
    add_llm_seg_tokens(tokenizer, use_im_start_end=raw.get("mm_use_im_start_end", False))
    if len(tokenizer) > language_model.config.vocab_size:
        language_model.resize_token_embeddings(len(tokenizer))
    backbone = LlavaBackbone(
        language_model,
        tower,
        projector,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_select_layer=raw.get("mm_vision_select_layer", -2),
        vision_select_feature=raw.get("mm_vision_select_feature", "patch"),
    )
    return backbone, tokenizer, raw


def save_llava_original(
    folder: str | os.PathLike,
    backbone: LlavaBackbone,
    tokenizer,
    vision_tower_path: str | os.PathLike,
    projector_type: str,
    use_im_start_end: bool = True,
    num_shards: int = 2,
) -> Path:
    """Write ``backbone`` in the original LLaVA layout (sharded ``.bin`` files + index).

    The vision tower is not copied: ``mm_vision_tower`` records ``vision_tower_path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llama = backbone.language_model.config
    raw = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        **{k: getattr(llama, k) for k in _LLAMA_FIELDS if k != "rope_theta" and hasattr(llama, k)},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": -1,
        "mm_vision_tower": str(vision_tower_path),
        "mm_hidden_size": backbone.vision_tower.config.hidden_size,
        "mm_use_im_start_end": use_im_start_end,
        "mm_vision_select_layer": backbone.vision_select_layer,
        "use_mm_proj": True,
    }
    if projector_type != "linear":
        raw["mm_projector_type"] = projector_type
        raw["mm_vision_select_feature"] = backbone.vision_select_feature
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")

    state = dict(backbone.language_model.state_dict())
    state.update({PROJECTOR_PREFIX + k: v for k, v in backbone.projector.state_dict().items()})
    keys = list(state)
    per_shard = -(-len(keys) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        chunk = keys[shard * per_shard : (shard + 1) * per_shard]
        save_state_dict({k: state[k] for k in chunk}, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# The ``transformers`` llava layout (``llava-hf/llava-1.5-7b-hf`` and models saved with
# ``LlavaForConditionalGeneration.save_pretrained``): one folder holding everything, in one of
# two key styles. v4 (transformers < 4.52, and what the hub's llava-hf repos hold):
# ``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
# ``multi_modal_projector.linear_{1,2}.*``. v5: ``model.language_model.*``, ``lm_head.*``,
# ``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.*``. The CLIP tower's
# ``vision_model.`` level is optional in both (newer transformers drop it).
# ---------------------------------------------------------------------------------------------

_TEXT_KEY_MAPPING = {
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^language_model\.lm_head\.": "lm_head.",
}
_VISION_KEY_MAPPING = {r"^(model\.)?vision_tower\.(vision_model\.)?": ""}
_VISION_OR_PROJECTOR = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")
_TEXT_OR_PROJECTOR = re.compile(
    r"^(language_model\.|model\.language_model\.|lm_head\.|(model\.)?multi_modal_projector\.)"
)
_HF_PROJECTOR_KEY = re.compile(r"^(model\.)?multi_modal_projector\.linear_([12])\.(weight|bias)$")
_SELECT_STRATEGIES = {"default": "patch", "full": "cls_patch"}


def detect_llava_layout(folder: str | os.PathLike) -> str:
    """``original`` (LLaVA's own repo: v1, 1.5) or ``transformers`` (``LlavaForConditional...``)."""
    raw = read_llava_config(folder)
    if "text_config" in raw and "vision_config" in raw:
        return "transformers"
    if "mm_hidden_size" in raw:
        return "original"
    raise CheckpointError(
        f"{folder}/config.json is neither an original LLaVA config (no mm_hidden_size) nor a "
        "transformers llava config (no text_config/vision_config)"
    )


def _read_tensors(folder: Path, pattern: re.Pattern) -> dict[str, torch.Tensor]:
    """Only the tensors whose names match ``pattern``, reading as few files as possible."""
    state: dict[str, torch.Tensor] = {}
    for file in resolve_weight_files(folder):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if pattern.match(key):
                        state[key] = handle.get_tensor(key)
        else:
            state.update({k: v for k, v in load_state_dict(file).items() if pattern.match(k)})
    return state


def _load_hf_projector(folder: Path, config: LlavaConfig) -> torch.nn.Module:
    if config.projector_hidden_act != "gelu" or not getattr(
        config, "multimodal_projector_bias", True
    ):
        raise CheckpointError(
            f"{folder}: only the LLaVA-1.5 projector (Linear-GELU-Linear with bias) is supported, "
            f"got act={config.projector_hidden_act!r}"
        )
    projector = build_projector(
        "mlp2x_gelu", config.vision_config.hidden_size, config.text_config.hidden_size
    )
    found = _read_tensors(folder, re.compile(r"^(model\.)?multi_modal_projector\."))
    state, unexpected = {}, []
    for key, value in found.items():
        match = _HF_PROJECTOR_KEY.match(key)
        if match is None:
            unexpected.append(key)
        else:
            state[f"{2 * (int(match.group(2)) - 1)}.{match.group(3)}"] = value
    if unexpected:
        raise CheckpointError(f"{folder}: unexpected keys: {sorted(unexpected)[:10]}")
    missing = sorted(set(projector.state_dict()) - set(state))
    if missing:
        names = [f"multi_modal_projector.linear_{int(k[0]) // 2 + 1}{k[1:]}" for k in missing]
        raise CheckpointError(f"{folder}: missing keys: {names}")
    load_state_dict_strict(projector, state, folder)
    return projector


def load_llava_transformers(
    folder: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    model_max_length: int = 512,
):
    """Load a ``transformers`` llava folder (either key style) into a :class:`LlavaBackbone`.

    The LLaMA and CLIP halves are read by ``from_pretrained`` with explicit key mappings; every
    tensor must be claimed by exactly one half or the projector, otherwise a
    :class:`CheckpointError` names it. Only LLaMA text models with a CLIP vision tower are
    supported (LLaVA-1.5 / LISA / LLM-Seg); ``vision_tower`` is unused because the tower's
    weights are inside the folder.

    Returns:
        ``(backbone, tokenizer, raw_config)`` as :func:`load_llava_original`.
    """
    folder = Path(folder)
    raw = read_llava_config(folder)
    config = LlavaConfig.from_pretrained(folder, local_files_only=True)
    if config.text_config.model_type != "llama" or not isinstance(
        config.vision_config, CLIPVisionConfig
    ):
        raise CheckpointError(
            f"{folder}: only LLaMA + CLIP llava checkpoints are supported, got "
            f"{config.text_config.model_type} + {config.vision_config.model_type}"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise CheckpointError(
            f"{folder}: vision_feature_layer {config.vision_feature_layer} (several layers) is "
            "not supported"
        )
    strategy = config.vision_feature_select_strategy
    if strategy not in _SELECT_STRATEGIES:
        raise CheckpointError(f"{folder}: unknown vision_feature_select_strategy {strategy!r}")
    if vision_tower is not None:
        logger.info("%s holds its own vision tower; ignoring vision_tower=%s", folder, vision_tower)

    with quiet_transformers():
        language_model, info = LlamaForCausalLM.from_pretrained(
            folder,
            config=config.text_config,
            key_mapping=_TEXT_KEY_MAPPING,
            dtype=dtype,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            local_files_only=True,
        )
        _check_loading_info(info, folder, _VISION_OR_PROJECTOR)
        tower, info = CLIPVisionModel.from_pretrained(
            folder,
            config=config.vision_config,
            key_mapping=_VISION_KEY_MAPPING,
            dtype=dtype,
            output_loading_info=True,
            local_files_only=True,
        )
        _check_loading_info(info, folder, _TEXT_OR_PROJECTOR)
    projector = _load_hf_projector(folder, config).to(dtype)

    tokenizer = load_tokenizer(str(folder), model_max_length=model_max_length)
    add_llm_seg_tokens(tokenizer, use_im_start_end=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != config.image_token_id:
        raise CheckpointError(
            f"{folder}: the tokenizer's {IMAGE_TOKEN} id {image_token_id} differs from the "
            f"config's image_token_id {config.image_token_id}"
        )
    if len(tokenizer) > language_model.config.vocab_size:
        language_model.resize_token_embeddings(len(tokenizer))
    backbone = LlavaBackbone(
        language_model,
        tower.eval(),
        projector,
        image_token_id=image_token_id,
        vision_select_layer=config.vision_feature_layer,
        vision_select_feature=_SELECT_STRATEGIES[strategy],
    )
    return backbone, tokenizer, raw


def save_llava_transformers(
    folder: str | os.PathLike, backbone: LlavaBackbone, tokenizer, key_style: str = "v5"
) -> Path:
    """Write a LLaVA-1.5-style ``backbone`` in the ``transformers`` llava layout.

    Args:
        folder: output folder (``config.json``, ``model.safetensors``, tokenizer files).
        backbone: must use the ``mlp2x_gelu`` projector.
        tokenizer: saved beside the weights; must hold ``<image>``.
        key_style: ``v4`` (``language_model.model.*``, ``vision_tower.vision_model.*``) or
            ``v5`` (``model.language_model.*``, ``model.vision_tower.vision_model.*``).
    """
    if key_style not in ("v4", "v5"):
        raise ValueError(f"key_style must be 'v4' or 'v5', got {key_style!r}")
    if not isinstance(backbone.projector, torch.nn.Sequential):
        raise ValueError("the transformers llava layout needs the mlp2x_gelu projector")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    strategy = {v: k for k, v in _SELECT_STRATEGIES.items()}[backbone.vision_select_feature]
    config = LlavaConfig(
        text_config=backbone.language_model.config.to_dict(),
        vision_config=backbone.vision_tower.config.to_dict(),
        image_token_id=backbone.image_token_id,
        vision_feature_layer=backbone.vision_select_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=backbone.num_image_tokens,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    base = "" if key_style == "v4" else "model."
    text = "language_model.model." if key_style == "v4" else "model.language_model."
    head = "language_model.lm_head." if key_style == "v4" else "lm_head."
    state = {}
    for key, value in backbone.language_model.state_dict().items():
        if key.startswith("lm_head."):
            state[head + key.removeprefix("lm_head.")] = value
        else:
            state[text + key.removeprefix("model.")] = value
    for key, value in backbone.vision_tower.state_dict().items():
        state[f"{base}vision_tower.vision_model.{key}"] = value
    for key, value in backbone.projector.state_dict().items():
        state[f"{base}multi_modal_projector.linear_{int(key[0]) // 2 + 1}{key[1:]}"] = value
    save_state_dict(state, folder / "model.safetensors")
    tokenizer.save_pretrained(folder)
    return folder


def load_llava(
    folder: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    model_max_length: int = 512,
):
    """Load any supported LLaVA folder, detecting its layout (see :func:`detect_llava_layout`).

    Args:
        folder: LLaVA-v1 (``LLaVA-Lightning-7B-v1``), LLaVA-1.5 (original repo) or a
            ``transformers`` llava folder.
        vision_tower: local CLIP folder for the original layout (overrides ``mm_vision_tower``,
            upstream's ``--vision-tower``); ignored by the self-contained transformers layout.
        dtype, attn_implementation, model_max_length: as :func:`load_llava_original`.
    Returns:
        ``(backbone, tokenizer, raw_config)``.
    """
    if detect_llava_layout(folder) == "transformers":
        return load_llava_transformers(
            folder, vision_tower, dtype, attn_implementation, model_max_length
        )
    return load_llava_original(folder, vision_tower, dtype, attn_implementation, model_max_length)
