"""Pure merge functions: ``θ = θ_0 + Σ_k λ_k τ_k`` per tensor with one fused contraction.

No ``λ ⊙ τ`` temporary of size K×P is ever formed: the sum over experts is a matrix-vector
product ``τᵀ λ`` (BLAS gemv) that reads each task-vector entry once, and its backward pass, the
gradient ``∂L/∂λ_k = ⟨∂L/∂θ, τ_k⟩``, is a second gemv over the same buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from adamerge.granularity import CoefficientLayout


def combine(base: torch.Tensor, task_vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``base + Σ_k coefficients[k] · task_vectors[k]`` as one fused contraction.

    Args:
        base: θ_0 of one tensor, shape ``S``.
        task_vectors: τ stacked over experts, ``(K, *S)``; any float dtype (bf16 storage is
            contracted in bf16 and the result added in the base's dtype).
        coefficients: ``(K,)``.

    Returns:
        The merged tensor, shape ``S`` and the base's dtype; differentiable in ``coefficients``.
    """
    flat_tv = task_vectors.reshape(task_vectors.shape[0], -1)  # (K, P)
    if flat_tv.dtype == base.dtype:
        merged = torch.addmv(base.reshape(-1), flat_tv.t(), coefficients.to(base.dtype))  # (P,)
    else:
        delta = torch.mv(flat_tv.t(), coefficients.to(flat_tv.dtype))  # (P,) in storage dtype
        merged = base.reshape(-1) + delta.to(base.dtype)  # (P,)
    return merged.view(base.shape)


def merge_tensors(
    base: Mapping[str, torch.Tensor],
    task_vectors: Iterable[tuple[str, torch.Tensor]],
    coefficients: torch.Tensor,
    layout: CoefficientLayout,
) -> dict[str, torch.Tensor]:
    """Merge every tensor of ``task_vectors`` with its group's coefficients.

    Args:
        base: ``{name: θ_0}`` holding at least the merged names.
        task_vectors: ``(name, τ (K, *S))`` pairs in layout order.
        coefficients: constrained coefficients ``(K, G)``.
        layout: the compiled granularity.

    Returns:
        ``{name: merged tensor}`` for the merged names only.
    """
    merged = {}
    for (name, tv), group in zip(task_vectors, layout.tensor_groups, strict=True):
        merged[name] = combine(base[name], tv, coefficients[:, group])
    return merged
