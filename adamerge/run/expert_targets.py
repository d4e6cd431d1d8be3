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
from adamerge.run.calibration_statistics import examples
from adamerge.sources import ExpertSet
from adamerge.storage.spill import SpillingRows

#: Bytes of token-level expert logits one run keeps in memory; past them the rest of the targets
#: go to a temporary file read back memory-mapped (:class:`~adamerge.storage.spill.SpillingRows`).
TARGETS_MEMORY_BUDGET = 2 << 30


class ExpertTargets:
    """Each expert's logits and hidden states on its own calibration data, computed once.

    Args:
        experts: the expert set.
        data: the run's data module (its ``target_loaders``).
        merged: the merged model (where the head input is captured).
        memory_budget_bytes: token-level logits (causal LMs) kept in memory over all tasks; the
            rest are kept on disk, memory-mapped.
    """

    def __init__(
        self, experts: ExpertSet, data: L.LightningDataModule, merged: MergedModel, memory_budget_bytes: int = TARGETS_MEMORY_BUDGET
    ) -> None:
        if experts.expert_model is None:
            raise AdamergeError("expert-merging needs each expert alone, which this expert source cannot rebuild")
        self.experts = experts
        self.data = data
        self.head_module = merged.head_module
        self.memory_budget_bytes = memory_budget_bytes
        self.cache: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]] = {}

    @torch.no_grad()
    def fill(self, objective: ExpertAlignment) -> None:
        loaders = self.data.target_loaders()
        budget = self.memory_budget_bytes - sum(c[0].numel() * 4 for c in self.cache.values() if c[2] is not None)
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
                    rows = SpillingRows(budget, name=f"expert targets ({task})")
                    self.cache[task] = token_targets(model, capture, objective.hidden_modules, batches(), positions, self.experts, rows)
                    budget -= rows.nbytes
            objective.cache_targets(task, *self.cache[task])


def token_targets(
    model: torch.nn.Module,
    capture: Callable[[Sequence[str]], ContextManager[dict[str, torch.Tensor]]],
    hidden_modules: Sequence[str],
    batches: Iterable[Inputs],
    positions: list[torch.Tensor],
    experts: ExpertSet,
    rows: SpillingRows | None = None,
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
        rows: where the logits go (default: all in memory); stored in visit order, so a
            memory-mapped file is written once, front to back.

    Example ``i``'s logits are rows ``spans[i, 0] : spans[i, 0] + spans[i, 1]`` (its scored
    positions, in order: for next-token prediction every real token but the last, or only the last
    under ``positions="response"``) and its hidden states rows ``spans[i, 2] : spans[i, 2] +
    spans[i, 3]`` (its real tokens, in order). The training step gathers the same rows in the same
    order for a batch of examples, whatever their padding.

    Returns:
        ``(logits (ΣN_i, C), {name: hidden (ΣT_i, H)}, spans (E, 4))``.
    """
    rows = rows if rows is not None else SpillingRows(budget_bytes=2**62)
    hidden_rows: dict[str, list[torch.Tensor]] = {name: [] for name in hidden_modules}
    hidden_count = 0
    spans: dict[int, tuple[int, int, int, int]] = {}
    run = module_forward(model)
    for inputs in batches:
        inputs = experts.task_type.model_inputs(inputs)  # a causal LM's logits at the scored positions only
        with capture(hidden_modules) as captured:
            logits = as_logits(run(inputs))  # (B, T, C)
        mask = inputs["attention_mask"].bool() if isinstance(inputs, dict) and "attention_mask" in inputs else None
        for (row, index), one in zip(enumerate(positions[-1].tolist()), examples(inputs), strict=True):
            if index in spans:
                raise AdamergeError(f"expert targets: the calibration loader visited example {index} twice")
            scored, _ = experts.task_type.scored(logits[row : row + 1], one)  # (N_i, C)
            real = mask[row] if mask is not None else slice(None)
            tokens = 0
            for name in hidden_modules:
                hidden_rows[name].append(captured[name][row][real].float())  # (T_i, H)
                tokens = len(hidden_rows[name][-1])
            spans[index] = (rows.append(scored), len(scored), hidden_count, tokens)
            hidden_count += tokens
    if sorted(spans) != list(range(len(spans))):
        raise AdamergeError("expert targets: the calibration loader did not visit every example once")
    table = torch.tensor([spans[i] for i in range(len(spans))], dtype=torch.long).reshape(-1, 4)  # (E, 4)
    hidden = {name: torch.cat(values) for name, values in hidden_rows.items()}
    return rows.finish(), hidden, table


def in_index_order(
    positions: torch.Tensor, logits: torch.Tensor, hidden: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows gathered in loader order ``positions`` (N,) put back so that row ``i`` is item ``i``."""
    order = torch.argsort(positions)  # (N,)
    return logits[order], {name: value[order] for name, value in hidden.items()}


def module_forward(model: torch.nn.Module):
    """``inputs -> logits`` of a plain module (tensor or tokenizer-dict inputs)."""
    return lambda inputs: call_module(model, inputs)
