"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025).

Per 2-D weight matrix, each task keeps its top-``k`` singular components ``U_k[:, :k] Σ_k[:k]
V_kᵀ[:k]``; the kept left vectors of all tasks are concatenated into ``U = [U_1 … U_K]`` ``(m, K k)``
and the right ones into ``Vᵀ`` ``(K k, n)``, both are replaced by their orthogonal polar factors
(``U⊥ = P Qᵀ`` from ``U = P S Qᵀ``, Procrustes), and the merged matrix is ``U⊥ Σ V⊥ᵀ`` with the
tasks' own singular values ``Σ = diag(Σ_1[:k], …, Σ_K[:k])``. Every other tensor is averaged.
``θ = θ_0 + α · merged``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite.coverage import warn_if_mostly_averaged
from adamerge.rewrite.scaled_rewrite import ScaledRewrite, compute_dtype
from adamerge.rewrite.spectral import COVER_MORE, MATRICES, as_matrices, check_conv_kernels, is_matrix, polar_factor, task_average, thin_svd

logger = logging.getLogger(__name__)

_EPS_COUNT = 1e-9  # guards floor(fraction · rank) against 0.29 · 100 == 28.999...


@dataclass(frozen=True)
class TSVMerge(ScaledRewrite):
    """TSV-M with the paper's defaults: ``k = rank / K`` components per task, ``α = 1.0``.

    Defaults: ``k = ⌊min(m, n) / K⌋`` (the paper's rank/T; FusionBench's
    ``compute_and_sum_svd_mem_reduction``, ``sv_reduction = 1 / num_tasks``) and ``α = 1.0`` (the
    paper merges without tuning α; FusionBench ``TaskSingularVectorMerging.yaml``: ``alpha: 1``).

    Per-task rewrite: ``τ'_k = U⊥[:, B_k] Σ_k[:k] V⊥ᵀ[B_k]`` (``B_k``: task k's block of the
    concatenation), each task's orthogonalised component, with ``λ_k = α``, so that
    ``Σ_k τ'_k`` is the TSV-M matrix exactly (FusionBench's ``return_single_task_models``
    components). Tensors that are not 2-D (biases, norms, convolution kernels) are averaged,
    ``τ'_k = τ_k / K``, as FusionBench does. Concatenation order does not matter: permuting the
    tasks permutes the blocks and the polar factor alike, so the merge is invariant to task order.

    Differences from FusionBench 0.2.33, both immaterial to the result: it concatenates into
    zero-padded ``(m, min(m, n))`` buffers (the zero columns do not change the polar factor's
    non-zero block when the kept columns are independent), and it computes ``k`` as
    ``int(min(m, n) · (1 / K))`` where this uses the exact ``⌊min(m, n) / K⌋`` (they differ only
    when ``1 / K`` rounds down, e.g. ``49 · (1 / 49) < 1``). It also excludes tensors named
    ``text_projection`` (CLIP's text tower, which adamerge's open_clip source never merges).

    Computed in float32 (float64 for float64 task vectors) and returned in the input dtype;
    factored (LoRA) task vectors are densified first (``TaskVectors.items``, with a warning).
    Matrices with fewer than K singular values keep no component (``k = 0``) and merge to zero,
    as in FusionBench; a warning names them.

    Attributes:
        scale: α, ≥ 0.
        rank_fraction: ``k = ⌊rank_fraction · min(m, n)⌋``; ``None``: ``1 / K``. Must leave room for
            every task: ``K · k ≤ min(m, n)``.
        conv_kernels: ``average`` (FusionBench) or ``matrix``: each convolution kernel decomposed as
            the matrix ``(out, in · k_h · k_w)`` (:func:`adamerge.rewrite.spectral.is_matrix`).
    """

    scale: float = 1.0
    rank_fraction: float | None = None
    conv_kernels: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_conv_kernels(self.conv_kernels)
        fraction = self.rank_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1):
            raise AdamergeError(f"rank_fraction must be in (0, 1] or null (1 / K), got {fraction!r}")

    def rank(self, full: int, num_tasks: int) -> int:
        """Components kept per task of a matrix with ``full = min(m, n)`` singular values."""
        if self.rank_fraction is None:
            return full // num_tasks
        return math.floor(self.rank_fraction * full + _EPS_COUNT)

    def rewrite_items(self, items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per matrix, each task's orthogonalised singular component; other tensors averaged."""
        matrix = lambda _, x: is_matrix(x, self.conv_kernels)  # noqa: E731
        warn_if_mostly_averaged("TSV-M", items, matrix, MATRICES[self.conv_kernels], COVER_MORE[self.conv_kernels])
        out = {}
        for name, x in items:
            wide = x.to(compute_dtype(x.dtype))
            out[name] = self._matrix(name, as_matrices(wide)).reshape(x.shape) if matrix(name, x) else task_average(wide)
        return out

    def _matrix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """TSV-M of one stacked matrix ``x`` ``(K, m, n)`` as the K per-task components ``(K, m, n)``."""
        num_tasks, rows, cols = x.shape
        full = min(rows, cols)
        k = self.rank(full, num_tasks)
        if num_tasks * k > full:
            raise AdamergeError(
                f"rank_fraction {self.rank_fraction} keeps {k} components per task of {name!r} {(rows, cols)}: "
                f"{num_tasks} tasks need {num_tasks * k} > {full} singular vectors; use rank_fraction ≤ 1/{num_tasks}"
            )
        if k == 0:
            logger.warning("TSV-M: %r %s has fewer singular values than tasks (%d): it keeps none", name, (rows, cols), num_tasks)
            return torch.zeros_like(x)
        u, s, vh = thin_svd(x)  # (K, m, full), (K, full), (K, full, n)
        u_cat = u[:, :, :k].permute(1, 0, 2).reshape(rows, num_tasks * k)  # (m, K k): task j in columns j k … (j+1) k
        vh_cat = vh[:, :k, :].reshape(num_tasks * k, cols)  # (K k, n)
        u_perp = polar_factor(u_cat).view(rows, num_tasks, k)  # (m, K, k)
        vh_perp = polar_factor(vh_cat).view(num_tasks, k, cols)  # (K, k, n)
        return torch.einsum("mtk,tk,tkn->tmn", u_perp, s[:, :k], vh_perp)  # (K, m, n)
