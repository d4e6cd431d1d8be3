"""Expert Merging++: importance-guided chunk budgets from a first-stage solution.

Importance of tensor (layer) ℓ, from the stage-one coefficients λ and the task vectors τ:

    I_ℓ = normalise( Σ_k |λ_k^ℓ| · mean|τ_k^ℓ| · n_ℓ )        (n_ℓ: entries of the tensor)
    m_ℓ = ⌊ B · I_ℓ^κ / Σ_j I_j^κ ⌋                            (B: chunk budget, κ: sharpness)

A tensor with ``m_ℓ = 0`` keeps its stage-one coefficient; the others get ``m_ℓ`` chunks, each
initialised at the tensor's stage-one value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from adamerge.errors import AdamergeError


def layer_importance(coefficients: torch.Tensor, task_vectors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """Normalised importance (sums to 1) of each tensor.

    Args:
        coefficients: stage-one constrained coefficients ``(K, L)``, one column per tensor.
        task_vectors: ``(name, τ (K, *S))`` in the same order as the columns.
    """
    raw = {}
    for column, (name, tv) in enumerate(task_vectors):
        flat = tv.reshape(tv.shape[0], -1)  # (K, n)
        mean_abs = flat.abs().float().mean(dim=1)  # (K,)
        raw[name] = float((coefficients[:, column].abs().float() * mean_abs).sum()) * flat.shape[1]
    total = sum(raw.values())
    if total <= 0:
        raise AdamergeError("all layer importances are zero: the stage-one coefficients or task vectors vanish")
    return {name: value / total for name, value in raw.items()}


def chunk_budget(importance: Mapping[str, float], budget: int, kappa: float = 1.0) -> dict[str, int]:
    """``m_ℓ = ⌊B · I_ℓ^κ / Σ_j I_j^κ⌋`` chunks per tensor.

    Args:
        importance: normalised importance per tensor.
        budget: B, the total number of chunks to distribute (>= 1).
        kappa: κ > 0; larger values concentrate chunks on the most important layers.
    """
    if budget < 1:
        raise AdamergeError(f"chunk budget B={budget}: expected >= 1")
    if kappa <= 0:
        raise AdamergeError(f"kappa={kappa}: expected > 0")
    powered = {name: value**kappa for name, value in importance.items()}
    total = sum(powered.values())
    return {name: int(budget * value / total) for name, value in powered.items()}
