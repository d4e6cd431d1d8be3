"""The settings of ``adamerge fit``, ``adamerge merge`` and ``adamerge pareto``: every option declared once.

Each field is one command-line option (``--field-name``), one YAML key and one keyword of the
Python API. The command line (:mod:`adamerge.cli`) is derived from these dataclasses: the option's
help is the field's entry in the class docstring, its type and default are the field's, its
choices and command-line shape come from :func:`option`. Plain data only (no torch), so that
``adamerge fit --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from adamerge.choices import (
    BATCHNORM_POLICIES,
    CONSTRAINTS,
    HEAD_INPUT,
    PARETO_METRICS,
    POSITION_CHOICES,
    PRECISIONS,
    TASK_VECTOR_DTYPES,
)


def option(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    choices: tuple[str, ...] | None = None,
    nargs: int | str | None = None,
    metavar: str | None = None,
) -> Any:
    """A settings field with its command-line shape.

    Args:
        default: the default (``MISSING``: a required option).
        factory: default factory for mutable defaults.
        choices: the values accepted (listed by ``--help``, checked before a run starts).
        nargs: values the option takes on the command line (``"+"``: one or more, ``3``: three).
        metavar: the value's name in ``--help``.
    """
    metadata = {"choices": choices, "nargs": nargs, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class RunSettings:
    """The options every run takes.

    Attributes:
        base: the pretrained model: ``ARCH@WEIGHTS`` (``torchvision:mobilenet_v2@base.pth``,
            ``package.module:builder@weights.pt``), ``open_clip:ARCH@FILE`` or ``hf:DIR``.
        base_kwargs: constructor keyword arguments of ``ARCH``, e.g. ``{num_classes: 10}``.
        experts: ``NAME=PATH`` (or ``NAME=hf:DIR``, ``NAME=peft:ADAPTER_DIR``) per expert; NAME:
            1-64 letters, digits, ``_ . + -``.
        trust_pickles: accept checkpoint files holding pickled Python objects (whole modules):
            loading them runs code from the file, so only for files you trust.
        eval: folder ``<task>/<class>/<file>`` of labelled data to report accuracy on.
        head_pattern: regex of task-specific tensors (each task keeps its expert's; never merged).
        task_specific: merged tensors each task keeps from its own expert: ``batchnorm`` (every
            BatchNorm layer's weight and bias), ``norm``, or a regex.
        batchnorm: BatchNorm statistics policy (``auto``: ``per-task`` when every task has its own
            head, else ``reestimate``).
        image_size: square input side of image experts (default: the model's metadata, else the
            calibration images' common size, else 224).
        image_mean: normalisation mean per RGB channel (default: the model's, else ImageNet's).
        image_std: normalisation standard deviation per RGB channel (as ``image_mean``).
        max_length: tokens per example (text experts; longer texts are truncated).
        eval_batch_size: inputs per evaluation batch.
        seed: global seed (data order, initialisation, random strategies such as DARE).
        output: output folder (refused if it exists, unless ``overwrite``).
        overwrite: replace an existing output folder.
        options: the method's own options, e.g. ``{scale: 0.4, density: 0.2}`` for a static merge
            or ``{trim_density: 0.3}`` for adamerging++ (fields of the method's class).
        surgery_steps: Representation Surgery after the merge (``0``: off): Adam steps of a small
            per-task adapter on the features entering each task's head, trained on ``calib`` to
            match the expert's; ``surgery/<task>.pt`` is written and ``eval`` gets a "+ surgery"
            row (classifiers with per-task heads; FusionBench's default: 1000).
        surgery_rank: hidden size r of each task's surgery adapter ``f − up(ReLU(down(f)))``.
        surgery_lr: Adam learning rate of the surgery adapters.
    """

    base: str
    base_kwargs: dict[str, Any] = option(factory=dict)
    experts: dict[str, str] = option(nargs="+", metavar="NAME=PATH")
    trust_pickles: bool = False
    eval: Path | None = None
    head_pattern: str | None = None
    task_specific: str | None = None
    batchnorm: str = option("auto", choices=BATCHNORM_POLICIES)
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = option(None, nargs=3)
    image_std: tuple[float, ...] | None = option(None, nargs=3)
    max_length: int = 128
    eval_batch_size: int = 128
    seed: int = 0
    output: Path
    overwrite: bool = False
    options: dict[str, Any] = option(factory=dict)
    surgery_steps: int = 0
    surgery_rank: int = 16
    surgery_lr: float = 1e-3


@dataclass(kw_only=True)
class FitSettings(RunSettings):
    """Everything ``adamerge fit`` needs (the command line and YAML configs map onto these fields).

    Attributes:
        calib: folder with one sub-folder of unlabeled inputs per task (few-shot:
            ``<task>/<class>/<image>``).
        method: learned-coefficient method (a registered name, or ``package.module:ATTRIBUTE``).
        granularity: ``task``, ``layer`` (one λ per tensor), ``tensor``, ``block`` (one λ per block,
            each tensor outside the blocks its own), ``group:REGEX[;REGEX...]``, ``chunk:N`` or
            ``partition:N``; default: ``block`` for causal language models, ``layer`` otherwise.
        init: initial λ (method default when unset).
        start_from: a static merge to start from (``regmean``, ``tsv-m``, ``ties``, ...): the
            fit learns λ on that merge's rewritten task vectors, scaled so that λ = ``init`` is
            that merge exactly (a learned method refines it instead of task arithmetic).
        start_options: options of the ``start_from`` merge, e.g. ``{alpha: 0.5}`` (its fields).
        constraint: constraint ``g`` of λ (method default when unset).
        task_vector_dtype: storage dtype of the task vectors.
        steps: optimisation steps (each sees one batch of every task).
        lr: learning rate (method default when unset).
        batch_size: calibration inputs per task per step (and per batch of BatchNorm statistics).
        num_workers: data-loader worker processes.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``, ...).
        devices: Lightning devices.
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        precision: ``32-true``, or autocast in ``bf16-mixed`` (CPU and GPU) / ``16-mixed`` (CUDA):
            the merged weights and λ stay float32, the model's forward and backward run in 16 bits.
        eval_experts: also evaluate each expert alone on its own task.
        eval_init: also evaluate the initial merge (λ = init) before training.
        positions: causal LMs: the next-token distributions an unlabeled objective scores on each
            calibration record (and that the experts' targets and the hold-out compare): ``all``
            real tokens, ``response``: only the one after the prompt, the first token the model
            would generate, or ``auto``: ``response`` when every record of every task is a prompt
            (``{"prompt"}``, or chat ``messages`` awaiting the assistant), else ``all``.
        gradient_checkpointing: recompute each repeated block's activations (a decoder layer, a
            transformer block) in backward instead of keeping them: less memory per step for
            long sequences, about one more forward of the model per step (dense task vectors).
        group_by_length: text experts: training batches of texts of similar length (far fewer
            pad tokens per step).
        progress_bar: a live bar of the training steps (on an interactive terminal; every stage
            logs its time when it ends either way).
        shots: few-shot aTLAS: read ``calib`` as ``<task>/<class>/<image>`` and use this many
            labelled images per class (seeded).
        calib_limit: calibration inputs per task the objective trains on (seeded subset; BatchNorm
            statistics use them all).
        pseudo_label_threshold: aTLAS test-time adaptation confidence threshold.
        align_modules: Expert Merging: hidden states aligned (sub-module names, or
            ``<head input>`` for the features entering the head).
        temperature: Expert Merging distillation temperature T.
        gamma: Expert Merging coefficient-regulariser weight γ.
        task_weights: weight of each task's loss, e.g. ``{mnist: 2}`` (every method; Expert
            Merging's β; default 1).
        chunk_budget: Expert Merging++ chunk budget B (default: twice the number of tensors).
        chunk_kappa: Expert Merging++ importance sharpness κ.
        holdout: share of each task's calibration inputs held out to keep the λ that agrees best
            with the experts (the start included; ``0``: off).
        resume: continue an interrupted fit of the same settings and ``output`` from its last
            checkpoint.
        checkpoint_every: steps between the λ-only resume checkpoints (``0``: only at the end of
            each stage).
    """

    calib: Path | None
    method: str = "adamerging"
    granularity: str | None = None
    init: float | None = None
    start_from: str | None = None
    start_options: dict[str, Any] = option(factory=dict)
    constraint: str | None = option(None, choices=CONSTRAINTS)
    task_vector_dtype: str = option("float32", choices=TASK_VECTOR_DTYPES)
    steps: int = 500
    lr: float | None = None
    batch_size: int = 16
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    precision: str = option("32-true", choices=PRECISIONS)
    eval_experts: bool = True
    eval_init: bool = True
    positions: str = option("auto", choices=POSITION_CHOICES)
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    progress_bar: bool = True
    shots: int | None = None
    calib_limit: int | None = None
    pseudo_label_threshold: float = 0.99
    align_modules: tuple[str, ...] = option((HEAD_INPUT,), nargs="+")
    temperature: float = 1.0
    gamma: float = 5.0
    task_weights: dict[str, float] = option(factory=dict)
    chunk_budget: int | None = None
    chunk_kappa: float = 1.0
    holdout: float = 0.1
    resume: bool = False
    checkpoint_every: int = 50


@dataclass(kw_only=True)
class MergeSettings(RunSettings):
    """Everything ``adamerge merge`` needs.

    Attributes:
        method: static merge (a registered name, or ``package.module:ATTRIBUTE``).
        calib: unlabeled data per task, for BatchNorm statistics (needed by models with
            BatchNorm layers under ``--batchnorm reestimate`` / ``per-task``).
        batch_size: inputs per batch of BatchNorm statistics.
    """

    method: str
    calib: Path | None = None
    batch_size: int = 16


@dataclass(kw_only=True)
class ParetoSettings(RunSettings):
    """Everything ``adamerge pareto`` needs (MAP: an amortized Pareto front of task-wise λ).

    Attributes:
        calib: unlabeled data per task: the agreement metric's inputs and the BatchNorm statistics.
        metric: what each task's score is: ``accuracy`` on ``eval``, ``agreement`` with the task's
            own expert on its ``calib`` inputs (no labels), or ``auto``: accuracy when ``eval`` is
            given, else agreement.
        points: λ sampled (scrambled Sobol, seeded) and evaluated on every task, besides the
            task-arithmetic point λ = 0.3; at least (K + 1)(K + 2) / 2, the quadratic's
            coefficients (default: twice that).
        bounds: low and high of every task's λ (the box searched).
        ridge: ridge penalty on the surrogates' non-constant coefficients.
        candidates: Sobol candidates the surrogates score (besides the weighted-sum optima).
        front_size: most points kept on the front (spread by crowding distance).
        pick: task weights choosing the front point to evaluate and export, e.g. ``{alpha: 2}``
            (unnamed tasks weigh 1; default: equal weights).
        batch_size: inputs per batch of BatchNorm statistics (and of the agreement metric).
        progress_bar: a live bar of the evaluated points (on an interactive terminal; each point
            logs its metrics either way).
    """

    calib: Path | None = None
    metric: str = option("auto", choices=PARETO_METRICS)
    points: int | None = None
    bounds: tuple[float, float] = option((0.0, 1.0), nargs=2)
    ridge: float = 1e-6
    candidates: int = 20000
    front_size: int = 200
    pick: dict[str, float] = option(factory=dict)
    batch_size: int = 16
    progress_bar: bool = True


def field_help(cls: type) -> dict[str, str]:
    """``{field: its docstring entry}`` over ``cls`` and its bases (the entry text, one line)."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        if "Attributes:" not in doc:
            continue
        block = doc.split("Attributes:", 1)[1]
        for match in re.finditer(r"^ {8}(\w+): (.*(?:\n {12,}.*)*)", block, flags=re.M):
            helps[match.group(1)] = " ".join(part.strip() for part in match.group(2).splitlines())
    return helps


def settings_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a settings class in declaration order (one command-line option each)."""
    return list(dataclasses.fields(cls))
