"""Static merges that are not presets of StaticMerge: a rewrite class named by import path, λ fixed.

PCB merging, TSV-M, Iso-C and Iso-CTS rewrite the task vectors in their own way
(:class:`~adamerge.rewrite.scaled_rewrite.ScaledRewrite` subclasses) and then merge them by task
arithmetic with one fixed λ, so ``adamerge merge`` runs them through the same
:class:`~adamerge.core.merged_model.MergedModel`, evaluation and export as every other method, and
a learned method could start from their rewritten vectors. The class is named as
``"module:Class"`` and imported when the method runs, so that listing the methods imports no torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from adamerge.errors import AdamergeError, check_options
from adamerge.methods.static_method import StaticMethod

if TYPE_CHECKING:
    import torch

    from adamerge.core.task_vectors import TaskVectors
    from adamerge.rewrite.scaled_rewrite import ScaledRewrite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewriteMethod(StaticMethod):
    """A static merge ``θ = θ_0 + λ Σ_k τ'_k`` whose τ' come from a :class:`ScaledRewrite` subclass.

    Attributes:
        name: the ``--method`` name.
        paper: reference.
        preset: field values of the rewrite class (empty: its defaults, the paper's, documented on
            the class); ``--options`` override them.
        rewrite_class: ``"package.module:Class"`` of the
            :class:`~adamerge.rewrite.scaled_rewrite.ScaledRewrite` subclass.
    """

    rewrite_class: str = ""

    #: ``"module:Class"`` that :attr:`rewrite_class` must subclass.
    rewrite_base: ClassVar[str] = "adamerge.rewrite.scaled_rewrite:ScaledRewrite"

    def configured(self, settings: Any = None, **options: Any) -> RewriteMethod:
        """The preset with the settings' ``options`` (``--options``) and keyword ``options`` applied.

        Raises:
            AdamergeError: an option that is not a field of the rewrite class, or an invalid value.
        """
        options = dict(getattr(settings, "options", None) or {}) | options
        check_options(self.name, options, (f.name for f in dataclasses.fields(self.rewrite_type())))
        method = dataclasses.replace(self, preset={**self.preset, **options})
        method.merge()  # invalid values fail here, before anything is loaded
        return method

    def rewrite_type(self) -> type[ScaledRewrite]:
        """The rewrite class named by :attr:`rewrite_class`.

        Raises:
            AdamergeError: it cannot be imported or is not a subclass of :attr:`rewrite_base`.
        """
        base = _imported(self.name, self.rewrite_base)
        found = _imported(self.name, self.rewrite_class)
        if not (isinstance(found, type) and issubclass(found, base)):
            raise AdamergeError(f"method {self.name!r}: {self.rewrite_class!r} is not a {base.__name__} subclass")
        return found

    def merge(self) -> ScaledRewrite:  # type: ignore[override]
        """The rewrite object of this preset (its ``__post_init__`` validates the values)."""
        return self.rewrite_type()(**self.preset)

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """The rewritten vectors τ' (dense: factored LoRA vectors are densified, with a warning)."""
        from adamerge.core.task_vectors import TaskVectors

        merge = self.merge()
        logger.info("static merge %s: %s", self.name, merge)
        return TaskVectors(task_vectors.tasks, merge.rewrite(dict(task_vectors.items())))

    def start(self, num_tasks: int) -> torch.Tensor:
        """λ ``(K, 1)``: the rewrite's fixed scale for every task."""
        return self.merge().coefficients(num_tasks).unsqueeze(1)


def _imported(method: str, spec: str) -> Any:
    """The attribute named ``"package.module:ATTRIBUTE"``."""
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise AdamergeError(f"method {method!r}: cannot import rewrite class {spec!r} ({error})") from None
