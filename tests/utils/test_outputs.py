"""refuse_to_replace: a command replaces only what an earlier run of it wrote, or --overwrite."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from utils.config import save_config
from utils.outputs import refuse_to_replace, written_by


@dataclass
class _ToolConfig:
    out_dir: str = "out"
    seed: int = 0


def _listing(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_free_paths_pass(tmp_path):
    (tmp_path / "empty").mkdir()
    refuse_to_replace([tmp_path / "missing.json", tmp_path / "empty"], False, "tool", "--out_dir")


def test_foreign_files_and_folders_are_named_with_the_ways_out(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "vis").mkdir()
    (tmp_path / "vis" / "a.png").write_bytes(b"png")
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError) as error:
        refuse_to_replace(
            [tmp_path / "metrics.json", tmp_path / "vis", tmp_path / "free.txt"], False, "tool",
            "--out_dir", tmp_path / "tool_config.json", _ToolConfig,
        )  # fmt: skip
    assert str(error.value) == (
        f"{tmp_path / 'metrics.json'}, {tmp_path / 'vis'}: not written by tool and would be "
        "replaced; choose another --out_dir or give --overwrite: --out_dir"
    )
    assert _listing(tmp_path) == before
    refuse_to_replace([tmp_path / "metrics.json"], True, "tool", "--out_dir")  # --overwrite


def test_without_a_command_any_existing_file_is_refused(tmp_path):
    paths = [tmp_path / f"{i}.json" for i in range(7)]
    for path in paths:
        path.write_text("[]")
    with pytest.raises(FileExistsError, match=r"6\.json and 2 more: already exists .*--overwrite$"):
        refuse_to_replace(paths[2:] + paths[:2], False)


def test_an_earlier_run_of_the_command_may_be_replaced(tmp_path):
    marker = tmp_path / "tool_config.json"
    (tmp_path / "metrics.json").write_text("{}")
    save_config(_ToolConfig(), marker)
    assert written_by(marker, _ToolConfig)
    refuse_to_replace([tmp_path / "metrics.json"], False, "tool", "--out_dir", marker, _ToolConfig)


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 32}),  # an HF config
        json.dumps({"seed": 0, "model_type": "llama"}),  # one field not ours is enough
        json.dumps({}),
        json.dumps([1, 2]),
        "{not json",
        b"\xff\xfe",
    ],
)
def test_a_foreign_file_of_the_markers_name_is_no_proof(tmp_path, content):
    marker = tmp_path / "config.json"
    marker.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert not written_by(marker, _ToolConfig)
    with pytest.raises(FileExistsError, match="config.json: not written by tool"):
        refuse_to_replace([marker], False, "tool", "--out_dir", marker, _ToolConfig)
