"""BatchNorm statistics of a merged model: the policy and its re-estimation.

Merged weights and the pretrained running statistics disagree (merging 4 real MobileNetV2
experts by task arithmetic: 0.73 average accuracy with statistics re-estimated on the unlabeled
calibration data, 0.29 with the pretrained ones). Policies:

- ``auto`` (default): ``per-task`` when every task has its own head (the task is then known at
  inference, so per-task statistics cost nothing but ``2 × channels`` numbers per layer and
  task), else ``reestimate`` (:func:`resolve_policy`).
- ``reestimate``: while the coefficients are trained, normalisation layers use the
  statistics of each batch; before evaluation and export the running statistics are reset and
  recomputed (cumulative average) with the current merged weights on the calibration data.
- ``per-task``: as ``reestimate``, but each task gets its own running statistics, computed on its
  own calibration data; they become part of the task's head (task-specific tensors, exported with
  it). Training batches hold one task each, so the training-time batch statistics are per-task
  too. The classifier heads already make evaluation task-aware; the statistics cost
  ``2 × channels`` numbers per layer and task. Statistics pooled over tasks that differ as much
  as digits and photographs fit none of them (``benchmarks/RESULTS.md``, *BatchNorm*).
- ``base``: keep the pretrained running statistics (layers always in eval mode).
- ``merge``: treat float buffers like weights: ``θ_0 + Σ_k λ_k τ_k`` over the experts' statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from adamerge.errors import DataError

logger = logging.getLogger(__name__)

STATISTIC_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def resolve_policy(policy: str, tasks: Sequence[str], heads: Mapping[str, Mapping[str, object]], model: nn.Module) -> str:
    """The policy ``auto`` stands for, given the experts' heads (other policies are returned as
    they are). Logged once when the model has BatchNorm layers.

    Args:
        policy: ``--batchnorm``.
        tasks: the task names.
        heads: ``{task: {name: tensor}}`` of task-specific head tensors.
        model: the base model (whether it has BatchNorm layers at all).
    """
    if policy != "auto":
        return policy
    per_task_heads = bool(tasks) and all(heads.get(task) for task in tasks)
    resolved = "per-task" if per_task_heads else "reestimate"
    if batchnorm_layers(model):
        logger.info(
            "BatchNorm statistics: %s (--batchnorm auto: %s)",
            resolved,
            "every task has its own head, so each task gets its own statistics"
            if per_task_heads
            else "the tasks share the model's output, so the statistics are pooled over them",
        )
    return resolved


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Normalisation layers that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def reestimate_running_stats(model: nn.Module, run_batches: Callable[[], int]) -> int:
    """Reset and recompute the running statistics of ``model``'s BatchNorm layers.

    Args:
        model: the module whose BatchNorm buffers are updated in place.
        run_batches: runs the data through the model (e.g. functional calls with merged weights)
            and returns the number of samples; every batch counts equally (cumulative average).

    Returns:
        Number of samples seen (0 when the model has no BatchNorm layer: nothing is run).
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [(layer, layer.momentum, layer.training) for layer in layers]
    seen = 0
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over all batches
            layer.train()
        seen = run_batches()
    finally:
        for layer, momentum, training in saved:
            layer.momentum = momentum
            layer.train(training)
    return seen


def running_stat_names(model: nn.Module) -> list[str]:
    """Names (in ``model.state_dict()`` keys) of every BatchNorm running-statistics buffer."""
    owners = {id(layer) for layer in batchnorm_layers(model)}
    names = []
    for module_name, module in model.named_modules():
        if id(module) in owners:
            prefix = f"{module_name}." if module_name else ""
            names += [prefix + b for b in STATISTIC_BUFFERS if getattr(module, b, None) is not None]
    return names


@torch.no_grad()
def per_task_running_stats(
    model: nn.Module, tasks: Sequence[str], run_task_batches: Callable[[str], int]
) -> dict[str, dict[str, torch.Tensor]]:
    """Running statistics of ``model``'s BatchNorm layers re-estimated on each task's data alone.

    The model's own buffers are restored afterwards; the statistics are returned as copies.

    Args:
        model: the module whose BatchNorm layers are run (e.g. by functional calls with merged weights).
        tasks: task names, in order.
        run_task_batches: runs one task's data through the model and returns the number of samples.

    Returns:
        ``{task: {buffer name: tensor}}`` (empty dicts when the model has no BatchNorm layer).
    """
    names = running_stat_names(model)
    if not names:
        return {task: {} for task in tasks}
    buffers = dict(model.named_buffers())
    saved = {name: buffers[name].clone() for name in names}
    statistics = {}
    try:
        for task in tasks:
            seen = reestimate_running_stats(model, lambda task=task: run_task_batches(task))
            if seen == 0:
                raise DataError(f"task {task!r} has no calibration data to estimate its BatchNorm statistics on")
            statistics[task] = {name: buffers[name].detach().clone() for name in names}
    finally:
        for name, value in saved.items():
            buffers[name].copy_(value)
    return statistics
