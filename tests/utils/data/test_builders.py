from pathlib import Path
from types import SimpleNamespace

import pytest

from model.backbones.llava_checkpoint import save_llava_transformers
from model.tiny import build_tiny_llava
from utils.data.builders import _clip_folder_and_size


def test_clip_folder_defaults_to_the_llava_config(tiny_checkpoints, tmp_path):
    given = SimpleNamespace(vision_tower=str(tiny_checkpoints.clip), version="")
    assert _clip_folder_and_size(given) == (tiny_checkpoints.clip, 32)
    # original layout: mm_vision_tower of the LLaVA config
    implied = SimpleNamespace(vision_tower="", version=str(tiny_checkpoints.llava))
    assert _clip_folder_and_size(implied) == (Path(tiny_checkpoints.clip), 32)
    # transformers layout: the LLaVA folder embeds the vision config
    backbone, tokenizer, _ = build_tiny_llava(projector_type="mlp2x_gelu")
    save_llava_transformers(tmp_path / "hf", backbone, tokenizer)
    embedded = SimpleNamespace(vision_tower="", version=str(tmp_path / "hf"))
    assert _clip_folder_and_size(embedded) == (tmp_path / "hf", 32)
    with pytest.raises(FileNotFoundError, match="set --vision-tower"):
        _clip_folder_and_size(SimpleNamespace(vision_tower=str(tmp_path), version=""))
