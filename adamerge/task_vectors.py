"""Task vectors ``τ_k = θ_k − θ_0`` stacked per tensor as frozen, non-persistent buffers.

The store holds, for each merged tensor name, one tensor ``(K, *shape)`` (K experts on dim 0) in a
storage dtype of the caller's choosing (float32, or bfloat16/float16 to halve the memory and the
memory traffic of every step). Experts are read one at a time, so building the store never holds
more than the base, one expert and the K-stacked result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from adamerge.checkpoints import check_finite_tensors
from adamerge.errors import IncompatibleExpertError

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
StateSource = StateDict | Callable[[], StateDict]


class TaskVectors(nn.Module):
    """Stacked task vectors ``{name: (K, *shape)}`` for ``K`` tasks, as non-persistent buffers.

    Non-persistent: the vectors are rebuilt from the expert files, never written into
    checkpoints. They move with the owning module (``.to(device)``) and never require gradients.

    Args:
        tasks: the K task (expert) names, in stacking order.
        vectors: ``{tensor name: Tensor(K, *shape)}`` in model order.
    """

    def __init__(self, tasks: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.names = tuple(vectors)
        for index, (name, vector) in enumerate(vectors.items()):
            if vector.shape[0] != len(self.tasks):
                raise IncompatibleExpertError(
                    f"task vector {name!r} stacks {vector.shape[0]} experts, expected {len(self.tasks)}"
                )
            self.register_buffer(self.buffer_name(index), vector.detach(), persistent=False)

    @staticmethod
    def buffer_name(index: int) -> str:
        """Attribute name of the ``index``-th stacked vector (module attributes cannot hold dots)."""
        return f"tv_{index}"

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, self.buffer_name(self.names.index(name)))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, Tensor(K, *shape))`` pairs in model order."""
        for index, name in enumerate(self.names):
            yield name, getattr(self, self.buffer_name(index))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def numel(self) -> int:
        """Entries per task (P): the merged part of the model."""
        return sum(v[0].numel() for _, v in self.items())

    def extra_repr(self) -> str:
        dtype = next((v.dtype for _, v in self.items()), None)
        return f"tasks={list(self.tasks)}, tensors={len(self)}, entries_per_task={self.numel():,}, dtype={dtype}"

    @classmethod
    def from_states(
        cls,
        base: StateDict,
        experts: Mapping[str, StateSource],
        names: Sequence[str],
        dtype: torch.dtype = torch.float32,
    ) -> TaskVectors:
        """Subtract the base from each expert, one expert in memory at a time.

        Args:
            base: the pretrained state dict θ_0.
            experts: ``{task: state dict or zero-argument loader returning one}``; loaders are called
                once each, in order, and their result is dropped before the next is read.
            names: tensors to merge (float parameters and, by policy, float buffers).
            dtype: storage dtype of the stacked vectors.

        Raises:
            IncompatibleExpertError: an expert lacks a merged tensor or has another shape.
        """
        tasks = list(experts)
        vectors = {n: torch.empty((len(tasks), *base[n].shape), dtype=dtype) for n in names}  # (K, *shape)
        for k, task in enumerate(tasks):
            source = experts[task]
            state = source() if callable(source) else source
            for name in names:
                if name not in state:
                    raise IncompatibleExpertError(f"expert {task!r} has no tensor {name!r} (the base has it)")
                if state[name].shape != base[name].shape:
                    raise IncompatibleExpertError(
                        f"expert {task!r}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                        f"the base has {tuple(base[name].shape)}"
                    )
                vectors[name][k] = state[name].float() - base[name].float()
            del state
            logger.debug("task vector of %s computed", task)
        return cls(tasks, vectors)


def check_expert_keys(base: StateDict, expert: StateDict, task: str, head_names: Sequence[str]) -> None:
    """Refuse an expert whose tensor names differ from the base, or whose non-head shapes differ.

    Head tensors (task-specific) may differ in shape (e.g. another number of classes), never in name.
    Raises :class:`IncompatibleExpertError` naming the tensor(s) and both shapes.
    """
    missing = [n for n in base if n not in expert]
    extra = [n for n in expert if n not in base]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) of the base, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) the base lacks, e.g. {extra[:3]}")
        raise IncompatibleExpertError(f"expert {task!r} does not match the base architecture: {'; '.join(parts)}")
    heads = set(head_names)
    for name, tensor in base.items():
        if name not in heads and expert[name].shape != tensor.shape:
            raise IncompatibleExpertError(
                f"expert {task!r}: tensor {name!r} has shape {tuple(expert[name].shape)}, "
                f"the base has {tuple(tensor.shape)}"
            )
    check_finite_tensors(expert, f"expert {task!r}")
