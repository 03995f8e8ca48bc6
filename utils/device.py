"""The one place that knows about devices, precisions and optional GPU-only packages.

Everything else takes a ``torch.device`` / ``torch.dtype`` from here or follows the tensors it is
given, so the same code runs on a laptop CPU and on a CUDA cluster.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import torch

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """Turn a user-facing device name into a ``torch.device``.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: under a distributed launcher, the process's GPU index; defaults to the
            ``LOCAL_RANK`` environment variable.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {name!r} was requested but CUDA is not available; use --device cpu"
            )
        if name == "cuda":
            if local_rank is None:
                local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            name = f"cuda:{local_rank}"
    elif name != "cpu" and not name.startswith("mps"):
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def resolve_dtype(precision: str) -> torch.dtype:
    """Map ``fp32``/``bf16``/``fp16`` to a torch dtype, with a clear error for anything else."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}"
        ) from None


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``dtype`` on ``device``; a no-op for fp32.

    fp16 autocast on the CPU is poorly supported, so there we fall back to fp32 (and say so once).
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "cpu" and dtype == torch.float16:
        logger.warning("fp16 autocast is not supported on the CPU; running in fp32")
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def collective_device() -> torch.device:
    """Where tensors for ``torch.distributed`` collectives must live: the GPU under NCCL."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_package_available(name: str) -> bool:
    """True when ``name`` can be imported, without importing it."""
    return importlib.util.find_spec(name) is not None


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel ``transformers`` should use.

    ``flash_attention_2`` needs the optional ``flash-attn`` package, a CUDA device and a 16-bit
    dtype; everywhere else PyTorch's ``sdpa`` is used.
    """
    if (
        device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and is_package_available("flash_attn")
    ):
        return "flash_attention_2"
    return "sdpa"


def require_bitsandbytes(feature: str) -> None:
    """Raise a helpful error when ``feature`` (e.g. ``--load_in_8bit``) needs bitsandbytes."""
    if not is_package_available("bitsandbytes"):
        raise RuntimeError(
            f"{feature} needs the optional 'bitsandbytes' package (CUDA only): "
            "pip install -r requirements-gpu.txt"
        )
