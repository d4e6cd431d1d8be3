"""What every expert source produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adamerge.task_vectors import TaskVectors


@dataclass
class ExpertSet:
    """A base model holding θ_0, the experts' task vectors and their task-specific tensors.

    Attributes:
        model: the base architecture with the pretrained weights loaded.
        task_vectors: stacked ``τ_k`` of the merged tensors.
        heads: ``{task: {name: tensor}}`` of tensors that are never merged (may be empty).
        sources: references (paths, specs) recorded with results and checkpoints.
    """

    model: nn.Module
    task_vectors: TaskVectors
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.task_vectors.tasks
