"""Experts from Hugging Face transformers: ``--base hf:DIR`` and ``--experts NAME=hf:DIR``.

``DIR`` is a ``save_pretrained`` folder (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, sharded or not). The base is the pretrained encoder (e.g. an ``AutoModel``
with its tokenizer); every expert is an ``AutoModelForSequenceClassification`` fine-tuned from it
(each may have its own number of labels).

What is merged and what is not:

- the model to merge is the experts' task class (``AutoModelForSequenceClassification``) built from
  the first expert's config, holding the base's encoder weights (the base's keys are mapped under
  the model's ``base_model_prefix``, e.g. ``bert.``);
- tensors of the task model that the base lacks (``classifier.*``, and e.g. ``pooler.*`` when the
  base was saved without it) are each task's own head, never merged (``--head-pattern`` overrides
  the choice); every other float tensor gets a task vector ``τ_k = θ_k − θ_0``;
- the forward returns a ``SequenceClassifierOutput`` whose ``.logits`` MergedModel takes.

Export (:func:`export_hf`) writes ``model/`` (the merged encoder in the base's own ``AutoModel``
class + tokenizer) and ``tasks/<task>/`` (a complete ``AutoModelForSequenceClassification``:
merged encoder, the task's head, its ``id2label``, + tokenizer), each loadable by transformers
alone.

``peft:DIR`` experts (LoRA adapters) are handed to :func:`_load_peft_experts`; a base whose config
records a causal-LM architecture to :mod:`adamerge.sources.hf_causal_lm`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import AdamergeError, IncompatibleExpertError
from adamerge.sources.base import ExpertSet, SourceOptions
from adamerge.sources.file import merged_tensor_names, select_heads
from adamerge.sources.transformers_files import (
    PEFT_PREFIX,
    hf_dir,
    is_causal_lm,
    load_pretrained,
    load_tokenizer,
    peft_dir,
    quiet_transformers,
    read_config,
    read_expert_configs,
    source_references,
    task_auto_class,
    without_weight_init,
)
from adamerge.storage.checkpoints import check_finite_tensors
from adamerge.storage.output_folder import inside
from adamerge.task_types import CLASSIFICATION, TaskType

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- keys


def encoder_prefix(model: nn.Module) -> str:
    """``"bert."`` for a task model whose encoder sits at ``model.bert`` ("" for an encoder itself)."""
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def encoder_to_task_keys(encoder_state: Mapping[str, torch.Tensor], task_keys: set[str], prefix: str) -> dict[str, str]:
    """``{task model key: encoder key}`` for the encoder tensors the task model holds."""
    mapping = {}
    for key in encoder_state:
        if f"{prefix}{key}" in task_keys:
            mapping[f"{prefix}{key}"] = key
        elif key in task_keys:  # a base saved as a task model keeps the prefix
            mapping[key] = key
    return mapping


# ----------------------------------------------------------------------------- the source


def task_model_with_base(base_path: Path, config: Any, task_type: TaskType = CLASSIFICATION) -> tuple[nn.Module, str, dict[str, str]]:
    """The task model (the task type's auto-class of ``config``) holding the base's encoder.

    Returns:
        ``(model, prefix, from_base)``: the model in eval mode, its encoder prefix (``"bert."``), and
        ``{task-model key: base key}`` of the tensors loaded from the base.

    Raises:
        IncompatibleExpertError: no base tensor fits the model, or one has another shape.
    """
    from transformers import AutoModel

    encoder, not_in_base = load_pretrained(AutoModel, base_path, "--base")
    encoder_state = {k: v for k, v in encoder.state_dict().items() if k not in not_in_base}
    del encoder
    with quiet_transformers():
        model = task_auto_class(task_type).from_config(config, dtype=torch.float32).eval()
    prefix = encoder_prefix(model)
    task_state = model.state_dict()
    from_base = encoder_to_task_keys(encoder_state, set(task_state), prefix)
    if not from_base:
        raise IncompatibleExpertError(
            f"--base {base_path}: none of its tensors fits {type(model).__name__} "
            f"(e.g. base {list(encoder_state)[:2]}, model {list(task_state)[:2]})"
        )
    for key, source in from_base.items():
        if encoder_state[source].shape != task_state[key].shape:
            raise IncompatibleExpertError(
                f"--base {base_path}: tensor {source!r} has shape {tuple(encoder_state[source].shape)}, "
                f"the experts' {type(model).__name__} expects {tuple(task_state[key].shape)}"
            )
    model.load_state_dict({key: encoder_state[source] for key, source in from_base.items()}, strict=False)
    return model, prefix, from_base


def load_hf_experts(base: str, experts: Mapping[str, str], options: SourceOptions) -> ExpertSet:
    """The :class:`ExpertSet` of a Hugging Face base and its fine-tuned sequence classifiers.

    Args:
        base: ``hf:DIR`` of the pretrained model (``AutoModel`` weights + tokenizer).
        experts: ``{task: "hf:DIR"}`` of ``AutoModelForSequenceClassification`` fine-tunes (a bare
            ``DIR`` works too), or ``{task: "peft:DIR"}`` of adapters.
        options: ``head_pattern`` (default: tensors the base lacks), ``dtype`` of the task vectors,
            ``batchnorm`` policy.

    Returns:
        A text :class:`ExpertSet`: the task model holding θ_0, the task vectors of its encoder, each
        task's head, the base's tokenizer, the experts alone and the transformers export.

    Raises:
        AdamergeError: missing folders or files, corrupt weights, an expert of another architecture
            or vocabulary, a tensor of another shape (each named).
    """
    if not experts:
        raise AdamergeError("no experts given: pass --experts NAME=hf:DIR [NAME=hf:DIR ...]")
    base_path = hf_dir(base, "--base")
    if is_causal_lm(read_config(base_path, "--base")):
        from adamerge.sources.hf_causal_lm import load_causal_lm_experts

        return load_causal_lm_experts(base_path, experts, options)
    if any(str(ref).startswith(PEFT_PREFIX) for ref in experts.values()):
        return _load_peft_experts(base_path, experts, options)
    auto_class = task_auto_class(options.task_type)

    base_config = read_config(base_path, "--base")
    tokenizer = load_tokenizer(base_path, "--base")
    paths = {task: hf_dir(str(ref), f"expert {task!r}") for task, ref in experts.items()}
    configs = read_expert_configs(paths, base_config, tokenizer)

    first = next(iter(configs))
    model, prefix, from_base = task_model_with_base(base_path, configs[first], options.task_type)
    task_state = model.state_dict()
    head_names = _head_names(list(task_state), set(from_base), options.head_pattern, base_path)
    persistent = set(task_state)
    names = [n for n in merged_tensor_names(model, set(head_names), options.batchnorm) if n in persistent]
    base_state = model.state_dict()
    heads: dict[str, dict[str, torch.Tensor]] = {}

    def read_expert(task: str) -> dict[str, torch.Tensor]:
        path = paths[task]
        expert, missing = load_pretrained(auto_class, path, f"expert {task!r}")
        state = expert.state_dict()
        lacking = sorted(n for n in missing if n in persistent)
        if lacking:
            raise IncompatibleExpertError(
                f"expert {task!r} ({path}) lacks {len(lacking)} tensor(s) of {type(expert).__name__}, e.g. {lacking[:3]} "
                f"(save the fine-tuned AutoModelForSequenceClassification with save_pretrained)"
            )
        foreign = sorted(set(base_state) ^ set(state))
        if foreign:
            raise IncompatibleExpertError(f"expert {task!r} ({path}): tensor names differ from the base model's, e.g. {foreign[:3]}")
        check_finite_tensors({n: state[n] for n in [*names, *head_names]}, f"expert {task!r} ({path})")
        heads[task] = {n: state[n].detach().clone() for n in head_names}
        return state

    task_vectors = TaskVectors.from_states(base_state, {task: partial(read_expert, task) for task in paths}, names, options.dtype)
    if heads:  # the model's own head: the first task's (never used in a merged forward)
        model.load_state_dict(heads[first], strict=False)
    logger.info("task vectors: %s; heads: %s", task_vectors.extra_repr(), head_names)
    sources = source_references(base_path, paths, {}, options.head_pattern)
    return ExpertSet(
        model,
        task_vectors,
        heads,
        sources,
        modality="text",
        expert_model=lambda task: load_pretrained(auto_class, paths[task], f"expert {task!r}")[0],
        export=partial(export_hf, base_path=base_path, configs=configs, tokenizer=tokenizer, prefix=prefix, auto_class=auto_class),
        tokenizer=tokenizer,
        num_classes={task: int(config.num_labels) for task, config in configs.items()},
        task_type=options.task_type,
    )


def _head_names(task_keys: list[str], from_base: set[str], head_pattern: str | None, base_path: Path) -> list[str]:
    """Task-specific tensors: ``head_pattern``'s matches, or the task model's tensors the base lacks."""
    if head_pattern:
        heads = select_heads(task_keys, head_pattern)
        lacking = [n for n in task_keys if n not in from_base and n not in heads]
        if lacking:
            raise IncompatibleExpertError(
                f"--base {base_path} lacks tensor(s) {lacking[:3]} that --head-pattern {head_pattern!r} does not "
                "cover: they have no pretrained value to merge from"
            )
        return heads
    heads = [n for n in task_keys if n not in from_base]
    if not heads:
        raise IncompatibleExpertError(
            f"--base {base_path} holds every tensor of the task model (a classifier too?): pass --head-pattern "
            "(e.g. '^classifier\\.') to name the task-specific tensors"
        )
    return heads


def _load_peft_experts(base_path: Path, experts: Mapping[str, str], options: SourceOptions) -> ExpertSet:
    """Experts given as ``peft:DIR`` LoRA adapters over the ``hf:`` base, possibly mixed with
    ``hf:DIR`` full fine-tunes (see :func:`adamerge.sources.peft.load_lora_experts`).

    The adapters are read with peft's own API and kept low-rank (never K dense deltas); each
    adapter's ``modules_to_save`` (the sequence-classification head) is its task's head. The task
    model is the base's ``AutoModelForSequenceClassification`` (a full fine-tune's config if one is
    given); each task's number of labels comes from its own head.
    """
    from adamerge.sources.peft import expert_alone, load_lora_experts

    base_config = read_config(base_path, "--base")
    tokenizer = load_tokenizer(base_path, "--base")
    adapters = {t: peft_dir(str(ref), t) for t, ref in experts.items() if str(ref).startswith(PEFT_PREFIX)}
    dense_paths = {t: hf_dir(str(ref), f"expert {t!r}") for t, ref in experts.items() if t not in adapters}
    dense_configs = read_expert_configs(dense_paths, base_config, tokenizer)
    model_config = next(iter(dense_configs.values()), None) or copy.deepcopy(base_config)
    model, prefix, from_base = task_model_with_base(base_path, model_config, options.task_type)
    task_keys = list(model.state_dict())
    head_names = _head_names(task_keys, set(from_base), options.head_pattern, base_path) if dense_paths else []
    if options.head_pattern and not dense_paths:
        head_names = select_heads(task_keys, options.head_pattern)

    def dense_reader(task: str) -> dict[str, torch.Tensor]:
        expert, _ = load_pretrained(task_auto_class(options.task_type), dense_paths[task], f"expert {task!r}")
        return expert.state_dict()

    task_vectors, heads = load_lora_experts(
        model,
        adapters,
        {task: partial(dense_reader, task) for task in dense_paths},
        tasks=list(experts),
        head_names=head_names,
        dtype=options.dtype,
        base_name=str(base_path),
    )
    configs = {task: dense_configs.get(task) or _config_for_head(base_config, model, heads.get(task, {})) for task in experts}
    logger.info("task vectors: %s; heads: %s", task_vectors.extra_repr(), sorted(next(iter(heads.values()), {})))

    def expert_model(task: str) -> nn.Module:
        if task in dense_paths:
            return load_pretrained(task_auto_class(options.task_type), dense_paths[task], f"expert {task!r}")[0]
        alone = expert_alone(model, task_vectors, heads, task)
        alone.config.num_labels = configs[task].num_labels
        return alone

    sources = source_references(base_path, dense_paths, adapters, options.head_pattern)
    return ExpertSet(
        model,
        task_vectors,
        heads,
        sources,
        modality="text",
        expert_model=expert_model,
        export=partial(
            export_hf,
            base_path=base_path,
            configs=configs,
            tokenizer=tokenizer,
            prefix=prefix,
            auto_class=task_auto_class(options.task_type),
        ),
        tokenizer=tokenizer,
        num_classes={task: int(config.num_labels) for task, config in configs.items()},
        task_type=options.task_type,
    )


def _config_for_head(base_config: Any, model: nn.Module, head: Mapping[str, torch.Tensor]) -> Any:
    """The base config with the number of labels of ``head`` (the tensor shaped like the model's
    ``(num_labels, ...)`` classifier output)."""
    config = copy.deepcopy(base_config)
    labels = int(model.config.num_labels)
    state = model.state_dict()
    for name, tensor in head.items():
        if state[name].ndim == tensor.ndim and state[name].shape[0] == labels and tensor.ndim >= 1:
            config.num_labels = int(tensor.shape[0])
            break
    config.architectures = [type(model).__name__]
    return config


# ----------------------------------------------------------------------------- export


def export_hf(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    base_path: Path,
    configs: Mapping[str, Any],
    tokenizer: Any,
    prefix: str,
    auto_class: Any = None,
) -> dict[str, str]:
    """Write the merge as transformers folders (no adamerge needed to load them).

    - ``model/``: the merged encoder in the base's own ``AutoModel`` class, with the tokenizer
      (``AutoModel.from_pretrained(directory / "model")``); tensors the task model does not hold
      (e.g. a pooler the classifier does not use) keep the base's values;
    - ``tasks/<task>/``: the full ``AutoModelForSequenceClassification`` of each task (merged
      encoder, the task's head, its config and ``id2label``), with the tokenizer.

    Args:
        directory: the (staging) output folder.
        state: merged state dict in the task model's keys.
        heads: ``{task: {name: tensor}}``.
        base_path: the base's folder (its class and the tensors the task model lacks).
        configs: each task's expert config.
        tokenizer: the base's tokenizer.
        prefix: the task model's encoder prefix (``"bert."``), see :func:`encoder_prefix`.
        auto_class: the task models' transformers auto-class (default: sequence classification).

    Returns:
        ``{what: path relative to directory}``.
    """
    from transformers import AutoModel

    auto_class = auto_class or task_auto_class(CLASSIFICATION)
    directory = Path(directory)
    encoder, _ = load_pretrained(AutoModel, base_path, "--base")
    with quiet_transformers():
        mapping = encoder_to_task_keys(encoder.state_dict(), set(state), prefix)
        encoder.load_state_dict({source: state[key].detach() for key, source in mapping.items()}, strict=False)
        encoder.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    files = {"model": "model"}
    del encoder
    for task, config in configs.items():
        with quiet_transformers():
            with without_weight_init():  # every tensor is loaded below (strict)
                model = auto_class.from_config(config, dtype=torch.float32)
            tensors = {k: v.detach() for k, v in state.items()} | {k: v.detach() for k, v in heads.get(task, {}).items()}
            own = model.state_dict()
            missing = [k for k in own if k not in tensors]
            if missing:
                raise AdamergeError(f"export of task {task!r}: no merged value for tensor(s) {missing[:3]}")
            model.load_state_dict({k: tensors[k] for k in own}, strict=True)
            model.eval().save_pretrained(inside(directory, "tasks", task))
        tokenizer.save_pretrained(inside(directory, "tasks", task))
        files[f"task/{task}"] = f"tasks/{task}"
    logger.info("exported transformers folders: %s", ", ".join(files.values()))
    return files
