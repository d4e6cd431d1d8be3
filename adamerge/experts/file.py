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

from adamerge.architectures import build_architecture
from adamerge.checkpoints import load_state_dict
from adamerge.errors import AdamergeError, CheckpointError
from adamerge.experts.base import ExpertSet
from adamerge.task_vectors import TaskVectors, check_expert_keys

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
    """Names matched by the head regex; a pattern that matches nothing is an error."""
    if not head_pattern:
        return []
    try:
        pattern = re.compile(head_pattern)
    except re.error as error:
        raise AdamergeError(f"--head-pattern {head_pattern!r} is not a valid regex: {error}") from None
    heads = [n for n in state_names if pattern.search(n)]
    if not heads:
        raise AdamergeError(f"--head-pattern {head_pattern!r} matches no tensor of the model (e.g. {state_names[:4]})")
    return heads


def load_base(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Load the base weights file into ``model`` (strict), naming any key or shape that differs."""
    state = load_state_dict(path)
    check_state_fits(model.state_dict(), state, f"base weights {path}", f"do not fit {type(model).__name__}")
    model.load_state_dict(state, strict=True)
    return model.state_dict()


def check_state_fits(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str, target: str
) -> None:
    """Refuse a state dict whose keys or shapes differ from ``expected``, naming keys and shapes.

    Args:
        expected: the architecture's own state dict.
        state: the loaded one.
        what: the file, as the message names it (``"base weights PATH"``).
        target: what a key mismatch says of it (``"do not fit ResNet"``).
    """
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise CheckpointError(
            f"{what} {target}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]})"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{what}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the architecture expects {tuple(tensor.shape)}"
            )


def load_file_experts(
    base_arch: str,
    base_weights: str | Path,
    experts: Mapping[str, str | Path],
    head_pattern: str | None = None,
    batchnorm: str = "reestimate",
    dtype: torch.dtype = torch.float32,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> ExpertSet:
    """Build the base model and the experts' task vectors from state-dict files.

    Args:
        base_arch: architecture spec, see :func:`adamerge.architectures.build_architecture`.
        base_weights: pretrained weights file of that architecture.
        experts: ``{task: weights file}`` of fine-tuned experts (same tensor names as the base;
            head tensors may differ in shape).
        head_pattern: regex of task-specific tensors, never merged (e.g. ``^classifier\\.``).
        batchnorm: BatchNorm policy (``merge`` also merges float buffers).
        dtype: storage dtype of the task vectors.
        arch_kwargs: keyword arguments of the architecture constructor.

    Raises:
        AdamergeError: any file, key, shape or value problem, naming the file and tensor.
    """
    if not experts:
        raise AdamergeError("no experts given: pass --experts NAME=PATH [NAME=PATH ...]")
    model = build_architecture(base_arch, arch_kwargs)
    base_state = load_base(model, Path(base_weights))
    head_names = select_heads(list(base_state), head_pattern)
    names = merged_tensor_names(model, set(head_names), batchnorm)
    heads: dict[str, dict[str, torch.Tensor]] = {}

    def reader(task: str, path: Path):
        def read() -> dict[str, torch.Tensor]:
            try:
                state = load_state_dict(path)
            except CheckpointError as error:
                raise CheckpointError(f"expert {task!r}: {error}") from None
            check_expert_keys(base_state, state, f"{task} ({path})", head_names)
            heads[task] = {n: state[n].clone() for n in head_names}
            return state

        return read

    task_vectors = TaskVectors.from_states(
        base_state, {task: reader(task, Path(path)) for task, path in experts.items()}, names, dtype
    )
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
        expert_model=lambda task: load_expert_module(base_arch, paths[task], arch_kwargs),
    )


def load_expert_module(arch: str, path: str | Path, arch_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """An expert as a plain module of the architecture, its own weights and statistics loaded
    (head tensors of another shape than the architecture's replace its parameters)."""
    from adamerge.merged_model import assign_tensor

    model = build_architecture(arch, arch_kwargs)
    for name, tensor in load_state_dict(path).items():
        assign_tensor(model, name, tensor)
    return model
