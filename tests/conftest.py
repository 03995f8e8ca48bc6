"""Shared fixtures: tiny random models written once per test session in the real layouts."""

from __future__ import annotations

import logging

import pytest
import torch

from model.tiny import TinyCheckpoints, build_tiny_llava, write_tiny_checkpoints

# Tests must never reach a model hub.
pytest.MonkeyPatch().setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_threads_and_logging(caplog):
    """Seeded, single-threaded (tiny tensors: with two cores shared, extra threads only cost),
    with INFO logs captured for failing tests."""
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    caplog.set_level(logging.INFO)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> TinyCheckpoints:
    """LLaVA-v1 folder, CLIP folder, DINOv2 folder and SAM file, all tiny and random."""
    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_checkpoints"))


@pytest.fixture(scope="session")
def tiny_llava():
    """``(backbone, tokenizer, clip_model)`` built in memory."""
    return build_tiny_llava()
