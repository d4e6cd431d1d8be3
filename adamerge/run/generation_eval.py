"""Scoring a language model by what it generates: exact match of greedy answers, and perplexity.

A prompt (plain, or a chat rendered with the tokenizer's chat template and the assistant's turn
opened) is completed greedily for up to the longest expected answer's token count plus
:data:`EXTRA_TOKENS`; the completion is cut at the end-of-sequence token and at its first line
break, whitespace is normalised (runs of spaces, tabs and newlines become one space, ends
stripped), and it counts when it equals the normalised answer. Plain texts are scored by
perplexity, ``exp`` of the mean next-token negative log-likelihood over their real tokens.

The model is an ordinary transformers causal LM (the merge materialised once with
:meth:`~adamerge.core.merged_model.MergedModel.merge_and_unload`, or an expert alone), so what is
scored here is what ``generate()`` on the exported folder gives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adamerge.data.generation import GenerationRecords, prompt_encodings
from adamerge.data.texts import PadCollator, pad_token_of
from adamerge.task_types import LANGUAGE_MODELLING

logger = logging.getLogger(__name__)

EXTRA_TOKENS = 4  # generated beyond the longest answer, so that a longer completion is seen to differ


def normalise(text: str) -> str:
    """Whitespace runs as one space, ends stripped."""
    return " ".join(text.split())


@dataclass(frozen=True)
class GenerationScores:
    """One task's scores: exact match (a fraction, ``None`` without prompts) and perplexity
    (``None`` without texts), with the counts they come from."""

    exact_match: float | None
    perplexity: float | None
    prompts: int
    tokens: int


@torch.no_grad()
def score_generation(
    model: nn.Module, tokenizer: Any, records: GenerationRecords, *, batch_size: int = 16, max_length: int = 512
) -> GenerationScores:
    """Exact match of ``model``'s greedy answers and perplexity on plain texts (see the module docstring)."""
    model.eval()
    device = next(model.parameters()).device
    pad = pad_token_of(tokenizer)
    exact = None
    if records.prompts:
        prompts = [ids[-max_length:] for ids in prompt_encodings(tokenizer, records.prompts, records.prompt_origins)]
        answers = [normalise(a) for a in records.answers]
        new_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in records.answers) + EXTRA_TOKENS
        left = PadCollator(pad, "left")  # generation continues every prompt from its last real token
        hits = 0
        for start in range(0, len(prompts), batch_size):
            inputs = _on(device, left.pad([_encoding(p) for p in prompts[start : start + batch_size]]))  # (B, T)
            width = inputs["input_ids"].shape[1]
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )  # (B, T + new)
            for row, expected in zip(out[:, width:].tolist(), answers[start : start + batch_size], strict=True):
                completion = tokenizer.decode(_until_eos(row, tokenizer.eos_token_id), skip_special_tokens=True)
                hits += normalise(completion.split("\n", 1)[0]) == expected
        exact = hits / len(prompts)
    perplexity, tokens = None, 0
    if records.texts:
        right = PadCollator(pad, "right")
        total = 0.0
        for start in range(0, len(records.texts), batch_size):
            encoded = tokenizer(records.texts[start : start + batch_size], truncation=True, max_length=max_length)
            inputs = _on(device, right.pad([_encoding(ids) for ids in encoded["input_ids"]]))  # (B, T)
            logits = model(**inputs).logits.float()  # (B, T, V)
            positions, targets = LANGUAGE_MODELLING.scored(logits, inputs)  # every real token's next token, (N, V), (N,)
            total += float(nn.functional.cross_entropy(positions, targets, reduction="sum"))
            tokens += targets.numel()
        perplexity = math.exp(total / max(tokens, 1))
    return GenerationScores(exact, perplexity, len(records.prompts), tokens)


def _encoding(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def _on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids
