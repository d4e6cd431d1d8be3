"""peft LoRA adapters as low-rank task vectors (``NAME=peft:DIR`` experts of the Hugging Face source).

An adapter directory is what peft's ``save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (or ``.bin``). Each adapted module of the base contributes
``ΔW_k = s_k · B_k A_k`` to its weight, kept as factors (never a dense ``(out, in)`` delta):

- ``nn.Linear``: ``ΔW = s · B A`` (``B = lora_B.weight (out, r)``, ``A = lora_A.weight (r, in)``);
- transformers ``Conv1D`` (GPT-2, weight ``(in, out)``, peft's ``fan_in_fan_out``): ``ΔW = s · (B A)ᵀ``;
- ``nn.Embedding``: ``ΔW = s · (B A)ᵀ`` (``lora_embedding_A (r, num)``, ``lora_embedding_B (dim, r)``);

with ``s = lora_alpha / r`` (``lora_alpha / √r`` for rsLoRA), ``r`` and ``lora_alpha`` per module
from ``rank_pattern`` / ``alpha_pattern`` exactly as peft resolves them. ``modules_to_save``
tensors (e.g. a sequence-classification head saved in full) become the task's head tensors.

Refused with an :class:`~adamerge.errors.IncompatibleExpertError` naming the adapter directory
and the module: non-LoRA adapters (IA³, LoHa, ...), DoRA, LoRA biases (``lora_bias``, ``bias`` other
than ``none``), input-dependent or structural variants (aLoRA, Arrow, layer replication,
parameter targets, trainable tokens, ...), a target module the base lacks or of an unsupported
type, and factors whose shapes do not fit the base (an adapter trained on another base model).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adamerge.core.task_vectors import (
    FactoredDelta,
    LowRankFactor,
    StateSource,
    TaskVectors,
    check_expert_keys,
    task_difference,
)
from adamerge.errors import AdamergeError, CheckpointError, IncompatibleExpertError
from adamerge.storage.checkpoints import check_finite_tensors

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<emb>[AB]))$")

# LoraConfig fields whose non-default value changes what the adapter computes beyond s·B·A
UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "alora_invocation_tokens": "aLoRA (activated by invocation tokens)",
    "arrow_config": "Arrow routing",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "block-diagonal LoRA",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}


@dataclass
class LoraAdapter:
    """One adapter directory read against the base model.

    Attributes:
        directory: the adapter directory.
        factors: ``{base parameter name: (left, right, scale)}`` with ``ΔW = scale · left @ right``
            in the parameter's own orientation.
        heads: ``{base tensor name: tensor}`` from ``modules_to_save``.
        base_name: the config's ``base_model_name_or_path``.
    """

    directory: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    base_name: str | None = None


def load_lora_experts(
    model: nn.Module,
    adapters: Mapping[str, str | Path],
    dense: Mapping[str, StateSource] | None = None,
    *,
    tasks: Sequence[str] | None = None,
    head_names: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    base_name: str | None = None,
) -> tuple[TaskVectors, dict[str, dict[str, torch.Tensor]]]:
    """Task vectors of K experts over ``model``: peft LoRA adapters (factored) and full fine-tunes (dense).

    A tensor is merged iff some adapter targets it or some dense expert changes it. Its store holds
    dense rows only for the dense experts that change it and LoRA factors only for the adapters that
    target it (:class:`~adamerge.core.task_vectors.FactoredDelta`); a tensor every expert changes densely
    is stored as a plain ``(K, *shape)`` tensor. Nothing LoRA is densified.

    Heads: the union of ``head_names`` and every adapter's ``modules_to_save`` tensors. Each task
    gets all of them: an adapter's saved tensor, a dense expert's own tensor (which may differ in
    shape, e.g. another number of classes), or else the base's tensor.

    Args:
        model: the base architecture with θ_0 loaded (not modified: adapters are read, not injected).
        adapters: ``{task: adapter directory}`` (peft ``save_pretrained`` layout).
        dense: ``{task: full state dict, or a zero-argument loader returning one}`` of fine-tuned
            experts over the same base (same tensor names; heads may differ in shape). Loaders are
            called once each, one expert in memory at a time.
        tasks: stacking order of all task names (default: the adapters, then the dense experts).
        head_names: base tensor names that are task-specific (never merged), e.g. the tensors a
            ``--head-pattern`` selects.
        dtype: storage dtype of the factors and dense rows.
        base_name: the base model's name or path, checked against each adapter's
            ``base_model_name_or_path`` (a difference is logged as a warning); default: the model's
            ``name_or_path`` / ``config._name_or_path`` if it has one.

    Returns:
        ``(task_vectors, heads)`` with ``heads = {task: {name: tensor}}`` (empty without heads),
        ready for :class:`~adamerge.core.merged_model.MergedModel` / :class:`~adamerge.sources.base.ExpertSet`.

    Raises:
        IncompatibleExpertError: an adapter that is not plain LoRA, targets a module the base lacks
            or does not support, or has factors of another shape; a dense expert whose tensors
            differ from the base; a tensor both merged and task-specific.
        CheckpointError: an adapter directory that is missing or unreadable.
    """
    dense = dict(dense or {})
    order = _task_order(adapters, dense, tasks)
    base_state = model.state_dict()
    base_name = base_name if base_name is not None else _model_name(model)
    read = {task: read_lora_adapter(model, Path(path), base_state, base_name) for task, path in adapters.items()}
    heads_union = list(dict.fromkeys([*head_names, *(n for a in read.values() for n in a.heads)]))
    _check_heads(read, heads_union, base_state)
    merge_names = [n for n, p in model.named_parameters() if p.is_floating_point() and n not in heads_union]
    dense_rows, dense_heads = _read_dense(base_state, dense, order, merge_names, heads_union, dtype)
    vectors = _build_vectors(base_state, order, read, dense_rows, merge_names, dtype)
    task_vectors = TaskVectors(order, vectors)
    heads = _collect_heads(order, read, dense_heads, heads_union, base_state)
    logger.info(
        "LoRA task vectors: %s (a dense store would take %.1f MB)",
        task_vectors.extra_repr(),
        task_vectors.dense_nbytes() / 2**20,
    )
    return task_vectors, heads


def _task_order(adapters: Mapping[str, object], dense: Mapping[str, object], tasks: Sequence[str] | None) -> list[str]:
    both = set(adapters) & set(dense)
    if both:
        raise AdamergeError(f"tasks {sorted(both)} are given both as LoRA adapters and as dense experts")
    default = [*adapters, *dense]
    if not default:
        raise AdamergeError("no experts given: pass at least one LoRA adapter or dense expert")
    if tasks is None:
        return default
    if sorted(tasks) != sorted(default):
        raise AdamergeError(f"task order {list(tasks)} does not name exactly the experts {default}")
    return list(tasks)


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def read_lora_adapter(
    model: nn.Module, directory: Path, base_state: Mapping[str, torch.Tensor] | None = None, base_name: str | None = None
) -> LoraAdapter:
    """Read one peft LoRA adapter directory against ``model`` (which is not modified).

    Uses peft's own readers (``PeftConfig.from_pretrained``, ``load_peft_weights``) and its rank /
    alpha pattern resolution (``get_pattern_key``), maps the adapter's module names
    (``base_model.model.<module>.lora_A.weight``) to the base's parameter names
    (``<module>.weight``) and checks every shape against the base.

    Raises:
        CheckpointError: the directory or its files are missing or unreadable.
        IncompatibleExpertError: see :func:`load_lora_experts`.
    """
    from peft import PeftConfig, PeftType, load_peft_weights

    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"LoRA adapter {directory}: no adapter_config.json (expected a peft save_pretrained folder)")
    try:
        config = PeftConfig.from_pretrained(str(directory))
        weights = load_peft_weights(str(directory), device="cpu")
    except Exception as error:  # peft raises ValueError/OSError/safetensors errors alike
        raise CheckpointError(f"LoRA adapter {directory}: cannot be read by peft: {error}") from None
    if config.peft_type != PeftType.LORA:
        raise IncompatibleExpertError(
            f"adapter {directory} is a {config.peft_type.value} adapter: only LoRA adapters merge as low-rank task vectors"
        )
    _check_options(config, directory)
    check_finite_tensors(weights, f"LoRA adapter {directory}")
    if base_name and config.base_model_name_or_path and config.base_model_name_or_path != base_name:
        logger.warning(
            "adapter %s was trained on %r, the base is %r: shapes are checked, weights cannot be",
            directory,
            config.base_model_name_or_path,
            base_name,
        )
    base_state = base_state if base_state is not None else model.state_dict()
    adapter = LoraAdapter(directory, base_name=config.base_model_name_or_path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        match = LORA_KEY.match(name)
        if match:
            pairs.setdefault(match["module"], {})[match["ab"] or match["emb"]] = tensor
        elif "lora_" in name:
            raise IncompatibleExpertError(f"adapter {directory}: tensor {key!r} is not a plain LoRA factor (unsupported)")
        else:
            adapter.heads[_head_name(name, config, directory, base_state)] = tensor
    for module_name, factors in pairs.items():
        adapter.factors[f"{module_name}.weight"] = _factors(model, module_name, factors, config, directory)
    logger.debug("adapter %s: %d LoRA modules, %d head tensors", directory, len(adapter.factors), len(adapter.heads))
    return adapter


def _check_options(config: object, directory: Path) -> None:
    for option, what in UNSUPPORTED_OPTIONS.items():
        value = getattr(config, option, None)
        if value not in (None, False, {}, [], ()):
            raise IncompatibleExpertError(f"adapter {directory} uses {what} ({option}={value!r}): not supported")
    if getattr(config, "bias", "none") != "none":
        raise IncompatibleExpertError(f"adapter {directory} trains base biases (bias={config.bias!r}): not supported, only bias='none'")


def _head_name(name: str, config: object, directory: Path, base_state: Mapping[str, torch.Tensor]) -> str:
    """Base tensor name of a saved ``modules_to_save`` tensor (``classifier.weight``)."""
    name = re.sub(r"\.modules_to_save(\.[^.]+)?\.", ".", name)  # older layouts kept the wrapper's path
    module = name.rpartition(".")[0]
    saved = list(getattr(config, "modules_to_save", None) or [])
    if not any(module == m or module.endswith(f".{m}") for m in saved):
        raise IncompatibleExpertError(f"adapter {directory}: tensor {name!r} is neither a LoRA factor nor in modules_to_save {saved}")
    if name not in base_state:
        raise IncompatibleExpertError(f"adapter {directory}: modules_to_save tensor {name!r} is not a tensor of the base model")
    return name


def _factors(
    model: nn.Module, module_name: str, factors: Mapping[str, torch.Tensor], config: object, directory: Path
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(left, right, scale)`` of one adapted module, in its weight's orientation."""
    from peft.utils.other import get_pattern_key

    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise IncompatibleExpertError(
            f"adapter {directory} targets module {module_name!r}, which the base model ({type(model).__name__}) does not have"
        ) from None
    missing = sorted({"A", "B"} - set(factors))
    if missing:
        raise IncompatibleExpertError(f"adapter {directory}: module {module_name!r} lacks its lora_{missing[0]} factor")
    a, b = factors["A"], factors["B"]  # (r, fan_in), (fan_out, r)
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
        raise IncompatibleExpertError(
            f"adapter {directory}: module {module_name!r} has LoRA factors A {tuple(a.shape)}, B {tuple(b.shape)}: "
            "not a 2-D low-rank pair (convolution LoRA is not supported)"
        )
    left, right, expected = _orient(module, module_name, a, b, directory)
    weight = getattr(module, "weight", None)
    if weight is None or tuple(weight.shape) != expected:
        got = None if weight is None else tuple(weight.shape)
        raise IncompatibleExpertError(
            f"adapter {directory}: module {module_name!r} gives a delta of shape {expected} "
            f"(A {tuple(a.shape)}, B {tuple(b.shape)}), the base's weight has shape {got}: "
            "was the adapter trained on another base model?"
        )
    configured_r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module_name), config.r)
    if configured_r != r:
        raise IncompatibleExpertError(
            f"adapter {directory}: module {module_name!r} has rank {r} in its weights, {configured_r} in its config"
        )
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module_name), config.lora_alpha)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return left, right, float(scale)


def _orient(
    module: nn.Module, module_name: str, a: torch.Tensor, b: torch.Tensor, directory: Path
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(left, right, weight shape)`` with ``ΔW = left @ right`` in the module's weight layout."""
    if isinstance(module, nn.Linear):
        return b, a, (b.shape[0], a.shape[1])  # ΔW = B A: (out, in)
    if isinstance(module, nn.Embedding) or _is_conv1d(module):
        return a.t(), b.t(), (a.shape[1], b.shape[0])  # ΔW = (B A)ᵀ = Aᵀ Bᵀ: (in|num, out|dim)
    raise IncompatibleExpertError(
        f"adapter {directory}: module {module_name!r} is a {type(module).__name__}; "
        "LoRA on nn.Linear, transformers Conv1D and nn.Embedding is supported"
    )


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain nn.Module bases
        return False
    return isinstance(module, Conv1D)


def _check_heads(read: Mapping[str, LoraAdapter], heads: Sequence[str], base_state: Mapping[str, torch.Tensor]) -> None:
    for name in heads:
        if name not in base_state:
            raise AdamergeError(f"head tensor {name!r} is not a tensor of the base model")
    for task, adapter in read.items():
        clash = sorted(set(adapter.factors) & set(heads))
        if clash:
            raise IncompatibleExpertError(
                f"adapter {adapter.directory} ({task}) puts LoRA on {clash[0]!r}, which is task-specific "
                "(a head or another adapter's modules_to_save): it cannot be both merged and kept per task"
            )


def _read_dense(
    base_state: Mapping[str, torch.Tensor],
    dense: Mapping[str, StateSource],
    order: Sequence[str],
    names: Sequence[str],
    head_names: Sequence[str],
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``{name: (Kd, *shape)}`` dense task vectors (Kd: dense experts, in ``order``) and their heads."""
    dense_tasks = [t for t in order if t in dense]
    rows = {n: torch.empty((len(dense_tasks), *base_state[n].shape), dtype=dtype) for n in names} if dense_tasks else {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for j, task in enumerate(dense_tasks):
        source = dense[task]
        state = source() if callable(source) else source
        check_expert_keys(base_state, state, task, head_names)
        for name in names:
            rows[name][j] = task_difference(state[name], base_state[name])
        heads[task] = {n: state[n].detach().clone() for n in head_names}
        del state
    return rows, heads


def _build_vectors(
    base_state: Mapping[str, torch.Tensor],
    order: Sequence[str],
    read: Mapping[str, LoraAdapter],
    dense_rows: Mapping[str, torch.Tensor],
    names: Sequence[str],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor | FactoredDelta]:
    """Per merged tensor: a plain ``(K, *shape)`` if all K experts change it densely, else a FactoredDelta."""
    dense_tasks = [k for k, t in enumerate(order) if t not in read]
    vectors: dict[str, torch.Tensor | FactoredDelta] = {}
    for name in names:
        factors = [LowRankFactor(k, *read[t].factors[name]) for k, t in enumerate(order) if t in read and name in read[t].factors]
        rows = dense_rows.get(name)
        keep = [j for j in range(len(dense_tasks)) if bool(rows[j].any())] if rows is not None else []
        if not factors and not keep:
            continue  # no adapter targets it, no dense expert changes it: not merged
        if not factors and len(keep) == len(order):
            vectors[name] = rows  # every expert dense: the plain (K, *shape) fast path
            continue
        kept_rows = rows[keep] if keep else None  # (Kd', *shape)
        vectors[name] = FactoredDelta(base_state[name].shape, len(order), [dense_tasks[j] for j in keep], kept_rows, factors, dtype)
    if not vectors:
        raise AdamergeError("the experts change no tensor of the base model: nothing to merge")
    return vectors


def _collect_heads(
    order: Sequence[str],
    read: Mapping[str, LoraAdapter],
    dense_heads: Mapping[str, Mapping[str, torch.Tensor]],
    head_names: Sequence[str],
    base_state: Mapping[str, torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    if not head_names:
        return {}
    heads = {}
    for task in order:
        own = read[task].heads if task in read else dense_heads[task]
        heads[task] = {n: (own[n] if n in own else base_state[n]).detach().clone() for n in head_names}
    return heads


def expert_state_dict(
    model: nn.Module,
    task_vectors: TaskVectors,
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    task: str,
) -> dict[str, torch.Tensor]:
    """The full state dict of one expert alone, ``θ_0 + τ_task`` plus its head (one tensor densified at a time).

    For rebuilding an expert (evaluation, Expert Merging's targets): :func:`expert_alone`.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in task_vectors.names:
        state[name] = (state[name].float() + task_vectors.task_delta(name, task).float()).to(state[name].dtype)
    state.update({k: v.detach().clone() for k, v in heads.get(task, {}).items()})
    return state


def expert_alone(model: nn.Module, task_vectors: TaskVectors, heads: Mapping[str, Mapping[str, torch.Tensor]], task: str) -> nn.Module:
    """Expert ``task`` alone, in eval mode: a copy of the base holding :func:`expert_state_dict`
    (tied parameters stay tied; a head of another size replaces the base's)."""
    import copy

    from adamerge.core.merged_model import load_state_in_place

    alone = copy.deepcopy(model)
    load_state_in_place(alone, expert_state_dict(model, task_vectors, heads, task))
    return alone.eval()
