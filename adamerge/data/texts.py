"""Calibration and evaluation text per task, tokenised for a Hugging Face model, and a round-robin
multi-task DataModule (the text twin of :class:`adamerge.data.images.MultiTaskImageDataModule`).

Layouts:

- calibration (unlabeled): ``CALIB/<task>/`` holding ``.txt`` files (one example per line, blank
  lines ignored) and/or ``.jsonl`` files (one JSON object per line with a ``text`` field, a
  ``prompt`` field, or a chat ``messages`` list of ``{"role", "content"}`` rendered with the
  tokenizer's chat template; any ``label`` is ignored); ``CALIB/<task>.txt`` or
  ``CALIB/<task>.jsonl`` also work. A ``prompt``, and a chat whose last message is not the
  assistant's, is a prompt a causal LM answers: when every record is one, unlabeled objectives
  score the response's first token (``fit --positions auto``); a ``text`` or a line is a document
  whose every token is scored;
- labelled (evaluation, and calibration when ``shots`` is set): ``DIR/<task>.jsonl`` or
  ``DIR/<task>/*.jsonl``, one ``{"text": str, "label": int}`` per line, ``label`` the class index
  ``0..C-1``.

Every file is read as UTF-8 and split on ``\\n`` only; records keep their file and line so every
error names them. Texts are tokenised once (truncated to ``max_length`` tokens) when a task is
set up; batches are padded to their longest example (:class:`PadCollator`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from adamerge.choices import IGNORE_INDEX
from adamerge.data.generation import AnswerTokens, read_generation_eval
from adamerge.data.images import CalibrationView, MultiTaskDataModule
from adamerge.data.text_files import chat_messages, json_objects, read_lines, render_chat, task_jsonl_files, text_files
from adamerge.errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl")
Encoding = dict[str, list[int]]


@dataclass
class TextRecords:
    """Texts read from files, each with where it came from (``file:line``) and an optional label.

    Attributes:
        chats: ``{index: messages}`` of records given as chat ``messages`` (their text is rendered
            with the tokenizer's chat template when they are tokenised, see :func:`render_chat`).
        prompts: how many records are prompts to answer rather than documents.
    """

    texts: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    chats: dict[int, list[dict[str, str]]] = field(default_factory=dict)
    prompts: int = 0

    @property
    def all_prompts(self) -> bool:
        """Whether every record is a prompt to answer (a ``prompt``, or a chat awaiting the assistant)."""
        return bool(self.texts) and self.prompts == len(self.texts)

    def __len__(self) -> int:
        return len(self.texts)


def _read_jsonl(path: Path, labelled: bool, num_classes: int | None) -> TextRecords:
    """Records of a JSON-lines file: ``text`` (and ``label`` when ``labelled``)."""
    records = TextRecords(labels=[] if labelled else None)
    for where, record in json_objects(path):
        if "messages" in record and "text" not in record and not labelled:
            records.chats[len(records.texts)] = messages = chat_messages(record["messages"], where)
            records.prompts += messages[-1]["role"] != "assistant"
            records.texts.append("")
            records.origins.append(where)
            continue
        if "prompt" in record and "text" not in record and not labelled:
            if not isinstance(record["prompt"], str):
                raise DataError(f"{where}: field 'prompt' is {type(record['prompt']).__name__}, expected a string")
            records.texts.append(record["prompt"])
            records.origins.append(where)
            records.prompts += 1
            continue
        text = record.get("text")
        if not isinstance(text, str):
            found = "missing" if text is None else type(text).__name__
            raise DataError(
                f"{where}: field 'text' is {found}, expected a string" + ("" if labelled else " (or 'prompt', or chat 'messages')")
            )
        if labelled:
            label = record.get("label")
            if isinstance(label, bool) or not isinstance(label, int):
                shown = "missing" if "label" not in record else repr(label)
                raise DataError(f"{where}: field 'label' is {shown}, expected an integer class index")
            if label < 0 or (num_classes is not None and label >= num_classes):
                allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
                raise DataError(f"{where}: label {label} is out of range (expected {allowed})")
            records.labels.append(label)
        records.texts.append(text)
        records.origins.append(where)
    return records


def _extend(records: TextRecords, more: TextRecords) -> None:
    offset = len(records.texts)
    records.chats.update({offset + i: messages for i, messages in more.chats.items()})
    records.texts += more.texts
    records.origins += more.origins
    records.prompts += more.prompts
    if records.labels is not None and more.labels is not None:
        records.labels += more.labels


def read_unlabeled(root: Path, task: str) -> TextRecords:
    """Unlabeled texts of ``task``: ``root/<task>/`` (``.txt`` / ``.jsonl``), or ``root/<task>.txt|.jsonl``.

    Raises:
        DataError: no such folder or file, a file without lines, malformed JSON, nothing usable.
    """
    folder = root / task
    if folder.is_dir():
        files = text_files(folder, TEXT_SUFFIXES)
        if not files:
            raise DataError(f"calibration folder {folder} holds no .txt or .jsonl file")
    else:
        files = [root / f"{task}{suffix}" for suffix in TEXT_SUFFIXES if (root / f"{task}{suffix}").is_file()]
        if not files:
            raise DataError(f"calibration data of task {task!r} not found: expected a folder {folder} of .txt/.jsonl files")
    records = TextRecords()
    for path in files:
        if path.suffix.lower() == ".jsonl":
            _extend(records, _read_jsonl(path, labelled=False, num_classes=None))
        else:
            lines = read_lines(path)
            records.texts += [text for _, text in lines]
            records.origins += [f"{path}:{number}" for number, _ in lines]
    return records


def read_labelled(root: Path, task: str, num_classes: int | None = None) -> TextRecords:
    """Labelled texts of ``task``: ``root/<task>.jsonl`` or ``root/<task>/*.jsonl``.

    Args:
        root: the labelled folder.
        task: task name.
        num_classes: labels must lie in ``0..num_classes-1`` (when known).

    Raises:
        DataError: missing file/folder, malformed JSON, missing or out-of-range labels.
    """
    files = task_jsonl_files(root, task, "labelled")
    records = TextRecords(labels=[])
    for path in files:
        _extend(records, _read_jsonl(path, labelled=True, num_classes=num_classes))
    return records


class TokenizedTexts(Dataset):
    """Texts tokenised once (truncated to ``max_length``); items are ``{name: list[int]}``, or
    ``(encoding, label)`` for labelled records.

    Attributes:
        records: the texts, their origins and labels.
        num_classes: the number of classes (labelled records: known, or the largest label + 1).
    """

    def __init__(self, records: TextRecords, tokenizer: Any, max_length: int, num_classes: int | None = None) -> None:
        if not records.texts:
            raise DataError("no text to tokenise")
        self.records = records
        encoded = tokenizer(records.texts, truncation=True, max_length=max_length)
        names = [n for n in getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]) if n in encoded]
        self.columns: dict[str, list[list[int]]] = {name: list(encoded[name]) for name in names}
        if records.chats:  # rendered chats carry their special tokens already
            indices = sorted(records.chats)
            rendered = [render_chat(tokenizer, records.chats[i], records.origins[i]) for i in indices]
            chats = tokenizer(rendered, truncation=True, max_length=max_length, add_special_tokens=False)
            for name in names:
                for row, i in enumerate(indices):
                    self.columns[name][i] = list(chats[name][row])
        empty = [i for i, ids in enumerate(self.columns["input_ids"]) if not ids]
        if empty:
            raise DataError(f"{records.origins[empty[0]]}: the tokenizer produced no token for this text")
        labels = records.labels
        self.num_classes = num_classes if num_classes is not None else (max(labels) + 1 if labels else None)

    @property
    def labels(self) -> list[int] | None:
        return self.records.labels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Encoding | tuple[Encoding, int]:
        encoding = {name: column[index] for name, column in self.columns.items()}
        if self.records.labels is not None:
            return encoding, self.records.labels[index]
        return encoding


def token_counts(view: CalibrationView) -> list[int]:
    """Token count of every item of a calibration view over :class:`TokenizedTexts`."""
    return [len(view.dataset.columns["input_ids"][i]) for i in view.indices]


def by_length(dataset: TokenizedTexts) -> Subset:
    """``dataset`` ordered by token count (stable: equal lengths keep the file order)."""
    lengths = [len(ids) for ids in dataset.columns["input_ids"]]
    return Subset(dataset, sorted(range(len(lengths)), key=lengths.__getitem__))


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of texts of similar length (Hugging Face's ``group_by_length``).

    Every epoch shuffles the indices (seeded), cuts them into mega-batches of ``megabatch``
    batches, sorts each mega-batch by length, cuts it into batches and shuffles the batch order.
    A batch padded to its longest text then carries little padding, so a step costs fewer tokens;
    each text is still seen once per epoch, and a batch's texts are still a random draw within
    their length range.

    Args:
        lengths: token count of every item.
        batch_size: items per batch.
        generator: the seeded generator of the shuffles.
        megabatch: batches per sorted mega-batch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, megabatch: int = 50) -> None:
        if batch_size < 1 or megabatch < 1:
            raise DataError(f"length-grouped batches: batch size {batch_size} and mega-batch {megabatch} must be >= 1")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)  # (N,)
        self.batch_size = batch_size
        self.generator = generator
        self.megabatch = megabatch

    def _batches(self) -> list[torch.Tensor]:
        order = torch.randperm(len(self.lengths), generator=self.generator)  # (N,)
        batches: list[torch.Tensor] = []
        for mega in order.split(self.batch_size * self.megabatch):
            ranked = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            batches.extend(ranked.split(self.batch_size))
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            yield batch.tolist()

    def __len__(self) -> int:
        mega = self.batch_size * self.megabatch
        full, rest = divmod(len(self.lengths), mega)
        return full * self.megabatch + math.ceil(rest / self.batch_size)


def pad_token_of(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return value
    return 0


class PadCollator:
    """Pads a batch of token lists to its longest example.

    ``input_ids`` are padded with the tokenizer's pad token, every other column (attention mask,
    token types) with 0, on the tokenizer's padding side. Items may be an encoding, an
    ``(encoding, label)`` pair, or a dict ``{"inputs": encoding, "labels"?, "index"?}``; the batch
    has the same structure with tensors ``(B, T)`` and ``(B,)``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise DataError(f"tokenizer padding side {padding_side!r}: expected 'right' or 'left'")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def pad(self, encodings: Sequence[Encoding]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in encodings)
        batch = {}
        for name in encodings[0]:
            value = self.pad_token_id if name == "input_ids" else 0
            rows = []
            for encoding in encodings:
                rows.append(self._fill(encoding[name], length, value))
            batch[name] = torch.tensor(rows, dtype=torch.long)  # (B, T)
        return batch

    def _fill(self, row: list[int], length: int, value: int) -> list[int]:
        fill = [value] * (length - len(row))
        return row + fill if self.padding_side == "right" else fill + row

    def __call__(self, items: Sequence[Any]) -> Any:
        first = items[0]
        if isinstance(first, tuple):
            return self.pad([i[0] for i in items]), self._labels([i[1] for i in items])
        if isinstance(first, Mapping) and "inputs" in first:
            out: dict[str, Any] = {"inputs": self.pad([i["inputs"] for i in items])}
            if "labels" in first:
                out["labels"] = self._labels([i["labels"] for i in items])
            if "index" in first:
                out["index"] = torch.tensor([i["index"] for i in items], dtype=torch.long)  # (B,)
            return out
        return self.pad(items)

    def _labels(self, labels: Sequence[int | list[int]]) -> torch.Tensor:
        """``(B,)`` class labels, or ``(B, T)`` token labels padded as unlabelled (``IGNORE_INDEX``)."""
        if labels and isinstance(labels[0], list):
            width = max(len(row) for row in labels)
            return torch.tensor([self._fill(row, width, IGNORE_INDEX) for row in labels], dtype=torch.long)
        return torch.tensor(labels, dtype=torch.long)


class MultiTaskTextDataModule(MultiTaskDataModule):
    """Unlabeled calibration texts per task (training) and optional labelled evaluation texts.

    Training batches are dictionaries ``{task: tokenised batch}`` (``{"input_ids": (B, T), ...}``,
    or ``{"inputs": ..., "labels": (B,), "index": (B,)}`` for few-shot / cached-target
    objectives): every step sees one batch of every task (Lightning's ``CombinedLoader`` in
    ``max_size_cycle`` mode). Validation and test iterate the tasks one after another, batches
    ``(tokenised dict, labels (B,))``; the dataloader index is the task's position in ``tasks``.

    Args:
        calib_dir: unlabeled texts per task (see the module docstring for the layouts).
        tasks: task names, in the experts' order.
        tokenizer: a Hugging Face tokenizer (called on a list of strings; its ``pad_token_id``
            and ``padding_side`` pad the batches).
        max_length: tokens per example (longer texts are truncated).
        eval_dir: optional labelled folder (``<task>.jsonl`` or ``<task>/*.jsonl``).
        batch_size: examples per task per step.
        eval_batch_size: examples per evaluation batch.
        num_workers: data-loader worker processes.
        seed: seed of the training shuffle and of the subsets below.
        shuffle: shuffle the calibration data.
        shots: read the calibration folder as labelled and keep this many examples per class
            (seeded), for few-shot objectives.
        limit_per_task: keep this many calibration examples per task (seeded subset).
        with_index: training items carry their index in the task's calibration view.
        num_classes: optional ``{task: C}``: labels must lie in ``0..C-1`` (e.g. the experts' head
            sizes); without it, the largest label seen + 1.
        group_by_length: shuffled training batches of texts of similar length
            (:class:`LengthGroupedBatches`) instead of uniformly shuffled ones: far fewer pad
            tokens per step. Single-process training only.
        holdout: share of each task's calibration texts held out of training (for
            :class:`adamerge.run.safeguard.KeepBestCoefficients`; see
            :meth:`~adamerge.data.images.MultiTaskDataModule.calibration_split`).
        answers: the tasks are language modelling: with ``shots``, the calibration folder holds
            prompt/answer records (:class:`adamerge.data.generation.AnswerTokens`), ``shots`` of
            them per task, labelled on the answer tokens.
    """

    def __init__(
        self,
        calib_dir: str | Path,
        tasks: Sequence[str],
        tokenizer: Any,
        max_length: int = 128,
        eval_dir: str | Path | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shots: int | None = None,
        limit_per_task: int | None = None,
        with_index: bool = False,
        num_classes: Mapping[str, int] | None = None,
        group_by_length: bool = False,
        holdout: float = 0.0,
        answers: bool = False,
    ) -> None:
        super().__init__(
            calib_dir,
            tasks,
            eval_dir,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            shuffle,
            shots,
            limit_per_task,
            with_index,
            holdout,
        )
        if tokenizer is None:
            raise DataError("text data needs a tokenizer (the expert source provides the base's)")
        if max_length < 1:
            raise DataError(f"--max-length {max_length}: expected a positive number of tokens")
        if shots is not None and shots < 1:
            raise DataError(f"--shots {shots}: expected at least 1 example per class")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.num_classes = dict(num_classes or {})
        self.group_by_length = group_by_length
        self.answers = answers
        if getattr(tokenizer, "pad_token_id", None) is None:
            has_end = getattr(tokenizer, "eos_token_id", None) is not None
            logger.warning("the tokenizer has no pad token: padding with %s", "its end token" if has_end else "0")
        self.collate = PadCollator(pad_token_of(tokenizer), getattr(tokenizer, "padding_side", "right"))
        if not self.calib_dir.is_dir():
            raise DataError(f"--calib {self.calib_dir} does not exist (expected one folder of .txt/.jsonl files per task)")
        self.calibration: dict[str, CalibrationView] = {}
        self.evaluation: dict[str, TokenizedTexts] = {}
        self.prompt_tasks: dict[str, bool] = {}

    def _tokenized(self, records: TextRecords, task: str) -> TokenizedTexts:
        return TokenizedTexts(records, self.tokenizer, self.max_length, self.num_classes.get(task))

    def setup(self, stage: str | None = None) -> None:
        if not self.calibration:
            self.calibration = {t: self._calibration_view(t, k) for k, t in enumerate(self.tasks)}
        if self.eval_dir is not None and not self.evaluation and stage in (None, "fit", "validate", "test"):
            if not self.eval_dir.is_dir():
                raise DataError(f"--eval {self.eval_dir} does not exist (expected <task>.jsonl or <task>/*.jsonl files)")
            self.evaluation = {t: self._tokenized(read_labelled(self.eval_dir, t, self.num_classes.get(t)), t) for t in self.tasks}
            for task, dataset in self.evaluation.items():
                logger.info("evaluation %s: %d labelled texts, %s classes", task, len(dataset), dataset.num_classes)

    def _calibration_view(self, task: str, position: int) -> CalibrationView:
        seed = self.seed + 1000 * (position + 1)
        if self.shots is not None and self.answers:  # language modelling: N prompt/answer records per task
            shots = AnswerTokens(read_generation_eval(self.calib_dir, task), self.tokenizer, self.max_length)
            logger.info("calibration %s: %d prompt/answer records, %d shots", task, len(shots), min(self.shots, len(shots)))
            return self.calibration_split(task, shots, seed, [0] * len(shots))
        if self.shots is not None:
            labelled = self._tokenized(read_labelled(self.calib_dir, task, self.num_classes.get(task)), task)
            return self.calibration_split(task, labelled, seed, list(labelled.labels))
        records = read_unlabeled(self.calib_dir, task)
        self.prompt_tasks[task] = records.all_prompts
        view = self.calibration_split(task, self._tokenized(records, task), seed)
        held = len(self.held_out[task]) if task in self.held_out else 0
        kind = "prompts" if records.all_prompts else "texts"
        logger.info("calibration %s: %d %s%s", task, len(view), kind, f" (+{held} held out)" if held else "")
        return view

    def calibration_is_prompts(self) -> dict[str, bool]:
        """``{task: whether every unlabeled calibration record is a prompt to answer}`` (empty
        for labelled few-shot calibration)."""
        self.setup("fit")
        return dict(self.prompt_tasks)

    def calibration_loaders(self, shuffle: bool | None = None, distributed: bool = False) -> dict[str, DataLoader]:
        """One loader of calibration batches per task; length-grouped when shuffled training
        batches are asked for and ``group_by_length`` is on (see the base class for the args)."""
        shuffle = self.shuffle if shuffle is None else shuffle
        if not (self.group_by_length and shuffle):
            return super().calibration_loaders(shuffle, distributed)
        if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise DataError("--group-by-length supports single-process training only (no DDP shards)")
        self.setup("fit")
        loaders = {}
        for position, (task, view) in enumerate(self.calibration.items()):
            lengths = token_counts(view)
            generator = torch.Generator().manual_seed(self.seed + position)
            loaders[task] = DataLoader(
                view,
                batch_sampler=LengthGroupedBatches(lengths, self.batch_size, generator),
                num_workers=self.num_workers,
                collate_fn=self.collate,
                persistent_workers=self.num_workers > 0,
            )
        return loaders

    def target_loaders(self) -> dict[str, DataLoader]:
        """As the base class, the texts ordered by length: a batch padded to its longest text then
        carries little padding (the expert outputs go back to index order)."""
        self.setup("fit")
        loaders = {}
        for task, view in self.calibration.items():
            lengths = token_counts(view)
            order = sorted(range(len(view)), key=lengths.__getitem__)
            loaders[task] = self._loader(Subset(view, order), self.eval_batch_size, shuffle=False)
        return loaders

    def evaluation_loaders(self) -> list[DataLoader]:
        """Labelled batches per task, the texts grouped by length: accuracy does not depend on the
        order, and a batch padded to its longest text then carries little padding."""
        if self.eval_dir is None:
            return []
        self.setup("test")
        return [self._loader(by_length(self.evaluation[t]), self.eval_batch_size, shuffle=False) for t in self.tasks]

    def class_counts(self) -> Mapping[str, int]:
        """Number of classes per task in the evaluation data (empty without ``eval_dir``)."""
        self.setup("test")
        return {t: int(ds.num_classes) for t, ds in self.evaluation.items()}
