"""The built-in demo's preset: tiny random components sized for the synthetic task on a CPU.

``scripts/demo.sh`` calls this module's command line once the synthetic dataset exists::

    python -m model.presets --dataset_dir demo_out/dataset --out_dir demo_out/checkpoints

It trains a tokenizer on the training split's queries (plus the prompt templates), so every word
of the data is one token, writes tiny random LLaVA/CLIP/DINOv2/SAM checkpoints in the real
layouts (:func:`model.tiny.write_tiny_checkpoints`) and writes ``model_args.txt``: the
``training.py``/``eval.py`` flags of :func:`demo_llm_seg_config`, one per line, so the demo's
training and evaluation build exactly the same model.

Where the preset departs from the paper's configuration, and why:

* ``mask_geometry_embedding`` (an ``LLMSegConfig`` option, off by default): mask-average pooling
  of uniformly coloured regions keeps colour but loses size, position and outline, which "the
  largest", "the leftmost" or "the shape with three corners" need (DINOv2-L recovers some of it
  from context; a random tiny DINOv2 cannot). Its rotation-invariant outline harmonics let
  "three corners" be learnt from triangles at any angle, and its linear path makes "further
  left" a direction of the embedding from the first step;
* sizes for a laptop CPU, not design changes: the tiny CLIP/DINOv2 of :mod:`model.tiny`, a
  LLaMA of 2 layers but 128 wide (measured when the demo still trained on one query per
  picture: at the kit's width 32 the ``[SEG]`` embedding of "the red object" and of "the blue
  object" stayed the same for the whole run, width 128 lifted colour queries from chance to
  about 0.6 gIoU; asking about several objects of a picture per step then took them to 0.9,
  and width 32 was not measured again), a 224-pixel
  DINOv2 input (a 16 x 16 grid, so objects of 10-30 pixels cover several patches), 64 x 64
  proposal maps (enough for the shape thumbnail of such objects), a 64-wide scorer, fp32, no
  gradient checkpointing.

DINOv2 stays frozen and the LLM gets the paper's LoRA: ``train_dinov2``, ``train_language_model``,
a larger LLaMA init std, a lower IoP-loss weight and a higher learning rate did not improve the
demo in 700-step comparisons with one query per picture (README, "Built-in demo").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from model.builder import LLMSegConfig, tiny_llm_seg_config
from model.tiny import TinyCheckpoints, TinySizes, kit_outputs, write_tiny_checkpoints
from utils.cli import run_cli
from utils.config import save_config
from utils.outputs import refuse_to_replace
from utils.tokenizer import DEFAULT_CORPUS, train_tiny_tokenizer

logger = logging.getLogger(__name__)

# A 128-wide LLM (the kit's default is 32): the [SEG] state must pick out one word of the query
# ("the *red* one"), and at width 32 the joint training stays on a plateau where the [SEG]
# embedding ignores that word (see the module docstring).
# SAM's prompts as wide as the demo's [SEG] embedding (out_dim 64), for --mask_head sam|both.
DEMO_SIZES = TinySizes(text_hidden=128, text_intermediate=256, sam_prompt_dim=64)
# Enough merges for every word of the synthetic queries to become a single token.
DEMO_VOCAB_SIZE = 1000
MODEL_ARGS_FILE = "model_args.txt"


def read_query_texts(dataset_dir: str | os.PathLike, split: str = "train") -> list[str]:
    """Every query phrasing of a ReasonSeg-format split (the ``text`` lists of its jsons)."""
    folder = Path(dataset_dir) / "reason_seg" / "ReasonSeg" / split
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no ReasonSeg json files to read queries from")
    texts = []
    for path in paths:
        try:
            value = json.loads(path.read_text())["text"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: cannot read its 'text' field ({error!r})") from None
        texts.extend([value] if isinstance(value, str) else value)
    return texts


def demo_tokenizer(texts: Iterable[str], vocab_size: int = DEMO_VOCAB_SIZE):
    """A tiny BPE tokenizer trained on the prompt templates and ``texts``."""
    return train_tiny_tokenizer(corpus=[*DEFAULT_CORPUS, *texts], vocab_size=vocab_size)


def write_demo_checkpoints(
    root: str | os.PathLike, texts: Iterable[str], seed: int = 0
) -> TinyCheckpoints:
    """Tiny random checkpoints at :data:`DEMO_SIZES` with :func:`demo_tokenizer` of ``texts``."""
    tokenizer = demo_tokenizer(texts)
    return write_tiny_checkpoints(root, sizes=DEMO_SIZES, seed=seed, tokenizer=tokenizer)


def demo_llm_seg_config(checkpoints: TinyCheckpoints, **overrides) -> LLMSegConfig:
    """The demo's :class:`LLMSegConfig` (see the module docstring for each departure)."""
    config = tiny_llm_seg_config(
        checkpoints,
        dino_image_size=224,
        out_dim=64,
        scorer_heads=4,
        scorer_mlp_dim=128,
        proposal_map_size=64,
        mask_geometry_embedding=True,
        tokenization="hf",  # the demo tokenizer is a byte-pair tokenizer.json, no sentencepiece
    )
    return dataclasses.replace(config, **overrides)


def config_arguments(config: LLMSegConfig) -> list[str]:
    """Command-line flags that rebuild ``config`` (only fields that differ from the defaults)."""
    defaults = LLMSegConfig()
    arguments = []
    for item in dataclasses.fields(LLMSegConfig):
        value = getattr(config, item.name)
        if value == getattr(defaults, item.name):
            continue
        if isinstance(value, bool):
            arguments.append(f"--{item.name}" if value else f"--no-{item.name}")
        else:
            arguments.extend([f"--{item.name}", str(value)])
    return arguments


@dataclass
class DemoPresetConfig:
    """Write the demo's tiny checkpoints (tokenizer trained on the data) and its model flags."""

    dataset_dir: str = field(
        default="dataset", metadata={"help": "synthetic dataset root (its train split is read)"}
    )
    out_dir: str = field(default="checkpoints", metadata={"help": "where checkpoints go"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace files in --out_dir this command did not write"}
    )


def main(config: DemoPresetConfig) -> list[str]:
    """Write the checkpoints and ``model_args.txt``; return the model flags."""
    out_dir = Path(config.out_dir)
    outputs = [*kit_outputs(out_dir), out_dir / "config.json", out_dir / MODEL_ARGS_FILE]
    refuse_to_replace(
        outputs, config.overwrite, "model.presets", "--out_dir", out_dir / "config.json",
        DemoPresetConfig,
    )  # fmt: skip
    texts = read_query_texts(config.dataset_dir, "train")
    checkpoints = write_demo_checkpoints(out_dir, texts, config.seed)
    arguments = config_arguments(demo_llm_seg_config(checkpoints))
    save_config(config, out_dir / "config.json")
    path = out_dir / MODEL_ARGS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(arguments) + "\n")
    os.replace(tmp, path)
    logger.info("demo checkpoints in %s (tokenizer from %d query texts)", out_dir, len(texts))
    return arguments


if __name__ == "__main__":
    run_cli(main, DemoPresetConfig)
