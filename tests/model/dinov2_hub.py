"""Writing a ``Dinov2Model`` as the official hub checkpoint (``dinov2_vit*14_pretrain.pth``).

The inverse of ``model.backbones.dinov2.convert_dinov2_hub_state``, written out independently so
the tests check the mapping rather than re-derive it.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import Dinov2Model


def hub_state_of(model: Dinov2Model, folder) -> dict[str, torch.Tensor]:
    """Write ``model`` as ``facebook/dinov2`` folder, then rename to the hub ``.pth`` keys."""
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    hub = {
        "cls_token": state.pop("embeddings.cls_token"),
        "mask_token": state.pop("embeddings.mask_token"),
        "pos_embed": state.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": state.pop("layernorm.weight"),
        "norm.bias": state.pop("layernorm.bias"),
    }
    renames = {
        "attention.output.dense": "attn.proj",
        "layer_scale1.lambda1": "ls1.gamma",
        "layer_scale2.lambda1": "ls2.gamma",
        "mlp.weights_in": "mlp.w12",
        "mlp.weights_out": "mlp.w3",
    }
    for layer in range(model.config.num_hidden_layers):
        prefix = f"encoder.layer.{layer}."
        for kind in ("weight", "bias"):
            parts = [
                state.pop(f"{prefix}attention.attention.{n}.{kind}")
                for n in ("query", "key", "value")
            ]
            hub[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts)
        for key in [k for k in state if k.startswith(prefix)]:
            name = key[len(prefix) :]
            for old, new in renames.items():
                name = name.replace(old, new)
            hub[f"blocks.{layer}.{name}"] = state.pop(key)
    assert not state, f"unmapped keys {sorted(state)}"
    return hub
