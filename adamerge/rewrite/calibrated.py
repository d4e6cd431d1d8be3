"""Rewrites that need statistics of each expert on its own calibration data (Fisher, RegMean).

A :class:`CalibratedRewrite` is a closed-form merge ``θ = θ_0 + Σ_k τ'_k`` (λ_k = 1) whose
rewritten task vectors ``τ'_k`` depend on a statistic of expert k alone, run on task k's unlabeled
calibration inputs: its diagonal Fisher (:mod:`adamerge.rewrite.fisher`) or the Gram matrices of
its linear layers' inputs (:mod:`adamerge.rewrite.regmean`). The rewrite does the maths on
tensors; :mod:`adamerge.run.calibration_statistics` collects the statistic named by
:attr:`CalibratedRewrite.statistic`, and :class:`~adamerge.methods.calibrated_method.CalibratedMethod`
runs both through the same :class:`~adamerge.core.merged_model.MergedModel` as every static merge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class CalibratedRewrite:
    """A rewrite ``τ → τ'`` computed from one statistic per expert; λ = 1 for every task."""

    #: The statistic of each expert it needs: ``"fisher"`` or ``"gram"``.
    statistic: ClassVar[str] = ""

    def rewrite(self, tv: Mapping[str, torch.Tensor], statistics: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The rewritten vectors ``{name: Tensor(K, *shape)}`` with ``θ = θ_0 + Σ_k τ'_k``.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order (never modified).
            statistics: one statistic per expert, in ``tv``'s task order.
        """
        raise NotImplementedError

    def coefficients(self, num_tasks: int) -> torch.Tensor:
        """The fixed λ ``(K,)``: 1 for every task (the merge is in τ')."""
        return torch.ones(num_tasks, dtype=torch.float32)
