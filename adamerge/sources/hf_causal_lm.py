"""Causal language models from Hugging Face transformers: one merged LM serves every task.

``--base hf:DIR`` is a pretrained ``AutoModelForCausalLM`` folder (``save_pretrained``, with its
tokenizer); ``--experts NAME=hf:DIR`` are full fine-tunes of it and ``NAME=peft:DIR`` LoRA
adapters over it, mixed freely (LoRA stays factored, :mod:`adamerge.sources.peft`). The source is
chosen when the base's config records a causal-LM architecture (``LlamaForCausalLM``,
``Qwen2ForCausalLM``, ``GPT2LMHeadModel``, ...).

What is merged: every float parameter (embeddings, every decoder block, the final norm, the LM
head). There are no per-task heads (``--head-pattern`` may still keep tensors per task). A tied LM
head is the input embedding itself: it is one parameter, gets one task vector, and the export
keeps the tie. Tasks are language modelling (:class:`~adamerge.task_types.TokenLevel` with
``next_token=True``): position ``t`` predicts token ``t + 1`` and padding is never scored.

Export (:func:`export_causal_lm`): ``model/``, a ``save_pretrained`` folder of the base's class
holding the merged weights, with the tokenizer: ``AutoModelForCausalLM.from_pretrained`` loads it
without adamerge.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.core.merged_model import tied_aliases
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
    without_weight_init,
)
from adamerge.storage.checkpoints import check_finite_tensors
from adamerge.task_types import LANGUAGE_MODELLING

logger = logging.getLogger(__name__)


def load_causal_lm_experts(base_path: Path, experts: Mapping[str, str], options: SourceOptions) -> ExpertSet:
    """The :class:`ExpertSet` of a causal-LM base and its fine-tunes / LoRA adapters.

    Args:
        base_path: the base's ``save_pretrained`` folder (an ``AutoModelForCausalLM`` with tokenizer).
        experts: ``{task: "hf:DIR" | "peft:DIR"}``.
        options: ``dtype`` of the task vectors; ``head_pattern`` (default: nothing per task).

    Raises:
        AdamergeError: a base or expert that is not a causal LM, of another architecture or
            vocabulary (the differing tokens are named), missing or non-finite tensors.
    """
    from transformers import AutoModelForCausalLM

    from adamerge.sources.peft import load_lora_experts

    base_config = read_config(base_path, "--base")
    tokenizer = load_tokenizer(base_path, "--base")
    adapters = {t: peft_dir(str(ref), t) for t, ref in experts.items() if str(ref).startswith(PEFT_PREFIX)}
    dense_paths = {t: hf_dir(str(ref), f"expert {t!r}") for t, ref in experts.items() if t not in adapters}
    configs = read_expert_configs(dense_paths, base_config, tokenizer)
    for task, config in configs.items():
        if not is_causal_lm(config):
            raise IncompatibleExpertError(
                f"expert {task!r} ({dense_paths[task]}) is a {', '.join(config.architectures or ['?'])}, "
                f"the base a causal language model ({', '.join(base_config.architectures)})"
            )
    model, missing = load_pretrained(AutoModelForCausalLM, base_path, "--base")
    tied = tied_aliases(model)
    lacking = sorted(n for n in missing if n in dict(model.named_parameters()))
    if lacking:
        raise IncompatibleExpertError(
            f"--base {base_path} lacks {len(lacking)} tensor(s) of {type(model).__name__}, e.g. {lacking[:3]}: "
            "save the pretrained causal LM with its LM head (AutoModelForCausalLM.save_pretrained)"
        )
    head_names = select_heads([n for n, _ in model.named_parameters()], options.head_pattern) if options.head_pattern else []
    names = merged_tensor_names(model, set(head_names), options.batchnorm)
    base_state = model.state_dict()

    def read_expert(task: str) -> dict[str, torch.Tensor]:
        path = dense_paths[task]
        expert, absent = load_pretrained(AutoModelForCausalLM, path, f"expert {task!r}")
        state = expert.state_dict()
        absent = sorted(n for n in absent if n in names and n not in tied)
        if absent:
            raise IncompatibleExpertError(f"expert {task!r} ({path}) lacks tensor(s) {absent[:3]} of {type(expert).__name__}")
        foreign = sorted(set(base_state) ^ set(state))
        if foreign:
            raise IncompatibleExpertError(f"expert {task!r} ({path}): tensor names differ from the base's, e.g. {foreign[:3]}")
        check_finite_tensors({n: state[n] for n in [*names, *head_names]}, f"expert {task!r} ({path})")
        return state

    readers = {task: partial(read_expert, task) for task in dense_paths}
    if adapters:
        task_vectors, heads = load_lora_experts(
            model, adapters, readers, tasks=list(experts), head_names=head_names, dtype=options.dtype, base_name=str(base_path)
        )
    else:
        heads = {}

        def keep_heads(task: str) -> dict[str, torch.Tensor]:
            state = readers[task]()
            if head_names:
                heads[task] = {n: state[n].detach().clone() for n in head_names}
            return state

        task_vectors = TaskVectors.from_states(base_state, {t: partial(keep_heads, t) for t in dense_paths}, names, options.dtype)
    logger.info(
        "causal LM %s: task vectors %s%s",
        type(model).__name__,
        task_vectors.extra_repr(),
        f"; tied: {', '.join(f'{a} = {n}' for a, n in tied.items())}" if tied else "",
    )
    sources = source_references(base_path, dense_paths, adapters, options.head_pattern)
    vocabulary = int(model.get_output_embeddings().weight.shape[0])
    return ExpertSet(
        model,
        task_vectors,
        heads,
        sources,
        modality="text",
        expert_model=partial(_expert_alone, model=model, task_vectors=task_vectors, heads=heads, dense_paths=dense_paths),
        export=partial(export_causal_lm, base_config=base_config, tokenizer=tokenizer),
        tokenizer=tokenizer,
        num_classes={task: vocabulary for task in experts},
        task_type=dataclasses.replace(LANGUAGE_MODELLING, keep_logits=takes_logits_to_keep(model)),
        default_granularity="block",  # one λ per expert and decoder block, embeddings, final norm and head
    )


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward computes the logits of given positions only (transformers'
    ``logits_to_keep``, a 1-D tensor of positions: the causal LMs of transformers 4.50 on)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _expert_alone(
    task: str,
    *,
    model: nn.Module,
    task_vectors: TaskVectors,
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    dense_paths: Mapping[str, Path],
) -> nn.Module:
    """Expert ``task`` alone: its own folder for a full fine-tune, the base plus its adapter's delta for LoRA."""
    from transformers import AutoModelForCausalLM

    from adamerge.sources.peft import expert_alone

    if task in dense_paths:
        return load_pretrained(AutoModelForCausalLM, dense_paths[task], f"expert {task!r}")[0]
    return expert_alone(model, task_vectors, heads, task)


def export_causal_lm(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    base_config: Any,
    tokenizer: Any,
) -> dict[str, str]:
    """Write the merged LM as ``model/`` (``save_pretrained`` of the base's class, with the tokenizer).

    Args:
        directory: the (staging) output folder.
        state: the merged state dict in the model's keys (tied aliases hold the merged value).
        heads: ``{task: {name: tensor}}``; with per-task tensors each task also gets
            ``tasks/<task>/``, the merged model with that task's tensors.

    Returns:
        ``{what: path relative to directory}``.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    targets = {"model": (directory / "model", {})} | {
        f"task/{task}": (directory / "tasks" / task, tensors) for task, tensors in heads.items()
    }
    files = {}
    for what, (folder, own) in targets.items():
        with quiet_transformers():
            with without_weight_init():  # every tensor is loaded below (strict)
                model = AutoModelForCausalLM.from_config(base_config, dtype=torch.float32)
            tensors = {k: v.detach() for k, v in state.items()} | {k: v.detach() for k, v in own.items()}
            expected = model.state_dict()
            missing = [k for k in expected if k not in tensors]
            if missing:
                raise AdamergeError(f"export: no merged value for tensor(s) {missing[:3]}")
            model.load_state_dict({k: tensors[k] for k in expected}, strict=True)
            model.eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        files[what] = str(folder.relative_to(directory))
    logger.info("exported causal LM folders: %s", ", ".join(files.values()))
    return files
