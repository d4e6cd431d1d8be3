"""Evaluation data of a language-modelling task: prompts with their expected answers, and plain text.

``--eval DIR`` holds ``DIR/<task>.jsonl`` or ``DIR/<task>/*.jsonl``, one JSON object per line:

- ``{"prompt": str, "answer": str}``, or ``{"messages": [...], "answer": str}`` (a chat rendered
  with the tokenizer's chat template, the assistant's turn opened): the model's greedy answer is
  scored by exact match (:mod:`adamerge.run.generation_eval`);
- ``{"text": str}``: scored by perplexity.

A file may mix both kinds; every record keeps its ``file:line`` so that errors name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adamerge.data.texts import chat_messages, json_objects, task_jsonl_files
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
