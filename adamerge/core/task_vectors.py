"""Task vectors ``τ_k = θ_k − θ_0`` per tensor as frozen, non-persistent buffers.

Two storage forms, chosen per tensor:

- **dense**: one tensor ``(K, *shape)`` (K experts on dim 0), for tensors every expert changes as a
  full fine-tune;
- **factored** (:class:`FactoredDelta`): dense rows for only the experts that have them, plus
  low-rank factors ``τ_k = s_k · B_k A_k`` for LoRA experts, concatenated along the rank. A LoRA
  expert's delta is never densified by the merge: memory is O(K·r·(rows + cols)) per tensor.

Both are held in a storage dtype of the caller's choosing (float32, or bfloat16/float16 to halve
the memory and the memory traffic of every step). Experts are read one at a time, so building the
store never holds more than the base, one expert and the stored result.

Dense consumers (static merges, TIES/DARE preprocessing, Expert Merging++ importance) read
:meth:`TaskVectors.items`, which densifies factored tensors one at a time (logged, since it costs
K dense copies of each tensor); the merge itself reads :meth:`TaskVectors.parts`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from adamerge.errors import AdamergeError, IncompatibleExpertError
from adamerge.storage.checkpoints import check_finite_tensors

logger = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
StateSource = StateDict | Callable[[], StateDict]
BATCH_COUNTER = "num_batches_tracked"  # BatchNorm's step counter (an int64 scalar buffer)


def missing_batch_counters(reference: StateDict, state: StateDict) -> list[str]:
    """BatchNorm step counters of ``reference`` that ``state`` lacks.

    A counter is a ``P.num_batches_tracked`` integer scalar beside ``P.running_mean`` and
    ``P.running_var`` (BatchNorm's buffers). PyTorch before 0.4.1 saved BatchNorm without it, and
    ``nn.Module.load_state_dict(strict=True)`` still accepts such files (BatchNorm's versioned
    loading fills the counter), so adamerge accepts them too (see :func:`with_batch_counters`).

    Args:
        reference: the architecture's (or base's) state dict.
        state: the loaded one.
    """
    missing = []
    for name, tensor in reference.items():
        prefix, _, leaf = name.rpartition(".")
        stem = f"{prefix}." if prefix else ""
        if (
            leaf == BATCH_COUNTER and name not in state and tensor.ndim == 0 and not tensor.is_floating_point()
            and f"{stem}running_mean" in reference and f"{stem}running_var" in reference
        ):  # fmt: skip
            missing.append(name)
    return missing


def with_batch_counters(reference: StateDict, state: StateDict) -> dict[str, torch.Tensor]:
    """``state`` with the BatchNorm step counters it lacks filled with 0 (as PyTorch's BatchNorm
    loading fills them for a freshly built module), in ``reference``'s dtype; ``state`` itself is
    not changed."""
    missing = missing_batch_counters(reference, state)
    if not missing:
        return dict(state)
    logger.info("%d BatchNorm num_batches_tracked buffer(s) missing (an older PyTorch's file): set to 0", len(missing))
    return dict(state) | {name: torch.zeros((), dtype=reference[name].dtype) for name in missing}


def check_dtype(task: str, name: str, tensor: torch.Tensor, base: torch.Tensor) -> None:
    """Refuse an integer (or bool) expert tensor where the base's is floating point: its task vector
    would be garbage. Lower float precision (float16 / bfloat16 experts of a float32 base) is fine.

    Raises:
        IncompatibleExpertError: naming the expert, the tensor and both dtypes.
    """
    if base.is_floating_point() and not (tensor.is_floating_point() or tensor.is_complex()):
        raise IncompatibleExpertError(
            f"expert {task!r}: tensor {name!r} is {_dtype_name(tensor)}, the base's is {_dtype_name(base)}: "
            f"an integer tensor cannot hold fine-tuned weights (a quantised or mislabelled file?); save the "
            f"expert's floating-point state dict"
        )


def task_difference(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``θ_k − θ_0`` computed in the wider of both dtypes and float32.

    float64 weights subtract in float64 (a difference of 1e-9 on a weight of 3 survives, where a
    float32 subtraction would return 0); bfloat16/float16 ones in float32. The caller casts the
    result to its storage dtype.
    """
    wide = torch.promote_types(torch.promote_types(expert.dtype, base.dtype), torch.float32)
    return expert.to(wide) - base.to(wide)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LowRankFactor:
    """One LoRA expert's delta of one tensor, in the stored tensor's orientation.

    ``τ = scale · left @ right`` viewed as the tensor's shape (rows = ``shape[0]``, cols = the
    product of the remaining dims).

    Attributes:
        task: index of the expert among the K tasks.
        left: ``(rows, r)`` (LoRA's ``B`` for ``nn.Linear``).
        right: ``(r, cols)`` (LoRA's ``A`` for ``nn.Linear``).
        scale: ``s_k`` (``lora_alpha / r``, or ``lora_alpha / √r`` for rsLoRA).
    """

    task: int
    left: torch.Tensor
    right: torch.Tensor
    scale: float


class FactoredDelta(nn.Module):
    """Task vectors of one tensor held as dense rows for some experts and LoRA factors for others.

    ``τ_k = dense[i]`` for ``k = dense_index[i]``; ``τ_k = s_k · left[:, R_k] @ right[R_k]`` for a
    LoRA expert ``k`` whose rank columns are ``R_k = {j : rank_owner[j] = k}``; ``τ_k = 0`` for
    any other expert. The factors of all LoRA experts are concatenated along the rank (no padding:
    ``rank_owner`` says which expert each rank column belongs to).

    Args:
        shape: shape of the tensor.
        num_tasks: K.
        dense_tasks: expert indices with a dense row (in ``dense``'s order).
        dense: ``(len(dense_tasks), *shape)`` or ``None``.
        factors: low-rank factors of the LoRA experts (each expert at most once).
        dtype: storage dtype.
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_tasks: int,
        dense_tasks: Sequence[int] = (),
        dense: torch.Tensor | None = None,
        factors: Sequence[LowRankFactor] = (),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.shape = torch.Size(shape)
        self.num_tasks = num_tasks
        self.rows = self.shape[0] if self.shape else 1
        self.cols = math.prod(self.shape[1:])
        self._check(dense_tasks, dense, factors)
        if dense is None:
            dense = torch.empty((0, *self.shape), dtype=dtype)
        self.register_buffer("dense", dense.detach().to(dtype), persistent=False)  # (Kd, *shape)
        self.register_buffer("dense_index", torch.tensor(list(dense_tasks), dtype=torch.long), persistent=False)
        left = [f.left.reshape(self.rows, -1) for f in factors]
        right = [f.right.reshape(-1, self.cols) for f in factors]
        owner = [torch.full((f.right.shape[0],), f.task, dtype=torch.long) for f in factors]
        scale = [torch.full((f.right.shape[0],), float(f.scale)) for f in factors]
        self.register_buffer("left", _cat(left, 1, (self.rows, 0)).to(dtype), persistent=False)  # (rows, R)
        self.register_buffer("right", _cat(right, 0, (0, self.cols)).to(dtype), persistent=False)  # (R, cols)
        self.register_buffer("rank_owner", _cat(owner, 0, (0,)).long(), persistent=False)  # (R,)
        self.register_buffer("rank_scale", _cat(scale, 0, (0,)).float(), persistent=False)  # (R,)

    def _check(self, dense_tasks: Sequence[int], dense: torch.Tensor | None, factors: Sequence[LowRankFactor]) -> None:
        tasks = list(dense_tasks) + [f.task for f in factors]
        if len(set(tasks)) != len(tasks) or any(not 0 <= k < self.num_tasks for k in tasks):
            raise IncompatibleExpertError(f"expert indices {tasks} must be distinct and in [0, {self.num_tasks})")
        if (dense is None) != (not dense_tasks) or (dense is not None and dense.shape != (len(dense_tasks), *self.shape)):
            got = None if dense is None else tuple(dense.shape)
            raise IncompatibleExpertError(f"dense rows of shape {got} for experts {list(dense_tasks)}, tensor {tuple(self.shape)}")
        for f in factors:
            r = f.right.shape[0]
            if f.left.numel() != self.rows * r or f.right.numel() != r * self.cols:
                raise IncompatibleExpertError(
                    f"LoRA factors {tuple(f.left.shape)} @ {tuple(f.right.shape)} of expert {f.task} "
                    f"do not give a tensor of shape {tuple(self.shape)}"
                )

    @property
    def num_dense(self) -> int:
        """Experts with a dense row."""
        return self.dense.shape[0]

    @property
    def rank(self) -> int:
        """Total rank R of the concatenated LoRA factors."""
        return self.right.shape[0]

    @property
    def low_rank_tasks(self) -> tuple[int, ...]:
        """Indices of the LoRA experts, in factor order."""
        return tuple(dict.fromkeys(self.rank_owner.tolist()))

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype

    def nbytes(self) -> int:
        """Bytes held by this tensor's task vectors."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def task_delta(self, task: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``τ_task`` of shape ``shape`` (zeros for an expert that does not change the tensor)."""
        if task in self.dense_index.tolist():
            return self.dense[self.dense_index.tolist().index(task)].to(dtype)
        delta = torch.zeros((self.rows, self.cols), dtype=dtype, device=self.dense.device)  # (rows, cols)
        columns = self.rank_owner == task  # (R,)
        if bool(columns.any()):
            left = self.left[:, columns].to(dtype) * self.rank_scale[columns].to(dtype)  # (rows, r_k) = s_k B_k
            delta.addmm_(left, self.right[columns].to(dtype))  # += s_k B_k A_k
        return delta.view(self.shape)

    def densify(self) -> torch.Tensor:
        """All K task vectors as one dense ``(K, *shape)`` tensor in the storage dtype (K dense copies)."""
        return torch.stack([self.task_delta(k) for k in range(self.num_tasks)]).to(self.dtype)  # (K, *shape)

    def scaled(self, factors: torch.Tensor) -> FactoredDelta:
        """A copy with ``τ_k`` multiplied by ``factors[k]`` (``(K,)``): the dense rows are scaled,
        a LoRA expert's factors are shared and only its scale ``s_k`` changes (nothing densified)."""
        factors = factors.detach().float().to(self.rank_scale.device)
        copy = nn.Module.__new__(FactoredDelta)
        copy.__dict__.update(self.__dict__)
        copy._buffers = dict(self._buffers)  # left, right and rank_owner shared with this delta
        copy.dense = _rows_scaled(self.dense, factors[self.dense_index].tolist())
        copy.rank_scale = self.rank_scale * factors[self.rank_owner]  # (R,)
        return copy

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self.shape)}, dense_tasks={self.dense_index.tolist()}, "
            f"low_rank_tasks={list(self.low_rank_tasks)}, rank={self.rank}"
        )


def _rows_scaled(rows: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """``rows[i] · factors[i]`` for ``rows`` ``(n, *shape)``: a copy in its dtype, one row at a time
    (no float32 copy of the whole stack)."""
    out = rows.clone()
    for i, factor in enumerate(factors):
        out[i].mul_(factor)
    return out


def _cat(tensors: Sequence[torch.Tensor], dim: int, empty: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([t.float() for t in tensors], dim=dim) if tensors else torch.zeros(empty)


TaskVector = torch.Tensor | FactoredDelta


class TaskVectors(nn.Module):
    """Task vectors of the merged tensors for ``K`` tasks, as non-persistent buffers.

    Each tensor is stored either dense, ``Tensor(K, *shape)``, or as a :class:`FactoredDelta`
    (dense rows for some experts, LoRA factors for others). Non-persistent: the vectors are rebuilt
    from the expert files, never written into checkpoints. They move with the owning module
    (``.to(device)``) and never require gradients.

    Args:
        tasks: the K task (expert) names, in stacking order.
        vectors: ``{tensor name: Tensor(K, *shape) or FactoredDelta}`` in model order.

    Raises:
        AdamergeError: ``vectors`` is empty (nothing would be merged: every source refuses it here).
        IncompatibleExpertError: a vector stacks another number of experts than ``tasks``.
    """

    def __init__(self, tasks: Sequence[str], vectors: Mapping[str, TaskVector]) -> None:
        super().__init__()
        if not vectors:
            raise AdamergeError(
                f"no merged tensor for experts {list(tasks)}: every tensor is task-specific (--head-pattern, "
                f"--task-specific) or not merged (integer buffers), so nothing is left to merge"
            )
        self.tasks = tuple(tasks)
        self.names = tuple(vectors)
        self.factored = nn.ModuleDict()
        for index, (name, vector) in enumerate(vectors.items()):
            stacked = vector.num_tasks if isinstance(vector, FactoredDelta) else vector.shape[0]
            if stacked != len(self.tasks):
                raise IncompatibleExpertError(f"task vector {name!r} stacks {stacked} experts, expected {len(self.tasks)}")
            if isinstance(vector, FactoredDelta):
                self.factored[self.buffer_name(index)] = vector
            else:
                self.register_buffer(self.buffer_name(index), vector.detach(), persistent=False)
        self._densify_logged = False

    @staticmethod
    def buffer_name(index: int) -> str:
        """Attribute name of the ``index``-th stacked vector (module attributes cannot hold dots)."""
        return f"tv_{index}"

    def __len__(self) -> int:
        return len(self.names)

    def _part(self, index: int) -> TaskVector:
        key = self.buffer_name(index)
        return self.factored[key] if key in self.factored else getattr(self, key)

    def parts(self) -> Iterator[tuple[str, TaskVector]]:
        """``(name, Tensor(K, *shape) or FactoredDelta)`` pairs in model order, never densified."""
        for index, name in enumerate(self.names):
            yield name, self._part(index)

    def __getitem__(self, name: str) -> torch.Tensor:
        """Dense ``(K, *shape)`` task vectors of ``name`` (densified if factored)."""
        return self._dense(name, self._part(self.names.index(name)))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, Tensor(K, *shape))`` pairs in model order, for dense consumers.

        Factored tensors are densified one at a time (K dense copies of that tensor): correct for
        every dense consumer, but the memory saving of LoRA factors is lost for whoever keeps them.
        """
        for name, part in self.parts():
            yield name, self._dense(name, part)

    def _dense(self, name: str, part: TaskVector) -> torch.Tensor:
        if not isinstance(part, FactoredDelta):
            return part
        if not self._densify_logged:
            self._densify_logged = True
            logger.warning(
                "densifying factored (LoRA) task vectors for a dense consumer, first %r: %.1f MB dense vs %.1f MB stored",
                name,
                self.dense_nbytes() / 2**20,
                self.nbytes() / 2**20,
            )
        return part.densify()

    def factored_names(self) -> list[str]:
        """Names of the tensors stored as :class:`FactoredDelta`, in order."""
        return [name for name, part in self.parts() if isinstance(part, FactoredDelta)]

    def is_factored(self, name: str) -> bool:
        """Whether ``name`` is stored as a :class:`FactoredDelta`."""
        return isinstance(self._part(self.names.index(name)), FactoredDelta)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def shapes(self) -> list[torch.Size]:
        """Shape of each merged tensor, in order."""
        return [p.shape if isinstance(p, FactoredDelta) else p.shape[1:] for _, p in self.parts()]

    def numels(self) -> list[int]:
        """Entries per task of each merged tensor, in order."""
        return [math.prod(shape) for shape in self.shapes()]

    def numel(self) -> int:
        """Entries per task (P): the merged part of the model."""
        return sum(self.numels())

    @property
    def dtype(self) -> torch.dtype | None:
        """Storage dtype (``None`` for an empty store)."""
        part = next((p for _, p in self.parts()), None)
        return None if part is None else part.dtype

    def nbytes(self) -> int:
        """Bytes held by the stored task vectors (dense buffers and factors)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dense_nbytes(self) -> int:
        """Bytes a dense ``(K, P)`` store of the same tensors would take (not allocated)."""
        dtype = self.dtype or torch.float32
        return self.num_tasks * self.numel() * torch.empty((), dtype=dtype).element_size()

    def task_delta(self, name: str, task: str | int) -> torch.Tensor:
        """Dense ``τ_task`` of tensor ``name`` (one expert, one tensor)."""
        k = task if isinstance(task, int) else self.tasks.index(task)
        part = self._part(self.names.index(name))
        return part.task_delta(k, part.dtype) if isinstance(part, FactoredDelta) else part[k]

    def scaled(self, factors: torch.Tensor) -> TaskVectors:
        """The task vectors ``factors[k] · τ_k`` (``factors`` ``(K,)``), in the storage dtype and
        form: LoRA factors stay factored, only their scale changes."""
        if factors.shape != (self.num_tasks,):
            raise AdamergeError(f"task-vector scale factors of shape {tuple(factors.shape)}, expected ({self.num_tasks},)")
        vectors: dict[str, TaskVector] = {}
        for name, part in self.parts():
            if isinstance(part, FactoredDelta):
                vectors[name] = part.scaled(factors)
            else:
                vectors[name] = _rows_scaled(part, factors.tolist())
        return TaskVectors(self.tasks, vectors)

    def extra_repr(self) -> str:
        factored = len(self.factored)
        return (
            f"tasks={list(self.tasks)}, tensors={len(self)} ({factored} factored), "
            f"entries_per_task={self.numel():,}, dtype={self.dtype}, stored={self.nbytes() / 2**20:.1f} MB"
        )

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
            IncompatibleExpertError: an expert lacks a merged tensor, has another shape, or an
                integer tensor where the base's is floating point.
            AdamergeError: ``names`` is empty.
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
                        f"expert {task!r}: tensor {name!r} has shape {tuple(state[name].shape)}, the base has {tuple(base[name].shape)}"
                    )
                check_dtype(task, name, state[name], base[name])
                vectors[name][k] = task_difference(state[name], base[name])
            del state
            logger.debug("task vector of %s computed", task)
        return cls(tasks, vectors)


def check_expert_keys(base: StateDict, expert: StateDict, task: str, head_names: Sequence[str]) -> None:
    """Refuse an expert whose tensor names differ from the base, whose non-head shapes differ, or
    that holds an integer tensor where the base's is floating point.

    Head tensors (task-specific) may differ in shape (e.g. another number of classes), never in name.
    Missing BatchNorm ``num_batches_tracked`` counters are allowed (files of an older PyTorch, which
    PyTorch's own loading accepts; see :func:`missing_batch_counters`). Half-precision experts of a
    float32 base are fine.

    Raises:
        IncompatibleExpertError: naming the tensor(s) and both shapes or dtypes.
    """
    counters = set(missing_batch_counters(base, expert))
    missing = [n for n in base if n not in expert and n not in counters]
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
        if name in counters:
            continue
        if name not in heads and expert[name].shape != tensor.shape:
            raise IncompatibleExpertError(
                f"expert {task!r}: tensor {name!r} has shape {tuple(expert[name].shape)}, the base has {tuple(tensor.shape)}"
            )
        check_dtype(task, name, expert[name], tensor)
    check_finite_tensors(expert, f"expert {task!r}")
