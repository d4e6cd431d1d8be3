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
                decoder = _decoder_feeding(model, module)
                if decoder is not None:  # every token's, even where logits_to_keep narrows the head's input
                    handles.append(decoder.register_forward_hook(_store_last_hidden_state(captured, name)))
                else:
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


def _decoder_feeding(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """A transformers language model's decoder (``get_decoder``) when ``head`` is its LM head
    (``get_output_embeddings``): the decoder's ``last_hidden_state`` is the head's input at every
    token, before ``logits_to_keep`` keeps some positions; ``None`` for other models."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_decoder) and callable(get_head)) or get_head() is not head:
        return None
    decoder = get_decoder()
    return decoder if isinstance(decoder, nn.Module) and decoder is not model else None


def _store_last_hidden_state(captured: dict[str, torch.Tensor], name: str):
    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        captured[name] = hidden if isinstance(hidden, torch.Tensor) else output[0]

    return hook


def _store_output(captured: dict[str, torch.Tensor], name: str):
    def hook(module, args, output):
        captured[name] = output[0] if isinstance(output, tuple) else output

    return hook
