"""A static merge as one fixed λ on rewritten task vectors: ``θ = θ_0 + λ · Σ_k τ'_k``.

PCB merging, TSV-M, Iso-C and Iso-CTS are no presets of
:class:`~adamerge.rewrite.static_merge.StaticMerge` (they weight entries by competition scores or
recombine singular vectors), but each one is a rewrite ``τ → τ'`` followed by task arithmetic with
the same λ for every task. :class:`ScaledRewrite` is that shape: a subclass implements
:meth:`ScaledRewrite.rewrite_items`, and :meth:`ScaledRewrite.rewrite`,
:meth:`ScaledRewrite.coefficients` and :meth:`ScaledRewrite.merged_delta` are shared, so that
:class:`~adamerge.methods.rewrite_method.RewriteMethod` runs every one of them through the same
:class:`~adamerge.core.merged_model.MergedModel` as any other method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite import operations as pp


def check_scale(value: float, arg: str = "scale") -> float:
    """``value`` as a finite float ≥ 0, else :class:`AdamergeError` naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise AdamergeError(f"{arg} must be a finite number ≥ 0 (the λ of every task), got {value!r}")
    return float(value)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merges compute in: float32, or float64 for float64 task vectors."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class ScaledRewrite:
    """``θ = θ_0 + scale · Σ_k τ'_k`` over the rewritten task vectors τ' of :meth:`rewrite_items`.

    Attributes:
        scale: λ, the same for every task, ≥ 0.
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_scale(self.scale))

    def rewrite_items(self, items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The rewritten vectors ``{name: Tensor(K, *shape)}`` of validated ``(name, Tensor(K, *shape))``
        pairs, in any floating dtype (:meth:`rewrite` casts them back)."""
        raise NotImplementedError

    def coefficients(self, num_tasks: int) -> torch.Tensor:
        """The fixed λ ``(K,)``: ``scale`` for every task."""
        return torch.full((num_tasks,), self.scale, dtype=torch.float32)

    def rewrite(self, tv: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rewritten task vectors τ' with ``merged_delta = scale · Σ_k τ'_k``.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order (never modified).

        Returns:
            ``{name: Tensor(K, *shape)}`` in model order and the input dtype.

        Raises:
            AdamergeError: ``tv`` is empty, not floating, or its tensors stack different K.
        """
        items = pp.as_items(tv)
        rewritten = self.rewrite_items(items)
        return {name: rewritten[name].to(x.dtype) for name, x in items}

    def merged_delta(self, tv: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged task vector ``θ − θ_0 = scale · Σ_k τ'_k``, ``{name: Tensor(*shape)}``.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order.
            dtype: result dtype (default: the task vectors'); the sum runs in float32 or wider.
        """
        result = {}
        for name, y in self.rewrite(tv).items():
            wide = compute_dtype(y.dtype)
            result[name] = (self.scale * y.to(wide).sum(dim=0)).to(y.dtype if dtype is None else dtype)
        return result
