"""RegMean (Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023).

For a linear layer ``y = x W`` (``W`` ``(in, out)``) that expert k runs on inputs ``X_k`` ``(n_k, in)``
of its own task, the merged ``W`` minimising ``Σ_k ‖X_k W − X_k W_k‖²`` is (paper, Eq. 2)

    ``W = (Σ_k G_k)⁻¹ Σ_k G_k W_k``,  ``G_k = X_kᵀ X_k`` ``(in, in)``,

with the off-diagonal entries of every Gram scaled by α (paper, Sec. 3.3:
``G̃_k = α G_k + (1 − α) diag(G_k)``; α = 1 is the exact regression, α = 0 a per-input-feature
weighted mean). PyTorch's ``nn.Linear`` stores ``W_kᵀ`` ``(out, in)``; GPT-2's ``Conv1D`` stores
``W_k`` ``(in, out)``: :attr:`LayerInputs.input_dim` says which. Every other merged tensor (biases,
embeddings, convolutions, norms) is averaged, as in the paper.

As a rewrite: ``W_k = W_0 + T_k`` (``T_k`` the task vector in ``(in, out)`` form) and
``(Σ_k G̃_k)⁻¹ Σ_k G̃_k W_0 = W_0``, so ``W = W_0 + Σ_k S⁻¹ G̃_k T_k`` with ``S = Σ_j G̃_j``:
``τ'_k = S⁻¹ G̃_k T_k`` (back in the tensor's orientation) and ``λ_k = 1``; averaged tensors get
``τ'_k = τ_k / K``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite import operations as pp
from adamerge.rewrite.calibrated import CalibratedRewrite
from adamerge.rewrite.coverage import warn_if_mostly_averaged
from adamerge.rewrite.scaled_rewrite import compute_dtype

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerInputs:
    """The inputs one linear layer of one expert received on that expert's calibration data.

    Attributes:
        gram: ``XᵀX`` ``(in, in)``, summed over the ``rows`` input vectors (float32 or wider).
        rows: how many input vectors (examples, or real tokens) it sums.
        input_dim: the weight's input dimension: 1 for ``nn.Linear`` ``(out, in)``, 0 for GPT-2's
            ``Conv1D`` ``(in, out)``.
    """

    gram: torch.Tensor
    rows: int
    input_dim: int = 1


@dataclass(frozen=True)
class RegMeanMerge(CalibratedRewrite):
    """RegMean with the paper's α = 0.9 and Grams averaged over their rows.

    Defaults: ``alpha=0.9``, the value of the official code's ``--regmean_reduce_nondiag`` option
    (default 0.9, github.com/bloomberg/dataless-model-merging; the paper treats α as a
    hyper-parameter and tunes it per setting); FusionBench 0.2.33 sets its
    ``reduce_non_diagonal_ratio`` per model family (0.95 for CLIP, 0.6 for GPT-2, 0.1 in the base
    ``regmean.yaml``). ``mean=True`` divides each expert's Gram by its number of input rows, as the
    official experiments (``regmean_mean: true``) and FusionBench (a running mean of ``xᵀx``) do;
    ``mean=False`` is the paper's plain ``XᵀX`` (tasks with more calibration tokens weigh more).

    The solve runs in float64 (``torch.linalg.solve``; FusionBench inverts in the Grams' dtype).
    Input features that no expert ever saw non-zero (``S_ii = 0``, e.g. after a dead ReLU) drop out
    of the regression exactly (their Gram rows and columns are 0) and keep the weights' mean; a
    singular rest (α = 1 with fewer rows than features) is solved with the pseudo-inverse (the
    minimum-norm optimum), with a warning. A layer whose weight is tied to another module (a tied
    LM head) is averaged. Factored (LoRA) task vectors are densified first (``TaskVectors.items``,
    with a warning). Memory: besides the task vectors, one ``(in, in)`` float32 Gram per hooked layer
    per expert (collected by :func:`adamerge.run.calibration_statistics.layer_input_grams`).

    Attributes:
        alpha: α in [0, 1], the scale of the Grams' off-diagonal entries.
        mean: divide each Gram by its row count.
    """

    alpha: float = 0.9
    mean: bool = True

    statistic = "gram"

    def __post_init__(self) -> None:
        value = self.alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
            raise AdamergeError(f"alpha must be in [0, 1] (the scale of the Grams' off-diagonal entries), got {value!r}")
        if not isinstance(self.mean, bool):
            raise AdamergeError(f"mean must be true or false, got {self.mean!r}")

    def regularised(self, layer: LayerInputs) -> torch.Tensor:
        """``G̃ = α G + (1 − α) diag(G)`` ``(in, in)`` in float64 (``G`` divided by its rows with ``mean``)."""
        gram = layer.gram.double()
        if self.mean:
            gram = gram / max(layer.rows, 1)
        return self.alpha * gram + (1.0 - self.alpha) * torch.diag_embed(torch.diagonal(gram))

    def rewrite(self, tv: Mapping[str, torch.Tensor], statistics: Sequence[Mapping[str, LayerInputs]]) -> dict[str, torch.Tensor]:
        """``τ'_k = S⁻¹ G̃_k T_k`` for the hooked linear weights, ``τ_k / K`` for every other tensor.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order.
            statistics: per expert, ``{weight name: LayerInputs}``.

        Raises:
            AdamergeError: not one set of Grams per expert, a Gram for some experts only, or a Gram
                that does not fit its weight.
        """
        items = pp.as_items(tv)
        num_tasks = items[0][1].shape[0]
        if len(statistics) != num_tasks:
            raise AdamergeError(f"RegMean: {len(statistics)} sets of Grams for {num_tasks} experts")
        warn_if_mostly_averaged("RegMean", items, lambda name, _: name in statistics[0], "in linear layers")
        out, solved = {}, 0
        for name, x in items:
            present = [name in grams for grams in statistics]
            if not any(present):
                out[name] = (x.to(compute_dtype(x.dtype)) / num_tasks).to(x.dtype)
                continue
            if not all(present):
                raise AdamergeError(f"RegMean: linear weight {name!r} has input Grams for some experts only")
            out[name] = self._solve(name, x, [grams[name] for grams in statistics])
            solved += 1
        logger.info("RegMean: %d linear weight(s) solved, %d tensor(s) averaged", solved, len(items) - solved)
        return out

    def _solve(self, name: str, x: torch.Tensor, layers: list[LayerInputs]) -> torch.Tensor:
        """``τ'_k`` ``(K, *shape)`` of one linear weight ``x`` ``(K, *shape)``."""
        input_dim = layers[0].input_dim
        if x.dim() != 3 or any(layer.input_dim != input_dim for layer in layers):
            raise AdamergeError(f"RegMean: {name!r} is not one 2-d linear weight per expert")
        deltas = x.double() if input_dim == 0 else x.double().transpose(1, 2)  # (K, in, out): T_k
        grams = torch.stack([self.regularised(layer) for layer in layers])  # (K, in, in): G̃_k
        if grams.shape[1:] != (deltas.shape[1], deltas.shape[1]):
            raise AdamergeError(f"RegMean: Gram of {name!r} is {tuple(grams.shape[1:])}, its weight has {deltas.shape[1]} inputs")
        total = grams.sum(dim=0)  # (in, in): S
        products = grams @ deltas  # (K, in, out): G̃_k T_k
        alive = torch.diagonal(total) > 0  # (in,): features some expert saw non-zero
        result = deltas / x.shape[0]  # (K, in, out): the mean where no input was seen
        if bool(alive.any()):
            block = total[alive][:, alive]  # (a, a)
            rhs = products[:, alive].permute(1, 0, 2).reshape(int(alive.sum()), -1)  # (a, K·out)
            solution = _solve_symmetric(name, block, rhs)  # (a, K·out)
            result[:, alive] = solution.reshape(int(alive.sum()), x.shape[0], -1).permute(1, 0, 2)
        result = result if input_dim == 0 else result.transpose(1, 2)  # (K, *shape)
        return result.to(x.dtype)


def _solve_symmetric(name: str, matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix⁻¹ rhs`` for a symmetric PSD ``matrix`` ``(a, a)`` (float64), else the pseudo-inverse's."""
    solution, info = torch.linalg.solve_ex(matrix, rhs)
    if int(info) == 0 and bool(torch.isfinite(solution).all()):
        return solution
    logger.warning("RegMean: the Gram sum of %r is singular (alpha 1 with too few rows?): using its pseudo-inverse", name)
    return torch.linalg.pinv(matrix, hermitian=True) @ rhs
