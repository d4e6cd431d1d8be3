"""The seeded float64 MLP pool the learned-method FusionBench checks share (Concrete, FW-Merging).

A body ``Linear → Tanh → Linear`` (:data:`DIMS`), experts that perturb it, and one fixed head per
task (the role of CLIP's zero-shot heads). Both sides of a check use it: FusionBench's (torch only:
:func:`fusionbench_pool`, :func:`head_logits`) and adamerge's (:func:`merged_model`, which imports
adamerge when called). The body's merged tensors are named ``body.<name>`` on adamerge's side and
``<name>`` on FusionBench's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

TASKS = ("alpha", "beta", "gamma")
DIMS = (12, 16, 8)  # input, hidden, feature
CLASSES = {"alpha": 5, "beta": 3, "gamma": 4}


def body(dims: tuple[int, int, int] = DIMS) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(dims[0], dims[1]), torch.nn.Tanh(), torch.nn.Linear(dims[1], dims[2])).double()


def pool(seed: int, scales: Mapping[str, float]) -> tuple[dict, torch.Generator]:
    """``({"base", "experts", "heads"}, generator)``: a base body seeded by ``seed``, each task's
    expert ``θ_0 + scales[task] · ε``, the heads; the generator goes on to draw the inputs."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = {k: v.detach().clone() for k, v in body().state_dict().items()}
    experts = {t: {k: v + scales[t] * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in base.items()} for t in TASKS}
    heads = {t: torch.randn(CLASSES[t], DIMS[2], generator=generator, dtype=torch.float64) for t in TASKS}
    return {"base": base, "experts": experts, "heads": heads}, generator


# ----------------------------------------------------------------------------------------------
# FusionBench's side


def fusionbench_pool(data: Mapping[str, Any], **attributes: Any) -> Any:
    """What FusionBench's algorithms read of a model pool: ``model_names``, ``has_pretrained`` and
    ``load_model`` (``_pretrained_``: the base body), plus ``attributes``."""

    def model_of(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        model = body()
        model.load_state_dict(state)
        return model

    class Pool:
        model_names = list(data["experts"])
        has_pretrained = True

        def load_model(self, name: str) -> torch.nn.Module:
            return model_of(data["base"] if name == "_pretrained_" else data["experts"][name])

    found = Pool()
    for name, value in attributes.items():
        setattr(found, name, value)
    return found


def head_logits(data: Mapping[str, Any], module: torch.nn.Module, inputs: torch.Tensor, task: str) -> torch.Tensor:
    """A task's logits: the body's features times its fixed head (FusionBench's ``compute_logits``)."""
    return module(inputs) @ data["heads"][task].T


# ----------------------------------------------------------------------------------------------
# adamerge's side


class TinyClassifier(torch.nn.Module):
    """The body plus a task head (task-specific: never merged).

    Args:
        tokens: inputs are ``(B, T, D)`` tokens, whose features are averaged before the head.
    """

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        self.body = body()
        self.head = torch.nn.Linear(DIMS[2], CLASSES[TASKS[0]], bias=False).double()
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        return self.head(features.mean(dim=1) if self.tokens else features)


def merged_model(data: Mapping[str, Any], granularity: str, constraint: str, init: float) -> Any:
    """adamerge's :class:`~adamerge.core.merged_model.MergedModel` of the pool: the body's task
    vectors, each task with its own head."""
    from adamerge.core.merged_model import MergedModel
    from adamerge.core.task_vectors import TaskVectors

    model = TinyClassifier()
    model.body.load_state_dict(data["base"])
    vectors = {f"body.{n}": torch.stack([data["experts"][t][n] - data["base"][n] for t in TASKS]) for n in data["base"]}
    heads = {t: {"head.weight": data["heads"][t]} for t in TASKS}  # each task's own (classes, features) head
    return MergedModel(model, TaskVectors(TASKS, vectors), granularity, constraint, init, heads=heads, batchnorm="base")


def merged_body(merged: Any) -> dict[str, torch.Tensor]:
    """The merged body's tensors under FusionBench's names."""
    state = merged.merged_state_dict()
    return {name.removeprefix("body."): tensor for name, tensor in state.items() if name.startswith("body.")}
