"""Fixtures for the LLM-Seg model tests: a fresh tiny model per test, built from tiny files."""

from __future__ import annotations

import pytest

from model.builder import build_llm_seg, tiny_llm_seg_config


@pytest.fixture
def tiny_config(tiny_checkpoints):
    """The tiny :class:`LLMSegConfig` (fp32, 32-d scorer, 32x32 maps, DINOv2 input 112)."""
    return tiny_llm_seg_config(tiny_checkpoints)


@pytest.fixture
def tiny_model(tiny_config):
    """``(model, tokenizer)``, freshly built (tests may train or wrap it)."""
    return build_llm_seg(tiny_config)
