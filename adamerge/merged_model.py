"""MergedModel: a base architecture whose merged weights are a pure function of λ.

``forward`` evaluates ``θ(λ) = θ_0 + Σ_k g(λ_k) ⊙ τ_k`` and runs the base module through
:func:`torch.func.functional_call` with those tensors, so gradients reach λ only: the base
weights are frozen and the task vectors are buffers. Task-specific tensors (classifier heads,
selected by a regex) are never merged; each task runs with its own expert's head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from adamerge.batchnorm import BATCHNORM_POLICIES, batchnorm_layers, reestimate_running_stats
from adamerge.coefficients import Coefficients
from adamerge.errors import AdamergeError
from adamerge.granularity import Granularity, TensorWise, parse_granularity
from adamerge.hooks import capture_hidden
from adamerge.merge import merge_tensors
from adamerge.model_inputs import Inputs, call_functional, input_batch_size
from adamerge.task_vectors import TaskVectors

logger = logging.getLogger(__name__)


class TaskHeads(nn.Module):
    """Per-task tensors that are never merged (e.g. classifier heads), as non-persistent buffers.

    Args:
        heads: ``{task: {tensor name: tensor}}``; every task names the same tensors.
    """

    def __init__(self, heads: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        super().__init__()
        self.tasks = tuple(heads)
        self.names = tuple(next(iter(heads.values()), {}))
        for k, (task, tensors) in enumerate(heads.items()):
            if tuple(tensors) != self.names:
                raise AdamergeError(f"head tensors of task {task!r} are {list(tensors)}, expected {list(self.names)}")
            for i, name in enumerate(self.names):
                self.register_buffer(f"head_{k}_{i}", tensors[name].detach(), persistent=False)

    def for_task(self, task: str) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` of ``task``'s head."""
        if task not in self.tasks:
            raise AdamergeError(f"unknown task {task!r}: heads exist for {', '.join(self.tasks)}")
        k = self.tasks.index(task)
        return {name: getattr(self, f"head_{k}_{i}") for i, name in enumerate(self.names)}


class MergedModel(nn.Module):
    """A base model plus K task vectors and learnable coefficients.

    Args:
        model: the base architecture holding θ_0 (its parameters are frozen here).
        task_vectors: stacked task vectors of the merged tensors.
        granularity: coefficient layout (``TaskWise``, ``TensorWise`` — AdaMerging's layer-wise —,
            ``GroupWise``) or its spec string (``task``, ``layer``, ``group:REGEX``).
        constraint: ``clamp`` (AdaMerging), ``sigmoid`` (Expert Merging) or ``none`` (aTLAS).
        init: initial coefficient value(s), float or ``(K,)`` / ``(K, G)`` tensor.
        heads: ``{task: {name: tensor}}`` of task-specific tensors (never merged).
        batchnorm: BatchNorm statistics policy, see :mod:`adamerge.batchnorm`.
        trainable: optional ``(K, G)`` mask of coefficients that learn (others stay at ``init``).

    A random-partition granularity (aTLAS) permutes the stored task vectors in place once, so
    that every partition is a contiguous range; the model owns its ``task_vectors``.
    """

    def __init__(
        self,
        model: nn.Module,
        task_vectors: TaskVectors,
        granularity: Granularity | str = TensorWise(),
        constraint: str = "clamp",
        init: float | torch.Tensor = 0.3,
        heads: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        batchnorm: str = "reestimate",
        trainable: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if batchnorm not in BATCHNORM_POLICIES:
            raise AdamergeError(f"batchnorm policy {batchnorm!r}: expected one of {', '.join(BATCHNORM_POLICIES)}")
        self.model = model.requires_grad_(False)
        self.task_vectors = task_vectors
        numels = [tv[0].numel() for _, tv in task_vectors.items()]
        self.layout = parse_granularity(granularity).compile(task_vectors.names, numels)
        self.coefficients = Coefficients(task_vectors.tasks, self.layout, constraint, init, trainable)
        self.partitions = _PartitionOrder(task_vectors, self.layout)
        self.heads = TaskHeads(heads or {})
        if self.heads.tasks and set(self.heads.tasks) != set(self.tasks):
            raise AdamergeError(f"heads are given for {list(self.heads.tasks)}, experts are {list(self.tasks)}")
        self.batchnorm = batchnorm
        self._check_names()
        self.train(False)

    def _check_names(self) -> None:
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name in (*self.task_vectors.names, *self.heads.names):
            if name not in own:
                raise AdamergeError(f"tensor {name!r} is not a parameter or buffer of {type(self.model).__name__}")
        clash = set(self.task_vectors.names) & set(self.heads.names)
        if clash:
            raise AdamergeError(f"tensors {sorted(clash)[:3]} are both merged and task-specific")

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.task_vectors.tasks

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """θ_0 of every parameter and buffer of the base model."""
        return dict(self.model.named_parameters()) | dict(self.model.named_buffers())

    def merged_tensors(self, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The merged tensors ``{name: θ_0 + Σ_k λ_k τ_k}``, differentiable in λ.

        Args:
            coefficients: constrained ``(K, G)`` values to use instead of the learned ones.
        """
        lam = self.coefficients() if coefficients is None else coefficients  # (K, G)
        return merge_tensors(
            self.base_tensors(), self.task_vectors.items(), lam, self.layout, self.partitions.inverse()
        )

    def forward(
        self,
        inputs: Inputs,
        task: str | None = None,
        merged: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the merged model.

        Args:
            inputs: a batch for the base architecture: a tensor, or a dict of tensors passed as
                keyword arguments (e.g. a tokenizer's output).
            task: whose head to use (required when heads exist).
            merged: precomputed :meth:`merged_tensors` (to merge once and run several tasks).
        """
        tensors = dict(self.merged_tensors() if merged is None else merged)
        if self.heads.names:
            if task is None:
                raise AdamergeError(f"this model has task-specific heads: pass task= one of {', '.join(self.tasks)}")
            tensors.update(self.heads.for_task(task))
        return call_functional(self.model, tensors, inputs)  # logits (a ModelOutput's ``.logits``)

    def train(self, mode: bool = True) -> MergedModel:
        """Dropout and the like stay off; under the ``reestimate`` policy BatchNorm layers use batch
        statistics while training."""
        super().train(mode)
        self.model.eval()
        if mode and self.batchnorm == "reestimate":
            for layer in batchnorm_layers(self.model):
                layer.train()
        return self

    @property
    def head_module(self) -> str | None:
        """Name of the module owning the task heads (``None`` without heads)."""
        if not self.heads.names:
            return None
        return self.heads.names[0].rpartition(".")[0]

    def capture(self, names: Sequence[str]):
        """Context manager collecting hidden states of the next forward passes, see
        :func:`adamerge.hooks.capture_hidden` (``"<head input>"``: the features entering the head)."""
        return capture_hidden(self.model, names, self.head_module)

    @torch.no_grad()
    def reestimate_batchnorm(self, batches: Iterable[tuple[str, Inputs]]) -> int:
        """Recompute the BatchNorm running statistics with the current merged weights.

        Args:
            batches: ``(task, inputs)`` pairs, e.g. the calibration data of every task.

        Returns:
            Number of samples seen (0 if the model has no BatchNorm layer).
        """
        merged = self.merged_tensors()

        def run_batches() -> int:
            seen = 0
            for task, inputs in batches:
                tensors = merged | (self.heads.for_task(task) if self.heads.names else {})
                call_functional(self.model, tensors, inputs)
                seen += input_batch_size(inputs)
            return seen

        return reestimate_running_stats(self.model, run_batches)

    @torch.no_grad()
    def merged_state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """The full state dict of the merged model, in the base architecture's own keys.

        Args:
            task: include this task's head tensors (else the base's head tensors are kept).
        """
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self.merged_tensors().items()})
        if task is not None and self.heads.names:
            state.update({k: v.detach().clone() for k, v in self.heads.for_task(task).items()})
        return state

    def merge_and_unload(self, task: str | None = None) -> nn.Module:
        """A plain ``nn.Module`` of the base architecture holding the merged weights.

        Its outputs equal :meth:`forward` for ``task`` (in eval mode). Head tensors of another shape
        than the base's (e.g. 10 classes instead of 1000) replace the base's parameters.
        """
        if self.heads.names and task is None:
            raise AdamergeError(f"this model has task-specific heads: pass task= one of {', '.join(self.tasks)}")
        plain = copy.deepcopy(self.model)
        state = self.merged_state_dict(task)
        for name, tensor in state.items():
            assign_tensor(plain, name, tensor)
        return plain.requires_grad_(True).eval()


class _PartitionOrder(nn.Module):
    """Random partitions as contiguous ranges: the task vectors of partitioned tensors are stored
    permuted (done once here, in place); ``inverse()`` gives the permutations restoring the order."""

    def __init__(self, task_vectors: TaskVectors, layout) -> None:
        super().__init__()
        self.names: list[str] = []
        if layout.partition_seed is None:
            return
        for index, ((name, tv), chunks) in enumerate(zip(task_vectors.items(), layout.tensor_chunks, strict=True)):
            if chunks == 1:
                continue
            generator = torch.Generator().manual_seed(layout.partition_seed + index)
            permutation = torch.randperm(tv[0].numel(), generator=generator)  # (P,)
            flat = tv.view(tv.shape[0], -1)  # (K, P)
            flat.copy_(flat[:, permutation.to(flat.device)])
            self.register_buffer(f"inverse_{len(self.names)}", torch.argsort(permutation), persistent=False)
            self.names.append(name)

    def inverse(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"inverse_{i}") for i, name in enumerate(self.names)}


def assign_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` at ``name`` (parameter or buffer), resizing where the shape differs."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        setattr(owner, attr, nn.Parameter(tensor.to(current.dtype), requires_grad=current.requires_grad))
    else:
        owner._buffers[attr] = tensor.to(current.dtype) if current is not None else tensor
    if isinstance(owner, nn.Linear):  # keep the module's description in step with a resized head
        owner.out_features, owner.in_features = owner.weight.shape
