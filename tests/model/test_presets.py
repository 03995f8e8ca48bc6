"""The demo preset: tokenizer from the data, flags that rebuild the config, the CLI's files."""

from __future__ import annotations

import json

import pytest

from model.builder import LLMSegConfig
from model.presets import (
    MODEL_ARGS_FILE,
    DemoPresetConfig,
    config_arguments,
    demo_llm_seg_config,
    demo_tokenizer,
    main,
    read_query_texts,
)
from model.tiny import TinyCheckpoints
from utils.config import parse_config


def _write_split(root, texts_per_image):
    folder = root / "reason_seg" / "ReasonSeg" / "train"
    folder.mkdir(parents=True)
    for index, texts in enumerate(texts_per_image):
        (folder / f"train_{index}.json").write_text(json.dumps({"text": texts}))
    return folder


def test_read_query_texts_and_errors(tmp_path):
    folder = _write_split(tmp_path, [["the leftmost shape", "leftmost object"], "a red thing"])
    assert read_query_texts(tmp_path) == ["the leftmost shape", "leftmost object", "a red thing"]
    (folder / "train_2.json").write_text("{}")
    with pytest.raises(ValueError, match="train_2.json: cannot read its 'text'"):
        read_query_texts(tmp_path)
    with pytest.raises(FileNotFoundError, match="no ReasonSeg json"):
        read_query_texts(tmp_path, "val")


def test_demo_tokenizer_keeps_data_words_whole():
    tokenizer = demo_tokenizer(["Which object is the bottommost one?"] * 5)
    pieces = tokenizer.tokenize("Which object is the bottommost one?")
    assert "\u2581bottommost" in pieces
    assert len(pieces) <= 7


def test_config_arguments_rebuild_the_config():
    paths = TinyCheckpoints("/c/llava", "/c/clip", "/c/dinov2", "/c/sam.pth")
    config = demo_llm_seg_config(paths)
    assert config.mask_geometry_embedding
    assert not config.gradient_checkpointing
    arguments = config_arguments(config)
    assert "--mask_geometry_embedding" in arguments
    assert "--no-gradient_checkpointing" in arguments
    assert parse_config(LLMSegConfig, arguments) == config
    assert config_arguments(LLMSegConfig()) == []
    assert demo_llm_seg_config(paths, out_dim=16).out_dim == 16


def test_main_writes_checkpoints_and_model_flags(tmp_path):
    _write_split(tmp_path / "data", [["the red object"], ["largest shape"]])
    out_dir = tmp_path / "checkpoints"
    arguments = main(DemoPresetConfig(dataset_dir=str(tmp_path / "data"), out_dir=str(out_dir)))
    assert (out_dir / MODEL_ARGS_FILE).read_text().splitlines() == arguments
    config = parse_config(LLMSegConfig, arguments)
    assert config.version == str(out_dir / "llava")
    assert config.tokenization == "hf"
    assert (out_dir / "llava" / "config.json").is_file()
    assert (out_dir / "dinov2" / "config.json").is_file()
    assert json.loads((out_dir / "config.json").read_text())["seed"] == 0
