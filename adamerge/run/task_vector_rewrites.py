"""The task vectors a run merges: the method's own rewrite, or a static merge's to start from.

A static method rewrites the experts' task vectors (:meth:`~adamerge.methods.method.Method.rewrite`;
a data-informed one from each expert's statistics on its own calibration data). A learned method
merges the experts' own vectors (AdaMerging++: TIES-trimmed ones), or, with ``--start-from NAME``,
the rewritten vectors ``τ'_k`` of the static merge ``NAME`` at its fixed ``λ^s_k``, scaled to

    ``τ''_k = (λ^s_k / λ_init) · τ'_k``,

so that the learned method's own start ``λ_init`` (``--init``, else its default) is that static
merge exactly, ``θ_0 + Σ_k λ_init τ''_k = θ_0 + Σ_k λ^s_k τ'_k``, and its constraint, learning rate
and regulariser keep the meaning they have around task arithmetic. The fit then refines a strong
merge (RegMean, TSV-M, ...) instead of task arithmetic. One-hot λ no longer gives an expert.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import torch

from adamerge.errors import AdamergeError
from adamerge.methods import LearnedMethod, Method, StaticMethod, get_method
from adamerge.methods.calibrated_method import CalibratedMethod
from adamerge.run.calibration_statistics import expert_statistics

if TYPE_CHECKING:
    import lightning as L

    from adamerge.core.task_vectors import TaskVectors
    from adamerge.sources import ExpertSet

logger = logging.getLogger(__name__)


def start_method(settings: Any, method: Method) -> StaticMethod | None:
    """The configured static merge named by ``settings.start_from`` that ``method`` starts from
    (``None``: unset).

    Raises:
        AdamergeError: ``method`` is static, an unknown name or a learned method to start from, or
            options / data the merge refuses (before anything is loaded).
    """
    if getattr(settings, "start_from", None) is None:
        return None
    if not isinstance(method, LearnedMethod):
        raise AdamergeError(f"--start-from {settings.start_from}: {method.name} is a static merge; --start-from is for learned methods")
    static = get_method(settings.start_from, option="--start-from")
    if not isinstance(static, StaticMethod):
        raise AdamergeError(
            f"--start-from {settings.start_from}: expected a static merge (regmean, tsv-m, ties, task-arithmetic, ...), "
            "not a learned method"
        )
    try:
        return static.configured(dataclasses.replace(settings, options=dict(settings.start_options)))
    except AdamergeError as error:  # the merge's own message names its options as --options
        raise AdamergeError(f"--start-from {static.name}: {str(error).replace('--options', '--start-options', 1)}") from None


def rewritten(method: Method, experts: ExpertSet, data: L.LightningDataModule | None) -> TaskVectors:
    """The task vectors ``method`` merges at its own λ; a data-informed one's from each expert's
    statistics on its own calibration data (its ``configured`` refused a run without ``--calib``)."""
    if not isinstance(method, CalibratedMethod):
        return method.rewrite(experts.task_vectors)
    return method.rewrite_with_statistics(experts.task_vectors, expert_statistics(method.merge(), experts, data))


def started_from(static: StaticMethod, method: LearnedMethod, experts: ExpertSet, data: L.LightningDataModule | None) -> TaskVectors:
    """The static merge's task vectors scaled so that ``method``'s start λ is that merge.

    Returns:
        ``(λ^s_k / λ_init) · τ'_k`` for every task k (LoRA factors stay factored where the static
        merge keeps them).
    """
    task_vectors = rewritten(static, experts, data)
    static_coefficients = static.start(len(experts.tasks)).reshape(-1).float()  # (K,)
    factors = static_coefficients / method.init  # (K,)
    logger.info(
        "%s starts from %s: task vectors scaled by %s, so that λ = %g is that merge",
        method.name, static.name, ", ".join(f"{f:.3g}" for f in factors.tolist()), method.init,
    )  # fmt: skip
    if torch.allclose(factors, torch.ones_like(factors)):
        return task_vectors
    return task_vectors.scaled(factors)
