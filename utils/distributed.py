"""Process-group set-up and the DeepSpeed engine: the only module that imports ``deepspeed``.

``training.py`` runs the same way under ``deepspeed --include localhost:0,1 training.py ...`` on
GPUs, under ``torchrun``/``deepspeed`` on CPUs (gloo), and as a plain ``python training.py``: in
the last case :func:`ensure_process_group_env` fills in the single-process rendezvous variables
that DeepSpeed otherwise tries to discover through MPI.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Set when ensure_process_group_env chose MASTER_PORT itself (a launcher's port is never changed).
_OWN_PORT = False
# A port found free can be taken by another process before the store binds it (two runs started
# together on one machine): that many fresh ports are tried before giving up.
_PORT_ATTEMPTS = 5


def ensure_process_group_env() -> None:
    """Make a plain single process look like rank 0 of a world of 1 (no launcher needed)."""
    global _OWN_PORT
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
        _OWN_PORT = True


def launched_as_group() -> bool:
    """Whether a launcher (``deepspeed``, ``torchrun``) started several processes; a single
    process (evaluation, chat) then needs no process group, and no DeepSpeed import, whose
    first use JIT-builds a communication op (about a minute on a laptop CPU)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group(device: torch.device) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) unless already joined."""
    if is_distributed():
        return
    import deepspeed

    ensure_process_group_env()
    backend = "nccl" if device.type == "cuda" else "gloo"
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            deepspeed.init_distributed(dist_backend=backend)
            return
        except torch.distributed.DistNetworkError:
            if not _OWN_PORT or attempt == _PORT_ATTEMPTS:
                raise
            logger.warning("port %s was taken meanwhile; trying another", os.environ["MASTER_PORT"])
            os.environ["MASTER_PORT"] = str(_free_port())


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


@dataclass
class OptimizationSettings:
    """What the DeepSpeed config is built from (the training config's optimisation fields)."""

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accumulation_steps: int = 10
    total_steps: int = 5000
    warmup_steps: int = 100
    gradient_clipping: float = 1.0
    precision: str = "bf16"
    zero_stage: int = 2


def deepspeed_config(settings: OptimizationSettings, device: torch.device) -> dict:
    """The DeepSpeed config LISA / LLM-Seg train with (reference §5.2).

    AdamW uses PyTorch's implementation (``torch_adam``) so no CUDA/C++ op is compiled on CPUs;
    ``overlap_comm`` is a GPU stream optimisation and stays off on CPU.
    """
    config = {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accumulation_steps,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": settings.lr,
                "weight_decay": settings.weight_decay,
                "betas": [settings.beta1, settings.beta2],
                "torch_adam": True,
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": max(settings.total_steps, settings.warmup_steps + 1),
                "warmup_min_lr": 0,
                "warmup_max_lr": settings.lr,
                "warmup_num_steps": settings.warmup_steps,
                "warmup_type": "linear",
            },
        },
        "gradient_clipping": settings.gradient_clipping,
        "zero_optimization": {
            "stage": settings.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": device.type == "cuda",
            "reduce_scatter": True,
            "reduce_bucket_size": 5e8,
            "allgather_bucket_size": 5e8,
        },
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if settings.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif settings.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def initialize_engine(model: torch.nn.Module, settings: OptimizationSettings, device: torch.device):
    """Wrap ``model`` in a DeepSpeed engine over its trainable parameters.

    Returns:
        ``(engine, optimizer, scheduler)``.
    """
    import deepspeed

    init_process_group(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=parameters, config=deepspeed_config(settings, device)
    )
    return engine, optimizer, scheduler
