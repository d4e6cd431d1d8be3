"""Reading text files: UTF-8 lines, JSON-lines objects, a task's ``.jsonl`` files, chat messages.

Every reader keeps where a record came from (``file:line``), so that each error names it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from adamerge.errors import DataError


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines ``(line number, text)`` of a UTF-8 file, split on ``\\n`` only."""
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    lines = [(number, line.rstrip("\r")) for number, line in enumerate(content.split("\n"), start=1)]
    kept = [(number, line) for number, line in lines if line.strip()]
    if not kept:
        raise DataError(f"{path}: holds no non-blank line (expected one example per line)")
    return kept


def chat_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat's ``messages``, checked: a non-empty list of ``{"role": str, "content": str}``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], where: str) -> str:
    """A chat as the model sees it: the tokenizer's chat template, with the assistant's turn opened
    when the chat ends on another role (the next tokens are the answer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' need a tokenizer with a chat template (this one has none); give 'text' instead")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=messages[-1]["role"] != "assistant")
    except Exception as error:  # jinja errors: unknown roles, templates that raise
        raise DataError(f"{where}: the tokenizer's chat template cannot render these messages: {error}") from None


def task_jsonl_files(root: Path, task: str, kind: str) -> list[Path]:
    """``root/<task>.jsonl``, or the ``.jsonl`` files under ``root/<task>/``.

    Raises:
        DataError: neither exists, or the folder holds no ``.jsonl`` file (``kind`` names the data).
    """
    file, folder = root / f"{task}.jsonl", root / task
    if file.is_file():
        return [file]
    if folder.is_dir():
        files = text_files(folder, (".jsonl",))
        if not files:
            raise DataError(f"{kind} folder {folder} holds no .jsonl file")
        return files
    raise DataError(f"{kind} data of task {task!r} not found: expected {file} or a folder {folder} of .jsonl files")


def json_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(file:line, object)`` of every non-blank line of a JSON-lines file.

    Raises:
        DataError: a line that is not JSON, or not a JSON object (named by file and line).
    """
    for number, line in read_lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def text_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
