"""An unsupervised safeguard: a learned merge never ends below its own start on held-out data.

An unsupervised objective is a proxy. Entropy minimisation, for one, can lower the summed entropy
by making the confident tasks more confident while the least confident task loses accuracy; a
user without labelled data cannot see it. :class:`KeepBestCoefficients` holds part of each task's
calibration inputs out of training (``--holdout``, :meth:`adamerge.data.images.MultiTaskDataModule.
calibration_split`) and scores the merge there by **agreement with each task's expert**: the share
of a task's held-out inputs on which the merged model predicts the class the expert alone
predicts. The expert is the best model of its own task there is, so agreement falls when the
merge forgets a task, whatever the objective says; it needs no label.

The score of a λ is the mean agreement over the tasks (each task counts the same, however easy).
It is taken at the start (the initial merge), every ``every`` steps and at the end; after training
the λ with the highest score is restored (the start on a tie, then the earliest), logged with the
per-task table, and a warning names every task whose agreement at the kept λ is more than
:data:`DROP_WARNING` points below its start.

The held-out pass runs the merged model as a training step does (BatchNorm on batch statistics
under the re-estimating policies, one batch of up to ``eval_batch_size`` inputs per task), without
gradients; the experts' predictions are computed once, one expert at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from adamerge.core.model_inputs import as_logits, call_module, move_inputs
from adamerge.objectives.task_objectives import as_task_batch
from adamerge.task_types import CLASSIFICATION, TaskType

logger = logging.getLogger(__name__)

#: points of held-out agreement a task may lose against the start before a warning names it
DROP_WARNING = 5.0


class KeepBestCoefficients(L.Callback):
    """Track held-out agreement with the experts and keep the best λ seen (start included).

    What is kept is the module's :meth:`~adamerge.run.module.MergingModule.learned_state` (λ; the
    routers of an input-routed merge), restored by its ``restore_learned_state``.

    Args:
        held_out: ``{task: [inputs batch, ...]}`` of held-out calibration inputs.
        expert_model: ``task -> nn.Module``, the expert alone (its predictions are the targets).
        every: steps between two scores (the start and the end are always scored).
        stage: a name for the log (``"stage 2"``), when a method trains more than once.
        targets: the experts' predictions from an earlier stage's safeguard (computed at the
            start of training otherwise).
    """

    def __init__(
        self,
        held_out: Mapping[str, Sequence[Any]],
        expert_model: Callable[[str], nn.Module],
        every: int,
        stage: str = "",
        targets: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.held_out = {task: list(batches) for task, batches in held_out.items()}
        self.expert_model = expert_model
        self.every = max(1, every)
        self.stage = stage
        self.targets = dict(targets) if targets is not None else None  # {task: (N,) class indices}
        self.history: dict[int, dict[str, float]] = {}  # step -> {task: agreement %}
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, module: Any) -> dict[str, float]:
        """``{task: agreement %}`` of ``module.merged`` at its current λ (and ``"mean"``)."""
        if self.targets is None:
            self.targets = expert_predictions(self.held_out, self.expert_model, module.device, module.task_type)
        shares = agreement_with_experts(module.merged, self.held_out, self.targets, module.device, module.task_type)
        agreement = {task: 100.0 * share for task, share in shares.items()}
        agreement["mean"] = sum(agreement.values()) / len(agreement)
        return agreement

    def _record(self, trainer: L.Trainer, module: Any) -> None:
        step = trainer.global_step
        if step in self.history:
            return
        self.history[step] = self.score(module)
        mean = self.history[step]["mean"]
        if self.best_step is None or mean > self.history[self.best_step]["mean"]:
            self.best_step = step
            self.best_state = module.learned_state()
        logger.debug("%sheld-out agreement at step %d: %.2f %%", self._prefix(), step, mean)

    # -- Lightning hooks ---------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)
        last = trainer.global_step
        assert self.best_step is not None and self.best_state is not None
        if self.best_step != last:
            pl_module.restore_learned_state(self.best_state)
        self._report(last)

    def _report(self, last: int) -> None:
        first = min(self.history)
        kept = self.best_step
        rows = {f"start (step {first})": self.history[first], f"last (step {last})": self.history[last]}
        if kept not in (first, last):
            rows[f"kept (step {kept})"] = self.history[kept]
        tasks = [t for t in self.history[first] if t != "mean"]
        header = "| λ | " + " | ".join(tasks) + " | mean |"
        lines = [header, "|" + "---|" * (len(tasks) + 2)]
        lines += [f"| {name} | " + " | ".join(f"{row[t]:.1f}" for t in tasks) + f" | {row['mean']:.1f} |" for name, row in rows.items()]
        verdict = (
            "the last λ is kept"
            if kept == last
            else "the start is kept: training did not raise held-out agreement"
            if kept == first
            else f"the λ of step {kept} is kept"
        )
        logger.info(
            "%sheld-out agreement with each expert (%%; held-out inputs per task: %d; %s):\n%s",
            self._prefix(),
            len(self.targets[tasks[0]]) if tasks else 0,
            verdict,
            "\n".join(lines),
        )
        for task in tasks:
            drop = self.history[first][task] - self.history[kept][task]
            if drop > DROP_WARNING:
                logger.warning(
                    "%stask %r: held-out agreement with its expert fell from %.1f %% at the start to %.1f %% at the kept "
                    "λ while the mean rose: the objective favours the other tasks; check this task on labelled data, or weight it "
                    "up (--task-weights '{%s: 2}')",
                    self._prefix(),
                    task,
                    self.history[first][task],
                    self.history[kept][task],
                    task,
                )

    def _prefix(self) -> str:
        return f"{self.stage}: " if self.stage else ""

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records: the scores by step and the kept step."""
        return {"kept_step": self.best_step, "agreement": {str(step): row for step, row in sorted(self.history.items())}}

    # -- resume: the scores and the best λ travel with the checkpoints -------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best_step": self.best_step, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(k): dict(v) for k, v in state_dict["history"].items()}
        self.best_step = state_dict["best_step"]
        old = {"raw": state_dict["best_raw"]} if "best_raw" in state_dict else None  # a checkpoint of λ alone
        self.best_state = state_dict.get("best_state", old)


@torch.no_grad()
def agreement_with_experts(
    merged: Any,
    held_out: Mapping[str, Sequence[Any]],
    targets: Mapping[str, torch.Tensor],
    device: torch.device,
    task_type: TaskType = CLASSIFICATION,
) -> dict[str, float]:
    """``{task: share}`` of the scored positions of each task's inputs on which the merged model at
    its current λ predicts the class its expert predicts (``targets``, :func:`expert_predictions`).

    The merge runs as a training step runs it (BatchNorm on batch statistics under the
    re-estimating policies), without gradients, merged once for all tasks.

    Args:
        merged: the :class:`~adamerge.core.merged_model.MergedModel`.
        held_out: ``{task: [inputs batch, ...]}``.
        targets: ``{task: (N,) classes}`` the experts predict on those inputs, in order.
        device: where the merge runs.
        task_type: how predictions are read from the logits.
    """
    training = merged.training
    merged.train()  # as a training step runs it: BatchNorm on batch statistics (re-estimating policies)
    try:
        merged_tensors = None if merged.merges_at_use else merged.merged_tensors()
        shares: dict[str, float] = {}
        for task, batches in held_out.items():
            predictions = []
            for inputs in batches:
                inputs = task_type.model_inputs(move_inputs(inputs, device))  # a causal LM's scored positions only
                logits = merged(inputs, task, merged=merged_tensors)
                predictions.append(task_type.predictions(as_logits(logits), inputs).cpu())  # (N,)
            agree = torch.cat(predictions) == targets[task]  # (N,)
            shares[task] = agree.float().mean().item()
    finally:
        merged.train(training)
    return shares


@torch.no_grad()
def expert_predictions(
    held_out: Mapping[str, Sequence[Any]],
    expert_model: Callable[[str], nn.Module],
    device: torch.device,
    task_type: TaskType = CLASSIFICATION,
) -> dict[str, torch.Tensor]:
    """``{task: (N,) classes}`` the task's expert predicts at the scored positions of its held-out
    inputs (one expert built at a time, in eval mode, on ``device``)."""
    predictions = {}
    for task, batches in held_out.items():
        model = expert_model(task).eval().to(device)
        moved = [task_type.model_inputs(move_inputs(inputs, device)) for inputs in batches]
        predictions[task] = torch.cat([task_type.predictions(call_module(model, inputs), inputs) for inputs in moved]).cpu()
        del model
    return predictions


def held_out_batches(loaders: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{task: [inputs, ...]}`` read once from the datamodule's ``holdout_loaders()``."""
    return {task: [as_task_batch(item).inputs for item in loader] for task, loader in loaders.items()}
