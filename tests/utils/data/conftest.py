"""Fixtures shared by the dataset-loader tests: a tiny LLM-Seg model and its sample encoder."""

from types import SimpleNamespace

import pytest

from model.builder import build_llm_seg, setup_trainable, tiny_llm_seg_config
from utils.data.builders import build_encoder


@pytest.fixture(scope="session")
def tiny_model_and_encoder(tiny_checkpoints):
    """``(model, tokenizer, encoder)``: a tiny LLM-Seg set up for training, and the encoder
    :func:`~utils.data.builders.build_encoder` makes for it (default data settings)."""
    config = tiny_llm_seg_config(tiny_checkpoints)
    model, tokenizer = build_llm_seg(config)
    setup_trainable(model, config)
    settings = SimpleNamespace(
        vision_tower=config.vision_tower,
        dino_image_size=config.dino_image_size,
        proposal_map_size=config.proposal_map_size,
        model_max_length=config.model_max_length,
        top_k_proposals=50,
        proposal_order="area",
        antialias=True,
        conv_type="llava_v1",
    )
    return model, tokenizer, build_encoder(settings, tokenizer, model.num_image_tokens)
