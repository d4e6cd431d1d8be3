"""Model inputs of any modality: an image tensor ``(B, 3, H, W)`` or a dict of tensors (a
tokenizer's ``{"input_ids", "attention_mask", ...}``), and model outputs that may be a tensor or a
Hugging Face ``ModelOutput`` with ``logits``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from adamerge.errors import AdamergeError

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def input_batch_size(inputs: Inputs) -> int:
    """Number of samples in ``inputs`` (first dimension of the tensor, or of the dict's first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                return int(value.shape[0])
    raise AdamergeError(f"model inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")


def move_inputs(inputs: Inputs, device: torch.device | str) -> Inputs:
    """``inputs`` on ``device`` (every tensor of a dict)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def as_logits(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, ``output.logits`` or ``output[0]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise AdamergeError(f"cannot find logits in the model's output of type {type(output).__name__}")


def call_module(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Run ``module`` on ``inputs`` (a dict becomes keyword arguments) and return its logits."""
    if isinstance(inputs, Mapping):
        return as_logits(module(**inputs))
    return as_logits(module(inputs))


def call_functional(module: nn.Module, tensors: Mapping[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """:func:`torch.func.functional_call` of ``module`` with ``tensors`` replacing its own, on
    ``inputs`` (a dict becomes keyword arguments); returns the logits."""
    if isinstance(inputs, Mapping):
        output = functional_call(module, tensors, (), dict(inputs), strict=False, tie_weights=True)
    else:
        output = functional_call(module, tensors, (inputs,), strict=False, tie_weights=True)
    return as_logits(output)
