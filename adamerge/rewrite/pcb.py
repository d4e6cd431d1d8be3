"""PCB merging: Parameter Competition Balancing (Du et al., NeurIPS 2024).

For K task vectors ``τ_k`` over the ``D`` entries of a scope (the whole model, as the paper
flattens it, or one tensor), with ``Norm`` the min-max normalisation over the scope's entries and
``Softmax`` over them too (paper, Sec. 3.2, Eqs. 2-6):

- intra-balancing ``β_intra,k = Softmax(K · Norm(τ_k ⊙ τ_k))``: each entry's weight within its task;
- inter-balancing ``β_inter,k = Σ_j Softmax(Norm(τ_k ⊙ τ_j))``: its agreement with every task;
- ``β_k = β_intra,k ⊙ β_inter,k``; drop: ``β̂_k = β_k`` where ``β_k ≥ sorted(β_k)[⌊(1 − r) D⌋]``
  (ascending, so the top ``r`` of each task survive, ties kept), else 0;
- ``τ_m = Σ_k β̂_k ⊙ τ_k / Σ_k β̂_k`` (0 where every task was dropped), ``θ = θ_0 + λ τ_m``.

Only ratios of ``β`` within a scope matter (the threshold and the weighted mean), so the
softmaxes are computed as ``D · Softmax`` (``exp(z − max z) / mean exp(z − max z)``), which is
exact and keeps the values near 1 however large the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite import operations as pp
from adamerge.rewrite.scaled_rewrite import ScaledRewrite, compute_dtype

logger = logging.getLogger(__name__)

_EPS_COUNT = 1e-9  # guards floor((1 − r) · D) against 0.9 · 100 == 89.999...
Items = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class _Competition:
    """Statistics of one scope that :func:`_balancing` needs, all in the compute dtype.

    Attributes:
        square_lo, square_hi: ``(K,)`` min and max of ``τ_k ⊙ τ_k`` over the scope.
        pair_lo, pair_hi: ``(K, K)`` min and max of ``τ_k ⊙ τ_j``.
        square_mean_exp: ``(K,)`` mean of ``exp(K · (Norm(τ_k ⊙ τ_k) − 1))``, the softmax's denominator / D.
        pair_mean_exp: ``(K, K)`` mean of ``exp(Norm(τ_k ⊙ τ_j) − 1)``.
    """

    square_lo: torch.Tensor
    square_hi: torch.Tensor
    pair_lo: torch.Tensor
    pair_hi: torch.Tensor
    square_mean_exp: torch.Tensor | None = None
    pair_mean_exp: torch.Tensor | None = None


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(compute_dtype(x.dtype))  # (K, n)


def _normalise(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Min-max ``(v − lo) / (hi − lo)``; 0 where ``hi == lo`` (then every entry equals ``lo``)."""
    span = hi - lo
    return (v - lo) / torch.where(span > 0, span, torch.ones_like(span))


def _extremes(group: Items) -> _Competition:
    """Pass one: the min and max of the squares and pair products over the scope."""
    square_lo = square_hi = pair_lo = pair_hi = None
    for _, x in group:
        xf = _flat(x)  # (K, n)
        square = xf * xf  # (K, n)
        pairs = [xf[k] * xf for k in range(xf.shape[0])]  # K × (K, n), one row of pairs at a time
        lo = torch.stack([p.amin(dim=1) for p in pairs])  # (K, K)
        hi = torch.stack([p.amax(dim=1) for p in pairs])  # (K, K)
        if square_lo is None:
            square_lo, square_hi, pair_lo, pair_hi = square.amin(dim=1), square.amax(dim=1), lo, hi
        else:
            square_lo, square_hi = torch.minimum(square_lo, square.amin(dim=1)), torch.maximum(square_hi, square.amax(dim=1))
            pair_lo, pair_hi = torch.minimum(pair_lo, lo), torch.maximum(pair_hi, hi)
    return _Competition(square_lo, square_hi, pair_lo, pair_hi)


def _competition(group: Items) -> _Competition:
    """Both passes: extremes, then the softmax denominators (accumulated in float64)."""
    extremes = _extremes(group)
    num_tasks = group[0][1].shape[0]
    size = sum(x[0].numel() for _, x in group)
    square_sum = torch.zeros(num_tasks, dtype=torch.float64, device=group[0][1].device)  # (K,)
    pair_sum = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=group[0][1].device)  # (K, K)
    for _, x in group:
        xf = _flat(x)  # (K, n)
        intra = _normalise(xf * xf, extremes.square_lo[:, None], extremes.square_hi[:, None])  # (K, n)
        square_sum += torch.exp(num_tasks * (intra - 1)).sum(dim=1, dtype=torch.float64)
        for k in range(num_tasks):
            inter = _normalise(xf[k] * xf, extremes.pair_lo[k][:, None], extremes.pair_hi[k][:, None])  # (K, n)
            pair_sum[k] += torch.exp(inter - 1).sum(dim=1, dtype=torch.float64)
    dtype = extremes.square_lo.dtype
    return _Competition(
        extremes.square_lo, extremes.square_hi, extremes.pair_lo, extremes.pair_hi,
        (square_sum / size).to(dtype), (pair_sum / size).to(dtype),
    )  # fmt: skip


def _balancing(xf: torch.Tensor, k: int, stats: _Competition) -> torch.Tensor:
    """``D · β_intra,k ⊙ D · β_inter,k`` ``(n,)`` on the entries ``xf`` ``(K, n)`` of one tensor."""
    num_tasks = xf.shape[0]
    square = _normalise(xf[k] * xf[k], stats.square_lo[k], stats.square_hi[k])  # (n,)
    intra = torch.exp(num_tasks * (square - 1)) / stats.square_mean_exp[k]  # (n,)
    pairs = _normalise(xf[k] * xf, stats.pair_lo[k][:, None], stats.pair_hi[k][:, None])  # (K, n)
    inter = (torch.exp(pairs - 1) / stats.pair_mean_exp[k][:, None]).sum(dim=0)  # (n,)
    return intra * inter  # (n,)


@dataclass(frozen=True)
class PCBMerge(ScaledRewrite):
    """PCB merging with the authors' defaults: keep ratio ``r = 0.1``, ``λ = 1.2``, model scope.

    Defaults: ``r = 0.1`` (``PCB_merge(flat_task_checks, pcb_ratio=0.1)`` in the official
    ``pcb-merging.py``, github.com/duguodong7/pcb-merging), ``λ = 1.2`` (``lams = [1.2]*n`` there and
    in ``vision_source_code/pcb.py``, the ViT-B/32 8-task script, which keeps 5 %:
    ``att_ratio = 0.05``). The paper tunes both per setting (and λ per task with evolutionary search
    when validation data exist); these are the published starting values. The balancing is ranked
    over the whole model, as the paper and its code flatten every task vector (``scope="model"``).

    This follows the paper's equations (Sec. 3.2), not the official code's variant of them, which
    clamps magnitudes at their 0.01 % (vision: 1 %) quantiles first, uses ``exp(K · Norm(|τ_k|)²)``
    (equal to the softmax up to a per-task factor) and ``tanh(τ_k ⊙ Σ_j τ_j)`` in place of the
    inter-balancing softmaxes, and min-max rescales the kept ``β`` so that the lowest kept entry
    gets weight 0. ``Softmax`` and ``Norm`` act over the scope's entries for each task (pair), as
    the intra-balancing term does; a softmax over tasks would make ``Σ_j Softmax(·)_j ≡ 1``.

    Per-task rewrite: ``τ'_k = β̂_k ⊙ τ_k / Σ_j β̂_j`` with ``λ_k = λ``, so ``Σ_k τ'_k = τ_m``
    exactly. Every step treats the tasks alike, so the merge is invariant to task order. Computed in float32 (float64
    for float64 task vectors) and returned in the input dtype; factored (LoRA) task vectors are
    densified first (``TaskVectors.items``, with a warning), as every entry-wise merge is. Memory:
    besides the result, one tensor's ``(K, n)`` temporaries and, at model scope, one ``D``-length
    buffer per task in turn (for the threshold); the balancing is recomputed, never stored.

    Attributes:
        scale: λ, ≥ 0.
        ratio: ``r``, the fraction of each task's entries kept, in (0, 1].
        scope: ``"model"`` (rank over every merged tensor, the paper's) or ``"tensor"``.
    """

    scale: float = 1.2
    ratio: float = 0.1
    scope: Literal["model", "tensor"] = "model"

    def __post_init__(self) -> None:
        super().__post_init__()
        pp.check_density(self.ratio, "ratio")
        if self.scope not in ("model", "tensor"):
            raise AdamergeError(f"scope must be 'model' or 'tensor', got {self.scope!r}")

    def rewrite_items(self, items: Items) -> dict[str, torch.Tensor]:
        """``τ'_k = β̂_k ⊙ τ_k / Σ_j β̂_j`` per scope (the model, or each tensor)."""
        groups = [items] if self.scope == "model" else [[item] for item in items]
        out: dict[str, torch.Tensor] = {}
        for group in groups:
            out |= self._rewrite_group(group)
        return out

    def _rewrite_group(self, group: Items) -> dict[str, torch.Tensor]:
        stats = _competition(group)
        thresholds = self._thresholds(group, stats)  # (K,)
        logger.debug("PCB thresholds per task: %s", thresholds.tolist())
        out = {}
        for name, x in group:
            xf = _flat(x)  # (K, n)
            beta = torch.stack([_balancing(xf, k, stats) for k in range(xf.shape[0])])  # (K, n)
            kept = torch.where(beta >= thresholds[:, None], beta, torch.zeros_like(beta))  # (K, n): β̂
            total = kept.sum(dim=0)  # (n,)
            weights = kept / torch.where(total > 0, total, torch.ones_like(total))  # (K, n), 0 where all dropped
            out[name] = (weights * xf).view(x.shape)  # (K, *shape)
        return out

    def _thresholds(self, group: Items, stats: _Competition) -> torch.Tensor:
        """Per task, ``sorted(β_k)[⌊(1 − r) D⌋]`` over the scope (one D-length buffer at a time)."""
        size = sum(x[0].numel() for _, x in group)
        index = min(size - 1, math.floor((1.0 - self.ratio) * size + _EPS_COUNT))  # 0-based, ascending
        thresholds = []
        for k in range(group[0][1].shape[0]):
            values = torch.cat([_balancing(_flat(x), k, stats) for _, x in group])  # (D,)
            thresholds.append(values.kthvalue(index + 1).values)
            del values
        return torch.stack(thresholds)  # (K,)
