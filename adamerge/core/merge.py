"""Pure merge functions: ``θ = θ_0 + Σ_k λ_k τ_k`` per tensor with one fused contraction.

No ``λ ⊙ τ`` temporary of size K×P is ever formed: the sum over experts is a matrix-vector
product ``τᵀ λ`` (BLAS gemv) that reads each task-vector entry once, and its backward pass, the
gradient ``∂L/∂λ_k = ⟨∂L/∂θ, τ_k⟩``, is a second gemv over the same buffer. Task vectors stored
in a lower precision (bf16/fp16) are widened chunk by chunk (a few MB at a time) and accumulated
in the base's precision.

Factored tensors (:class:`~adamerge.core.task_vectors.FactoredDelta`: LoRA experts' ``s_k B_k A_k``,
possibly beside dense rows of full fine-tunes) are merged as ONE dense result per tensor,
``addmm(W_0, B_cat · diag(λ_owner · s), A_cat)``, with the experts' factors concatenated along the
rank; autograd then gives ``∂L/∂λ_k = s_k Σ_{j ∈ R_k} ((G A_catᵀ) ⊙ B_cat)[:, j]`` — the
``s_k ⟨G, B_k A_k⟩`` of the dense formula — without ever forming a per-expert dense delta.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from adamerge.core.granularity import CoefficientLayout, chunk_bounds
from adamerge.core.task_vectors import FactoredDelta
from adamerge.errors import AdamergeError

CPU_CHUNK = 1 << 16  # columns widened at a time on CPU: K × 64 Ki entries stay in cache
CUDA_CHUNK = 1 << 24


def combine(base: torch.Tensor, task_vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``base + Σ_k coefficients[k] · task_vectors[k]`` as one fused contraction.

    Args:
        base: θ_0 of one tensor, shape ``S``.
        task_vectors: τ stacked over experts, ``(K, *S)``, float32 or a lower precision.
        coefficients: ``(K,)``.

    Returns:
        The merged tensor, shape ``S`` and the base's dtype; differentiable in ``coefficients``.
    """
    flat_tv = task_vectors.reshape(task_vectors.shape[0], -1)  # (K, P)
    if flat_tv.dtype == base.dtype:
        merged = torch.mv(flat_tv.t(), coefficients.to(base.dtype))  # (P,) = τᵀ λ
        merged = merged.add_(base.reshape(-1))  # in place: mv's backward does not need its output
    else:
        merged = _WidenedCombine.apply(base.reshape(-1), flat_tv, coefficients)  # (P,)
    return merged.view(base.shape)


class _WidenedCombine(torch.autograd.Function):
    """``base + τᵀ λ`` for low-precision τ, widened chunk by chunk, accumulated in base's dtype."""

    @staticmethod
    def forward(ctx, base: torch.Tensor, flat_tv: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat_tv)
        ctx.coefficient_dtype = coefficients.dtype
        lam = coefficients.detach().to(base.dtype)  # (K,)
        merged = base.detach().clone()  # (P,)
        for start, stop in _chunks(flat_tv):
            merged[start:stop].addmv_(flat_tv[:, start:stop].to(base.dtype).t(), lam)
        return merged

    @staticmethod
    def backward(ctx, grad_merged: torch.Tensor):
        (flat_tv,) = ctx.saved_tensors
        grad = torch.zeros(flat_tv.shape[0], dtype=grad_merged.dtype, device=grad_merged.device)  # (K,)
        for start, stop in _chunks(flat_tv):
            grad.addmv_(flat_tv[:, start:stop].to(grad_merged.dtype), grad_merged[start:stop])  # += τ_chunk g_chunk
        return None, None, grad.to(ctx.coefficient_dtype)


def _chunks(flat_tv: torch.Tensor) -> Iterable[tuple[int, int]]:
    size = CUDA_CHUNK if flat_tv.is_cuda else CPU_CHUNK
    total = flat_tv.shape[1]
    return ((start, min(start + size, total)) for start in range(0, total, size))


def combine_chunks(
    base: torch.Tensor,
    task_vectors: torch.Tensor,
    coefficients: torch.Tensor,
    inverse_permutation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor whose entries are split into C chunks with their own coefficients.

    Args:
        base: θ_0, shape ``S`` (P entries).
        task_vectors: ``(K, *S)``; for random partitions, stored with its entries permuted so that
            every partition is a contiguous range.
        coefficients: ``(K, C)``, column ``c`` for chunk ``c``.
        inverse_permutation: ``(P,)`` indices restoring the original entry order (random
            partitions), or ``None`` for contiguous chunks.
    """
    flat_base = base.reshape(-1)  # (P,)
    flat_tv = task_vectors.reshape(task_vectors.shape[0], -1)  # (K, P)
    bounds = chunk_bounds(flat_base.numel(), coefficients.shape[1])
    if inverse_permutation is None:
        pieces = [combine(flat_base[a:b], flat_tv[:, a:b], coefficients[:, c]) for c, (a, b) in enumerate(bounds)]
        return torch.cat(pieces).view(base.shape)
    zero = flat_base.new_zeros(())
    deltas = [combine(zero.expand(b - a), flat_tv[:, a:b], coefficients[:, c]) for c, (a, b) in enumerate(bounds)]
    delta = torch.cat(deltas)[inverse_permutation]  # (P,) back in the original entry order
    return (flat_base + delta).view(base.shape)


def _add_low_rank(start: torch.Tensor, delta: FactoredDelta, rows: slice, coefficients: torch.Tensor) -> torch.Tensor:
    """``start + B_cat[rows] · diag(λ[owner] · s) · A_cat``: the LoRA experts' part of some rows.

    Args:
        start: ``(n, cols)``, the base (or base + dense rows) of those rows.
        delta: the factored task vectors of the tensor.
        rows: the row range of ``start`` within the tensor.
        coefficients: ``(K,)``.
    """
    dtype = start.dtype
    lam = coefficients.to(dtype)[delta.rank_owner] * delta.rank_scale.to(dtype)  # (R,) = λ_owner(j) · s_owner(j)
    left = delta.left[rows].to(dtype) * lam  # (n, R) = B_cat diag(λ s)
    return torch.addmm(start, left, delta.right.to(dtype))  # (n, cols): one dense result, no per-expert delta


def _add_dense_rows(base: torch.Tensor, delta: FactoredDelta, coefficients: torch.Tensor) -> torch.Tensor:
    """``base + Σ_{dense experts} λ_k τ_k`` (``base`` itself if no expert has a dense row)."""
    if not delta.num_dense:
        return base
    lam = coefficients[delta.dense_index]  # (Kd,) or (Kd, C)
    if lam.dim() == 1:
        return combine(base, delta.dense, lam)
    return combine_chunks(base, delta.dense, lam)


def combine_factored(base: torch.Tensor, delta: FactoredDelta, coefficients: torch.Tensor) -> torch.Tensor:
    """``θ_0 + Σ_k λ_k τ_k`` of a factored tensor as one dense result.

    Args:
        base: θ_0, shape ``S``.
        delta: dense rows and LoRA factors of the tensor.
        coefficients: ``(K,)``.

    Returns:
        The merged tensor, shape ``S``, differentiable in ``coefficients``.
    """
    start = _add_dense_rows(base, delta, coefficients).reshape(delta.rows, delta.cols)  # (rows, cols)
    if not delta.rank:
        return start.view(base.shape)
    return _add_low_rank(start, delta, slice(None), coefficients).view(base.shape)


def combine_factored_chunks(base: torch.Tensor, delta: FactoredDelta, coefficients: torch.Tensor) -> torch.Tensor:
    """A factored tensor split into C contiguous chunks of its flattened entries, each with its own λ.

    Each chunk computes the LoRA product only over the rows it touches (a chunk that starts or
    stops inside a row computes that row in full and keeps its slice), so the work is one dense
    result plus at most two rows per chunk.

    Args:
        base: θ_0, shape ``S`` (P entries).
        delta: dense rows and LoRA factors of the tensor.
        coefficients: ``(K, C)``, column ``c`` for chunk ``c``.
    """
    start = _add_dense_rows(base, delta, coefficients).reshape(delta.rows, delta.cols)  # (rows, cols)
    if not delta.rank:
        return start.view(base.shape)
    cols = delta.cols
    pieces = []
    for c, (a, b) in enumerate(chunk_bounds(base.numel(), coefficients.shape[1])):
        rows = slice(a // cols, -(-b // cols))  # rows touched by entries [a, b)
        block = _add_low_rank(start[rows], delta, rows, coefficients[:, c])  # (n, cols)
        offset = rows.start * cols
        pieces.append(block.reshape(-1)[a - offset : b - offset])  # (b - a,)
    return torch.cat(pieces).view(base.shape)


def merge_tensors(
    base: Mapping[str, torch.Tensor],
    task_vectors: Iterable[tuple[str, torch.Tensor | FactoredDelta]],
    coefficients: torch.Tensor,
    layout: CoefficientLayout,
    inverse_permutations: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge every tensor of ``task_vectors`` with its group's (or chunks') coefficients.

    Args:
        base: ``{name: θ_0}`` holding at least the merged names.
        task_vectors: ``(name, τ (K, *S) or FactoredDelta)`` pairs in layout order
            (:meth:`~adamerge.core.task_vectors.TaskVectors.parts`).
        coefficients: constrained coefficients ``(K, G)``.
        layout: the compiled granularity.
        inverse_permutations: for randomly partitioned tensors, the permutation undoing their
            storage order (see :func:`combine_chunks`).

    Returns:
        ``{name: merged tensor}`` for the merged names only.
    """
    inverse_permutations = inverse_permutations or {}
    merged = {}
    rows = zip(task_vectors, layout.tensor_groups, layout.tensor_chunks, strict=True)
    for (name, tv), group, chunks in rows:
        merged[name] = merge_tensor(name, base[name], tv, coefficients, group, chunks, inverse_permutations)
    return merged


def merge_tensor(
    name: str,
    base: torch.Tensor,
    tv: torch.Tensor | FactoredDelta,
    coefficients: torch.Tensor,
    group: int,
    chunks: int,
    inverse_permutations: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Merge one tensor: ``tv`` dense ``(K, *S)`` or factored, its group (and chunks) in ``coefficients (K, G)``."""
    if isinstance(tv, FactoredDelta):
        return _merge_factored(name, base, tv, coefficients, group, chunks, inverse_permutations)
    if chunks == 1:
        return combine(base, tv, coefficients[:, group])
    lam = coefficients[:, group : group + chunks]  # (K, C)
    return combine_chunks(base, tv, lam, inverse_permutations.get(name))


def _merge_factored(
    name: str,
    base: torch.Tensor,
    delta: FactoredDelta,
    coefficients: torch.Tensor,
    group: int,
    chunks: int,
    inverse_permutations: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    if chunks == 1:
        return combine_factored(base, delta, coefficients[:, group])
    if name in inverse_permutations:
        raise AdamergeError(
            f"tensor {name!r} holds LoRA factors: random partitions would need its dense task vectors; "
            "use contiguous chunks (chunk:N), layer, group or task granularity"
        )
    return combine_factored_chunks(base, delta, coefficients[:, group : group + chunks])


class PrecomputedGradient(torch.autograd.Function):
    """A scalar carrying already-computed gradients of ``tensors``.

    ``PrecomputedGradient.apply(value, grads, *tensors)`` returns ``value``; back-propagating it
    hands ``grads`` (scaled by the incoming gradient) to ``tensors`` without any further
    computation. A training step uses it to run the merged weights' backward once, after the
    per-task losses have filled ``∂L/∂θ``.
    """

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: tuple[torch.Tensor, ...], *tensors: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grads = ctx.grads
        del ctx.grads
        if bool(grad_output != 1):  # e.g. gradient accumulation divides the loss
            grads = tuple(g * grad_output for g in grads)
        return (None, None, *grads)
