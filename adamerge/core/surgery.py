"""Representation Surgery (Yang et al., "Representation Surgery for Multi-Task Model Merging",
ICML 2024): a small per-task module on the features entering each task's head.

A merged model's features drift from each expert's ("representation bias"); surgery subtracts a
learned low-rank estimate of that bias before the head::

    surgery_k(f) = f − up_k(ReLU(down_k(f)))      f: (..., D)   down_k: (r, D)   up_k: (D, r)

``down_k`` starts Kaiming-uniform (``a = √5``, a linear layer's default), ``up_k`` at zero, so
every task's surgery starts as the identity. Training (:mod:`adamerge.run.surgery`) aligns
``surgery_k(f)`` with expert ``k``'s own features by L1, the merged model frozen.

:meth:`RepresentationSurgery.applied` puts the surgery in front of a :class:`MergedModel`'s head:
every forward for task ``k`` then enters the head with ``surgery_k(f)``. Each task's adapter is the
plain state dict ``{"down.weight": (r, D), "up.weight": (D, r)}``; without adamerge the same
correction is ``features - up(relu(down(features)))`` before the head.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adamerge.core.merged_model import MergedModel
from adamerge.errors import AdamergeError


class SurgeryAdapter(nn.Module):
    """One task's surgery: ``f − up(ReLU(down(f)))`` over the last dimension of ``f``.

    Args:
        dim: feature size D (the head's input size).
        rank: hidden size r of the adapter.
        generator: the random generator ``down`` is drawn with (``None``: the global one).
    """

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1 or dim < 1:
            raise AdamergeError(f"representation surgery: rank {rank} and feature size {dim} must be >= 1")
        self.down = nn.utils.skip_init(nn.Linear, dim, rank, bias=False)  # weight (r, D)
        self.up = nn.utils.skip_init(nn.Linear, rank, dim, bias=False)  # weight (D, r)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.up.weight)  # the identity at the start

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., D) -> (..., D)``, computed in the features' dtype and on their device."""
        down = self.down.weight.to(device=features.device, dtype=features.dtype)  # (r, D)
        up = self.up.weight.to(device=features.device, dtype=features.dtype)  # (D, r)
        bias = F.linear(F.relu(F.linear(features, down)), up)  # (..., r) -> (..., D)
        return features - bias  # (..., D)


class RepresentationSurgery(nn.Module):
    """One :class:`SurgeryAdapter` per task.

    Args:
        tasks: the task names, in order.
        dim: feature size D entering the heads.
        rank: hidden size r of each adapter (the paper's 16).
        seed: seed of the adapters' ``down`` initialisation (drawn in task order).
    """

    def __init__(self, tasks: Sequence[str], dim: int, rank: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.dim = dim
        self.rank = rank
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleList(SurgeryAdapter(dim, rank, generator) for _ in self.tasks)

    def adapter(self, task: str) -> SurgeryAdapter:
        """``task``'s adapter."""
        if task not in self.tasks:
            raise AdamergeError(f"representation surgery: unknown task {task!r}; surgery exists for {', '.join(self.tasks)}")
        return self.adapters[self.tasks.index(task)]

    def forward(self, features: torch.Tensor, task: str) -> torch.Tensor:
        """``surgery_task(features)``: ``(..., D) -> (..., D)``."""
        return self.adapter(task)(features)

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """``{"down.weight": (r, D), "up.weight": (D, r)}`` of ``task``, detached copies on the CPU."""
        return {name: tensor.detach().cpu().clone() for name, tensor in self.adapter(task).state_dict().items()}

    @contextlib.contextmanager
    def applied(self, merged: MergedModel) -> Iterator[None]:
        """Within the block, every forward of ``merged`` for a task enters that task's head with
        the task's surgery applied (a forward pre-hook on the head module).

        The task of the running forward is read from ``merged``'s own call (``forward(inputs,
        task)``), by a forward pre-hook on ``merged``.

        Raises:
            AdamergeError: ``merged`` has no per-task heads.
        """
        if not merged.heads.names or merged.head_module is None:
            raise AdamergeError("representation surgery applies to models with per-task heads")
        head = merged.model.get_submodule(merged.head_module)
        signature = inspect.signature(merged.forward)
        current: dict[str, str | None] = {"task": None}

        def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
            current["task"] = signature.bind(*args, **kwargs).arguments.get("task")

        def operate(module: nn.Module, args: tuple) -> tuple:
            task = current["task"]
            if task is None:
                raise AdamergeError("representation surgery: the head ran outside a forward for a task")
            return (self(args[0], task), *args[1:])  # the head's input (..., D), corrected

        handles = [merged.register_forward_pre_hook(remember, with_kwargs=True), head.register_forward_pre_hook(operate)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
