"""Row-sparse gradients of merged embedding tables in the training step.

A batch reads a few hundred rows of a vocabulary embedding (all-MiniLM-L6-v2: 30 522 × 384, half
the model's entries), yet its dense gradient ``∂L/∂E`` is a zero-filled table the size of ``E``,
filled, accumulated over the tasks and contracted with every expert's task vector. Here the
embedding layers of the merged tables run with ``sparse=True`` during the step's forwards, so
``∂L/∂E`` holds only the rows the batch read, and λ's gradient is contracted over those rows:

    ∂L/∂λ_k[c] = Σ_{(r, j) read, in chunk c} τ_k[r, j] · ∂L/∂E[r, j]

which equals the dense ``⟨τ_k, ∂L/∂E⟩`` exactly (the other rows' gradient is zero; the padding
row's too, as in the dense backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from adamerge.core.granularity import CoefficientLayout, chunk_bounds


def row_sparse_tables(
    model: nn.Module,
    task_vectors: dict[str, torch.Tensor],
    shared: frozenset[str],
    permuted: frozenset[str],
) -> frozenset[str]:
    """Merged tensors whose gradient can be row-sparse: the ``weight`` of an ``nn.Embedding``
    that no other module reads (not ``shared``), stored as dense task vectors in entry order (not
    ``permuted`` into random partitions), without ``max_norm`` (which renormalises rows in place).

    Args:
        model: the base architecture.
        task_vectors: ``{name: τ}`` of the dense merged tensors.
        shared: names of parameters held by several modules (tied weights).
        permuted: names stored in partition order.
    """
    names = []
    for name in task_vectors:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if (
            isinstance(module, nn.Embedding)
            and attr == "weight"
            and module.max_norm is None
            and name not in shared
            and name not in permuted
        ):
            names.append(name)
    return frozenset(names)


@contextlib.contextmanager
def sparse_gradients(model: nn.Module, names: frozenset[str]) -> Iterator[None]:
    """Run the embedding layers owning ``names`` with ``sparse=True`` (restored on exit)."""
    modules = [model.get_submodule(name.rpartition(".")[0]) for name in sorted(names)]
    previous = [module.sparse for module in modules]
    for module in modules:
        module.sparse = True
    try:
        yield
    finally:
        for module, value in zip(modules, previous, strict=True):
            module.sparse = value


def coefficient_gradient(
    grad: torch.Tensor,
    task_vectors: torch.Tensor,
    chunks: int,
) -> torch.Tensor:
    """``∂L/∂λ`` of one table from its row-sparse gradient.

    Args:
        grad: sparse COO ``∂L/∂E`` of shape ``(V, D)`` (uncoalesced: one part per task).
        task_vectors: ``(K, V, D)`` τ of the table, any float dtype.
        chunks: C contiguous chunks of the flattened table, each with its own coefficient.

    Returns:
        ``(K, C)`` in ``grad``'s dtype.
    """
    grad = grad.coalesce()
    rows = grad.indices()[0]  # (R,)
    values = grad.values()  # (R, D)
    gathered = task_vectors.index_select(1, rows).to(values.dtype)  # (K, R, D)
    if chunks == 1:
        return torch.einsum("krd,rd->k", gathered, values).unsqueeze(1)  # (K, 1)
    width = values.shape[1]
    entries = (rows.unsqueeze(1) * width + torch.arange(width, device=rows.device)).reshape(-1)  # (R·D,) flat index
    starts = torch.tensor([a for a, _ in chunk_bounds(task_vectors[0].numel(), chunks)], device=rows.device)  # (C,)
    chunk = torch.searchsorted(starts, entries, right=True) - 1  # (R·D,) chunk of each entry
    products = gathered.reshape(gathered.shape[0], -1) * values.reshape(1, -1)  # (K, R·D)
    return products.new_zeros(products.shape[0], chunks).index_add_(1, chunk, products)  # (K, C)


def coefficient_gradients(
    grads: dict[str, torch.Tensor],
    task_vectors: dict[str, torch.Tensor],
    layout: CoefficientLayout,
    num_tasks: int,
) -> torch.Tensor:
    """``(K, G)`` ``∂L/∂λ`` (constrained coefficients) of every row-sparse table in ``grads``."""
    first = next(iter(grads.values()))
    total = torch.zeros(num_tasks, layout.num_groups, dtype=first.dtype, device=first.device)  # (K, G)
    for name, grad in grads.items():
        i = layout.tensor_names.index(name)
        group, chunks = layout.tensor_groups[i], layout.tensor_chunks[i]
        total[:, group : group + chunks] += coefficient_gradient(grad, task_vectors[name], chunks)
    return total
