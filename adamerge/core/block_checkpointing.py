"""Activation (gradient) checkpointing of a model's repeated blocks under ``functional_call``.

A merged model runs its base architecture through :func:`torch.func.functional_call` with the
merged tensors θ′ in place of its own, and the backward pass runs after that call has returned,
when the modules hold their own parameters again. The checkpointing that libraries switch on
(``model.gradient_checkpointing_enable()`` in transformers) recomputes a block's forward in
backward from the module's attributes, so it would recompute with θ₀ and give wrong gradients.

:func:`checkpointed_blocks` instead passes each block the tensors it holds *at call time* (θ′) as
explicit inputs of :func:`torch.utils.checkpoint.checkpoint` (non-reentrant), so the
recomputation runs the same block on the same tensors: only the blocks' inputs are kept between
forward and backward, at the price of a second forward of every block.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from adamerge.core.granularity import BLOCK_PATTERN


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the items of every ``nn.ModuleList`` named like a stack of
    blocks (``layers``, ``h``, ``blocks``, ... as :data:`~adamerge.core.granularity.BLOCK_PATTERN`),
    outermost lists only (a decoder layer's own lists are inside a block already)."""
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1 and re.search(BLOCK_PATTERN, f"{name}.0."):
            blocks.extend(module)
            inside.append(name)
    return blocks


@contextlib.contextmanager
def checkpointed_blocks(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Within the context, each of ``blocks`` runs under activation checkpointing whenever
    gradients are being recorded, recomputing in backward with the tensors it held in forward."""
    originals = []
    for block in blocks:
        had_own = "forward" in block.__dict__
        originals.append((block, had_own, block.__dict__.get("forward")))
        block.forward = _checkpointing_forward(block, block.forward)
    try:
        yield
    finally:
        for block, had_own, own in originals:
            if had_own:
                block.forward = own
            else:
                del block.forward


def _checkpointing_forward(block: nn.Module, forward):
    bypass = False

    def run(tensors: dict[str, torch.Tensor], *args, **kwargs):
        nonlocal bypass
        bypass = True
        try:
            return functional_call(block, tensors, args, kwargs, strict=False)
        finally:
            bypass = False

    def checkpointing(*args, **kwargs):
        if bypass or not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        tensors = dict(itertools.chain(block.named_parameters(), block.named_buffers()))  # θ′ inside functional_call
        return checkpoint(run, tensors, *args, use_reentrant=False, **kwargs)

    return checkpointing
