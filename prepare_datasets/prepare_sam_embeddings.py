"""Precompute the SAM head's image embeddings into a store (``--sam_embedding_store``).

LISA's SAM image encoder is frozen, so its pass over an image gives the same embedding in every
epoch; on ViT-H it is most of a training step's vision cost. This runs it once per image of the
given folders and writes :mod:`utils.embedding_store` (keyed by the image bytes, tied to the
encoder's weights). The preprocessing is the training/evaluation encoder's, so a stored
embedding equals a fresh pass (fp32 exactly; fp16 to about 1e-3)::

    python -m prepare_datasets.prepare_sam_embeddings --sam_checkpoint sam_vit_h_4b8939.pth \\
        --image_dirs dataset/reason_seg/ReasonSeg/train,dataset/reason_seg/ReasonSeg/val \\
        --out sam_masks/sam_embeddings/vit_h.h5

A rerun continues where an interrupted one stopped (``<out>.partial``); ``<out>`` appears only
when every image is in. An existing ``<out>`` is replaced only when an earlier run of this command
wrote it (its ``<out stem>_config.json`` beside it) or with ``--overwrite``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model.backbones.sam import load_sam
from utils.annotations import IMAGE_SUFFIXES
from utils.cli import run_cli
from utils.config import save_config
from utils.data.images import ImageReadError, load_rgb_image, preprocess_for_dinov2
from utils.device import resolve_device
from utils.embedding_store import EmbeddingStoreWriter, content_key, encoder_fingerprint
from utils.outputs import refuse_to_replace

logger = logging.getLogger(__name__)


@dataclass
class SamEmbeddingsConfig:
    """Precompute SAM image embeddings for the SAM head."""

    sam_checkpoint: str = field(default="", metadata={"help": "SAM checkpoint (as training's)"})
    sam_model_type: str = field(default="vit_h", metadata={"help": "vit_h, vit_l or vit_b"})
    image_dirs: str = field(
        default="", metadata={"help": "comma-separated image folders (searched recursively)"}
    )
    out: str = field(default="", metadata={"help": "the store file to write (.h5)"})
    dtype: str = field(
        default="float16",
        metadata={"help": "stored precision", "choices": ["float16", "float32"]},
    )
    batch_size: int = field(default=4, metadata={"help": "images per encoder pass"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an --out this command did not write"}
    )

    def __post_init__(self):
        for name in ("sam_checkpoint", "image_dirs", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required: --{name}")
        if self.batch_size < 1:
            raise ValueError(
                f"--batch_size must be at least 1, got {self.batch_size}: --batch_size"
            )


def _images(image_dirs: str) -> list[Path]:
    found = []
    for folder in (Path(d) for d in image_dirs.split(",") if d):
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist: --image_dirs")
        found += [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise FileNotFoundError(f"no images in {image_dirs}: --image_dirs")
    return sorted(found)


def main(config: SamEmbeddingsConfig) -> Path:
    """Write the store; return its path."""
    out = Path(config.out)
    config_path = out.with_name(out.stem + "_config.json")
    refuse_to_replace(
        [out], config.overwrite, "prepare_sam_embeddings", "--out", config_path, SamEmbeddingsConfig
    )
    device = resolve_device(config.device)
    sam = load_sam(config.sam_checkpoint, config.sam_model_type).eval()
    encoder, side = sam.image_encoder, sam.image_encoder.img_size
    fingerprint = encoder_fingerprint(encoder, side)
    encoder.to(device)
    images = _images(config.image_dirs)
    save_config(config, config_path)
    writer = EmbeddingStoreWriter(out, fingerprint, config.dtype)
    try:
        keys = {}
        for path in images:
            keys.setdefault(content_key(path), path)  # identical files share one embedding
        todo = [(k, p) for k, p in keys.items() if k not in writer]
        logger.info("%d images, %d distinct, %d to encode", len(images), len(keys), len(todo))
        for start in tqdm(range(0, len(todo), config.batch_size), desc="sam embeddings"):
            chunk = todo[start : start + config.batch_size]
            pixels = []
            for _, path in chunk:
                try:
                    pixels.append(preprocess_for_dinov2(load_rgb_image(path), side)[0])
                except ImageReadError as error:
                    raise ImageReadError(f"{error}: --image_dirs") from None
            with torch.no_grad():
                embeddings = encoder(torch.stack(pixels).to(device))
            for (key, _), embedding in zip(chunk, embeddings):
                writer.add(key, embedding)
            writer.flush()
    except BaseException:
        writer.close()  # the partial file stays for the rerun
        raise
    path = writer.finish()
    logger.info("wrote %s (%d embeddings)", path, len(keys))
    return path


if __name__ == "__main__":
    run_cli(main, SamEmbeddingsConfig)
