"""Tensors each task keeps from its own expert instead of merging them (``--task-specific``).

A merged model already holds per-task classifier heads (and, with ``--batchnorm per-task``, per-task
BatchNorm statistics). ``--task-specific batchnorm`` goes one step further: each task also keeps
its expert's own normalisation scale and shift (``weight`` and ``bias`` of every BatchNorm layer),
which re-centre the merged features for that task (the idea of lightweight task-specific
modulators, e.g. EMR-Merging's rescalers). They are small (two numbers per channel of each
normalisation layer) and need what the heads need anyway: knowing the task at inference. What
they bring on the benchmarks is in ``benchmarks/RESULTS.md``.

Values: ``batchnorm`` (affine tensors of every ``BatchNorm*d`` layer), ``norm`` (also LayerNorm,
GroupNorm and InstanceNorm layers) or a regex searched in the merged tensors' names.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import nn

from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import AdamergeError
from adamerge.sources.base import ExpertSet

logger = logging.getLogger(__name__)

NORM_LAYERS = {
    "batchnorm": (nn.modules.batchnorm._BatchNorm,),
    "norm": (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm),  # _NormBase: BatchNorm, InstanceNorm
}


def task_specific_names(model: nn.Module, merged_names: list[str], spec: str) -> list[str]:
    """The merged tensors ``spec`` selects, in ``merged_names``' order.

    Args:
        model: the base model (its module types resolve ``batchnorm`` / ``norm``).
        merged_names: names of the tensors that have task vectors.
        spec: ``batchnorm``, ``norm`` or a regex.

    Raises:
        AdamergeError: an invalid regex, or nothing selected.
    """
    if spec in NORM_LAYERS:
        owners = {name for name, module in model.named_modules() if isinstance(module, NORM_LAYERS[spec])}
        chosen = [n for n in merged_names if n.rpartition(".")[0] in owners and n.rpartition(".")[2] in ("weight", "bias")]
        what = f"no {spec} layer with affine weights among the merged tensors"
    else:
        try:
            pattern = re.compile(spec)
        except re.error as error:
            raise AdamergeError(f"--task-specific {spec!r} is not 'batchnorm', 'norm' or a valid regex: {error}") from None
        chosen = [n for n in merged_names if pattern.search(n)]
        what = "it matches no merged tensor"
    if not chosen:
        raise AdamergeError(f"--task-specific {spec!r} selects nothing: {what} (e.g. {merged_names[:4]})")
    return chosen


def keep_task_specific(experts: ExpertSet, spec: str | None) -> ExpertSet:
    """Move the tensors ``spec`` selects out of the task vectors: each task keeps its expert's value.

    Args:
        experts: the loaded experts.
        spec: ``batchnorm``, ``norm``, a regex, or ``None`` (nothing kept; ``experts`` unchanged).

    Returns:
        A copy whose ``task_vectors`` lack the selected tensors and whose ``task_specific`` holds
        ``{task: {name: θ_0 + τ_task}}`` (low-rank task vectors are densified for these tensors).
    """
    if spec is None:
        return experts
    names = task_specific_names(experts.model, list(experts.task_vectors.names), spec)
    base = dict(experts.model.named_parameters()) | dict(experts.model.named_buffers())
    kept = {
        task: {n: (base[n].detach() + experts.task_vectors.task_delta(n, task).to(base[n].dtype)) for n in names}
        for task in experts.tasks
    }  # fmt: skip
    chosen = set(names)
    remaining = TaskVectors(experts.tasks, {n: part for n, part in experts.task_vectors.parts() if n not in chosen})
    sources = experts.sources | {"task_specific": {"spec": spec, "tensors": len(names)}}
    numbers = sum(base[n].numel() for n in names)
    logger.info("--task-specific %s: %d tensors (%d numbers per task) kept from each expert, not merged", spec, len(names), numbers)
    return dataclasses.replace(experts, task_vectors=remaining, task_specific=kept, sources=sources)


def with_task_specific(heads: dict[str, dict[str, torch.Tensor]], kept: dict[str, dict[str, torch.Tensor]]) -> dict:
    """``{task: head tensors | kept tensors}`` (what each task's ``heads/<task>.pt`` holds)."""
    tasks = list(dict.fromkeys([*heads, *kept]))
    return {task: {**heads.get(task, {}), **kept.get(task, {})} for task in tasks}
