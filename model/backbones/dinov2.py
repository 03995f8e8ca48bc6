"""Loading DINOv2 (``transformers`` ``Dinov2Model``) from local files only.

The ``facebook/dinov2-large`` folder layout (``config.json`` + ``model.safetensors``) loads
directly and strictly: a missing or unexpected weight is an error naming it, never a silently
random-initialised layer. The official ``torch.hub`` checkpoint files
(``dinov2_vitl14_pretrain.pth``, what upstream LLM-Seg fetched at run time) load through an
explicit key mapping, with the architecture read from the tensor shapes.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model

from utils.checkpoint import CheckpointError, load_state_dict, quiet_transformers

logger = logging.getLogger(__name__)


def load_dinov2_folder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Dinov2Model:
    """Load a ``facebook/dinov2-*`` style folder strictly, in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a DINOv2 folder (no config.json)")
    with quiet_transformers():
        model, info = Dinov2Model.from_pretrained(
            path, dtype=dtype, output_loading_info=True, local_files_only=True
        )
    problems = {k: sorted(v)[:10] for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise CheckpointError(f"{path}: {problems}")
    return model.eval()


# The official ViTs all use 64-dimensional attention heads; the hidden size identifies the arch.
DINOV2_ARCHS: dict[str, dict[str, int]] = {
    "vits14": {"hidden_size": 384, "num_attention_heads": 6},
    "vitb14": {"hidden_size": 768, "num_attention_heads": 12},
    "vitl14": {"hidden_size": 1024, "num_attention_heads": 16},
    "vitg14": {"hidden_size": 1536, "num_attention_heads": 24},
}

# Hub (``facebookresearch/dinov2``) names -> the ``facebook/dinov2-*`` folder names. Per-block
# keys are matched after the ``blocks.{i}.`` prefix; ``attn.qkv`` is split separately.
_HUB_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_HUB_BLOCK = {
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",  # SwiGLU (ViT-g): transformers splits it into gate/up
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}
_HUB_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")


def convert_dinov2_hub_state(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official hub checkpoint (``dinov2_vitl14_pretrain.pth``) to the folder layout.

    Returns:
        ``(converted, unknown)``: the tensors under ``facebook/dinov2-*`` names, and the hub keys
        that have no counterpart (e.g. ``register_tokens`` of the ``_reg`` variants).
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in _HUB_TOP_LEVEL:
            converted[_HUB_TOP_LEVEL[key]] = value
            continue
        match = _HUB_BLOCK_KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, module, kind = match.groups()
        prefix = f"encoder.layer.{index}."
        if module == "attn.qkv":
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                converted[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
        elif module in _HUB_BLOCK:
            converted[f"{prefix}{_HUB_BLOCK[module]}.{kind}"] = value
        elif f"{module}.{kind}" in _HUB_BLOCK:  # layer-scale gammas have no weight/bias suffix
            converted[prefix + _HUB_BLOCK[f"{module}.{kind}"]] = value
        else:
            unknown.append(key)
    return converted, sorted(unknown)


def dinov2_config_from_hub_state(
    state: dict[str, torch.Tensor], arch: str | None = None, num_heads: int | None = None
) -> Dinov2Config:
    """Infer a ``Dinov2Config`` from the tensor shapes of a hub checkpoint.

    Hidden size, patch size, depth, MLP ratio, SwiGLU and the pre-training resolution (from the
    position-embedding grid) come from the shapes. The head count cannot be seen in the weights;
    it is ``hidden // 64`` as in every official model, or ``num_heads``/``arch`` when given.

    Args:
        state: the hub state dict (``cls_token``, ``pos_embed``, ``blocks.{i}.*`` ...).
        arch: optional ``vits14``/``vitb14``/``vitl14``/``vitg14``, checked against the shapes.
        num_heads: optional explicit head count (non-official sizes, e.g. the tiny test model).
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise CheckpointError(f"not a DINOv2 hub checkpoint: missing key {key!r}")
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = 1 + max((int(m.group(1)) for k in state if (m := _HUB_BLOCK_KEY.match(k))), default=-1)
    swiglu = "blocks.0.mlp.w12.weight" in state
    mlp_hidden = 4 * hidden if swiglu else state["blocks.0.mlp.fc1.weight"].shape[0]
    if mlp_hidden % hidden:
        raise CheckpointError(f"DINOv2 MLP width {mlp_hidden} is not a multiple of {hidden}")
    if arch:
        if arch not in DINOV2_ARCHS:
            raise ValueError(f"unknown DINOv2 arch {arch!r}; expected one of {list(DINOV2_ARCHS)}")
        if DINOV2_ARCHS[arch]["hidden_size"] != hidden:
            raise CheckpointError(
                f"DINOv2 arch {arch} has hidden size {DINOV2_ARCHS[arch]['hidden_size']} but the "
                f"checkpoint's is {hidden}"
            )
        num_heads = num_heads or DINOV2_ARCHS[arch]["num_attention_heads"]
    num_heads = num_heads or hidden // 64
    if num_heads < 1 or hidden % num_heads:
        raise CheckpointError(
            f"cannot split DINOv2 hidden size {hidden} into {num_heads} heads; pass num_heads"
        )
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        mlp_ratio=mlp_hidden // hidden,
        patch_size=patch,
        image_size=grid * patch,
        use_swiglu_ffn=swiglu,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
    )


def load_dinov2_hub(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    arch: str | None = None,
    num_heads: int | None = None,
) -> Dinov2Model:
    """Load an official hub checkpoint file (``dinov2_vitl14_pretrain.pth``) strictly, offline.

    The keys are renamed explicitly (:func:`convert_dinov2_hub_state`); anything unmapped or
    missing raises :class:`CheckpointError` naming the keys.
    """
    path = Path(path)
    state = load_state_dict(path)
    config = dinov2_config_from_hub_state(state, arch=arch, num_heads=num_heads)
    converted, unknown = convert_dinov2_hub_state(state)
    with quiet_transformers():
        model, info = Dinov2Model.from_pretrained(
            None, config=config, state_dict=converted, dtype=dtype, output_loading_info=True
        )
    problems = {k: sorted(v)[:10] for k, v in info.items() if k != "error_msgs" and v}
    if unknown:
        problems["unexpected_keys"] = unknown[:10]
    if problems:
        raise CheckpointError(f"{path}: {problems}")
    logger.info(
        "DINOv2 from %s: hidden %d, %d layers, %d heads, patch %d",
        path,
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.patch_size,
    )
    return model.eval()


def load_dinov2(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    arch: str | None = None,
    num_heads: int | None = None,
) -> Dinov2Model:
    """Load DINOv2 from a ``facebook/dinov2-*`` folder or an official hub ``.pth`` file."""
    path = Path(path)
    if path.is_dir():
        return load_dinov2_folder(path, dtype)
    if path.is_file():
        return load_dinov2_hub(path, dtype, arch=arch, num_heads=num_heads)
    raise CheckpointError(
        f"DINOv2 checkpoint {path} not found: pass a facebook/dinov2-large folder or "
        "dinov2_vitl14_pretrain.pth"
    )
