"""Model inputs of any modality: an image tensor ``(B, 3, H, W)`` or a dict of tensors (a
tokenizer's ``{"input_ids", "attention_mask", ...}``), and model outputs that may be a tensor or a
Hugging Face ``ModelOutput`` with ``logits``.

Convolutional models run channels-last on the CPU where that is faster (:func:`uses_channels_last`:
every forward without gradients, and training steps of models with grouped convolutions). The
layout does not change what is computed, only the order of float additions.
"""

from __future__ import annotations

import weakref
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
    """Run ``module`` on ``inputs`` (a dict becomes keyword arguments) and return its logits
    (channels-last where :func:`uses_channels_last` says so)."""
    if uses_channels_last(module, inputs):
        return call_functional(module, {}, inputs)
    if isinstance(inputs, Mapping):
        return as_logits(module(**inputs))
    return as_logits(module(inputs))


def call_functional(module: nn.Module, tensors: Mapping[str, torch.Tensor], inputs: Inputs) -> torch.Tensor:
    """:func:`torch.func.functional_call` of ``module`` with ``tensors`` replacing its own, on
    ``inputs`` (a dict becomes keyword arguments); returns the logits.

    A convolutional model on the CPU runs channels-last (:func:`uses_channels_last`): the image
    batch and every 4-d weight, given or the module's own, are passed in that layout (copies,
    differentiable; the module and ``tensors`` are left as they are).
    """
    if uses_channels_last(module, inputs):
        tensors, inputs = channels_last_tensors(module, tensors), inputs.contiguous(memory_format=torch.channels_last)
    if isinstance(inputs, Mapping):
        output = functional_call(module, tensors, (), dict(inputs), strict=False, tie_weights=True)
    else:
        output = functional_call(module, tensors, (inputs,), strict=False, tie_weights=True)
    return as_logits(output)


# Set to False to run convolutional models in the default layout on the CPU as well: the float
# rounding, and so the last digits of a fit, are then those of adamerge before channels-last
CHANNELS_LAST_ON_CPU = True

# what a module holds, by module (so that each call does not walk the module): a 2-d convolution,
# a grouped (e.g. depthwise) one
_CONVOLUTIONS: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def uses_channels_last(module: nn.Module, inputs: Inputs) -> bool:
    """Whether ``module`` runs channels-last on ``inputs``.

    It does for an image batch ``(B, C, H, W)`` of floats on the CPU into a model with a
    :class:`torch.nn.Conv2d`, while :data:`CHANNELS_LAST_ON_CPU` is on, and then
    - without gradients (evaluation, BatchNorm statistics, an expert's targets) always: faster for
      every convolutional network measured (``benchmarks/channels_last.py``);
    - with gradients (a fit's steps) only if a convolution is grouped (depthwise, as in
      MobileNetV2 and EfficientNet), not for dense convolutions only, whose backward is slower in
      it (measurements: ``benchmarks/RESULTS.md``).

    On CUDA, cuDNN's float32 convolutions gain little from the layout, so it is left to the user.
    """
    if not CHANNELS_LAST_ON_CPU:
        return False
    if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.is_floating_point()):
        return False
    if inputs.device.type != "cpu":
        return False
    if module not in _CONVOLUTIONS:
        convolutions = [layer for layer in module.modules() if isinstance(layer, nn.Conv2d)]
        _CONVOLUTIONS[module] = (bool(convolutions), any(layer.groups > 1 for layer in convolutions))
    has_conv, has_grouped = _CONVOLUTIONS[module]
    return has_conv and (has_grouped or not torch.is_grad_enabled())


def channels_last_tensors(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` plus ``module``'s own parameters, every 4-d floating one channels-last.

    Args:
        module: the model the tensors are for.
        tensors: ``{name: tensor}`` replacing some of the module's parameters and buffers.

    Returns:
        A new ``{name: tensor}``: each 4-d floating tensor (of ``tensors``, else the module's own
        parameter of that name) as a channels-last copy, and the rest of ``tensors`` unchanged.
    """
    out = dict(tensors)
    for name, parameter in module.named_parameters():
        if name not in out and parameter.dim() == 4:
            out[name] = parameter
    for name, tensor in out.items():
        if tensor.dim() == 4 and tensor.is_floating_point():
            out[name] = tensor.contiguous(memory_format=torch.channels_last)
    return out
