"""What every merging method is: a task-vector rewrite, a start for λ, and zero or more stages.

A method is one object (:class:`Method`); the workflow (:mod:`adamerge.run.workflow`) asks it, in order:

1. :meth:`Method.configured`: the method with the run's options applied (``--init``,
   ``--options``, ``--shots`` ...);
2. :meth:`Method.rewrite`: the task vectors it merges (TIES trims them, LiNeS scales them by
   depth; most methods leave them as they are);
3. :attr:`Method.constraint` and :meth:`Method.start`: the constraint ``g`` and the initial λ of
   the :class:`~adamerge.core.merged_model.MergedModel`;
4. its training stages: none for a static merge (λ stays at its start), one for AdaMerging, two
   for Expert Merging++ (:class:`~adamerge.methods.learned.LearnedMethod`).

Subclass :class:`~adamerge.methods.learned.LearnedMethod` or
:class:`~adamerge.methods.static_method.StaticMethod` (or this class) and register the instance
with :func:`adamerge.methods.register_method`, or name it on the command line as
``--method package.module:ATTRIBUTE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # torch stays unimported until a run starts, so that ``--help`` answers at once
    import torch

    from adamerge.core.task_vectors import TaskVectors


@dataclass(frozen=True)
class Method:
    """A merging method.

    Attributes:
        name: the ``--method`` name.
        paper: the reference (authors, title, venue) it implements.
    """

    name: str
    paper: str = ""

    #: Whether the method learns λ (``adamerge fit``) or keeps it fixed (``adamerge merge``).
    learned: ClassVar[bool] = False

    def configured(self, settings: Any = None, **options: Any) -> Method:
        """This method with the run's settings (or keyword options) applied (default: unchanged)."""
        return self

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """The task vectors this method merges (default: the experts' own)."""
        return task_vectors

    @property
    def constraint(self) -> str:
        """The constraint ``g`` of λ: ``clamp``, ``sigmoid`` or ``none``."""
        return "none"

    def start(self, num_tasks: int) -> float | torch.Tensor:
        """The initial λ: a float, or ``(K,)`` / ``(K, G)`` values."""
        raise NotImplementedError

    def start_label(self) -> str:
        """The row name of the merge at the initial λ in the accuracy table."""
        return self.name
