"""Each expert's outputs on its own calibration data, computed once (Expert Merging's targets)."""

from __future__ import annotations

import lightning as L
import torch

from adamerge.core.hooks import capture_hidden
from adamerge.core.merged_model import MergedModel
from adamerge.core.model_inputs import call_module
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import ExpertAlignment, as_task_batch, collect_outputs
from adamerge.sources import ExpertSet


class ExpertTargets:
    """Each expert's logits and hidden states on its own calibration data, computed once."""

    def __init__(self, experts: ExpertSet, data: L.LightningDataModule, merged: MergedModel) -> None:
        if experts.expert_model is None:
            raise AdamergeError("expert-merging needs each expert alone, which this expert source cannot rebuild")
        if experts.task_type.name != "classification":
            raise AdamergeError(f"expert-merging caches one output per example: {experts.task_type.name} tasks are not supported yet")
        self.experts = experts
        self.data = data
        self.head_module = merged.head_module
        self.cache: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    @torch.no_grad()
    def fill(self, objective: ExpertAlignment) -> None:
        loaders = self.data.target_loaders()
        for task in self.experts.tasks:
            if task not in self.cache:
                model = self.experts.expert_model(task).eval()
                positions: list[torch.Tensor] = []

                def batches(loader=loaders[task], positions=positions):
                    for item in loader:
                        batch = as_task_batch(item)
                        positions.append(batch.index)  # (B,) rows of the training items
                        yield batch.inputs

                logits, hidden = collect_outputs(
                    module_forward(model),
                    lambda names, model=model: capture_hidden(model, names, self.head_module),
                    objective.hidden_modules,
                    batches(),
                )
                self.cache[task] = in_index_order(torch.cat(positions), logits, hidden)
            objective.cache_targets(task, *self.cache[task])


def in_index_order(
    positions: torch.Tensor, logits: torch.Tensor, hidden: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows gathered in loader order ``positions`` (N,) put back so that row ``i`` is item ``i``."""
    order = torch.argsort(positions)  # (N,)
    return logits[order], {name: value[order] for name, value in hidden.items()}




def module_forward(model: torch.nn.Module):
    """``inputs -> logits`` of a plain module (tensor or tokenizer-dict inputs)."""
    return lambda inputs: call_module(model, inputs)
