"""Top-1 accuracy of plain modules, per task (experts alone, static merges)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from adamerge.core.model_inputs import as_logits
from adamerge.task_types import CLASSIFICATION, TaskType


@torch.no_grad()
def accuracy(forward: Callable[[Any], Any], batches: Iterable[tuple[Any, torch.Tensor]], task_type: TaskType = CLASSIFICATION) -> float:
    """Fraction of correct top-1 predictions of ``forward`` over the scored positions of labelled
    ``(inputs, labels)`` batches (``forward`` may return logits or an output with ``.logits``)."""
    correct = total = 0
    for inputs, labels in batches:
        positions, targets = task_type.scored(as_logits(forward(inputs)), inputs, labels)  # (N, C), (N,)
        correct += int((positions.argmax(-1) == targets).sum())
        total += targets.numel()
    return correct / max(total, 1)


def with_average(per_task: dict[str, float]) -> dict[str, float]:
    """Per-task values plus their unweighted ``average``."""
    return per_task | {"average": sum(per_task.values()) / len(per_task)}
