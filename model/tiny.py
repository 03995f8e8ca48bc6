"""The tiny-model kit: randomly initialised miniature versions of every pretrained component.

Tests and the built-in demo cannot download LLaVA, CLIP, DINOv2 or SAM, so they build these from
config objects in seconds and write them to disk in the *same layouts as the real checkpoints*;
the real loading code then reads them. Sizes are chosen so that nothing accidentally matches a
real model (e.g. 16 image tokens instead of 256, a 32-d DINOv2 instead of 1024-d).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlamaForCausalLM,
)

from model.backbones.llava import LlavaBackbone, build_projector
from model.backbones.llava_checkpoint import save_clip_vision_tower, save_llava_original
from model.backbones.sam import SamArchitecture, architecture_path, build_sam, save_sam
from utils.cli import run_cli
from utils.config import save_config
from utils.outputs import refuse_to_replace
from utils.tokenizer import IMAGE_TOKEN, add_llm_seg_tokens, train_tiny_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny components (all small enough for a CPU test in well under a second)."""

    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 64
    clip_image_size: int = 32
    clip_patch_size: int = 8
    clip_hidden: int = 24
    clip_layers: int = 2
    dinov2_hidden: int = 32
    dinov2_layers: int = 2
    dinov2_patch_size: int = 14
    dinov2_image_size: int = 56
    sam_image_size: int = 256
    sam_embed_dim: int = 64
    sam_depth: int = 2
    sam_prompt_dim: int = 32  # SAM's prompt width = the [SEG] projection's width for its head
    # Init std of the LLaMA weights (transformers' default). At width d and sequence length L an
    # attention layer's output is about std * d / sqrt(L) times the token's own embedding, so at
    # d = 32 the last token barely sees the others until training grows the weights (at d = 4096
    # it is the other way round). Raising it made the demo learn slower, so it stays at the default.
    text_init_std: float = 0.02


TINY = TinySizes()


def tiny_llama_config(vocab_size: int, sizes: TinySizes = TINY) -> LlamaConfig:
    """A 2-layer LLaMA config for ``vocab_size`` tokens."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        initializer_range=sizes.text_init_std,
    )


def tiny_clip_vision_config(sizes: TinySizes = TINY) -> CLIPVisionConfig:
    """A CLIP vision config giving ``(32 / 8)^2 = 16`` patch tokens."""
    return CLIPVisionConfig(
        image_size=sizes.clip_image_size,
        patch_size=sizes.clip_patch_size,
        hidden_size=sizes.clip_hidden,
        intermediate_size=2 * sizes.clip_hidden,
        num_hidden_layers=sizes.clip_layers,
        num_attention_heads=4,
        projection_dim=16,
    )


def tiny_clip_config(sizes: TinySizes = TINY) -> CLIPConfig:
    """A full CLIP (text + vision) config: real CLIP folders hold both towers."""
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=tiny_clip_vision_config(sizes).to_dict(),
        projection_dim=16,
    )


def tiny_dinov2_config(sizes: TinySizes = TINY) -> Dinov2Config:
    """A 2-layer DINOv2 with patch 14 (as ViT-L/14), so an input of 112 gives an 8x8 grid."""
    return Dinov2Config(
        hidden_size=sizes.dinov2_hidden,
        num_hidden_layers=sizes.dinov2_layers,
        num_attention_heads=4,
        mlp_ratio=2,
        patch_size=sizes.dinov2_patch_size,
        image_size=sizes.dinov2_image_size,
    )


def tiny_sam_architecture(sizes: TinySizes = TINY) -> SamArchitecture:
    """SAM at image size 256 with a 64-d, 2-block encoder (a 16x16 embedding grid)."""
    return SamArchitecture(
        image_size=sizes.sam_image_size,
        encoder_embed_dim=sizes.sam_embed_dim,
        encoder_depth=sizes.sam_depth,
        encoder_num_heads=2,
        encoder_global_attn_indexes=[sizes.sam_depth - 1],
        encoder_window_size=4,
        prompt_embed_dim=sizes.sam_prompt_dim,
        decoder_mlp_dim=64,
        decoder_num_heads=2,
    )


def build_tiny_llava(
    tokenizer=None,
    projector_type: str = "linear",
    sizes: TinySizes = TINY,
    seed: int = 0,
):
    """A randomly initialised tiny :class:`LlavaBackbone` and its tokenizer.

    Args:
        tokenizer: defaults to :func:`~utils.tokenizer.train_tiny_tokenizer`; missing LLM-Seg
            tokens are added.
        projector_type: ``linear`` (LLaVA-v1) or ``mlp2x_gelu`` (LLaVA-1.5).
        sizes: component sizes.
        seed: initialisation seed.
    Returns:
        ``(backbone, tokenizer, clip_model)``; ``clip_model`` is the full CLIP whose vision half
        the backbone uses, for writing a CLIP folder.
    """
    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = train_tiny_tokenizer()
    add_llm_seg_tokens(tokenizer, use_im_start_end=True)
    language_model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), sizes))
    clip = CLIPModel(tiny_clip_config(sizes))
    vision_tower = CLIPVisionModel(clip.config.vision_config)
    vision_tower.load_state_dict(
        {
            k[len("vision_model.") :]: v
            for k, v in clip.state_dict().items()
            if k.startswith("vision_model.")
        }
    )
    projector = build_projector(projector_type, sizes.clip_hidden, sizes.text_hidden)
    backbone = LlavaBackbone(
        language_model,
        vision_tower.eval(),
        projector,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return backbone, tokenizer, clip


def build_tiny_dinov2(sizes: TinySizes = TINY, seed: int = 0) -> Dinov2Model:
    """A randomly initialised tiny ``Dinov2Model`` in eval mode."""
    torch.manual_seed(seed)
    return Dinov2Model(tiny_dinov2_config(sizes)).eval()


@dataclass
class TinyCheckpoints:
    """Paths of a complete set of tiny checkpoints, laid out like the real ones."""

    llava: Path  # original LLaVA layout folder (tokenizer inside)
    clip: Path  # openai/clip-vit-large-patch14 layout folder
    dinov2: Path  # facebook/dinov2-large layout folder
    sam: Path  # sam_vit_*.pth-style state dict (+ .json architecture beside it)


def tiny_checkpoint_paths(root: str | os.PathLike) -> TinyCheckpoints:
    """Where :func:`write_tiny_checkpoints` puts each component under ``root``."""
    root = Path(root)
    return TinyCheckpoints(
        llava=root / "llava", clip=root / "clip", dinov2=root / "dinov2", sam=root / "sam_tiny.pth"
    )


def kit_outputs(root: str | os.PathLike) -> list[Path]:
    """Every file and folder :func:`write_tiny_checkpoints` replaces under ``root``."""
    paths = tiny_checkpoint_paths(root)
    return [paths.llava, paths.clip, paths.dinov2, paths.sam, architecture_path(paths.sam)]


def write_tiny_checkpoints(
    root: str | os.PathLike,
    projector_type: str = "linear",
    sizes: TinySizes = TINY,
    seed: int = 0,
    tokenizer=None,
) -> TinyCheckpoints:
    """Build every tiny component and write it under ``root`` in the real on-disk layouts."""
    paths = tiny_checkpoint_paths(root)
    backbone, tokenizer, clip = build_tiny_llava(tokenizer, projector_type, sizes, seed)
    save_clip_vision_tower(clip, paths.clip)
    save_llava_original(paths.llava, backbone, tokenizer, paths.clip, projector_type)
    build_tiny_dinov2(sizes, seed).save_pretrained(paths.dinov2)
    torch.manual_seed(seed)
    arch = tiny_sam_architecture(sizes)
    save_sam(build_sam(arch), arch, paths.sam)
    return paths


@dataclass
class TinyKitConfig:
    """Write a complete set of tiny random checkpoints in the real on-disk layouts."""

    out_dir: str = dataclasses.field(default="tiny_checkpoints", metadata={"help": "output folder"})
    projector_type: str = dataclasses.field(
        default="linear", metadata={"help": "LLaVA projector", "choices": ["linear", "mlp2x_gelu"]}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "initialisation seed"})
    overwrite: bool = dataclasses.field(
        default=False, metadata={"help": "replace files in --out_dir this command did not write"}
    )


def main(config: TinyKitConfig) -> TinyCheckpoints:
    root = Path(config.out_dir)
    refuse_to_replace(
        [*kit_outputs(root), root / "config.json"], config.overwrite, "model.tiny", "--out_dir",
        root / "config.json", TinyKitConfig,
    )  # fmt: skip
    paths = write_tiny_checkpoints(config.out_dir, config.projector_type, seed=config.seed)
    save_config(config, Path(config.out_dir) / "config.json")
    for name, path in dataclasses.asdict(paths).items():
        logger.info("%-7s -> %s", name, path)
    return paths


if __name__ == "__main__":
    run_cli(main, TinyKitConfig)
