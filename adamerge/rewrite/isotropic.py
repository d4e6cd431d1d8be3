"""Iso-C and Iso-CTS: isotropic merging in common (and task-specific) subspaces (Marczak et al., ICML 2025).

Per 2-D weight matrix:

- **Iso-C**: the task-arithmetic sum ``M = Σ_k τ_k = U Σ Vᵀ`` keeps its singular vectors and gets
  a flat spectrum, every singular value replaced by their mean ``σ̄``: ``merged = σ̄ U Vᵀ``.
- **Iso-CTS**: the common subspace is the top ``c`` singular vectors of ``M``; each task adds its
  top ``s`` singular vectors of its residual ``τ_k − U_c U_cᵀ τ_k`` (the part outside the common
  left subspace), with ``c + K s = min(m, n)``; the concatenated left and right vectors are
  orthogonalised (polar factors, as TSV-M) and the spectrum is flat: ``merged = σ̄ U⊥ V⊥ᵀ``, ``σ̄``
  the mean of the ``c`` common and ``K s`` task singular values.

Every other tensor is averaged. ``θ = θ_0 + α · merged``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite.coverage import warn_if_mostly_averaged
from adamerge.rewrite.scaled_rewrite import ScaledRewrite, compute_dtype
from adamerge.rewrite.spectral import COVER_MORE, MATRICES, as_matrices, check_conv_kernels, is_matrix, polar_factor, task_average, thin_svd


@dataclass(frozen=True)
class IsoCMerge(ScaledRewrite):
    """Iso-C: the flat-spectrum task-arithmetic sum, ``θ = θ_0 + α σ̄ U Vᵀ`` per matrix.

    Default ``α = 1.0``: FusionBench 0.2.33 ``isotropic_merging/iso_c.yaml``
    (``scaling_factor: 1.0``). The paper selects α on held-out validation data per model and task
    set (the authors' code, ``danielm1405/iso-merging``, evaluates a grid of 31 values,
    ``n_eval_points: 31``); without validation data 1.0 is the choice, not a published optimum.

    Iso-C has no per-task part: the rewrite is ``τ'_k = merged / K`` for every task with
    ``λ_k = α``, which gives the merged weights exactly (the per-task vectors are not meaningful
    on their own). Tensors that are not 2-D are averaged (``τ'_k = τ_k / K``), as FusionBench does.
    Iso-C is invariant to task order (it only sees the sum). Computed in float32 (float64 for
    float64 task vectors), returned in the input dtype; factored (LoRA) task vectors are
    densified first (``TaskVectors.items``, with a warning). Agrees with FusionBench's ``iso_c``
    to float rounding (``benchmarks/peers/fusionbench_subspace_check.py``).

    Attributes:
        scale: α, ≥ 0.
        conv_kernels: ``average`` (FusionBench) or ``matrix``: each convolution kernel decomposed as
            the matrix ``(out, in · k_h · k_w)`` (:func:`adamerge.rewrite.spectral.is_matrix`).
    """

    scale: float = 1.0
    conv_kernels: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_conv_kernels(self.conv_kernels)

    def rewrite_items(self, items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per matrix ``merged / K`` for every task; other tensors averaged."""
        matrix = lambda _, x: is_matrix(x, self.conv_kernels)  # noqa: E731
        warn_if_mostly_averaged("Iso-C", items, matrix, MATRICES[self.conv_kernels], COVER_MORE[self.conv_kernels])
        out = {}
        for name, x in items:
            wide = x.to(compute_dtype(x.dtype))
            if not matrix(name, x):
                out[name] = task_average(wide)
                continue
            u, s, vh = thin_svd(as_matrices(wide).sum(dim=0))  # (m, r), (r,), (r, n)
            merged = s.mean() * (u @ vh)  # (m, n): the spectrum flattened to its mean
            out[name] = (merged / x.shape[0]).reshape(x.shape[1:]).expand_as(wide).contiguous()  # (K, *shape)
        return out


def subspace_sizes(full: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(c, s)``: common and per-task dimensions with ``c + K s = full`` (``full = min(m, n)``).

    As the authors' code and FusionBench: ``c₀ = ⌊full · common_fraction⌋``; the task-specific
    total is ``K · round((full − c₀) / K)`` (Python's ``round``, ties to even), the common space
    the rest. Where that total would exceed ``full`` (a matrix with fewer singular values than
    about K / 2 left over: FusionBench's slices fail there) it is ``K · ⌊full / K⌋``.
    """
    common = int(full * common_fraction)
    task_total = round((full - common) / num_tasks) * num_tasks
    if task_total > full:
        task_total = (full // num_tasks) * num_tasks
    return full - task_total, task_total // num_tasks


@dataclass(frozen=True)
class IsoCTSMerge(ScaledRewrite):
    """Iso-CTS: common and task-specific subspaces, orthogonalised, with a flat spectrum.

    Defaults: ``common_fraction = 0.8`` (the paper's and the authors' code's
    ``common_space_fraction: 0.8``, ``config/method/iso_cts.yaml``; FusionBench's ``iso_cts.yaml``
    too) and ``α = 1.0`` (FusionBench ``iso_cts.yaml``, ``scaling_factor: 1.0``; the paper selects α
    on held-out validation data, see :class:`IsoCMerge`).

    Per-task rewrite: ``τ'_k = σ̄ (U⊥[:, B_k] V⊥ᵀ[B_k] + U⊥[:, C] V⊥ᵀ[C] / K)`` with ``λ_k = α``:
    each task's orthogonalised task-specific block ``B_k`` plus an equal share of the common block
    ``C``, so that ``Σ_k τ'_k`` is the Iso-CTS matrix exactly. Tensors that are not 2-D are
    averaged (``τ'_k = τ_k / K``), as FusionBench does. The merge is invariant to task order (the
    polar factor commutes with permuting the blocks); with ``common_fraction = 1`` it is Iso-C.
    Computed in float32 (float64 for float64 task vectors), returned in the input dtype;
    factored (LoRA) task vectors are densified first (``TaskVectors.items``, with a warning).
    Agrees with FusionBench's ``iso_cts`` to float rounding
    (``benchmarks/peers/fusionbench_subspace_check.py``).

    Attributes:
        scale: α, ≥ 0.
        common_fraction: share of the ``min(m, n)`` dimensions given to the common subspace, in
            (0, 1] (rounded so that the rest divides evenly among the tasks: :func:`subspace_sizes`).
        conv_kernels: as :class:`IsoCMerge`.
    """

    scale: float = 1.0
    common_fraction: float = 0.8
    conv_kernels: str = "average"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_conv_kernels(self.conv_kernels)
        value = self.common_fraction
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise AdamergeError(f"common_fraction must be in (0, 1] (the common subspace's share), got {value!r}")

    def rewrite_items(self, items: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per matrix, each task's block plus its share of the common block; other tensors averaged."""
        matrix = lambda _, x: is_matrix(x, self.conv_kernels)  # noqa: E731
        warn_if_mostly_averaged("Iso-CTS", items, matrix, MATRICES[self.conv_kernels], COVER_MORE[self.conv_kernels])
        out = {}
        for name, x in items:
            wide = x.to(compute_dtype(x.dtype))
            out[name] = self._matrix(as_matrices(wide)).reshape(x.shape) if matrix(name, x) else task_average(wide)
        return out

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Iso-CTS of one stacked matrix ``x`` ``(K, m, n)`` as K per-task parts ``(K, m, n)``."""
        num_tasks, rows, cols = x.shape
        common, per_task = subspace_sizes(min(rows, cols), num_tasks, self.common_fraction)
        u, s, vh = thin_svd(x.sum(dim=0))  # (m, r), (r,), (r, n)
        u_c, s_c, vh_c = u[:, :common], s[:common], vh[:common]  # (m, c), (c,), (c, n)
        residual = x - u_c @ (u_c.T @ x)  # (K, m, n): each task outside the common left subspace
        u_t, s_t, vh_t = thin_svd(residual)  # (K, m, r), (K, r), (K, r, n)
        u_cat = torch.cat([u_t[:, :, :per_task].permute(1, 0, 2).reshape(rows, -1), u_c], dim=1)  # (m, K s + c)
        vh_cat = torch.cat([vh_t[:, :per_task].reshape(-1, cols), vh_c], dim=0)  # (K s + c, n)
        mean = torch.cat([s_t[:, :per_task].reshape(-1), s_c]).mean()  # σ̄ over all min(m, n) values
        u_perp, vh_perp = polar_factor(u_cat), polar_factor(vh_cat)  # (m, K s + c), (K s + c, n)
        split = num_tasks * per_task
        tasks = torch.einsum(
            "mtk,tkn->tmn", u_perp[:, :split].reshape(rows, num_tasks, per_task), vh_perp[:split].reshape(num_tasks, per_task, cols)
        )  # (K, m, n): task k's block
        shared = u_perp[:, split:] @ vh_perp[split:]  # (m, n): the common block
        return mean * (tasks + shared / num_tasks)  # (K, m, n)
