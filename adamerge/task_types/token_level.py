"""Token-level tasks: a prediction per token, ``(B, T, C)`` logits, padding never scored.

Two uses: a tagger (one label per token, ``labels`` ``(B, T)``, ``-100`` where a token has none,
the Hugging Face convention) and language modelling (``next_token=True``: position ``t`` predicts
token ``t + 1`` of ``input_ids``, so the targets come from the inputs and the last position of
each sequence is not scored). Positions where ``attention_mask`` is 0 are padding and are
dropped, so a loss or an accuracy over the scored positions is per real token.

Unlabeled prompts can be scored at one position instead (``positions="response"``): the
distribution after each prompt's last real token, the first token the model would generate. On
prompts whose tasks are decided in the answer (prompt → short answer), the text tokens before it
carry little of what a fine-tune changed, and that is the analogue of AdaMerging's per-image
prediction for a classifier. Labelled batches (few-shot) are always scored at their labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from adamerge.choices import IGNORE_INDEX, TOKEN_POSITIONS
from adamerge.errors import AdamergeError
from adamerge.task_types.task_type import TaskType


@dataclass(frozen=True)
class TokenLevel(TaskType):
    """Every non-padding token is a scored position.

    Attributes:
        next_token: language modelling: the target of position ``t`` is input token ``t + 1``.
        positions: language modelling without labels: ``all`` real tokens, or ``response``: the
            last real token of each sequence only (``(B, C)`` logits, no targets).
    """

    next_token: bool = False
    positions: Literal["all", "response"] = "all"

    name: ClassVar[str] = "token"

    def __post_init__(self) -> None:
        if self.positions not in TOKEN_POSITIONS:
            raise AdamergeError(f"token positions must be 'all' or 'response', got {self.positions!r}")
        if self.positions == "response" and not self.next_token:
            raise AdamergeError("positions='response' scores the token after a prompt: language modelling only")

    @property
    def generates(self) -> bool:
        return self.next_token

    @property
    def auto_class(self) -> str:
        return "AutoModelForCausalLM" if self.next_token else "AutoModelForTokenClassification"

    def scored(self, logits: torch.Tensor, inputs: Any, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if logits.dim() != 3:
            raise AdamergeError(f"a token-level task expects (batch, tokens, classes) logits, got shape {tuple(logits.shape)}")
        batch, tokens = logits.shape[:2]
        mask = _attention_mask(inputs, batch, tokens, logits.device)  # (B, T) bool
        if self.next_token and labels is None and self.positions == "response":
            last = mask.long().cumsum(1).argmax(1)  # (B,) each row's last real token (either padding side)
            return logits[torch.arange(batch, device=logits.device), last], None  # (B, C)
        if self.next_token:
            if labels is None:
                labels = _input_ids(inputs)
            logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, C), (B, T-1): t predicts t + 1
            mask = mask[:, :-1] & mask[:, 1:]  # both the position and its next token are real
        if labels is not None:
            if labels.shape != (logits.shape[0], logits.shape[1]):
                raise AdamergeError(f"token labels of shape {tuple(labels.shape)} for logits {tuple(logits.shape)}")
            mask = mask & (labels != IGNORE_INDEX)
            return logits[mask], labels[mask]  # (N, C), (N,)
        return logits[mask], None


def _attention_mask(inputs: Any, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def _input_ids(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise AdamergeError("next-token prediction takes its targets from the inputs' input_ids")
    return inputs["input_ids"]
