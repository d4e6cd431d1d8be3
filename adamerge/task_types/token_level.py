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

A causal LM's logits cost a ``(hidden × vocabulary)`` product per position, a fifth of a small
model's forward and backward. Where the model takes transformers' ``logits_to_keep``
(``keep_logits``), :meth:`TokenLevel.model_inputs` asks for the scored positions only: the sorted
union over the batch of each row's response position, or of the positions whose next token is
labelled; :meth:`TokenLevel.scored` reads the same positions from the narrower logits. The head's
input is still captured at every token (:func:`adamerge.core.hooks.capture_hidden` reads the
decoder's output).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from adamerge.choices import IGNORE_INDEX, TOKEN_POSITIONS
from adamerge.errors import AdamergeError
from adamerge.task_types.task_type import TaskType

#: the keyword of transformers' causal LMs that computes the logits of the given positions only
LOGITS_TO_KEEP = "logits_to_keep"


@dataclass(frozen=True)
class TokenLevel(TaskType):
    """Every non-padding token is a scored position.

    Attributes:
        next_token: language modelling: the target of position ``t`` is input token ``t + 1``.
        positions: language modelling without labels: ``all`` real tokens, or ``response``: the
            last real token of each sequence only (``(B, C)`` logits, no targets).
        keep_logits: the model's forward takes ``logits_to_keep`` (a 1-D tensor of positions).
    """

    next_token: bool = False
    positions: Literal["all", "response"] = "all"
    keep_logits: bool = False

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

    def model_inputs(self, inputs: Any, labels: torch.Tensor | None = None) -> Any:
        if not (self.keep_logits and self.next_token and isinstance(inputs, Mapping)) or LOGITS_TO_KEEP in inputs:
            return inputs
        kept = self._kept_positions(inputs, labels)
        return inputs if kept is None else {**inputs, LOGITS_TO_KEEP: kept}

    def _kept_positions(self, inputs: Mapping[str, Any], labels: torch.Tensor | None) -> torch.Tensor | None:
        """``(U,)`` sorted positions :meth:`scored` reads, or ``None`` when it reads every one."""
        ids = _input_ids(inputs)  # (B, T)
        mask = _attention_mask(inputs, *ids.shape, ids.device)  # (B, T)
        if labels is None and self.positions == "response":
            return torch.unique(_last_real(mask))  # (U,) each row's response position, sorted
        if labels is None or labels.shape != ids.shape:
            return None  # every real token is scored (or the shape check of scored reports the labels)
        scored = mask[:, :-1] & mask[:, 1:] & (labels[:, 1:] != IGNORE_INDEX)  # (B, T-1): t predicts t + 1
        kept = scored.any(0).nonzero().squeeze(1)  # (U,)
        return kept if len(kept) < ids.shape[1] else None

    def scored(self, logits: torch.Tensor, inputs: Any, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if logits.dim() != 3:
            raise AdamergeError(f"a token-level task expects (batch, tokens, classes) logits, got shape {tuple(logits.shape)}")
        kept = inputs.get(LOGITS_TO_KEEP) if isinstance(inputs, Mapping) else None  # (U,) or None: every position
        batch = logits.shape[0]
        tokens = _input_ids(inputs).shape[1] if kept is not None else logits.shape[1]
        mask = _attention_mask(inputs, batch, tokens, logits.device)  # (B, T) bool
        if kept is not None and kept.shape != (logits.shape[1],):
            raise AdamergeError(f"logits of {logits.shape[1]} positions for logits_to_keep of shape {tuple(kept.shape)}")
        rows = torch.arange(batch, device=logits.device)
        if self.next_token and labels is None and self.positions == "response":
            last = _last_real(mask)  # (B,)
            column = last if kept is None else torch.searchsorted(kept.to(last.device), last)  # (B,)
            return logits[rows, column], None  # (B, C)
        if self.next_token:
            if labels is None:
                labels = _input_ids(inputs)
            if kept is not None:  # logits of positions kept: position t predicts token t + 1
                kept = kept.to(mask.device)
                if labels.shape != mask.shape:
                    raise AdamergeError(f"token labels of shape {tuple(labels.shape)} for inputs {tuple(mask.shape)}")
                targets = labels[:, kept + 1]  # (B, U)
                real = mask[:, kept] & mask[:, kept + 1] & (targets != IGNORE_INDEX)  # (B, U)
                return logits[real], targets[real]  # (N, C), (N,)
            logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, C), (B, T-1): t predicts t + 1
            mask = mask[:, :-1] & mask[:, 1:]  # both the position and its next token are real
        if labels is not None:
            if labels.shape != (logits.shape[0], logits.shape[1]):
                raise AdamergeError(f"token labels of shape {tuple(labels.shape)} for logits {tuple(logits.shape)}")
            mask = mask & (labels != IGNORE_INDEX)
            return logits[mask], labels[mask]  # (N, C), (N,)
        return logits[mask], None


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` each row's last real token of a ``(B, T)`` attention mask (either padding side)."""
    return mask.long().cumsum(1).argmax(1)


def _attention_mask(inputs: Any, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)
    return mask.to(device=device, dtype=torch.bool)


def _input_ids(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise AdamergeError("next-token prediction takes its targets from the inputs' input_ids")
    return inputs["input_ids"]
