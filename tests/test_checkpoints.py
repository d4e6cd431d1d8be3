"""Reading and writing weight files: formats, wrappings and every bad-input case."""

from __future__ import annotations

import pytest
import torch

from adamerge.errors import CheckpointError
from adamerge.storage.checkpoints import load_state_dict, save_state_dict


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3), "steps": torch.tensor(4)}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s},
        lambda s: {f"module.{k}": v for k, v in s.items()},
    ],
    ids=["plain", "lightning-style", "model-key", "dataparallel"],
)
def test_wrappings_are_undone(tmp_path, state, wrap):
    path = tmp_path / "w.pt"
    torch.save(wrap(state), path)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_safetensors_round_trip(tmp_path, state):
    path = save_state_dict(state, tmp_path / "w.safetensors")
    loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state_dict(path)


def test_truncated_torch_file(tmp_path, state):
    path = tmp_path / "w.pt"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_state_dict(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(path)


def test_pickled_module_is_refused_with_advice(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="state_dict"):
        load_state_dict(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_named(tmp_path, state, bad):
    state["layer.weight"][1, 1] = bad
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"'layer.weight' holds 1 NaN/Inf"):
        load_state_dict(path)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch, state):
    path = tmp_path / "w.pt"
    torch.save(state, path)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError):
        save_state_dict(state, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]
