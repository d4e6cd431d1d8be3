"""Experts given as plain state-dict files (``.pt/.pth/.bin/.safetensors``) over an architecture
spec (``torchvision:NAME``, ``open_clip:NAME``, ``package.module:factory``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.core.task_vectors import TaskVectors, check_expert_keys, missing_batch_counters, with_batch_counters
from adamerge.data.image_preprocessing import model_metadata
from adamerge.errors import AdamergeError, CheckpointError
from adamerge.sources.architectures import build_architecture
from adamerge.sources.base import ExpertSet
from adamerge.storage.checkpoints import load_state_dict

logger = logging.getLogger(__name__)


def parse_base_spec(spec: str) -> tuple[str, Path]:
    """Split ``ARCH@WEIGHTS`` (e.g. ``torchvision:mobilenet_v2@base.pth``)."""
    arch, sep, weights = spec.rpartition("@")
    if not sep or not arch or not weights:
        raise AdamergeError(f"--base {spec!r}: expected ARCH@WEIGHTS, e.g. torchvision:mobilenet_v2@base.pth")
    return arch, Path(weights)


def merged_tensor_names(model: nn.Module, head_names: set[str], batchnorm: str) -> list[str]:
    """Float parameters (and float buffers under the ``merge`` BatchNorm policy), heads excluded."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point() and n not in head_names]
    if batchnorm == "merge":
        names += [n for n, b in model.named_buffers() if b.is_floating_point() and n not in head_names]
    return names


def select_heads(state_names: list[str], head_pattern: str | None) -> list[str]:
    """Names matched by the head regex.

    Raises:
        AdamergeError: an invalid regex, or one that matches no tensor or every tensor of the model
            (nothing would be left to merge).
    """
    if not head_pattern:
        return []
    try:
        pattern = re.compile(head_pattern)
    except re.error as error:
        raise AdamergeError(f"--head-pattern {head_pattern!r} is not a valid regex: {error}") from None
    heads = [n for n in state_names if pattern.search(n)]
    if not heads:
        raise AdamergeError(f"--head-pattern {head_pattern!r} matches no tensor of the model (e.g. {state_names[:4]})")
    if len(heads) == len(state_names):
        raise AdamergeError(
            f"--head-pattern {head_pattern!r} matches all {len(heads)} tensors of the model: nothing would be "
            f"left to merge; match the task-specific heads only (e.g. '^classifier\\.')"
        )
    return heads


def load_base(model: nn.Module, path: Path, trust_pickles: bool = False) -> dict[str, torch.Tensor]:
    """Load the base weights file into ``model`` (strict), naming any key or shape that differs.

    Missing BatchNorm ``num_batches_tracked`` buffers (files of PyTorch before 0.4.1, which PyTorch's
    own strict loading accepts) are set to 0, as PyTorch sets them.
    """
    state = load_state_dict(path, trust_pickles=trust_pickles)
    expected = model.state_dict()
    check_state_fits(expected, state, f"base weights {path}", f"do not fit {type(model).__name__}")
    model.load_state_dict(with_batch_counters(expected, state), strict=True)
    return model.state_dict()


def check_state_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str, target: str) -> None:
    """Refuse a state dict whose keys or shapes differ from ``expected``, naming keys and shapes.

    Whatever ``nn.Module.load_state_dict(strict=True)`` accepts is accepted: BatchNorm
    ``num_batches_tracked`` buffers may be missing (see
    :func:`adamerge.core.task_vectors.missing_batch_counters`).

    Args:
        expected: the architecture's own state dict.
        state: the loaded one.
        what: the file, as the message names it (``"base weights PATH"``).
        target: what a key mismatch says of it (``"do not fit ResNet"``).
    """
    counters = set(missing_batch_counters(expected, state))
    missing = [k for k in expected if k not in state and k not in counters]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{what} {target}: {len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})")
    for name, tensor in expected.items():
        if name in state and state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{what}: tensor {name!r} has shape {tuple(state[name].shape)}, the architecture expects {tuple(tensor.shape)}"
            )


def load_file_experts(
    base_arch: str,
    base_weights: str | Path,
    experts: Mapping[str, str | Path],
    head_pattern: str | None = None,
    batchnorm: str = "reestimate",
    dtype: torch.dtype = torch.float32,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickles: bool = False,
) -> ExpertSet:
    """Build the base model and the experts' task vectors from state-dict files.

    Args:
        base_arch: architecture spec, see :func:`adamerge.sources.architectures.build_architecture`.
        base_weights: pretrained weights file of that architecture.
        experts: ``{task: weights file}`` of fine-tuned experts (same tensor names as the base;
            head tensors may differ in shape).
        head_pattern: regex of task-specific tensors, never merged (e.g. ``^classifier\\.``).
        batchnorm: BatchNorm policy (``merge`` also merges float buffers).
        dtype: storage dtype of the task vectors.
        arch_kwargs: keyword arguments of the architecture constructor.
        trust_pickles: also read files holding a whole pickled module (``torch.save(model)``) by
            unpickling them, which runs code from the file (see
            :func:`adamerge.storage.checkpoints.load_state_dict`); the base and every expert.

    Raises:
        AdamergeError: any file, key, shape, dtype or value problem, naming the file and tensor; a
            head pattern that leaves no tensor to merge.
    """
    if not experts:
        raise AdamergeError("no experts given: pass --experts NAME=PATH [NAME=PATH ...]")
    model = build_architecture(base_arch, arch_kwargs)
    base_state = load_base(model, Path(base_weights), trust_pickles)
    head_names = select_heads(list(base_state), head_pattern)
    names = merged_tensor_names(model, set(head_names), batchnorm)
    if not names:
        merged = "float parameters and buffers" if batchnorm == "merge" else "float parameters"
        raise AdamergeError(
            f"--head-pattern {head_pattern!r} matches {len(head_names)} of the {len(base_state)} tensors of the "
            f"model, among them every one that would be merged ({merged}): nothing is left to merge; match the "
            f"task-specific heads only (e.g. '^classifier\\.')"
            if head_names
            else f"the base {base_arch} has no float parameter to merge"
        )
    heads: dict[str, dict[str, torch.Tensor]] = {}

    def reader(task: str, path: Path):
        def read() -> dict[str, torch.Tensor]:
            try:
                state = load_state_dict(path, trust_pickles=trust_pickles)
            except CheckpointError as error:
                raise CheckpointError(f"expert {task!r}: {error}") from None
            check_expert_keys(base_state, state, f"{task} ({path})", head_names)
            state = with_batch_counters(base_state, state)
            heads[task] = {n: state[n].clone() for n in head_names}
            return state

        return read

    task_vectors = TaskVectors.from_states(base_state, {task: reader(task, Path(path)) for task, path in experts.items()}, names, dtype)
    if not heads or not head_names:
        heads = {}
    logger.info("task vectors: %s", task_vectors.extra_repr())
    sources = {
        "base": f"{base_arch}@{Path(base_weights).resolve()}",
        "experts": {task: str(Path(path).resolve()) for task, path in experts.items()},
        "head_pattern": head_pattern,
    }
    paths = {task: Path(path) for task, path in experts.items()}
    return ExpertSet(
        model,
        task_vectors,
        heads,
        sources,
        expert_model=lambda task: load_expert_module(base_arch, paths[task], arch_kwargs, trust_pickles),
        image_preprocessing=model_metadata(base_arch, model),
    )


def load_expert_module(arch: str, path: str | Path, arch_kwargs: Mapping[str, Any] | None = None, trust_pickles: bool = False) -> nn.Module:
    """An expert as a plain module of the architecture, its own weights and statistics loaded
    (head tensors of another shape than the architecture's replace its parameters).

    Args:
        arch: architecture spec.
        path: the expert's weights file.
        arch_kwargs: keyword arguments of the architecture constructor.
        trust_pickles: read a whole pickled module too, as :func:`load_file_experts` does.

    Missing BatchNorm ``num_batches_tracked`` buffers are set to 0, as in :func:`load_base`.
    """
    from adamerge.core.merged_model import load_state_in_place

    model = build_architecture(arch, arch_kwargs)
    load_state_in_place(model, with_batch_counters(model.state_dict(), load_state_dict(path, trust_pickles=trust_pickles)))
    return model
