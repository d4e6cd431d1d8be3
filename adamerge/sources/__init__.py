"""Expert sources: each turns user references into an :class:`ExpertSet` (base model, task
vectors, per-task heads, how to rebuild an expert alone and how to export the merge).

:func:`load_experts` picks the source from the ``--base`` prefix:

- ``hf:DIR`` — Hugging Face transformers (experts ``hf:DIR`` fine-tunes or ``peft:DIR`` LoRA
  adapters), see :mod:`adamerge.sources.hf`;
- ``open_clip:ARCH@FILE`` — open_clip (full CLIP checkpoints, zero-shot heads from
  ``CALIB/<task>/classnames.txt``; an image-tower-only FILE falls back to plain files), see
  :mod:`adamerge.sources.open_clip`;
- anything else, ``ARCH@FILE`` — plain state-dict files over an architecture spec
  (``torchvision:NAME``, ``timm:NAME``, ``package.module:factory``), see :mod:`adamerge.sources.file`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from adamerge.sources.base import ExpertSet, SourceOptions
from adamerge.sources.file import load_file_experts, parse_base_spec

# prefix of --base -> "module:function" taking (base, experts, options) and returning an ExpertSet
SOURCES: dict[str, str] = {
    "hf:": "adamerge.sources.hf:load_hf_experts",
    "open_clip:": "adamerge.sources.open_clip:load_open_clip_experts",
}


def load_experts(base: str, experts: Mapping[str, str], options: SourceOptions | None = None) -> ExpertSet:
    """The :class:`ExpertSet` for ``--base`` and ``--experts`` from the source the base's prefix names.

    Args:
        base: ``hf:DIR``, ``open_clip:ARCH@FILE`` or ``ARCH@FILE``.
        experts: ``{task: reference}`` (a file, ``hf:DIR`` or ``peft:DIR``, by source).
        options: head pattern, BatchNorm policy, task-vector dtype, ``trust_pickles`` (honoured by
            every source: plain files too), ...
    """
    options = options or SourceOptions()
    for prefix, target in SOURCES.items():
        if base.startswith(prefix):
            return _resolve(target)(base, experts, options)
    arch, weights = parse_base_spec(base)
    return load_file_experts(
        arch,
        weights,
        experts,
        head_pattern=options.head_pattern,
        batchnorm=options.batchnorm,
        dtype=options.dtype,
        arch_kwargs=options.base_kwargs,
        trust_pickles=options.trust_pickles,
    )


def _resolve(target: str) -> Callable[[str, Mapping[str, str], SourceOptions], ExpertSet]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


__all__ = ["SOURCES", "ExpertSet", "SourceOptions", "load_experts", "load_file_experts", "parse_base_spec"]
