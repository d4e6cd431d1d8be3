"""Each expert's outputs on its own calibration data, computed once (Expert Merging's targets)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import ContextManager

import lightning as L
import torch

from adamerge.core.hooks import capture_hidden
from adamerge.core.merged_model import MergedModel
from adamerge.core.model_inputs import Inputs, as_logits, call_module
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import ExpertAlignment, as_task_batch, collect_outputs
from adamerge.sources import ExpertSet


class ExpertTargets:
    """Each expert's logits and hidden states on its own calibration data, computed once."""

    def __init__(self, experts: ExpertSet, data: L.LightningDataModule, merged: MergedModel) -> None:
        if experts.expert_model is None:
            raise AdamergeError("expert-merging needs each expert alone, which this expert source cannot rebuild")
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

                capture = lambda names, model=model: capture_hidden(model, names, self.head_module)  # noqa: E731
                if self.experts.task_type.name == "classification":
                    logits, hidden = collect_outputs(module_forward(model), capture, objective.hidden_modules, batches())
                    self.cache[task] = (*in_index_order(torch.cat(positions), logits, hidden), None)
                else:
                    self.cache[task] = token_targets(model, capture, objective.hidden_modules, batches(), positions, self.experts)
            objective.cache_targets(task, *self.cache[task])


def token_targets(
    model: torch.nn.Module,
    capture: Callable[[Sequence[str]], ContextManager[dict[str, torch.Tensor]]],
    hidden_modules: Sequence[str],
    batches: Iterable[Inputs],
    positions: list[torch.Tensor],
    experts: ExpertSet,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """An expert's outputs at every scored token of every calibration example, row-ragged.

    Args:
        model: the expert alone.
        capture: context-manager factory collecting the named hidden states of ``model``.
        hidden_modules: the hidden states the objective aligns.
        batches: the task's calibration inputs; each batch appends its examples' indices to
            ``positions`` before it is yielded.
        positions: ``(B,)`` dataset indices of each batch, in loader order.
        experts: the expert set (its task type scores the positions).

    Example ``i``'s rows are ``offsets[i]:offsets[i + 1]`` of the logits (its scored positions,
    in order: for next-token prediction every real token but the last) and of each hidden state
    (its real tokens, in order). The training step gathers the same rows in the same order for a
    batch of examples, whatever their padding.

    Returns:
        ``(logits (ΣN_i, C), {name: hidden (ΣT_i, H)}, offsets (E + 1, 2))``: column 0 the logits'
        offsets, column 1 the hidden states'.
    """
    per_example: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
    run = module_forward(model)
    for inputs in batches:
        with capture(hidden_modules) as captured:
            logits = as_logits(run(inputs))  # (B, T, C)
        mask = inputs["attention_mask"].bool() if isinstance(inputs, dict) and "attention_mask" in inputs else None
        for row, index in enumerate(positions[-1].tolist()):
            one = {k: v[row : row + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[row : row + 1]
            scored, _ = experts.task_type.scored(logits[row : row + 1], one)  # (N_i, C)
            real = mask[row] if mask is not None else slice(None)
            per_example[index] = (scored.float(), {name: captured[name][row][real].float() for name in hidden_modules})
    order = sorted(per_example)
    if order != list(range(len(order))):
        raise AdamergeError("expert targets: the calibration loader did not visit every example once")
    counts = torch.tensor([[len(per_example[i][0]), len(next(iter(per_example[i][1].values()), per_example[i][0]))] for i in order])
    offsets = torch.cat([torch.zeros(1, 2, dtype=torch.long), counts.cumsum(0)])  # (E + 1, 2)
    logits = torch.cat([per_example[i][0] for i in order])
    hidden = {name: torch.cat([per_example[i][1][name] for i in order]) for name in hidden_modules}
    return logits, hidden, offsets


def in_index_order(
    positions: torch.Tensor, logits: torch.Tensor, hidden: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows gathered in loader order ``positions`` (N,) put back so that row ``i`` is item ``i``."""
    order = torch.argsort(positions)  # (N,)
    return logits[order], {name: value[order] for name, value in hidden.items()}




def module_forward(model: torch.nn.Module):
    """``inputs -> logits`` of a plain module (tensor or tokenizer-dict inputs)."""
    return lambda inputs: call_module(model, inputs)
