"""What a task's output is and how it is scored: the one place that knows the shape of logits.

The training step, the objectives, the evaluation and the safeguard never assume ``(B, C)``
logits: they ask the task type for the **scored positions** of a batch, ``(N, C)`` logits with
``(N,)`` targets, and work on those. A sequence classifier scores one position per example; a
token-level task (a language model's next token, a tagger's label per token) scores every
non-padding token. An objective such as AdaMerging's entropy is then the mean over positions,
whatever the task.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class TaskType:
    """Base class of task types (stateless: one instance serves every task of that type)."""

    #: The name of the task type (``metrics.json``, error messages).
    name: ClassVar[str] = ""

    @property
    def generates(self) -> bool:
        """Whether the task is evaluated on what the model generates (exact match of greedy answers
        to prompts, perplexity of texts: :mod:`adamerge.run.generation_eval`) rather than on the
        scored positions of labelled examples."""
        return False

    @property
    def auto_class(self) -> str:
        """The transformers auto-class a Hugging Face source builds for this task type."""
        raise NotImplementedError

    def model_inputs(self, inputs: Any, labels: torch.Tensor | None = None) -> Any:
        """``inputs`` as a forward that is only read through :meth:`scored` takes them: a task type
        whose model can skip the logits of unscored positions says so here (default: unchanged).

        Args:
            inputs: the batch's inputs.
            labels: the batch's labels, if any (they decide which positions are scored).
        """
        return inputs

    def scored(self, logits: torch.Tensor, inputs: Any, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scored positions of one batch.

        Args:
            logits: the model's logits for the batch.
            inputs: the batch's inputs (a tensor, or a tokenizer's dict with ``attention_mask``).
            labels: the batch's labels, if any.

        Returns:
            ``(positions (N, C), targets (N,) or None)``: the logits of the N scored positions and
            their target classes (``None`` without labels, unless the task type makes its own,
            as next-token prediction does).
        """
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor, inputs: Any) -> torch.Tensor:
        """``(N,)`` predicted classes of the scored positions."""
        return self.scored(logits, inputs)[0].argmax(-1)
