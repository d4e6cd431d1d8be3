"""MergedModel: a base architecture whose merged weights are a pure function of λ.

``forward`` evaluates ``θ(λ) = θ_0 + Σ_k g(λ_k) ⊙ τ_k`` and runs the base module through
:func:`torch.func.functional_call` with those tensors, so gradients reach λ only: the base
weights are frozen and the task vectors are buffers. Task-specific tensors (classifier heads,
selected by a regex) are never merged; each task runs with its own expert's head.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adamerge.choices import BATCHNORM_POLICIES, REESTIMATING_POLICIES
from adamerge.core.batchnorm import batchnorm_layers, per_task_running_stats, reestimate_running_stats
from adamerge.core.block_checkpointing import checkpointed_blocks, repeated_blocks
from adamerge.core.coefficients import Coefficients
from adamerge.core.granularity import Granularity, TensorWise, parse_granularity
from adamerge.core.hooks import capture_hidden
from adamerge.core.merge import merge_tensor, merge_tensors
from adamerge.core.model_inputs import Inputs, call_functional, input_batch_size
from adamerge.core.row_sparse import row_sparse_tables
from adamerge.core.task_vectors import FactoredDelta, TaskVectors
from adamerge.errors import AdamergeError

logger = logging.getLogger(__name__)

USE_TIME_LAYERS = (nn.Linear, nn.Embedding)  # (and transformers' Conv1D): layers whose forward reads their weight


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
        batchnorm: BatchNorm statistics policy, see :mod:`adamerge.core.batchnorm`.
        trainable: optional ``(K, G)`` mask of coefficients that learn (others stay at ``init``).

    A random-partition granularity (aTLAS) permutes the stored task vectors in place once, so
    that every partition is a contiguous range; the model owns its ``task_vectors``. Tensors
    stored as LoRA factors (:class:`~adamerge.core.task_vectors.FactoredDelta`) are merged into one
    dense result each, never densified per expert; they support every granularity except random
    partitions (refused: a partition of entries needs the dense task vectors). In :meth:`forward`
    (without ``merged=``) such a tensor is merged at use time, in a forward pre-hook of the module
    owning it: autograd then runs its merge backward right after that module's backward, so the
    gradients of the merged weights never pile up (they would with an up-front merge, whose
    backward nodes run last).
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
        task_specific: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if batchnorm not in BATCHNORM_POLICIES:
            raise AdamergeError(f"batchnorm policy {batchnorm!r}: expected one of {', '.join(BATCHNORM_POLICIES)}")
        self.model = model.requires_grad_(False)
        self.task_vectors = task_vectors
        self.layout = parse_granularity(granularity).compile(task_vectors.names, task_vectors.numels())
        self.coefficients = Coefficients(task_vectors.tasks, self.layout, constraint, init, trainable)
        self.partitions = _PartitionOrder(task_vectors, self.layout)
        self.heads = TaskHeads(heads or {})
        if self.heads.tasks and set(self.heads.tasks) != set(self.tasks):
            raise AdamergeError(f"heads are given for {list(self.heads.tasks)}, experts are {list(self.tasks)}")
        self.kept = TaskHeads(task_specific or {})  # merged tensors each task keeps from its expert
        if self.kept.tasks and set(self.kept.tasks) != set(self.tasks):
            raise AdamergeError(f"task-specific tensors are given for {list(self.kept.tasks)}, experts are {list(self.tasks)}")
        self.batchnorm = batchnorm
        self.statistics = TaskHeads({})  # per-task BatchNorm statistics (policy ``per-task``), once estimated
        self._check_names()
        self._use_time = self._use_time_names()
        self._checkpointed: tuple[nn.Module, ...] = ()
        self.train(False)

    def checkpoint_blocks(self) -> int:
        """Recompute each repeated block's activations in backward instead of keeping them
        (:mod:`adamerge.core.block_checkpointing`); returns the number of blocks.

        Raises:
            AdamergeError: the model has no repeated blocks, or tensors merged at use time (LoRA
                task vectors under the low-rank step), whose merge the recomputation would miss.
        """
        if self.merges_at_use:
            raise AdamergeError(
                "--gradient-checkpointing: LoRA task vectors are merged at use time, one layer at a time, "
                "which block recomputation cannot repeat; fit LoRA experts without it"
            )
        blocks = repeated_blocks(self.model)
        if not blocks:
            raise AdamergeError(f"--gradient-checkpointing: {type(self.model).__name__} has no repeated blocks (a ModuleList of layers)")
        self._checkpointed = tuple(blocks)
        return len(blocks)

    @property
    def merges_at_use(self) -> bool:
        """Whether some (factored, LoRA) tensors are merged right before their layer runs."""
        return bool(self._use_time)

    def use_time_nbytes(self) -> int:
        """Bytes of the tensors merged at use time once merged (dense, in the base's dtypes): what a
        step holding them merged, and again as their gradients, keeps twice."""
        base = self.base_tensors()
        return sum(base[name].numel() * base[name].element_size() for name in self._use_time)

    def _use_time_names(self) -> frozenset[str]:
        """Factored tensors mergeable at use time: the unshared ``weight`` of a linear or embedding
        layer (whose own forward is what reads it; tied or otherwise shared weights merge up front)."""
        shared = _shared_parameter_names(self.model)
        names = []
        for name in self.task_vectors.factored_names():
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            param = module._parameters.get(attr)
            use_time_layer = isinstance(module, USE_TIME_LAYERS) or type(module).__name__ == "Conv1D"
            if use_time_layer and attr == "weight" and param is not None and name not in shared:
                names.append(name)
        return frozenset(names)

    @property
    def row_sparse_tables(self) -> frozenset[str]:
        """Merged embedding tables whose training gradient can be row-sparse (see
        :mod:`adamerge.core.row_sparse`): unshared, dense task vectors in entry order."""
        dense = {name: tv for name, tv in self.task_vectors.parts() if not isinstance(tv, FactoredDelta)}
        permuted = frozenset(self.partitions.names)
        return row_sparse_tables(self.model, dense, _shared_parameter_names(self.model), permuted)

    def _check_names(self) -> None:
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name in (*self.task_vectors.names, *self.heads.names, *self.kept.names):
            if name not in own:
                raise AdamergeError(f"tensor {name!r} is not a parameter or buffer of {type(self.model).__name__}")
        clash = set(self.task_vectors.names) & (set(self.heads.names) | set(self.kept.names))
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
        return merge_tensors(self.base_tensors(), self.task_vectors.parts(), lam, self.layout, self.partitions.inverse())

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
        at_use: dict[str, _UseTimeMerge] = {}
        if merged is None:
            tensors, at_use = self._merge_split()
        else:
            tensors = dict(merged)
        tensors.update(self.task_tensors(task))
        blocks = self._checkpointed if torch.is_grad_enabled() else ()
        if blocks and isinstance(inputs, Mapping) and getattr(getattr(self.model, "config", None), "use_cache", False):
            inputs = {**inputs, "use_cache": False}  # a recomputed block would write its key/value cache twice
        with _merge_at_use(self.model, at_use), checkpointed_blocks(blocks):
            return call_functional(self.model, tensors, inputs)  # logits (a ModelOutput's ``.logits``)

    def task_tensors(self, task: str | None) -> dict[str, torch.Tensor]:
        """The tensors specific to ``task``: its head, the tensors it keeps from its expert
        (``task_specific``) and, once estimated and outside training, its BatchNorm statistics
        (policy ``per-task``; training uses batch statistics, and running statistics passed to a
        training forward would be updated in place)."""
        if not self.heads.names and not self.kept.names and not self.statistics.names:
            return {}
        if task is None:
            raise AdamergeError(f"this model has task-specific tensors: pass task= one of {', '.join(self.tasks)}")
        tensors = self.own_tensors(task)
        if self.statistics.names and not self.training:
            tensors |= self.statistics.for_task(task)
        return tensors

    def own_tensors(self, task: str | None) -> dict[str, torch.Tensor]:
        """``task``'s head and the tensors it keeps from its expert (no statistics)."""
        heads = self.heads.for_task(task) if self.heads.names else {}
        return heads | (self.kept.for_task(task) if self.kept.names else {})

    def _merge_split(self) -> tuple[dict[str, torch.Tensor], dict[str, _UseTimeMerge]]:
        """Tensors merged now, and ``{name: merge}`` of the factored ones merged at use time."""
        lam = self.coefficients()  # (K, G)
        base = self.base_tensors()
        frozen = lam.detach()  # what backward re-merges with (see _merge_at_use)
        inverse = self.partitions.inverse()
        now, later = {}, {}
        rows = zip(self.task_vectors.parts(), self.layout.tensor_groups, self.layout.tensor_chunks, strict=True)
        for (name, tv), group, chunks in rows:
            if name in self._use_time:
                later[name] = _UseTimeMerge(
                    functools.partial(merge_tensor, name, base[name], tv, lam, group, chunks, inverse),
                    functools.partial(merge_tensor, name, base[name], tv, frozen, group, chunks, inverse),
                )
            else:
                now[name] = merge_tensor(name, base[name], tv, lam, group, chunks, inverse)
        return now, later

    def train(self, mode: bool = True) -> MergedModel:
        """Dropout and the like stay off; under the ``reestimate`` policy BatchNorm layers use batch
        statistics while training."""
        super().train(mode)
        self.model.eval()
        if mode and self.batchnorm in REESTIMATING_POLICIES:
            for layer in batchnorm_layers(self.model):
                layer.train()
        return self

    @property
    def head_module(self) -> str | None:
        """Name of the module owning the task heads; without heads, the model's output embeddings
        (a language model's shared LM head, transformers' ``get_output_embeddings``), else ``None``."""
        if not self.heads.names:
            output = getattr(self.model, "get_output_embeddings", lambda: None)()
            return next((n for n, m in self.model.named_modules() if m is output), None) if output is not None else None
        return self.heads.names[0].rpartition(".")[0]

    def capture(self, names: Sequence[str]):
        """Context manager collecting hidden states of the next forward passes, see
        :func:`adamerge.core.hooks.capture_hidden` (``"<head input>"``: the features entering the head)."""
        return capture_hidden(self.model, names, self.head_module)

    @torch.no_grad()
    def reestimate_batchnorm(self, batches: Iterable[tuple[str, Inputs]], pooled: bool = False) -> int:
        """Recompute the BatchNorm running statistics with the current merged weights.

        Under the ``per-task`` policy each task's statistics are computed on its own batches and
        kept in :attr:`statistics`; otherwise (or with ``pooled``) the model's running statistics
        are recomputed on all.

        Args:
            batches: ``(task, inputs)`` pairs, e.g. the calibration data of every task.
            pooled: one set of statistics over every task's batches, into the model's own
                buffers, whatever the policy.

        Returns:
            Number of samples seen (0 if the model has no BatchNorm layer).
        """
        if not batchnorm_layers(self.model):
            return 0
        merged = self.merged_tensors()

        def run(pairs: Iterable[tuple[str, Inputs]]) -> int:
            seen = 0
            for task, inputs in pairs:
                tensors = merged | self.own_tensors(task)  # statistics of the model each task runs
                call_functional(self.model, tensors, inputs)
                seen += input_batch_size(inputs)
            return seen

        if pooled or self.batchnorm != "per-task":
            return reestimate_running_stats(self.model, lambda: run(batches))
        by_task: dict[str, list[Inputs]] = {task: [] for task in self.tasks}
        for task, inputs in batches:
            by_task[task].append(inputs)
        statistics = per_task_running_stats(self.model, self.tasks, lambda task: run((task, inputs) for inputs in by_task[task]))
        self.statistics = TaskHeads(statistics)
        return sum(input_batch_size(inputs) for items in by_task.values() for inputs in items)

    @torch.no_grad()
    def merged_state_dict(self, task: str | None = None) -> dict[str, torch.Tensor]:
        """The full state dict of the merged model, in the base architecture's own keys.

        Args:
            task: include this task's head tensors and per-task statistics (else the base's are kept).
        """
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({k: v.detach().clone() for k, v in self.merged_tensors().items()})
        for alias, name in tied_aliases(self.model).items():  # a tied LM head is the embedding: merged too
            if name in state:
                state[alias] = state[name]
        if task is not None:
            state.update({k: v.detach().clone() for k, v in self.task_tensors(task).items()})
        return state

    def merge_and_unload(self, task: str | None = None) -> nn.Module:
        """A plain ``nn.Module`` of the base architecture holding the merged weights.

        Its outputs equal :meth:`forward` for ``task`` (in eval mode). Head tensors of another shape
        than the base's (e.g. 10 classes instead of 1000) replace the base's parameters.
        """
        if (self.heads.names or self.kept.names or self.statistics.names) and task is None:
            raise AdamergeError(f"this model has task-specific tensors: pass task= one of {', '.join(self.tasks)}")
        plain = copy.deepcopy(self.model)  # tied parameters stay one object
        load_state_in_place(plain, self.merged_state_dict(task))
        return plain.requires_grad_(True).eval()


@contextlib.contextmanager
def _merge_at_use(model: nn.Module, merges: Mapping[str, _UseTimeMerge]) -> Iterator[None]:
    """Merge each tensor of ``merges`` right before its module runs, and recompute it in backward.

    A forward pre-hook puts the merged weight in the module and a forward hook puts the module's
    own parameter back (``functional_call`` restores only the tensors it was given), so a merged
    weight lives during its module's forward only. Saved-tensor hooks keep autograd from holding the merged weights until backward (a layer saves its weight
    for its input gradient): they are saved as a recipe and re-merged from the factors when the
    backward needs them, so only one merged weight at a time is alive in backward, as in the
    forward.
    """
    if not merges:
        yield
        return
    by_owner: dict[str, dict[str, _UseTimeMerge]] = {}
    for name, merge in merges.items():
        owner, _, attr = name.rpartition(".")
        by_owner.setdefault(owner, {})[attr] = merge
    originals: dict[tuple[str, str], tuple[nn.Module, torch.Tensor]] = {}
    recipes: dict[int, Callable[[], torch.Tensor]] = {}  # storage address of a live merged weight -> re-merge
    handles = []
    for owner, attrs in by_owner.items():

        def put(module: nn.Module, args: Any, owner: str = owner, attrs: dict = attrs) -> None:
            for attr, merge in attrs.items():
                originals.setdefault((owner, attr), (module, module._parameters[attr]))
                merged = merge.forward()  # (*S): θ_0 + Σ_k λ_k τ_k, graph to λ
                module._parameters[attr] = merged
                recipes[merged.untyped_storage().data_ptr()] = merge.recompute

        def take(module: nn.Module, args: Any, output: Any, owner: str = owner, attrs: dict = attrs) -> None:
            for attr in attrs:  # the merged weight lives during its module's forward only
                recipes.pop(module._parameters[attr].untyped_storage().data_ptr(), None)
                module._parameters[attr] = originals[(owner, attr)][1]

        submodule = model.get_submodule(owner)
        handles += [submodule.register_forward_pre_hook(put), submodule.register_forward_hook(take)]

    def pack(tensor: torch.Tensor) -> torch.Tensor | _Recipe:
        dense = tensor.layout == torch.strided and tensor.device.type != "meta"
        merge = recipes.get(tensor.untyped_storage().data_ptr()) if dense and recipes else None
        if merge is None:
            return tensor
        return _Recipe(merge, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for (_, attr), (module, original) in originals.items():
            module._parameters[attr] = original


@dataclasses.dataclass(frozen=True)
class _UseTimeMerge:
    """How to merge one tensor in forward (graph to λ) and to re-merge it in backward (no graph)."""

    forward: Callable[[], torch.Tensor]
    recompute: Callable[[], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class _Recipe:
    """A saved merged weight (or a view of it), re-merged when backward unpacks it."""

    merge: Callable[[], torch.Tensor]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _unpack(saved: torch.Tensor | _Recipe) -> torch.Tensor:
    if not isinstance(saved, _Recipe):
        return saved
    with torch.no_grad():
        merged = saved.merge()  # same λ (the forward's constrained values), same result
    return merged.as_strided(saved.size, saved.stride, saved.offset)


class _PartitionOrder(nn.Module):
    """Random partitions as contiguous ranges: the task vectors of partitioned tensors are stored
    permuted (done once here, in place); ``inverse()`` gives the permutations restoring the order."""

    def __init__(self, task_vectors: TaskVectors, layout) -> None:
        super().__init__()
        self.names: list[str] = []
        if layout.partition_seed is None:
            return
        for index, ((name, tv), chunks) in enumerate(zip(task_vectors.parts(), layout.tensor_chunks, strict=True)):
            if chunks == 1:
                continue
            if isinstance(tv, FactoredDelta):
                raise AdamergeError(
                    f"tensor {name!r} holds LoRA factors: random partitions (partition:N) would need its dense "
                    "task vectors (K dense copies); use contiguous chunks (chunk:N), layer, group or task granularity"
                )
            generator = torch.Generator().manual_seed(layout.partition_seed + index)
            permutation = torch.randperm(tv[0].numel(), generator=generator)  # (P,)
            flat = tv.view(tv.shape[0], -1)  # (K, P)
            flat.copy_(flat[:, permutation.to(flat.device)])
            self.register_buffer(f"inverse_{len(self.names)}", torch.argsort(permutation), persistent=False)
            self.names.append(name)

    def inverse(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"inverse_{i}") for i, name in enumerate(self.names)}


def _shared_parameter_names(model: nn.Module) -> frozenset[str]:
    """Names of the parameters that several modules hold (tied weights), every alias included."""
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    return frozenset(name for names in aliases.values() if len(names) > 1 for name in names)


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: name}`` of tied parameters: ``name`` is the one ``named_parameters`` lists (and the
    one merged), ``alias`` another path to it (a tied LM head: ``lm_head.weight`` →
    ``model.embed_tokens.weight``)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}


@torch.no_grad()
def load_state_in_place(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write a full state dict into ``module``: in place where a tensor keeps its shape (so tied
    parameters stay one object and see the new value; a tied alias is written through the
    parameter it is), by :func:`assign_tensor` where it does not (a head of another size)."""
    current = module.state_dict(keep_vars=True)
    aliases = tied_aliases(module)
    for name, tensor in state.items():
        if name in aliases:
            continue
        if name in current and current[name].shape == tensor.shape:
            current[name].copy_(tensor)
        else:
            assign_tensor(module, name, tensor)


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
