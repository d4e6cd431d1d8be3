"""Static merges informed by data: each expert's statistics on its own calibration inputs, then a
closed-form rewrite, λ fixed (Fisher merging, RegMean).

A :class:`CalibratedMethod` is a static merge like any other (one frozen λ per task on rewritten
task vectors, the same :class:`~adamerge.core.merged_model.MergedModel`, evaluation and export),
with one addition to the contract: its rewrite needs a statistic of each expert alone on that
expert's unlabeled ``--calib`` data. The workflow (:func:`adamerge.run.workflow._load`) sees
:attr:`CalibratedMethod.needs_calibration`, collects the statistic named by the rewrite
(:mod:`adamerge.run.calibration_statistics`) and calls :meth:`CalibratedMethod.rewrite_with_statistics`
in place of :meth:`~adamerge.methods.method.Method.rewrite`. A run without ``--calib`` is refused
when the method is configured, before anything is loaded or written.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from adamerge.errors import AdamergeError
from adamerge.methods.rewrite_method import RewriteMethod

if TYPE_CHECKING:
    from adamerge.core.task_vectors import TaskVectors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibratedMethod(RewriteMethod):
    """A static merge ``θ = θ_0 + Σ_k τ'_k`` whose τ' come from a :class:`CalibratedRewrite` and
    each expert's statistics on its own calibration data.

    Attributes:
        name: the ``--method`` name.
        paper: reference.
        preset: field values of the rewrite class (empty: its defaults, documented on the class);
            ``--options`` override them.
        rewrite_class: ``"package.module:Class"`` of the
            :class:`~adamerge.rewrite.calibrated.CalibratedRewrite` subclass.
    """

    rewrite_base: ClassVar[str] = "adamerge.rewrite.calibrated:CalibratedRewrite"

    #: The workflow collects each expert's statistics (``--calib`` required) before the rewrite.
    needs_calibration: ClassVar[bool] = True

    def configured(self, settings: Any = None, **options: Any) -> CalibratedMethod:
        """As :meth:`RewriteMethod.configured`, refused without ``--calib``; a sampling seed
        defaults to ``--seed``.

        Raises:
            AdamergeError: ``settings`` without ``--calib``, an option that is not a field of the
                rewrite class, or an invalid value.
        """
        if settings is not None and getattr(settings, "calib", None) is None:
            raise AdamergeError(
                f"--method {self.name} computes each expert's statistics on its own task's unlabeled data: "
                "pass --calib DIR (DIR/<task>/...)"
            )
        given = dict(getattr(settings, "options", None) or {}) | options
        if settings is not None and "seed" not in given and "seed" in {f.name for f in dataclasses.fields(self.rewrite_type())}:
            options["seed"] = getattr(settings, "seed", 0)
        return super().configured(settings, **options)

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """Refused: this merge needs each expert's statistics (:meth:`rewrite_with_statistics`)."""
        raise AdamergeError(f"--method {self.name} needs each expert's calibration statistics: run it with --calib DIR")

    def rewrite_with_statistics(self, task_vectors: TaskVectors, statistics: Sequence[Any]) -> TaskVectors:
        """The rewritten vectors τ' from one statistic per expert (in task order); dense: factored
        LoRA vectors are densified, with a warning."""
        from adamerge.core.task_vectors import TaskVectors

        merge = self.merge()
        logger.info("data-informed merge %s: %s", self.name, merge)
        return TaskVectors(task_vectors.tasks, merge.rewrite(dict(task_vectors.items()), statistics))
