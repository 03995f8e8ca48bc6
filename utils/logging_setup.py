"""Logging configured once per process: rank 0 talks, other ranks only warn."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Third-party loggers that narrate routine work at INFO (DeepSpeed's config dump, setuptools'
# compiler probes when DeepSpeed JIT-builds its CPU op).
_CHATTY = ("DeepSpeed", "compilers", "torch.distributed")


def process_rank() -> int:
    """This process's global rank under a distributed launcher (0 when not distributed)."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Send log records to stdout, at ``level`` on rank 0 and WARNING elsewhere.

    Safe to call more than once: the root handler installed here is replaced, not duplicated.
    """
    rank = process_rank() if rank is None else rank
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_llm_seg", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}"))
    handler._llm_seg = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
