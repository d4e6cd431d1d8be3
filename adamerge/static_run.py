"""The ``adamerge merge`` workflow: a static merge (no training) written like ``adamerge fit``'s.

The merged weights ``θ_0 + static_merge(method, τ)`` replace the base weights; BatchNorm
statistics follow the same policy as in ``fit`` (re-estimated on ``--calib`` data when given);
``--eval`` reports per-task accuracy with each task's own head.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from adamerge.batchnorm import (
    REESTIMATING_POLICIES,
    batchnorm_layers,
    per_task_running_stats,
    reestimate_running_stats,
    resolve_policy,
)
from adamerge.data import build_datamodule
from adamerge.errors import AdamergeError
from adamerge.evaluation import accuracy, with_average
from adamerge.experts import load_experts
from adamerge.experts.task_specific import keep_task_specific, with_task_specific
from adamerge.export import (
    export_merged,
    format_table,
    plain_config,
    write_json,
    write_yaml,
)
from adamerge.model_inputs import call_functional, input_batch_size
from adamerge.objectives import as_task_batch
from adamerge.output_dir import OutputFolder
from adamerge.run_checks import check_common_settings, check_eval_classes, input_paths
from adamerge.static import STATIC_METHODS, static_merge

logger = logging.getLogger(__name__)


@dataclass
class MergeSettings:
    """Everything ``adamerge merge`` needs.

    Attributes:
        base: ``ARCH@WEIGHTS`` of the pretrained model.
        experts: ``{task: weights file}``.
        method: one of :data:`adamerge.static.STATIC_METHODS`.
        output: folder to write (refused if it exists, unless ``overwrite``).
        options: overrides of the method's preset (e.g. ``{"scale": 0.4, "density": 0.2}``).
        calib: optional unlabeled folder per task (BatchNorm re-estimation).
        eval: optional ``<task>/<class>/<image>`` folder of labelled data.
        head_pattern: regex of task-specific tensors (never merged).
        task_specific: merged tensors each task keeps from its own expert (``batchnorm``,
            ``norm`` or a regex; see :mod:`adamerge.experts.task_specific`).
        batchnorm: ``auto`` (``per-task`` when every task has its own head, else
            ``reestimate``), ``reestimate`` or ``per-task`` (all three need ``calib`` for a model
            with BatchNorm layers), ``base`` or ``merge``.
        batch_size: inputs per batch for BatchNorm re-estimation.
        eval_batch_size: inputs per evaluation batch.
        image_size: square input side of image experts (``None``: found as ``fit`` finds it).
        image_mean: per-channel normalisation mean (``None``: the model's, else ImageNet's).
        image_std: per-channel normalisation standard deviation (as ``image_mean``).
        max_length: tokens per example (text experts).
        seed: seed of random strategies (DARE).
        overwrite: replace an existing output folder.
        base_kwargs: constructor keyword arguments of the architecture.
        trust_pickles: accept expert files that are pickled modules (they run code when loaded).
    """

    base: str
    experts: dict[str, str]
    method: str
    output: Path
    options: dict[str, Any] = field(default_factory=dict)
    calib: Path | None = None
    eval: Path | None = None
    head_pattern: str | None = None
    task_specific: str | None = None
    batchnorm: str = "auto"
    batch_size: int = 64
    eval_batch_size: int = 128
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    max_length: int = 128
    seed: int = 0
    overwrite: bool = False
    base_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickles: bool = False


def run_merge(settings: MergeSettings) -> dict[str, Any]:
    """Run ``adamerge merge``; returns the metrics written to ``metrics.json``.

    Options and the output folder are checked (and the folder locked) before anything is loaded.
    Under a re-estimating BatchNorm policy a model with BatchNorm layers needs ``--calib``, with or
    without ``--eval``: statistics are never kept from the base silently.
    """
    started = time.perf_counter()
    check_common_settings(settings)
    if settings.method not in STATIC_METHODS:
        raise AdamergeError(f"--method {settings.method!r}: expected one of {', '.join(STATIC_METHODS)}")
    with OutputFolder(settings.output, settings.overwrite, input_paths(settings)) as output:
        return _merge(settings, output, started)


def _merge(settings: MergeSettings, output: OutputFolder, started: float) -> dict[str, Any]:
    L.seed_everything(settings.seed, verbose=False)
    from adamerge.fit import source_options

    experts = keep_task_specific(load_experts(settings.base, settings.experts, source_options(settings)), settings.task_specific)
    batchnorm = resolve_policy(settings.batchnorm, experts.tasks, experts.heads, experts.model)
    if settings.calib is None and batchnorm in REESTIMATING_POLICIES and batchnorm_layers(experts.model):
        raise AdamergeError(
            f"--batchnorm {settings.batchnorm}{' (here ' + batchnorm + ')' if batchnorm != settings.batchnorm else ''} re-estimates BatchNorm statistics on --calib data, and none was given: "
            "pass --calib DIR, or --batchnorm base to keep the base model's statistics"
        )
    data = None
    if settings.calib is not None or settings.eval is not None:
        data = build_datamodule(
            experts, settings.calib or settings.eval, eval_dir=settings.eval, batch_size=settings.batch_size,
            eval_batch_size=settings.eval_batch_size, image_size=settings.image_size, image_mean=settings.image_mean, image_std=settings.image_std,
            max_length=settings.max_length,
            seed=settings.seed, shuffle=False,
        )
        data.setup("fit")
    options = dict(settings.options)
    if settings.method == "dare":
        options.setdefault("seed", settings.seed)
    delta = static_merge(settings.method, dict(experts.task_vectors.items()), dtype=torch.float32, **options)
    model = experts.model
    with torch.no_grad():
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, change in delta.items():
            tensors[name].add_(change.to(tensors[name].dtype))  # θ = θ_0 + merged delta, in place
    heads = with_task_specific(dict(experts.heads), experts.task_specific)

    def forward(task: str):
        return lambda inputs: call_functional(model, heads.get(task, {}), inputs)

    model.eval()
    if settings.eval is not None and data is not None:
        check_eval_classes(data, lambda task, inputs: forward(task)(inputs))
    if batchnorm in REESTIMATING_POLICIES and settings.calib is not None and data is not None:
        loaders = data.statistics_loaders()

        def run_batches(tasks: list[str]) -> int:
            seen = 0
            with torch.no_grad():
                for task in tasks:
                    for item in loaders[task]:
                        inputs = as_task_batch(item).inputs
                        forward(task)(inputs)
                        seen += input_batch_size(inputs)
            return seen

        if batchnorm == "per-task":  # each task's statistics join its head
            statistics = per_task_running_stats(model, list(experts.tasks), lambda task: run_batches([task]))
            heads = {task: {**heads.get(task, {}), **statistics[task]} for task in experts.tasks}
        else:
            reestimate_running_stats(model, lambda: run_batches(list(loaders)))
    metrics: dict[str, Any] = {
        "tasks": list(experts.tasks), "method": settings.method, "options": options, "batchnorm": batchnorm, "accuracy": {}
    }
    if settings.eval is not None and data is not None:
        loaders = dict(zip(data.tasks, data.evaluation_loaders(), strict=True))
        metrics["accuracy"][settings.method] = with_average({t: accuracy(forward(t), loaders[t]) for t in experts.tasks})
    with output.staging() as staging:
        metrics["files"] = export_merged(staging, model.state_dict(), heads, experts.export)
        metrics["timing_s"] = {"total": time.perf_counter() - started}
        write_json(staging / "metrics.json", metrics)
        write_yaml(staging / "config.yaml", plain_config(dataclasses.asdict(settings)))
    if metrics["accuracy"]:
        logger.info("per-task accuracy (%%):\n%s", format_table(metrics["accuracy"], list(experts.tasks)))
    return metrics
