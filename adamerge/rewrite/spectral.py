"""The linear algebra the subspace merges (TSV-M, Iso-C, Iso-CTS) share.

Which stacked task vectors count as matrices, the orthogonal polar factor (the Procrustes step that
makes concatenated singular vectors orthonormal), and the task average used for every other tensor.
Everything returns new tensors in the dtype it was given (callers pass float32 or float64).
"""

from __future__ import annotations

import logging

import torch

from adamerge.errors import AdamergeError

logger = logging.getLogger(__name__)


#: How the subspace merges treat convolution kernels: ``average`` them (FusionBench, the papers'
#: code) or decompose each as the matrix ``(out, in · k_h · k_w)`` it applies to image patches.
CONV_KERNELS = ("average", "matrix")
#: What a decomposed tensor is, per ``conv_kernels``, for the coverage warning.
MATRICES = {"average": "in 2-D matrices", "matrix": "in 2-D matrices or convolution kernels"}
#: What would cover more, per ``conv_kernels``, for the coverage warning.
COVER_MORE = {"average": "--options '{conv_kernels: matrix}' decomposes convolution kernels too", "matrix": ""}


def is_matrix(x: torch.Tensor, conv_kernels: str = "average") -> bool:
    """Whether the stacked task vectors ``x`` ``(K, *shape)`` are decomposed as matrices.

    As in FusionBench and the papers' code, 2-D tensors ``(K, rows, cols)`` are; biases, norms and
    embeddings' 1-D parts are averaged (:func:`task_average`). Convolution kernels (``(K, out, in,
    *kernel)``, 3-D and more per task) are averaged too, unless ``conv_kernels="matrix"``: then
    each is the matrix ``(out, in · Π kernel)`` of the linear map it applies to each patch (a 1×1
    convolution: a linear layer over the channels at every pixel), see :func:`as_matrices`.
    """
    return x.dim() == 3 or (conv_kernels == "matrix" and x.dim() >= 4)


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """``(K, rows, cols)``: stacked matrices as they are, convolution kernels as ``(K, out, in · Π kernel)``."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], x.shape[1], -1)


def check_conv_kernels(value: str) -> None:
    """Refuse a ``conv_kernels`` option other than :data:`CONV_KERNELS`."""
    if value not in CONV_KERNELS:
        raise AdamergeError(f"conv_kernels {value!r}: expected one of {', '.join(CONV_KERNELS)}")


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
