"""Shared fixtures: tiny experts written as real files, image folders, and the real data root."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_convnet

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"
HEAD = r"^8\."  # the classifier of tests.tiny:tiny_convnet


def load_benchmark(name: str) -> ModuleType:
    """The module ``benchmarks.<name>`` (each benchmark script runs as ``python -m benchmarks.<name>``)."""
    return importlib.import_module(f"benchmarks.{name}")


@dataclass
class TinySetup:
    base: Path
    experts: dict[str, Path]
    calib: Path
    eval: Path
    classes: dict[str, int]

    def expert_args(self) -> list[str]:
        return [f"{task}={path}" for task, path in self.experts.items()]


def perturbed_expert(base: torch.nn.Module, num_classes: int, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A base copy with seeded noise on every float tensor and a fresh head of ``num_classes``."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for name, tensor in state.items():
        if tensor.is_floating_point() and not name.startswith("8."):
            state[name] = tensor + scale * torch.randn(tensor.shape, generator=generator)
    torch.manual_seed(seed)
    head = torch.nn.Linear(base[8].in_features, num_classes)
    state["8.weight"], state["8.bias"] = head.weight.detach(), head.bias.detach()
    return state


def write_images(folder: Path, count: int, seed: int, size: int = 12, classes: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        target = folder / f"{i % classes}" if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(target / f"{i}.png")


@pytest.fixture
def tiny_setup(tmp_path: Path) -> TinySetup:
    """A tiny base, two experts (3 and 4 classes), calibration and evaluation folders, as files."""
    torch.manual_seed(0)
    base = tiny_convnet()
    base_path = tmp_path / "base.pt"
    torch.save(base.state_dict(), base_path)
    classes = {"alpha": 3, "beta": 4}
    experts = {}
    for seed, (task, count) in enumerate(classes.items(), start=1):
        experts[task] = tmp_path / f"{task}.pt"
        torch.save(perturbed_expert(base, count, seed), experts[task])
        write_images(tmp_path / "calib" / task, 12, seed)
        write_images(tmp_path / "eval" / task, 12, 100 + seed, classes=count)
    return TinySetup(base_path, experts, tmp_path / "calib", tmp_path / "eval", classes)
