"""Fisher merging (Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022).

Each expert k has a diagonal Fisher ``F_k`` (one non-negative value per entry of every merged
tensor, from its own task's calibration inputs: :mod:`adamerge.run.calibration_statistics`), and
the merge is the per-entry weighted mean of the experts (paper, Eq. 3):

    ``θ = Σ_k c_k (F_k + ε) θ_k / Σ_k c_k (F_k + ε)``,

``c_k = 1/K``, or with ``normalise`` ``c_k ∝ 1 / (‖F_k‖ + ε)`` (``‖·‖`` the L2 norm over every merged
entry of expert k), so that an expert whose Fisher is larger overall (a sharper loss) does not
outweigh the others everywhere. Since ``Σ_k w_k = 1`` for ``w_k = c_k (F_k + ε) / Σ_j c_j (F_j + ε)``,
the merge is ``θ_0 + Σ_k w_k ⊙ τ_k``: the rewrite ``τ'_k = w_k ⊙ τ_k`` with ``λ_k = 1``.

The Fisher estimator (``labels``, how ``y`` is chosen in ``E_y (∇ log p(y|x))²``) and its cost are
documented on :class:`FisherMerge` and :func:`adamerge.run.calibration_statistics.fisher_diagonals`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite import operations as pp
from adamerge.rewrite.calibrated import CalibratedRewrite
from adamerge.rewrite.scaled_rewrite import compute_dtype

logger = logging.getLogger(__name__)

#: How the label of each scored position is chosen (:func:`adamerge.run.calibration_statistics.fisher_diagonals`).
FISHER_LABELS = ("sqrt-weighted", "expected", "argmax", "sample")


@dataclass(frozen=True)
class FisherMerge(CalibratedRewrite):
    """Fisher-weighted averaging with FusionBench's defaults (``fisher_merging.yaml``).

    Defaults: ``normalise=True`` and ``minimal_fisher=1e-6`` are FusionBench 0.2.33's
    ``normalize_fisher_weight`` and ``minimal_fisher_weight`` (MergeLM's, and the paper's code's
    ``normalize_fishers=True``, ``fisher_floor=1e-6``). FusionBench adds ε to every expert's Fisher;
    the paper's code (github.com/mmatena/model_merging, ``merging.py``) floors only the first
    expert's at ε (``favor_target_model``) and normalises by ``1 / ‖F_k‖`` without ε: both only
    matter where every Fisher is about 0 (there the merge falls back to the c-weighted mean).

    Labels (``labels``), for the squared gradients of ``log p(y | x)`` of each example:

    - ``"sqrt-weighted"`` (default, FusionBench's and MergeLM's): one gradient per example of
      ``Σ_c sqrt(p̂_c) log p_c`` (``p̂`` the expert's detached probabilities), squared. It is the
      paper's expectation ``Σ_c p_c (∇ log p_c)²`` plus the cross terms
      ``Σ_{c≠c'} sqrt(p_c p_c') ∇ log p_c ∇ log p_c'``, at the cost of one backward pass.
      FusionBench squares the gradient of a whole **batch's** sum instead (cross terms between
      examples too); adamerge always squares per example, which equals FusionBench at batch size 1.
    - ``"expected"`` (the paper's, ``_compute_exact_fisher_for_batch`` in its code): the exact
      expectation over the expert's predictive distribution, one backward pass per class
      (classification only: a language model's vocabulary would take one per token).
    - ``"argmax"``: the expert's own prediction as the label (one backward).
    - ``"sample"``: a label drawn from the expert's predictive distribution (seeded, one backward),
      an unbiased one-sample estimate of ``"expected"``.

    Tensors without a Fisher (float buffers such as BatchNorm statistics: no gradient) are averaged.
    Factored (LoRA) task vectors are densified first (``TaskVectors.items``, with a warning).

    Attributes:
        labels: one of :data:`FISHER_LABELS`.
        normalise: scale each expert's Fisher by ``1 / (‖F_k‖ + ε)`` first.
        minimal_fisher: ε > 0, added to every Fisher entry (and to ``‖F_k‖``).
        seed: seed of the sampled labels (``labels="sample"``; defaults to ``--seed``).
    """

    labels: Literal["sqrt-weighted", "expected", "argmax", "sample"] = "sqrt-weighted"
    normalise: bool = True
    minimal_fisher: float = 1e-6
    seed: int = 0

    statistic = "fisher"

    def __post_init__(self) -> None:
        if self.labels not in FISHER_LABELS:
            raise AdamergeError(f"labels must be one of {list(FISHER_LABELS)}, got {self.labels!r}")
        if not isinstance(self.normalise, bool):
            raise AdamergeError(f"normalise must be true or false, got {self.normalise!r}")
        value = self.minimal_fisher
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise AdamergeError(f"minimal_fisher must be a finite number > 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise AdamergeError(f"seed must be an integer, got {self.seed!r}")

    def weights(self, fishers: Sequence[Mapping[str, torch.Tensor]], num_tasks: int) -> torch.Tensor:
        """``c`` ``(K,)``: ``1/K``, or with ``normalise`` ``(1/K) · r_k / Σ_j r_j``, ``r_k = 1 / (‖F_k‖ + ε)``."""
        scale = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64)  # (K,)
        if not self.normalise:
            return scale
        norms = torch.stack(
            [
                torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values()) if fisher else torch.zeros((), dtype=torch.float64))
                for fisher in fishers
            ]
        )  # (K,)
        inverse = 1.0 / (norms + self.minimal_fisher)
        logger.info("Fisher norms per expert: %s", [f"{v:.3g}" for v in norms.tolist()])
        return scale * inverse / inverse.sum()

    def rewrite(self, tv: Mapping[str, torch.Tensor], statistics: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``τ'_k = w_k ⊙ τ_k``, ``w_k = c_k (F_k + ε) / Σ_j c_j (F_j + ε)`` per entry.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order.
            statistics: per expert, ``{name: F_k (*shape)}``; a name missing from every expert's
                Fisher is averaged (``τ'_k = τ_k / K``).

        Raises:
            AdamergeError: not one Fisher per expert, or a Fisher of another shape than its tensor,
                or a name with a Fisher for some experts only.
        """
        items = pp.as_items(tv)
        num_tasks = items[0][1].shape[0]
        if len(statistics) != num_tasks:
            raise AdamergeError(f"Fisher merging: {len(statistics)} Fishers for {num_tasks} experts")
        scale = self.weights(statistics, num_tasks)
        out, averaged = {}, []
        for name, x in items:
            wide = compute_dtype(x.dtype)
            present = [name in fisher for fisher in statistics]
            if not any(present):
                averaged.append(name)
                out[name] = (x.to(wide) / num_tasks).to(x.dtype)
                continue
            if not all(present):
                raise AdamergeError(f"Fisher merging: tensor {name!r} has a Fisher for some experts only")
            fisher = torch.stack([f[name] for f in statistics]).to(wide)  # (K, *shape)
            if fisher.shape != x.shape:
                raise AdamergeError(
                    f"Fisher merging: Fisher of {name!r} has shape {tuple(fisher.shape[1:])}, the tensor {tuple(x.shape[1:])}"
                )
            c = scale.to(wide).view(-1, *([1] * (x.dim() - 1)))  # (K, 1, ...)
            weighted = c * (fisher + self.minimal_fisher)  # (K, *shape)
            out[name] = (weighted / weighted.sum(dim=0) * x.to(wide)).to(x.dtype)  # (K, *shape)
        if averaged:
            logger.info("Fisher merging: %d tensor(s) without a Fisher (buffers) averaged, e.g. %s", len(averaged), averaged[:3])
        return out
