"""Capturing hidden states of a model during a forward pass (forward hooks)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from adamerge.choices import HEAD_INPUT
from adamerge.errors import AdamergeError

__all__ = ["HEAD_INPUT", "capture_hidden"]


@contextlib.contextmanager
def capture_hidden(model: nn.Module, names: Sequence[str], head_module: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Collect outputs of named sub-modules (and the head's input) while the block runs.

    Args:
        model: the module that will be run (directly or through ``functional_call``).
        names: sub-module names; ``"<head input>"`` means the input of ``head_module``.
        head_module: name of the task head's module.

    Yields:
        A dict filled with ``{name: tensor}`` as the forward pass reaches each module (the last
        call wins if a module runs several times).
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            if name == HEAD_INPUT:
                if head_module is None:
                    raise AdamergeError("hidden state '<head input>' needs task heads (--head-pattern)")
                module = _submodule(model, head_module)
                handles.append(module.register_forward_pre_hook(_store_input(captured, name)))
            else:
                handles.append(_submodule(model, name).register_forward_hook(_store_output(captured, name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AdamergeError(f"{type(model).__name__} has no sub-module {name!r}") from None


def _store_input(captured: dict[str, torch.Tensor], name: str):
    def hook(module, args):
        captured[name] = args[0]

    return hook


def _store_output(captured: dict[str, torch.Tensor], name: str):
    def hook(module, args, output):
        captured[name] = output[0] if isinstance(output, tuple) else output

    return hook
