"""Loading DINOv2 (``transformers`` ``Dinov2Model``) from local files only.

The ``facebook/dinov2-large`` folder layout (``config.json`` + ``model.safetensors``) loads
directly and strictly: a missing or unexpected weight is an error naming it, never a silently
random-initialised layer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import Dinov2Model

from utils.checkpoint import CheckpointError, quiet_transformers

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
