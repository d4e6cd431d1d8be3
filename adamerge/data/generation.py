"""Evaluation data of a language-modelling task: prompts with their expected answers, and plain text.

``--eval DIR`` holds ``DIR/<task>.jsonl`` or ``DIR/<task>/*.jsonl``, one JSON object per line:

- ``{"prompt": str, "answer": str}``, or ``{"messages": [...], "answer": str}`` (a chat rendered
  with the tokenizer's chat template, the assistant's turn opened): the model's greedy answer is
  scored by exact match (:mod:`adamerge.run.generation_eval`);
- ``{"text": str}``: scored by perplexity.

A file may mix both kinds; every record keeps its ``file:line`` so that errors name it. The same
prompt/answer records, under ``--calib`` with ``--shots N``, are a few-shot training set
(:class:`AnswerTokens`): the loss is taken on the answer's tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from adamerge.choices import IGNORE_INDEX
from adamerge.data.text_files import chat_messages, json_objects, render_chat, task_jsonl_files
from adamerge.errors import DataError


@dataclass
class GenerationRecords:
    """One task's evaluation records.

    Attributes:
        prompts: each question, a string or chat ``messages``.
        answers: the expected answer of each prompt.
        prompt_origins: ``file:line`` of each prompt.
        texts: plain texts scored by perplexity.
        text_origins: ``file:line`` of each text.
    """

    prompts: list[str | list[dict[str, str]]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    prompt_origins: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    text_origins: list[str] = field(default_factory=list)


def read_generation_eval(root: Path, task: str) -> GenerationRecords:
    """Prompts with answers and plain texts of ``task`` from ``root/<task>.jsonl`` or ``root/<task>/*.jsonl``.

    Raises:
        DataError: no such file or folder, malformed JSON, a record with neither ``prompt`` /
            ``messages`` + ``answer`` nor ``text`` (named by file and line), nothing to score.
    """
    records = GenerationRecords()
    for path in task_jsonl_files(Path(root), task, "evaluation"):
        for where, record in json_objects(path):
            _add(records, record, where)
    return records


def _add(records: GenerationRecords, record: dict, where: str) -> None:
    if "answer" in record:
        answer = record["answer"]
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' is {type(answer).__name__}, expected a string")
        if "messages" in record:
            prompt: str | list[dict[str, str]] = chat_messages(record["messages"], where)
        elif isinstance(record.get("prompt"), str):
            prompt = record["prompt"]
        else:
            raise DataError(f"{where}: a record with an 'answer' needs a string 'prompt' or chat 'messages'")
        records.prompts.append(prompt)
        records.answers.append(answer)
        records.prompt_origins.append(where)
    elif isinstance(record.get("text"), str):
        records.texts.append(record["text"])
        records.text_origins.append(where)
    else:
        raise DataError(f"{where}: expected 'prompt' (or 'messages') with 'answer', or 'text'")


def prompt_encodings(tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]], origins: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; a rendered chat carries its own special tokens."""
    encoded = []
    for prompt, where in zip(prompts, origins, strict=True):
        if isinstance(prompt, str):
            encoded.append(list(tokenizer(prompt)["input_ids"]))
        else:
            encoded.append(list(tokenizer(render_chat(tokenizer, prompt, where), add_special_tokens=False)["input_ids"]))
    return encoded


class AnswerTokens(Dataset):
    """Prompt/answer records as a few-shot training set: ``prompt + answer + end`` tokens, labelled
    on the answer and the end token only (``IGNORE_INDEX`` on the prompt), so that a cross-entropy
    over the labelled next-token positions is the loss of the answer given its prompt.

    Items are ``(encoding, labels)`` with ``labels`` aligned to ``input_ids`` (the next-token task
    type shifts them). A prompt too long for ``max_length`` loses its first tokens; the answer is
    always kept whole.

    Args:
        records: the task's prompt/answer records.
        tokenizer: the base's tokenizer.
        max_length: tokens per example.

    Raises:
        DataError: no prompt with an answer, or an answer that alone exceeds ``max_length``.
    """

    def __init__(self, records: GenerationRecords, tokenizer: Any, max_length: int) -> None:
        if not records.prompts:
            raise DataError(
                f"few-shot data needs prompt/answer records ({', '.join(records.text_origins[:1]) or 'none found'}): "
                "one {'prompt' or 'messages', 'answer'} object per line"
            )
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompts = prompt_encodings(tokenizer, records.prompts, records.prompt_origins)
        self.rows: list[tuple[dict[str, list[int]], list[int]]] = []
        for prompt, answer, where in zip(prompts, records.answers, records.prompt_origins, strict=True):
            target = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + end
            room = max_length - len(target)
            if room < 1:
                raise DataError(f"{where}: the answer takes {len(target)} tokens, more than --max-length {max_length} leaves")
            prompt = prompt[-room:]
            ids = prompt + target
            self.rows.append(({"input_ids": ids, "attention_mask": [1] * len(ids)}, [IGNORE_INDEX] * len(prompt) + target))
        self.records = records

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[dict[str, list[int]], list[int]]:
        return self.rows[index]
