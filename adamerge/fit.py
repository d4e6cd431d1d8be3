"""The ``adamerge fit`` workflow as a plain function: files in, output folder out.

:func:`run_fit` loads the base and the experts, learns the coefficients with a Lightning
``Trainer`` on the unlabeled calibration data, evaluates (optionally) on labelled data, and writes
the output folder atomically:

- ``coefficients.json`` / ``coefficients.tsv``: learned λ per task and group;
- ``merged.pt`` + ``heads/<task>.pt``: the merged model for the base architecture's
  ``load_state_dict`` (no adamerge needed);
- ``metrics.json``: per-task accuracy of each expert alone, the initial merge (task arithmetic at
  the initial λ) and the learned merge, plus timings;
- ``config.yaml``: the resolved settings; ``checkpoints/last.ckpt``: λ and optimiser state
  (resume with ``ckpt_path``); ``logs/``: the losses per step (CSV).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from adamerge.architectures import build_architecture
from adamerge.checkpoints import load_state_dict
from adamerge.data import MultiTaskImageDataModule
from adamerge.errors import AdamergeError
from adamerge.experts import ExpertSet, load_file_experts, parse_base_spec
from adamerge.export import (
    atomic_output_dir,
    check_output_dir,
    format_table,
    write_coefficients,
    write_json,
    write_merged_model,
    write_yaml,
)
from adamerge.merged_model import MergedModel, assign_tensor
from adamerge.methods import resolve_method
from adamerge.module import MergingModule, adam

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FitSettings:
    """Everything ``adamerge fit`` needs (the command line and YAML configs map onto these fields).

    Attributes:
        base: ``ARCH@WEIGHTS`` of the pretrained model.
        experts: ``{task: weights file}``.
        calib: folder with one sub-folder of unlabeled inputs per task.
        output: folder to write (refused if it exists, unless ``overwrite``).
        eval: optional ``<task>/<class>/<image>`` folder of labelled data.
        head_pattern: regex of task-specific tensors (never merged).
        method: learned-coefficient method (``adamerging``).
        granularity: ``task``, ``layer`` or ``group:REGEX``.
        init: initial λ (method default when ``None``).
        constraint: ``clamp``, ``sigmoid`` or ``none`` (method default when ``None``).
        batchnorm: BatchNorm statistics policy (``reestimate``, ``base``, ``merge``).
        task_vector_dtype: storage dtype of the task vectors.
        steps: optimisation steps (each sees one batch of every task).
        lr: learning rate (method default when ``None``).
        batch_size: calibration inputs per task per step.
        eval_batch_size: inputs per evaluation batch.
        image_size: square input side.
        num_workers: data-loader workers.
        seed: global seed (data order, initialisation).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Lightning devices.
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        overwrite: replace an existing output folder.
        eval_experts: also evaluate each expert alone on its own task.
        base_kwargs: constructor keyword arguments of the architecture.
        progress_bar: show Lightning's progress bar.
    """

    base: str
    experts: dict[str, str]
    calib: Path
    output: Path
    eval: Path | None = None
    head_pattern: str | None = None
    method: str = "adamerging"
    granularity: str = "layer"
    init: float | None = None
    constraint: str | None = None
    batchnorm: str = "reestimate"
    task_vector_dtype: str = "float32"
    steps: int = 500
    lr: float | None = None
    batch_size: int = 16
    eval_batch_size: int = 128
    image_size: int = 224
    num_workers: int = 0
    seed: int = 0
    accelerator: str = "auto"
    devices: str | int = "auto"
    strategy: str = "auto"
    overwrite: bool = False
    eval_experts: bool = True
    base_kwargs: dict[str, Any] = field(default_factory=dict)
    progress_bar: bool = True


def run_fit(settings: FitSettings) -> dict[str, Any]:
    """Run ``adamerge fit``; returns the metrics written to ``metrics.json``."""
    started = time.perf_counter()
    output = Path(settings.output)
    check_output_dir(output, settings.overwrite)
    if settings.task_vector_dtype not in DTYPES:
        raise AdamergeError(f"--task-vector-dtype {settings.task_vector_dtype!r}: expected one of {', '.join(DTYPES)}")
    method = resolve_method(settings.method, init=settings.init, constraint=settings.constraint, lr=settings.lr)
    L.seed_everything(settings.seed, verbose=False)

    arch, base_weights = parse_base_spec(settings.base)
    experts = load_file_experts(
        arch,
        base_weights,
        settings.experts,
        head_pattern=settings.head_pattern,
        batchnorm=settings.batchnorm,
        dtype=DTYPES[settings.task_vector_dtype],
        arch_kwargs=settings.base_kwargs,
    )
    data = MultiTaskImageDataModule(
        settings.calib,
        experts.tasks,
        eval_dir=settings.eval,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        image_size=settings.image_size,
        num_workers=settings.num_workers,
        seed=settings.seed,
    )
    data.setup("fit")  # fail on bad calibration / evaluation folders before any training
    merged = MergedModel(
        experts.model,
        experts.task_vectors,
        granularity=settings.granularity,
        constraint=method.constraint,
        init=method.init,
        heads=experts.heads,
        batchnorm=settings.batchnorm,
    )
    module = MergingModule(merged, objective=method.loss(), optimizer=adam(method.lr), sources=experts.sources)
    load_s = time.perf_counter() - started

    metrics: dict[str, Any] = {"tasks": list(experts.tasks), "accuracy": {}, "timing_s": {"load": load_s}}
    with atomic_output_dir(output, settings.overwrite) as staging:
        trainer = _trainer(settings, staging)
        if settings.eval is not None:
            if settings.eval_experts:
                metrics["accuracy"]["expert (alone)"] = evaluate_experts(experts, data, settings)
            metrics["accuracy"][f"task arithmetic (λ={method.init:g})"] = _test(trainer, module, data)
        fit_started = time.perf_counter()
        trainer.fit(module, datamodule=data)
        metrics["timing_s"]["fit"] = time.perf_counter() - fit_started
        metrics["steps"] = trainer.global_step
        if settings.eval is not None:
            metrics["accuracy"][f"{settings.method} ({settings.granularity})"] = _test(trainer, module, data)
        elif merged.batchnorm == "reestimate":
            trainer.strategy.barrier()
            module.reestimate_batchnorm()  # exported statistics belong to the learned λ
        if trainer.is_global_zero:
            write_coefficients(staging, merged)
            metrics["files"] = write_merged_model(staging, merged)
            metrics["timing_s"]["total"] = time.perf_counter() - started
            write_json(staging / "metrics.json", metrics)
            write_yaml(staging / "config.yaml", _jsonable(dataclasses.asdict(settings)))
    if metrics["accuracy"]:
        logger.info("per-task accuracy (%%):\n%s", format_table(metrics["accuracy"], list(experts.tasks)))
    return metrics


def _trainer(settings: FitSettings, root: Path) -> L.Trainer:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen base: intended
    return L.Trainer(
        max_steps=settings.steps,
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=settings.strategy,
        default_root_dir=root,
        logger=CSVLogger(root, name="logs", version=""),
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0)],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, settings.steps // 10)),
        enable_progress_bar=settings.progress_bar,
        enable_model_summary=False,
    )


def _test(trainer: L.Trainer, module: MergingModule, data: MultiTaskImageDataModule) -> dict[str, float]:
    trainer.test(module, datamodule=data, verbose=False)
    return dict(module.results["test"])


@torch.no_grad()
def evaluate_experts(experts: ExpertSet, data: MultiTaskImageDataModule, settings: FitSettings) -> dict[str, float]:
    """Accuracy of each expert alone (its own weights and statistics) on its own task."""
    arch, _ = parse_base_spec(settings.base)
    results = {}
    loaders = dict(zip(data.tasks, data.evaluation_loaders(), strict=True))
    for task, path in settings.experts.items():
        model = build_architecture(arch, settings.base_kwargs)
        for name, tensor in load_state_dict(path).items():
            assign_tensor(model, name, tensor)
        model.eval()
        correct = total = 0
        for inputs, labels in loaders[task]:
            correct += int((model(inputs).argmax(-1) == labels).sum())
            total += labels.numel()
        results[task] = correct / total
    results["average"] = sum(results.values()) / len(results)
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
