"""The LightningModule that learns merging coefficients.

One training step merges once and back-propagates once:

1. ``θ = θ(λ)`` is computed (graph to λ) and detached into leaf tensors ``θ'``;
2. for each task in turn, the task's batch runs through ``θ'`` with the task's head, and the
   task's loss is back-propagated into ``θ'.grad`` (only one task's activations are alive at a
   time);
3. the step returns the summed loss wrapped so that its backward hands ``θ'.grad`` to ``θ(λ)``
   (:class:`~adamerge.core.merge.PrecomputedGradient`): Lightning's ordinary backward then runs the
   merge's backward once, giving exactly ``Σ_tasks ∂L_task/∂λ``; optimizers, gradient
   accumulation and DDP work on it unchanged.

LoRA task vectors are merged into dense leaves the same way while the adapted weights are small
(``low_rank_step``); for larger ones each task's forward merges them at use time.

Under DDP only λ is all-reduced: task vectors, heads and frozen base weights are listed in
``_ddp_params_and_buffers_to_ignore``, so they are neither broadcast at start nor every step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from adamerge.choices import REESTIMATING_POLICIES
from adamerge.core.merge import PrecomputedGradient
from adamerge.core.merged_model import MergedModel
from adamerge.core.model_inputs import move_inputs
from adamerge.core.row_sparse import coefficient_gradients, sparse_gradients
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import Entropy, ModelOutputs, Objective, TaskBatch, as_task_batch
from adamerge.task_types import CLASSIFICATION, TaskType

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
COEFFICIENT_PREFIX = "merged.coefficients."
LOW_RANK_STEPS = ("auto", "per-step", "at-use")
# ``auto`` merges factored (LoRA) tensors once per step while the dense merged weights and their
# gradients, which that step holds, take at most this many bytes
PER_STEP_MERGE_LIMIT = 256 * 2**20


def statistics_loaders_of(datamodule: Any) -> dict[str, Any] | None:
    """``{task: loader}`` of unlabeled inputs for BatchNorm re-estimation: the datamodule's
    ``statistics_loaders()``, else its unshuffled ``calibration_loaders()`` (a user's own
    datamodule), else ``None``."""
    if hasattr(datamodule, "statistics_loaders"):
        return datamodule.statistics_loaders()
    if hasattr(datamodule, "calibration_loaders"):
        return datamodule.calibration_loaders(shuffle=False)
    return None


def adam(lr: float = 1e-3) -> OptimizerFactory:
    """AdaMerging's optimiser: Adam, lr 1e-3, betas (0.9, 0.999)."""
    return functools.partial(torch.optim.Adam, lr=lr, betas=(0.9, 0.999))


class MergingModule(L.LightningModule):
    """Learns the coefficients of a :class:`MergedModel` with a per-task objective.

    Args:
        merged: the model (base, task vectors, coefficients, heads).
        objective: per-task objective (default: :class:`~adamerge.objectives.task_objectives.Entropy`, AdaMerging).
        optimizer: factory ``params -> Optimizer`` (default: Adam lr 1e-3).
        scheduler: optional factory ``Optimizer -> LRScheduler``, stepped every training step.
        sources: references to the base and expert files, stored in checkpoints (not the weights).
        low_rank_step: how a training step merges factored (LoRA) task vectors. ``per-step``: once
            per step, as dense tensors (fastest: one low-rank merge per step); ``at-use``: per task,
            each weight right before its layer runs and again in its backward (no dense copy of
            the adapted weights outlives its layer: for adapters on most of a large model);
            ``auto`` (default): ``per-step`` while the adapted weights, merged and as gradients,
            take at most :data:`PER_STEP_MERGE_LIMIT` bytes (256 MiB), else ``at-use``.
        sparse_tables: give merged embedding tables row-sparse gradients in the training step
            (default; :mod:`adamerge.core.row_sparse`); ``False`` keeps their dense gradients (the same
            λ-gradient up to float rounding, more time and memory).
        task_type: what the tasks' outputs are and how they are scored (default: classification);
            objectives and accuracy see its scored positions, never the raw logits.
    """

    def __init__(
        self,
        merged: MergedModel,
        objective: Objective | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        sources: Mapping[str, Any] | None = None,
        low_rank_step: str = "auto",
        sparse_tables: bool = True,
        task_type: TaskType | None = None,
    ) -> None:
        super().__init__()
        if low_rank_step not in LOW_RANK_STEPS:
            raise AdamergeError(f"low_rank_step={low_rank_step!r}: expected one of {', '.join(LOW_RANK_STEPS)}")
        self.save_hyperparameters(ignore=["merged", "objective", "optimizer", "scheduler", "task_type"])
        self.task_type = task_type if task_type is not None else CLASSIFICATION
        self.merged = merged
        self.objective = objective if objective is not None else Entropy()
        self.optimizer_factory = optimizer if optimizer is not None else adam()
        self.scheduler_factory = scheduler
        self.sources = dict(sources or {})
        self._row_sparse = merged.row_sparse_tables if sparse_tables else frozenset()
        self.merges_at_use = merged.merges_at_use and (
            low_rank_step == "at-use" or (low_rank_step == "auto" and 2 * merged.use_time_nbytes() > PER_STEP_MERGE_LIMIT)
        )
        self.accuracy = nn.ModuleDict()
        self.strict_loading = False  # checkpoints hold λ only; the rest comes from the expert files
        self._eval_merged: dict[str, torch.Tensor] | None = None
        self._bn_estimated_for: torch.Tensor | None = None  # λ the BatchNorm statistics belong to
        self.results: dict[str, dict[str, float]] = {}
        self._ddp_params_and_buffers_to_ignore = [
            name for name, _ in self.named_buffers() if name.startswith(("merged.task_vectors.", "merged.heads."))
        ] + [name for name, p in self.named_parameters() if not p.requires_grad]

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.merged.tasks

    # -- training ----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # Lightning keeps the modes modules were built with; the merged model is built in eval mode
        # (so evaluation and export before any training are deterministic). Training puts it in
        # its training mode: dropout stays off, BatchNorm uses batch statistics under the
        # re-estimating policies (see MergedModel.train).
        self.merged.train()
        if self.merged.merges_at_use:
            logger.info(
                "LoRA task vectors: merged %s (adapted weights merged: %.1f MiB)",
                "at use, per task" if self.merges_at_use else "once per step",
                self.merged.use_time_nbytes() / 2**20,
            )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self.merges_at_use:
            return self._low_rank_training_step(batch)
        lam = self.merged.coefficients()  # (K, G), graph to λ
        merged = self.merged.merged_tensors(lam)  # θ(λ), graph to λ
        return self._with_regularizer(self._loss_through(merged, lam, batch))

    def _loss_through(self, merged: Mapping[str, torch.Tensor], lam: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Every task's loss on ``batch`` through the merged tensors, back-propagated one task at a
        time into detached copies of them; the summed loss, whose backward hands the copies'
        gradients to ``merged`` (and the row-sparse tables' λ-gradient to ``lam``).

        Args:
            merged: ``{name: merged tensor}`` with a graph to what is learned.
            lam: the constrained ``(K, G)`` coefficients ``merged`` was built from.
            batch: ``{task: batch}`` of one step.
        """
        leaves = {name: t.detach().requires_grad_() for name, t in merged.items()}  # θ'
        total = torch.zeros((), device=self.device)
        with sparse_gradients(self.merged.model, self._row_sparse):  # embedding tables: ∂L/∂E of the rows read
            for task, item in batch.items():
                task_batch = as_task_batch(item)
                task_loss = self.objective(task, *self._outputs(task_batch, task, leaves))
                task_loss.backward(inputs=list(leaves.values()))  # accumulates ∂L_task/∂θ' in θ'.grad
                total += task_loss.detach()
                self._log_training(f"train/loss/{task}", task_loss.detach(), batch_size=task_batch.size)
        used = [name for name, leaf in leaves.items() if leaf.grad is not None]
        if not used:
            raise AdamergeError("no merged tensor received a gradient: does the loss depend on the model?")
        # value: the summed loss; backward: hands ∂L/∂θ' to θ(λ), one gemv per tensor into λ, and
        # the tables' λ-gradient (contracted over the rows read) to λ itself
        dense = [name for name in used if name not in self._row_sparse]
        grads = [leaves[name].grad for name in dense]
        targets = [merged[name] for name in dense]
        sparse = {name: leaves[name].grad for name in used if name in self._row_sparse}
        if sparse:
            tables = {name: tv for name, tv in self.merged.task_vectors.parts() if name in sparse}
            grads.append(coefficient_gradients(sparse, tables, self.merged.layout, len(self.tasks)).to(lam.dtype))
            targets.append(lam)
        return PrecomputedGradient.apply(total, tuple(grads), *targets)

    def _with_regularizer(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss plus the objective's coefficient regulariser (if any), logged."""
        regularizer = self.objective.regularization(self.merged.coefficients())
        if regularizer is not None:
            self._log_training("train/regularizer", regularizer.detach(), batch_size=1)
            loss = loss + regularizer
        self._log_training("train/loss", loss.detach(), prog_bar=True, batch_size=1)
        return loss

    def _low_rank_training_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The step for models with factored (LoRA) task vectors: no dense θ(λ) for the whole model.

        Each task's forward merges every adapted weight right before its layer runs (and its
        backward re-merges it), so only one layer's dense weight and weight gradient are alive at a
        time; the task's backward goes straight to λ (``autograd.grad``), and the summed gradient is
        handed to λ by the returned loss, as in the dense step. Peak memory is the base model plus
        one task's activations, below a dense model's forward+backward (which keeps every weight
        gradient); the price is one low-rank merge per task instead of one per step.
        """
        raw = self.merged.coefficients.raw
        grad = torch.zeros_like(raw)
        total = torch.zeros((), device=self.device)
        for task, item in batch.items():
            task_batch = as_task_batch(item)
            task_loss = self.objective(task, *self._outputs(task_batch, task, None))
            (task_grad,) = torch.autograd.grad(task_loss, [raw], allow_unused=True)
            if task_grad is not None:
                grad += task_grad
            total += task_loss.detach()
            self._log_training(f"train/loss/{task}", task_loss.detach(), batch_size=task_batch.size)
        return self._with_regularizer(PrecomputedGradient.apply(total, (grad,), raw))  # hands Σ_task ∂L/∂λ to λ

    def _outputs(self, batch: TaskBatch, task: str, tensors: Mapping[str, torch.Tensor] | None) -> tuple[ModelOutputs, TaskBatch]:
        """The task type's scored positions of the merged model on ``batch`` (and the hidden states
        the objective asks for), with the batch's labels as the positions' targets."""
        hidden: Mapping[str, torch.Tensor] = {}
        inputs = self.task_type.model_inputs(batch.inputs, batch.labels)  # a causal LM's scored positions only
        if not self.objective.hidden_modules:
            logits = self.merged(inputs, task, merged=tensors)
        else:
            with self.merged.capture(self.objective.hidden_modules) as hidden:
                logits = self.merged(inputs, task, merged=tensors)
        positions, targets = self.task_type.scored(logits, inputs, batch.labels)  # (N, C), (N,)
        return ModelOutputs(positions, dict(hidden)), dataclasses.replace(batch, labels=targets)

    def _log_training(self, name: str, value: torch.Tensor, **kwargs: Any) -> None:
        if self._trainer is not None:  # the step also runs outside a Trainer (benchmarks, notebooks)
            self.log(name, value, **kwargs)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.merged.coefficients.parameters())
        if self.scheduler_factory is None:
            return optimizer
        schedule = {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def learned_state(self) -> dict[str, torch.Tensor]:
        """A copy of what training changes (λ), for the held-out safeguard to keep the best of."""
        return {"raw": self.merged.coefficients.raw.detach().clone()}

    @torch.no_grad()
    def restore_learned_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put back a :meth:`learned_state`."""
        raw = self.merged.coefficients.raw
        raw.copy_(state["raw"].to(raw.device))

    # -- evaluation --------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._prepare_evaluation()

    def on_test_epoch_start(self) -> None:
        self._prepare_evaluation()

    @torch.no_grad()
    def _prepare_evaluation(self) -> None:
        if self.merged.batchnorm in REESTIMATING_POLICIES:
            self.reestimate_batchnorm()
        self._eval_merged = self.merged.merged_tensors()

    @torch.no_grad()
    def reestimate_batchnorm(self, loaders: Mapping[str, Any] | None = None) -> None:
        """Recompute BatchNorm statistics (once per value of λ) on ``{task: loader}`` of unlabeled
        inputs, by default the attached trainer's datamodule's calibration data."""
        current = self.merged.coefficients.raw.detach()
        if self._bn_estimated_for is not None and torch.equal(self._bn_estimated_for, current):
            return
        if loaders is None:
            loaders = statistics_loaders_of(getattr(self._trainer, "datamodule", None))
        if loaders is None:
            logger.warning(
                "batchnorm policy %r needs a datamodule with statistics_loaders() or calibration_loaders(); skipped",
                self.merged.batchnorm,
            )
            return
        seen = self.merged.reestimate_batchnorm(self.statistics_batches(loaders))
        self._bn_estimated_for = current.clone()
        if seen:
            logger.info("re-estimated BatchNorm statistics on %d calibration samples", seen)

    def statistics_batches(self, loaders: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
        """``(task, inputs on this module's device)`` of every batch of ``{task: loader}``."""
        return ((task, move_inputs(as_task_batch(item).inputs, self.device)) for task, loader in loaders.items() for item in loader)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._common_eval_step(batch, dataloader_idx)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._common_eval_step(batch, dataloader_idx)

    def _common_eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> None:
        inputs, labels = batch
        task = self.tasks[dataloader_idx]
        logits = self.merged(inputs, task, merged=self._eval_merged)
        positions, targets = self.task_type.scored(logits, inputs, labels)  # (N, C), (N,)
        self._accuracy(task, positions.shape[-1]).update(positions, targets)

    def _accuracy(self, task: str, num_classes: int) -> MulticlassAccuracy:
        if task not in self.accuracy:
            self.accuracy[task] = MulticlassAccuracy(num_classes=num_classes, average="micro").to(self.device)
        return self.accuracy[task]

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def _log_accuracy(self, stage: str) -> None:
        values = {task: round(float(self.accuracy[task].compute()), 6) for task in self.tasks if task in self.accuracy}
        for task, value in values.items():
            self.log(f"{stage}/acc/{task}", value, add_dataloader_idx=False)
            self.accuracy[task].reset()
        if values:
            average = sum(values.values()) / len(values)
            self.log(f"{stage}/acc/average", average, add_dataloader_idx=False, prog_bar=stage == "val")
            self.results[stage] = values | {"average": average}
        self._eval_merged = None

    # -- checkpoints: λ and references, never the weights ------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(COEFFICIENT_PREFIX)}
        checkpoint["adamerge"] = {
            "tasks": list(self.tasks),
            "groups": list(self.merged.layout.group_names),
            "constraint": self.merged.coefficients.constraint,
            "sources": self.sources,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("adamerge")
        if meta is None or f"{COEFFICIENT_PREFIX}raw" not in checkpoint.get("state_dict", {}):
            raise AdamergeError("checkpoint holds no adamerge coefficients (was it written by adamerge?)")
        if meta["tasks"] != list(self.tasks) or meta["groups"] != list(self.merged.layout.group_names):
            raise AdamergeError(
                f"checkpoint coefficients are for tasks {meta['tasks']} with {len(meta['groups'])} groups; "
                f"this model has tasks {list(self.tasks)} with {self.merged.layout.num_groups} groups"
            )
