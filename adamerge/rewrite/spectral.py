"""The linear algebra the subspace merges (TSV-M, Iso-C, Iso-CTS) share.

Which stacked task vectors count as matrices, the orthogonal polar factor (the Procrustes step that
makes concatenated singular vectors orthonormal), and the task average used for every other tensor.
Everything returns new tensors in the dtype it was given (callers pass float32 or float64).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def is_matrix(x: torch.Tensor) -> bool:
    """Whether the stacked task vectors ``x`` ``(K, *shape)`` are 2-D weight matrices ``(K, rows, cols)``.

    As in FusionBench and the papers' code, only 2-D tensors are decomposed; biases, norms,
    embeddings' 1-D parts and convolution kernels (4-D) are averaged (:func:`task_average`).
    """
    return x.dim() == 3


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``a = P Σ Qᵀ`` (thin SVD), in ``a``'s shape and dtype.

    The matrix with orthonormal columns (rows, if ``a`` is wide) nearest to ``a`` in Frobenius norm:
    the solution of the orthogonal Procrustes problem, as TSV-M and Iso-CTS orthogonalise their
    concatenated singular vectors.
    """
    p, _, qt = thin_svd(a)  # (m, r), (r,), (r, n)
    return p @ qt  # (m, n)


def thin_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)`` ``(..., m, r), (..., r), (..., r, n)``, in
    ``a``'s dtype, that does not stop a merge when LAPACK's divide-and-conquer fails to converge.

    On real experts it can (``gesdd`` on a concatenation of singular vectors with many equal
    singular values); the SVD is then taken again in float64, and of the transpose if that fails
    too (the SVD of ``aᵀ`` is ``Q Σ Pᵀ``).
    """
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        logger.warning("SVD of a %s %s matrix did not converge; taking it again in float64", tuple(a.shape), a.dtype)
    wide = a.double()
    try:
        u, s, vh = torch.linalg.svd(wide, full_matrices=False)
    except torch.linalg.LinAlgError:
        ut, s, vht = torch.linalg.svd(wide.mT, full_matrices=False)  # aᵀ = (vhᵀ) Σ (uᵀ)
        u, vh = vht.mT, ut.mT
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def task_average(x: torch.Tensor) -> torch.Tensor:
    """``τ'_k = τ_k / K`` ``(K, *shape)``: with one λ for every task, ``λ Σ_k τ'_k = λ · mean_k τ_k``."""
    return x / x.shape[0]
