"""Static merges as methods: a rewrite of the task vectors and a fixed λ, no training stage.

Every :class:`~adamerge.rewrite.static_merge.StaticMerge` is task arithmetic with fixed λ on rewritten task
vectors (:meth:`~adamerge.rewrite.static_merge.StaticMerge.rewrite`), so ``adamerge merge`` builds the same
:class:`~adamerge.core.merged_model.MergedModel` as ``adamerge fit``, with one frozen λ per task, and
evaluates, re-estimates statistics and exports it with the same code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adamerge.errors import check_options
from adamerge.methods.method import Method

if TYPE_CHECKING:
    import torch

    from adamerge.core.task_vectors import TaskVectors
    from adamerge.rewrite.static_merge import StaticMerge

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StaticMethod(Method):
    """A static merge: :class:`~adamerge.rewrite.static_merge.StaticMerge` field values, λ fixed.

    Attributes:
        name: the ``--method`` name.
        paper: reference.
        preset: :class:`~adamerge.rewrite.static_merge.StaticMerge` field values (plain data: listing the
            methods imports no torch).
    """

    preset: Mapping[str, Any] = field(default_factory=dict)

    def configured(self, settings: Any = None, **options: Any) -> StaticMethod:
        """The preset with the settings' ``options`` (``--options``) and keyword ``options`` applied
        (DARE's seed defaults to ``--seed``).

        Raises:
            AdamergeError: an option that is not a :class:`~adamerge.rewrite.static_merge.StaticMerge` field.
        """
        from adamerge.rewrite.static_merge import StaticMerge

        options = dict(getattr(settings, "options", None) or {}) | options
        if self.preset.get("sparsify") == "dare":
            options.setdefault("seed", getattr(settings, "seed", 0))
        check_options(self.name, options, (f.name for f in dataclasses.fields(StaticMerge)))
        method = dataclasses.replace(self, preset={**self.preset, **options})
        method.merge()  # invalid values fail here, before anything is loaded
        return method

    def merge(self) -> StaticMerge:
        """The :class:`~adamerge.rewrite.static_merge.StaticMerge` of this preset."""
        from adamerge.rewrite.static_merge import StaticMerge

        return StaticMerge(**self.preset)

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """The rewritten vectors τ' (unchanged for the linear merges: LoRA factors stay factored)."""
        from adamerge.core.task_vectors import TaskVectors

        merge = self.merge()
        logger.info("static merge %s: %s", self.name, merge)
        if merge.is_linear():
            return task_vectors
        return TaskVectors(task_vectors.tasks, merge.rewrite(dict(task_vectors.items())))

    def start(self, num_tasks: int) -> torch.Tensor:
        """λ ``(K, 1)``: one fixed value per task."""
        return self.merge().coefficients(num_tasks).unsqueeze(1)
