"""Building and loading SAM from the ``segment_anything`` package, at any size.

``segment_anything.build_sam_vit_*`` hard-code the architecture, so they cannot build the tiny SAM
our tests use. :class:`SamArchitecture` describes the sizes; :func:`build_sam` composes the
package's own modules with them; :func:`load_sam` reads an official checkpoint
(``sam_vit_h_4b8939.pth``: a plain state dict with ``image_encoder.*``, ``prompt_encoder.*`` and
``mask_decoder.*`` keys) or a custom-size one whose architecture is stored beside it as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from utils.checkpoint import (
    CheckpointError,
    load_state_dict,
    load_state_dict_strict,
    save_state_dict,
)


@dataclass
class SamArchitecture:
    """Every size that defines a SAM model. Defaults are ViT-H."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    encoder_window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    mask_in_chans: int = 16

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_PRESETS: dict[str, SamArchitecture] = {
    "vit_h": SamArchitecture(),
    "vit_l": SamArchitecture(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=[5, 11, 17, 23],
    ),
    "vit_b": SamArchitecture(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=[2, 5, 8, 11],
    ),
}


def build_sam(arch: SamArchitecture) -> Sam:
    """A randomly initialised ``segment_anything`` SAM with the sizes of ``arch``, in eval mode."""
    grid = arch.image_embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.encoder_depth,
            embed_dim=arch.encoder_embed_dim,
            img_size=arch.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.encoder_num_heads,
            patch_size=arch.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(arch.encoder_global_attn_indexes),
            window_size=arch.encoder_window_size,
            out_chans=arch.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.prompt_embed_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_num_heads,
            ),
            transformer_dim=arch.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def architecture_path(checkpoint: str | os.PathLike) -> Path:
    """Where the architecture JSON of a custom-size checkpoint lives: ``<name>.json`` beside it."""
    return Path(checkpoint).with_suffix(".json")


def save_sam(sam: Sam, arch: SamArchitecture, checkpoint: str | os.PathLike) -> Path:
    """Write ``sam`` in the official layout (a plain state dict) plus its architecture JSON."""
    checkpoint = Path(checkpoint)
    save_state_dict(sam.state_dict(), checkpoint)
    architecture_path(checkpoint).write_text(json.dumps(dataclasses.asdict(arch), indent=2) + "\n")
    return checkpoint


def load_sam(
    checkpoint: str | os.PathLike, model_type: str = "vit_h", device: torch.device | str = "cpu"
) -> Sam:
    """Load a SAM checkpoint strictly.

    Args:
        checkpoint: an official ``sam_vit_*.pth`` or a file written by :func:`save_sam`.
        model_type: ``vit_h``, ``vit_l`` or ``vit_b``; ignored when an architecture JSON sits
            beside the checkpoint (custom sizes).
        device: where to put the model.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"SAM checkpoint {checkpoint} does not exist")
    arch_file = architecture_path(checkpoint)
    if arch_file.is_file():
        arch = SamArchitecture(**json.loads(arch_file.read_text()))
    elif model_type in SAM_PRESETS:
        arch = SAM_PRESETS[model_type]
    else:
        raise ValueError(f"unknown SAM model_type {model_type!r}; expected {sorted(SAM_PRESETS)}")
    sam = build_sam(arch)
    load_state_dict_strict(sam, load_state_dict(checkpoint), source=checkpoint)
    return sam.to(device)


def infer_sam_architecture(state: dict[str, torch.Tensor], decoder_num_heads: int = 8):
    """The :class:`SamArchitecture` of a SAM state dict, read from the tensor shapes.

    Image size from ``pos_embed`` and the patch size, encoder width and depth from the patch
    embedding and the blocks, encoder heads from the ``rel_pos`` tables (their width is the
    head dimension), global vs window blocks from the tables' length (``2 * grid - 1`` for global
    attention, ``2 * window - 1`` otherwise), prompt width, mask channels and decoder depth/MLP
    from theirs. The decoder's head count leaves no trace in the weights: every released SAM
    uses 8, hence the default.

    Raises:
        CheckpointError: a tensor SAM always has is missing (the message names it).
    """

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"not a SAM state dict: no {name}")
        return state[name]

    patch = get("image_encoder.patch_embed.proj.weight")
    embed_dim, patch_size = patch.shape[0], patch.shape[-1]
    grid = get("image_encoder.pos_embed").shape[1]
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")})
    tables = [get(f"image_encoder.blocks.{i}.attn.rel_pos_h").shape for i in blocks]
    global_blocks = [i for i, shape in zip(blocks, tables) if shape[0] == 2 * grid - 1]
    windows = {(shape[0] + 1) // 2 for i, shape in zip(blocks, tables) if i not in global_blocks}
    layers = {k.split(".")[3] for k in state if k.startswith("mask_decoder.transformer.layers.")}
    return SamArchitecture(
        image_size=grid * patch_size,
        patch_size=patch_size,
        encoder_embed_dim=embed_dim,
        encoder_depth=len(blocks),
        encoder_num_heads=embed_dim // tables[0][1],
        encoder_global_attn_indexes=global_blocks,
        encoder_window_size=windows.pop() if windows else 14,
        prompt_embed_dim=get("prompt_encoder.no_mask_embed.weight").shape[1],
        decoder_depth=len(layers),
        decoder_mlp_dim=get("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        decoder_num_heads=decoder_num_heads,
        mask_in_chans=get("prompt_encoder.mask_downscaling.3.weight").shape[0],
    )
