"""The ``adamerge fit`` workflow as a plain function: files in, output folder out.

:func:`run_fit` loads the base and the experts, learns the coefficients with a Lightning
``Trainer`` on the unlabeled calibration data, keeps the λ that agrees best with the experts on
held-out calibration inputs (:mod:`adamerge.safeguard`; the start included), evaluates
(optionally) on labelled data, logs one line per stage with its time (:mod:`adamerge.progress`),
and writes the output folder atomically:

- ``coefficients.json`` / ``coefficients.tsv``: learned λ per task and group;
- the merged model in the expert source's own format, loadable without adamerge: ``merged.pt`` +
  ``heads/<task>.pt`` (plain state dicts for the architecture's ``load_state_dict``),
  ``open_clip_model.safetensors`` + ``heads/<task>.pt`` (open_clip), or ``model/`` +
  ``tasks/<task>/`` (transformers ``from_pretrained`` folders);
- ``metrics.json``: per-task accuracy of each expert alone, the initial merge (task arithmetic at
  the initial λ) and the learned merge, the BatchNorm policy used, the safeguard's held-out
  scores and kept step, plus timings (``timing_s``; ``stages``: seconds per stage);
- ``config.yaml``: the resolved settings; ``checkpoints/last.ckpt``: λ and optimiser state
  (resume with ``ckpt_path``); ``logs/``: the losses per step (CSV).
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
from lightning.pytorch.loggers import CSVLogger

from adamerge.batchnorm import resolve_policy
from adamerge.choices import REESTIMATING_POLICIES, TASK_VECTOR_DTYPES
from adamerge.data import build_datamodule
from adamerge.errors import AdamergeError
from adamerge.evaluation import accuracy, with_average
from adamerge.experts import ExpertSet, SourceOptions, load_experts
from adamerge.experts.task_specific import keep_task_specific
from adamerge.export import (
    format_table,
    plain_config,
    write_coefficients,
    write_json,
    write_merged_model_of,
    write_yaml,
)
from adamerge.granularity import ChunkWise
from adamerge.hooks import HEAD_INPUT, capture_hidden
from adamerge.importance import chunk_budget, layer_importance
from adamerge.merged_model import MergedModel
from adamerge.methods import MethodSpec, resolve_method
from adamerge.model_inputs import call_module
from adamerge.module import MergingModule
from adamerge.objectives import (
    CrossEntropy,
    Entropy,
    ExpertAlignment,
    Objective,
    PseudoLabel,
    TaskWeighted,
    as_task_batch,
    collect_outputs,
)
from adamerge.output_dir import OutputFolder
from adamerge.preprocess import ties
from adamerge.progress import Stages, quiet_third_party
from adamerge.resume import ResumeState, save_checkpoint
from adamerge.run_checks import check_accelerator, check_eval_classes, check_fit_settings, input_paths
from adamerge.safeguard import KeepBestCoefficients, held_out_batches
from adamerge.task_vectors import TaskVectors

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in TASK_VECTOR_DTYPES}


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
        task_specific: merged tensors each task keeps from its own expert (``batchnorm``,
            ``norm`` or a regex; see :mod:`adamerge.experts.task_specific`).
        method: learned-coefficient method (``adamerging``).
        granularity: ``task``, ``layer`` or ``group:REGEX``.
        init: initial λ (method default when ``None``).
        constraint: ``clamp``, ``sigmoid`` or ``none`` (method default when ``None``).
        batchnorm: BatchNorm statistics policy (``auto``: ``per-task`` when every task has its
            own head, else ``reestimate``; ``reestimate``, ``per-task``, ``base``, ``merge``).
        task_vector_dtype: storage dtype of the task vectors.
        steps: optimisation steps (each sees one batch of every task).
        lr: learning rate (method default when ``None``).
        batch_size: calibration inputs per task per step.
        eval_batch_size: inputs per evaluation batch.
        image_size: square input side of image experts (``None``: the model's metadata, else the
            calibration images' common size, else 224; see :mod:`adamerge.image_preprocessing`).
        image_mean: per-channel normalisation mean (``None``: the model's, else ImageNet's).
        image_std: per-channel normalisation standard deviation (as ``image_mean``).
        max_length: tokens per example (text experts; longer texts are truncated).
        num_workers: data-loader workers.
        seed: global seed (data order, initialisation).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``).
        devices: Lightning devices.
        strategy: Lightning strategy (``auto``, ``ddp``, ...).
        overwrite: replace an existing output folder.
        eval_experts: also evaluate each expert alone on its own task.
        eval_init: also evaluate the initial merge (λ = init) before training.
        group_by_length: text experts: training batches of texts of similar length (far fewer
            pad tokens per step; see :class:`adamerge.text_data.LengthGroupedBatches`).
        base_kwargs: constructor keyword arguments of the architecture.
        trust_pickles: accept expert files that are pickled modules (they run code when loaded).
        progress_bar: a live bar of the training steps (on an interactive terminal; every stage
            logs its time when it ends either way).
        shots: few-shot aTLAS: read ``calib`` as ``<task>/<class>/<image>`` and use this many
            labelled images per class (seeded).
        calib_limit: train on this many calibration inputs per task (seeded subset; Expert
            Merging needs only 5-10). BatchNorm statistics are still re-estimated on all of them.
        pseudo_label_threshold: aTLAS test-time adaptation confidence threshold.
        align_modules: Expert Merging: hidden states aligned (sub-module names, or
            ``"<head input>"`` for the features entering the head).
        temperature: Expert Merging distillation temperature T.
        gamma: Expert Merging coefficient-regulariser weight γ.
        task_weights: weight of each task's loss, every method (Expert Merging's β; default 1).
        chunk_budget: Expert Merging++ chunk budget B (default: twice the number of tensors).
        chunk_kappa: Expert Merging++ importance sharpness κ.
        holdout: share of each task's calibration inputs held out of training for the safeguard
            (:mod:`adamerge.safeguard`: the λ with the best held-out agreement with the experts,
            the start included, is kept); ``0`` turns it off.
        resume: continue an interrupted fit of the same settings from its last checkpoint
            (:mod:`adamerge.resume`).
        checkpoint_every: steps between the λ-only resume checkpoints (``0``: only at the end
            of each stage).
    """

    base: str
    experts: dict[str, str]
    calib: Path
    output: Path
    eval: Path | None = None
    head_pattern: str | None = None
    task_specific: str | None = None
    method: str = "adamerging"
    granularity: str = "layer"
    init: float | None = None
    constraint: str | None = None
    batchnorm: str = "auto"
    task_vector_dtype: str = "float32"
    steps: int = 500
    lr: float | None = None
    batch_size: int = 16
    eval_batch_size: int = 128
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    max_length: int = 128
    num_workers: int = 0
    seed: int = 0
    accelerator: str = "auto"
    devices: str | int = "auto"
    strategy: str = "auto"
    overwrite: bool = False
    eval_experts: bool = True
    eval_init: bool = True
    group_by_length: bool = False
    base_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickles: bool = False
    progress_bar: bool = True
    shots: int | None = None
    calib_limit: int | None = None
    pseudo_label_threshold: float = 0.99
    align_modules: tuple[str, ...] = (HEAD_INPUT,)
    temperature: float = 1.0
    gamma: float = 5.0
    task_weights: dict[str, float] = field(default_factory=dict)
    chunk_budget: int | None = None
    chunk_kappa: float = 1.0
    holdout: float = 0.1
    resume: bool = False
    checkpoint_every: int = 50


def run_fit(settings: FitSettings) -> dict[str, Any]:
    """Run ``adamerge fit``; returns the metrics written to ``metrics.json``.

    Every option is checked, and the output folder checked and locked, before anything is loaded
    (:func:`adamerge.run_checks.check_fit_settings`, :class:`adamerge.output_dir.OutputFolder`).
    """
    started = time.perf_counter()
    check_fit_settings(settings)
    with OutputFolder(settings.output, settings.overwrite, input_paths(settings)) as output:
        check_accelerator(settings.accelerator, settings.devices, settings.strategy)
        resume = ResumeState(
            output.output, plain_config(dataclasses.asdict(settings)), settings.resume, settings.checkpoint_every, output.writer
        )
        resume.start()
        try:
            metrics = _fit(settings, output, resume, started)
        except AdamergeError:
            resume.discard()  # bad input: nothing to resume
            raise
        resume.discard()
    return metrics


def _fit(settings: FitSettings, output: OutputFolder, resume: ResumeState, started: float) -> dict[str, Any]:
    stages = Stages(live=settings.progress_bar)
    with stages.stage("loading experts and data"):
        method, experts, data, merged, module, targets, safeguard = _load(settings)
    metrics: dict[str, Any] = {
        "tasks": list(experts.tasks),
        "method": dataclasses.asdict(method),
        "batchnorm": merged.batchnorm,
        "accuracy": {},
        "timing_s": {"load": time.perf_counter() - started},
    }
    with output.staging() as staging:
        if settings.eval is not None:
            tester = _trainer(settings, staging, None, [])
            if settings.eval_experts:
                with stages.stage("evaluating the experts alone"):
                    alone = evaluate_experts(experts, data, settings)
                if alone:
                    metrics["accuracy"]["expert (alone)"] = alone
            if settings.eval_init:
                with stages.stage("evaluating the start"):
                    metrics["accuracy"][_initial_label(method)] = _test(tester, module, data)
        fit_started = time.perf_counter()
        with stages.stage("fitting" if not method.refine_chunks else "fitting stage 1", total=settings.steps) as bar:
            trainer = _trainer(settings, staging, "logs", [safeguard, resume.callback(1), bar])
            trainer.fit(module, datamodule=data, ckpt_path=resume.resume_from(1))
            resume.finish_stage(trainer, 1)
        if safeguard is not None:
            metrics["safeguard"] = {"stage 1": safeguard.summary()}
        if method.refine_chunks:
            if settings.eval is not None:
                with stages.stage("evaluating stage 1"):
                    _test_stage_one(trainer, module, data, settings, metrics, time.perf_counter() - fit_started)
            second = _safeguard(experts, data, settings, "stage 2", safeguard)
            with stages.stage("fitting stage 2", total=settings.steps) as bar:
                module, trainer = _refine_in_chunks(
                    module, method, settings, experts.sources, targets, data, staging, resume, [second, bar]
                )
            merged = module.merged
            if second is not None:
                metrics["safeguard"]["stage 2"] = second.summary()
        metrics["timing_s"]["fit"] = time.perf_counter() - fit_started
        metrics["steps"] = trainer.global_step
        if settings.eval is not None:
            with stages.stage("evaluating the merge"):
                metrics["accuracy"][f"{settings.method} ({settings.granularity})"] = _test(trainer, module, data)
        elif merged.batchnorm in REESTIMATING_POLICIES:
            with stages.stage("re-estimating BatchNorm statistics"):
                trainer.strategy.barrier()
                module.reestimate_batchnorm()  # exported statistics belong to the learned λ
        with stages.stage("writing"):
            save_checkpoint(trainer, staging / "checkpoints" / "last.ckpt")
            if trainer.is_global_zero:
                write_coefficients(staging, merged)
                metrics["files"] = write_merged_model_of(staging, merged, experts.export)
                metrics["timing_s"]["total"] = time.perf_counter() - started
                metrics["timing_s"]["stages"] = dict(stages.seconds)
                write_json(staging / "metrics.json", metrics)
                write_yaml(staging / "config.yaml", plain_config(dataclasses.asdict(settings)))
    if metrics["accuracy"]:
        logger.info("per-task accuracy (%%):\n%s", format_table(metrics["accuracy"], list(experts.tasks)))
    logger.info("stage times: %s", stages.summary())
    return metrics


def _load(settings: FitSettings) -> tuple[
    MethodSpec, ExpertSet, L.LightningDataModule, MergedModel, MergingModule, ExpertTargets | None, KeepBestCoefficients | None
]:
    """Experts, data, the merged model, its LightningModule and the safeguard of a fit."""
    method = resolve_method(
        settings.method, init=settings.init, constraint=settings.constraint, lr=settings.lr, shots=settings.shots
    )
    L.seed_everything(settings.seed, verbose=False)

    experts = load_experts(settings.base, settings.experts, source_options(settings, DTYPES[settings.task_vector_dtype]))
    experts = keep_task_specific(experts, settings.task_specific)
    task_vectors = preprocess_task_vectors(experts.task_vectors, method.preprocess)
    batchnorm = resolve_policy(settings.batchnorm, experts.tasks, experts.heads, experts.model)
    data = build_datamodule(
        experts,
        settings.calib,
        eval_dir=settings.eval,
        batch_size=settings.batch_size,
        eval_batch_size=settings.eval_batch_size,
        image_size=settings.image_size,
        image_mean=settings.image_mean,
        image_std=settings.image_std,
        max_length=settings.max_length,
        num_workers=settings.num_workers,
        seed=settings.seed,
        shots=settings.shots,
        limit_per_task=settings.calib_limit,
        with_index=method.objective == "expert-alignment",
        holdout=settings.holdout,
        **({"group_by_length": True} if settings.group_by_length else {}),
    )
    data.setup("fit")  # fail on bad calibration / evaluation folders before any training
    merged = MergedModel(
        experts.model,
        task_vectors,
        granularity=settings.granularity,
        constraint=method.constraint,
        init=method.init,
        heads=experts.heads,
        batchnorm=batchnorm,
        task_specific=experts.task_specific,
    )
    if settings.eval is not None:
        check_eval_classes(data, lambda task, inputs: merged(inputs, task))
    targets = ExpertTargets(experts, data, merged) if method.objective == "expert-alignment" else None
    module = _module(method, merged, settings, experts.sources, targets)
    return method, experts, data, merged, module, targets, _safeguard(experts, data, settings)


def source_options(settings: Any, dtype: torch.dtype = torch.float32) -> SourceOptions:
    """The :class:`SourceOptions` of ``fit`` / ``merge`` settings."""
    return SourceOptions(
        head_pattern=settings.head_pattern,
        batchnorm=settings.batchnorm,
        dtype=dtype,
        base_kwargs=settings.base_kwargs,
        calib=settings.calib,
        eval=settings.eval,
        trust_pickles=settings.trust_pickles,
    )


def preprocess_task_vectors(task_vectors: TaskVectors, preprocess: str | None) -> TaskVectors:
    """Apply a method's task-vector preprocessor (``ties``: AdaMerging++)."""
    if preprocess is None:
        return task_vectors
    if preprocess == "ties":
        return TaskVectors(task_vectors.tasks, ties(dict(task_vectors.items()), density=0.2))
    raise AdamergeError(f"unknown task-vector preprocessor {preprocess!r}")


def _initial_label(method: MethodSpec) -> str:
    if method.init == 0:
        return "pretrained (λ=0)"
    if method.preprocess == "ties":
        return f"TIES-trimmed task arithmetic (λ={method.init:g})"
    return f"task arithmetic (λ={method.init:g})"


def _module(
    method: MethodSpec,
    merged: MergedModel,
    settings: FitSettings,
    sources: dict[str, Any],
    targets: ExpertTargets | None,
) -> MergingModule:
    objective = build_objective(method, merged, settings, targets)
    return MergingModule(
        merged,
        objective=objective,
        optimizer=method.optimizer_factory(),
        scheduler=method.scheduler_factory(settings.steps),
        sources=sources,
    )


def build_objective(
    method: MethodSpec, merged: MergedModel, settings: FitSettings, targets: ExpertTargets | None
) -> Objective:
    """The method's objective for this model (expert alignment caches the experts' outputs), each
    task's loss weighted by ``--task-weights`` (Expert Merging's β is that weight)."""
    if method.objective == "expert-alignment":
        assert targets is not None
        alignment = ExpertAlignment(
            merged.coefficients().detach(),
            merged.tasks,
            hidden_modules=settings.align_modules,
            temperature=settings.temperature,
            gamma=settings.gamma,
            task_weights=settings.task_weights,
        )
        targets.fill(alignment)
        return alignment
    objectives = {"entropy": Entropy, "cross-entropy": CrossEntropy, "pseudo-label": lambda: PseudoLabel(settings.pseudo_label_threshold)}
    if method.objective not in objectives:
        raise AdamergeError(f"unknown objective {method.objective!r}")
    objective = objectives[method.objective]()
    return TaskWeighted(objective, merged.tasks, settings.task_weights) if settings.task_weights else objective


class ExpertTargets:
    """Each expert's logits and hidden states on its own calibration data, computed once."""

    def __init__(self, experts: ExpertSet, data: L.LightningDataModule, merged: MergedModel) -> None:
        if experts.expert_model is None:
            raise AdamergeError("expert-merging needs each expert alone, which this expert source cannot rebuild")
        self.experts = experts
        self.data = data
        self.head_module = merged.head_module
        self.cache: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    @torch.no_grad()
    def fill(self, objective: ExpertAlignment) -> None:
        loaders = self.data.target_loaders()
        for task in self.experts.tasks:
            if task not in self.cache:
                model = self.experts.expert_model(task).eval()
                positions: list[torch.Tensor] = []

                def batches(loader=loaders[task], positions=positions):
                    for item in loader:
                        batch = as_task_batch(item)
                        positions.append(batch.index)  # (B,) rows of the training items
                        yield batch.inputs

                logits, hidden = collect_outputs(
                    _module_forward(model),
                    lambda names, model=model: capture_hidden(model, names, self.head_module),
                    objective.hidden_modules,
                    batches(),
                )
                self.cache[task] = in_index_order(torch.cat(positions), logits, hidden)
            objective.cache_targets(task, *self.cache[task])


def in_index_order(
    positions: torch.Tensor, logits: torch.Tensor, hidden: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rows gathered in loader order ``positions`` (N,) put back so that row ``i`` is item ``i``."""
    order = torch.argsort(positions)  # (N,)
    return logits[order], {name: value[order] for name, value in hidden.items()}


def _test_stage_one(
    trainer: L.Trainer,
    module: MergingModule,
    data: L.LightningDataModule,
    settings: FitSettings,
    metrics: dict[str, Any],
    fit_s: float,
) -> None:
    """Expert Merging++: the accuracy of its stage one, which is Expert Merging itself.

    Stage one runs exactly as ``--method expert-merging`` with the same settings, so its result is
    reported under that method's name ("did the chunks help?", and one run gives both table rows).
    The test runs under a forked RNG: stage two draws the same batches as when nothing is tested.
    """
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        metrics["accuracy"][f"expert-merging ({settings.granularity})"] = _test(trainer, module, data)
    metrics["timing_s"]["stage_one_fit"] = fit_s
    metrics["timing_s"]["stage_one_test"] = time.perf_counter() - started


def _refine_in_chunks(
    module: MergingModule,
    method: MethodSpec,
    settings: FitSettings,
    sources: dict[str, Any],
    targets: ExpertTargets | None,
    data: L.LightningDataModule,
    staging: Path,
    resume: ResumeState,
    callbacks: list[L.Callback | None],
) -> tuple[MergingModule, L.Trainer]:
    """Expert Merging++ stage two: importance-guided chunks, initialised at the stage-one λ."""
    first = module.merged
    if first.layout.tensor_groups != tuple(range(len(first.layout.tensor_names))):
        raise AdamergeError("expert-merging++ refines a layer-wise first stage: use --granularity layer")
    stage_one = first.coefficients().detach()  # (K, L)
    importance = layer_importance(stage_one, first.task_vectors.items())
    budget = settings.chunk_budget or 2 * len(importance)
    chunks = chunk_budget(importance, budget, settings.chunk_kappa)
    granularity = ChunkWise({n: max(1, m) for n, m in chunks.items()})
    layout = granularity.compile(first.layout.tensor_names, first.task_vectors.numels())
    init = torch.cat(
        [stage_one[:, [i]].expand(-1, c) for i, c in enumerate(layout.tensor_chunks)], dim=1
    )  # (K, G2): every chunk starts at its tensor's stage-one value
    trainable = torch.cat(
        [torch.full((stage_one.shape[0], c), chunks[n] > 0) for n, c in zip(layout.tensor_names, layout.tensor_chunks)],
        dim=1,
    )
    second = MergedModel(
        first.model,
        first.task_vectors,
        granularity,
        method.constraint,
        init.clamp(1e-4, 1 - 1e-4) if method.constraint == "sigmoid" else init,
        heads={t: first.heads.for_task(t) for t in first.heads.tasks},
        batchnorm=first.batchnorm,
        trainable=trainable,
        task_specific={t: first.kept.for_task(t) for t in first.kept.tasks},
    )
    logger.info(
        "expert-merging++: %d of %d tensors refined into %d chunks (budget %d, kappa %g)",
        sum(m > 0 for m in chunks.values()), len(chunks), sum(chunks.values()), budget, settings.chunk_kappa,
    )
    refined = _module(method, second, settings, sources, targets)
    trainer = _trainer(settings, staging, "logs_stage2", [callbacks[0], resume.callback(2), *callbacks[1:]])
    trainer.fit(refined, datamodule=data, ckpt_path=resume.resume_from(2))
    resume.finish_stage(trainer, 2)
    return refined, trainer


def _safeguard(
    experts: ExpertSet,
    data: L.LightningDataModule,
    settings: FitSettings,
    stage: str = "",
    earlier: KeepBestCoefficients | None = None,
) -> KeepBestCoefficients | None:
    """The held-out safeguard of one training stage, or ``None`` (logged) where it cannot run."""
    if settings.holdout == 0:
        return None
    loaders = data.holdout_loaders() if hasattr(data, "holdout_loaders") else {}
    missing = [task for task in experts.tasks if task not in loaders]
    if missing or experts.expert_model is None:
        logger.warning(
            "safeguard off: %s",
            f"--holdout {settings.holdout:g} leaves no held-out calibration input for {', '.join(missing)} "
            "(too few inputs)" if missing else "this expert source cannot rebuild the experts alone",
        )
        return None
    return KeepBestCoefficients(
        earlier.held_out if earlier is not None else held_out_batches(loaders),
        experts.expert_model,
        every=max(1, settings.steps // 10),
        stage=stage,
        targets=earlier.targets if earlier is not None else None,
    )


def _trainer(settings: FitSettings, root: Path, log_name: str | None, callbacks: list[L.Callback | None]) -> L.Trainer:
    """The run's Lightning ``Trainer``: the losses logged to ``root/log_name`` (``None``: not logged),
    ``callbacks`` in order (``None`` left out; the safeguard comes before the resume checkpoints, so
    that they hold its state), adamerge's own progress display."""
    quiet_third_party()
    return L.Trainer(
        max_steps=settings.steps,
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=settings.strategy,
        default_root_dir=root,
        logger=CSVLogger(root, name=log_name, version="") if log_name is not None else False,
        callbacks=[c for c in callbacks if c is not None],
        enable_checkpointing=False,  # resume checkpoints: adamerge.resume; the output's last.ckpt: run_fit
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, settings.steps // 10)),
        enable_progress_bar=False,  # adamerge.progress: one bar for the steps, one line per stage
        enable_model_summary=False,
    )


def _test(trainer: L.Trainer, module: MergingModule, data: L.LightningDataModule) -> dict[str, float]:
    trainer.test(module, datamodule=data, verbose=False)
    return dict(module.results["test"])


def evaluate_experts(experts: ExpertSet, data: L.LightningDataModule, settings: FitSettings) -> dict[str, float]:
    """Accuracy of each expert alone (its own weights, statistics and head) on its own task."""
    if experts.expert_model is None:
        logger.warning("this expert source cannot rebuild the experts alone: their accuracy is not reported")
        return {}
    loaders = dict(zip(data.tasks, data.evaluation_loaders(), strict=True))
    return with_average(
        {task: accuracy(_module_forward(experts.expert_model(task).eval()), loaders[task]) for task in experts.tasks}
    )


def _module_forward(model: torch.nn.Module):
    return lambda inputs: call_module(model, inputs)
