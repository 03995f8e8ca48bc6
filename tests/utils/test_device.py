import logging

import pytest
import torch

from utils.device import (
    attention_implementation,
    autocast,
    require_bitsandbytes,
    resolve_device,
    resolve_dtype,
)
from utils.logging_setup import process_rank, setup_logging


def test_resolve_device_cpu_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_dtype("fp8")


def test_autocast_bf16_on_cpu_changes_matmul_dtype():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), torch.float32):
        assert (a @ a).dtype == torch.float32


def test_attention_falls_back_to_sdpa_on_cpu():
    assert attention_implementation(torch.device("cpu"), torch.bfloat16) == "sdpa"


def test_bitsandbytes_error_is_actionable(monkeypatch):
    monkeypatch.setattr("utils.device.is_package_available", lambda name: False)
    with pytest.raises(RuntimeError, match="requirements-gpu.txt"):
        require_bitsandbytes("--load_in_8bit")


def test_logging_rank_zero_only(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == 3
    setup_logging()
    assert logging.getLogger().level == logging.WARNING
    setup_logging(rank=0)
    root = logging.getLogger()
    assert root.level == logging.INFO
    assert sum(getattr(h, "_llm_seg", False) for h in root.handlers) == 1
