import pytest
import torch
from torch import nn

from utils.checkpoint import (
    CheckpointError,
    load_state_dict,
    load_state_dict_strict,
    save_state_dict,
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_save_load_round_trip_is_bit_identical(tmp_path, name):
    net = _net()
    path = save_state_dict(net.state_dict(), tmp_path / name)
    loaded = load_state_dict(path)
    assert set(loaded) == set(net.state_dict())
    for key, value in net.state_dict().items():
        assert torch.equal(loaded[key], value)
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temporary file"


def test_missing_key_is_named():
    state = _net().state_dict()
    del state["2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: 2\.bias"):
        load_state_dict_strict(_net(), state, source="ckpt.pth")


def test_unexpected_key_is_named():
    state = _net().state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight"):
        load_state_dict_strict(_net(), state, source="ckpt.pth")


def test_shape_mismatch_is_named():
    state = _net().state_dict()
    state["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(
        CheckpointError,
        match=r"^ckpt\.pth does not match .*0\.weight \(checkpoint \(5, 3\) vs model \(4, 3\)\)",
    ):
        load_state_dict_strict(_net(), state, source="ckpt.pth")


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": _net()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_state_dict(path)


def test_missing_file_and_empty_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="no weight file found"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
def test_truncated_checkpoint_names_the_file(tmp_path, name):
    path = save_state_dict(_net().state_dict(), tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy or a download cut short
    with pytest.raises(CheckpointError, match=f"^{path}: ") as error:
        load_state_dict(path)
    assert "\n" not in str(error.value).strip()


def test_unreadable_safetensors_and_index_are_named(tmp_path):
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=f"{garbage}: not a readable safetensors file"):
        load_state_dict(garbage)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=f"{index}: not a checkpoint index"):
        load_state_dict(index.parent)
