"""Classification: one prediction per example, ``(B, C)`` logits, class-index labels."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from adamerge.errors import AdamergeError
from adamerge.task_types.task_type import TaskType


class Classification(TaskType):
    """One scored position per example: the logits are the positions."""

    name: ClassVar[str] = "classification"

    @property
    def auto_class(self) -> str:
        return "AutoModelForSequenceClassification"

    def scored(self, logits: torch.Tensor, inputs: Any, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if logits.dim() != 2:
            raise AdamergeError(
                f"classification expects (batch, classes) logits, got shape {tuple(logits.shape)}: "
                "a token-level model needs a token-level task type"
            )
        return logits, labels
