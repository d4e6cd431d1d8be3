"""The one workflow of every method, learned or static: files in, output folder out.

:func:`run_workflow` loads the base and the experts, lets the method rewrite the task vectors and
fix its start, runs the method's training stages with a Lightning ``Trainer`` on the unlabeled
calibration data (none for a static merge), keeps the λ that agrees best with the experts on
held-out calibration inputs (:mod:`adamerge.run.safeguard`; the start included), optionally
trains a Representation Surgery on the result (:mod:`adamerge.run.surgery`), evaluates
(optionally) on labelled data, logs one line per stage with its time (:mod:`adamerge.run.progress`),
and writes the output folder atomically:

- ``coefficients.json`` / ``coefficients.tsv``: learned λ per task and group;
- the merged model in the expert source's own format, loadable without adamerge: ``merged.pt`` +
  ``heads/<task>.pt`` (plain state dicts for the architecture's ``load_state_dict``),
  ``open_clip_model.safetensors`` + ``heads/<task>.pt`` (open_clip), or ``model/`` +
  ``tasks/<task>/`` (transformers ``from_pretrained`` folders);
- ``routing/`` (input-routed methods, :mod:`adamerge.methods.routed`): the routers and deltas,
  and ``adamerge_routing.py``, which installs them into the static merge without adamerge;
- ``surgery/<task>.pt`` (``--surgery-steps``): each task's Representation Surgery adapter
  (:mod:`adamerge.run.surgery`), a plain state dict applied before the task's head;
- ``metrics.json``: per-task accuracy of each expert alone, the initial merge (task arithmetic at
  the initial λ) and the learned merge (and it with surgery), the BatchNorm policy used, the
  safeguard's held-out scores and kept step, the surgery's losses, plus timings (``timing_s``;
  ``stages``: seconds per stage);
- ``config.yaml``: the resolved settings; ``checkpoints/last.ckpt``: λ and optimiser state
  (resume with ``ckpt_path``); ``logs/``: the losses per step (CSV).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from adamerge.choices import REESTIMATING_POLICIES, TASK_VECTOR_DTYPES
from adamerge.core.batchnorm import batchnorm_layers, resolve_policy
from adamerge.core.merged_model import MergedModel
from adamerge.core.surgery import RepresentationSurgery
from adamerge.errors import AdamergeError
from adamerge.methods import LearnedMethod, Method, get_method
from adamerge.run.checks import check_eval_classes
from adamerge.run.datamodules import build_datamodule
from adamerge.run.evaluators import GeneratedEvaluation, ScoredEvaluation
from adamerge.run.expert_targets import ExpertTargets
from adamerge.run.export import format_table, plain_config, write_coefficients, write_merged_model_of, write_surgery
from adamerge.run.module import MergingModule, statistics_loaders_of
from adamerge.run.progress import Stages, quiet_third_party
from adamerge.run.resume import ResumeState, save_checkpoint
from adamerge.run.routed_merge import RoutedMergeModule, write_routing
from adamerge.run.safeguard import KeepBestCoefficients, held_out_batches
from adamerge.run.settings import FitSettings
from adamerge.run.surgery import check_surgery_target, fit_surgery
from adamerge.run.task_vector_rewrites import rewritten, start_method, started_from
from adamerge.sources import ExpertSet, SourceOptions, load_experts
from adamerge.sources.task_specific import keep_task_specific
from adamerge.storage.files import write_json, write_yaml
from adamerge.storage.output_folder import OutputFolder

logger = logging.getLogger(__name__)

DTYPES = {name: getattr(torch, name) for name in TASK_VECTOR_DTYPES}
#: Below this bound on how far λ can move (:meth:`LearnedMethod.reach`) a fit is warned that it
#: will end about where it started.
MIN_REACH = 0.1


def run_workflow(settings: FitSettings, output: OutputFolder, resume: ResumeState | None, started: float) -> dict[str, Any]:
    """The one workflow of every method, learned or static, into a locked output folder.

    Load the sources → the method rewrites τ → :class:`MergedModel` at the method's start → the
    method's training stages (none for a static merge) → normalisation statistics → evaluation →
    Representation Surgery (``--surgery-steps``) and its evaluation → write. ``resume`` is ``None``
    for a method without training stages.
    """
    stages = Stages(live=settings.progress_bar)
    with stages.stage("loading experts and data"):
        loaded = _load(settings)
        settings, method, experts, data = loaded.settings, loaded.method, loaded.experts, loaded.data
        merged, module, targets, safeguard = loaded.merged, loaded.module, loaded.targets, loaded.safeguard
        evaluation = _evaluation(settings, experts, data)
    metrics: dict[str, Any] = {
        "tasks": list(experts.tasks),
        "method": dataclasses.asdict(method),
        "batchnorm": merged.batchnorm,
        "accuracy": {},
        "timing_s": {"load": time.perf_counter() - started},
    }
    with output.staging() as staging:
        tester = _trainer(settings, staging, None, [])
        if settings.eval is not None:
            if settings.eval_experts:
                with stages.stage("evaluating the experts alone"):
                    _record(metrics, "expert (alone)", evaluate_experts(experts, evaluation))
            if settings.eval_init and method.learned:
                with stages.stage("evaluating the start"):
                    _record(metrics, method.start_label(), evaluation.merge(tester, module))
        trainer = tester
        if isinstance(method, LearnedMethod):
            module, trainer = _train(
                method, module, settings, experts, data, evaluation, targets, safeguard, staging, resume, stages, metrics
            )
            merged = module.merged
            metrics["steps"] = trainer.global_step
        label = f"{settings.method} ({settings.granularity})" if method.learned else settings.method
        if settings.eval is not None:
            with stages.stage("evaluating the merge"):
                _record(metrics, label, evaluation.merge(trainer, module))
        elif merged.batchnorm in REESTIMATING_POLICIES and data is not None:
            with stages.stage("re-estimating BatchNorm statistics"):
                trainer.strategy.barrier()
                module.reestimate_batchnorm(statistics_loaders_of(data))  # exported statistics belong to this λ
        surgery = _surgery(settings, merged, module, experts, data, evaluation, trainer, stages, metrics, label)
        with stages.stage("writing"):
            if method.learned:
                save_checkpoint(trainer, staging / "checkpoints" / "last.ckpt")
            if trainer.is_global_zero:
                write_coefficients(staging, merged)
                metrics["files"] = write_merged_model_of(staging, merged, experts.export)
                if isinstance(module, RoutedMergeModule):  # the routers beside the static merge they route
                    metrics["files"] |= write_routing(staging, module)
                    metrics["routing"] = module.routing_summary()
                if surgery is not None:
                    metrics["files"] |= write_surgery(staging, surgery)
                metrics["timing_s"]["total"] = time.perf_counter() - started
                metrics["timing_s"]["stages"] = dict(stages.seconds)
                write_json(staging / "metrics.json", metrics)
                write_yaml(staging / "config.yaml", plain_config(dataclasses.asdict(settings)))
    if metrics["accuracy"]:
        logger.info("per-task accuracy (%%):\n%s", format_table(metrics["accuracy"], list(experts.tasks)))
    logger.info("stage times: %s", stages.summary())
    return metrics


def _surgery(
    settings: FitSettings,
    merged: MergedModel,
    module: MergingModule,
    experts: ExpertSet,
    data: L.LightningDataModule,
    evaluation: ScoredEvaluation | GeneratedEvaluation | None,
    trainer: L.Trainer,
    stages: Stages,
    metrics: dict[str, Any],
    label: str,
) -> RepresentationSurgery | None:
    """Representation Surgery on the final merge (``--surgery-steps``; ``None``: off) and, with
    ``--eval``, the row ``"<label> + surgery"``: the merge with each task's surgery before its head."""
    if not settings.surgery_steps:
        return None
    started = time.perf_counter()
    with stages.stage("representation surgery", total=settings.surgery_steps) as bar:
        if merged.batchnorm in REESTIMATING_POLICIES:
            module.reestimate_batchnorm(statistics_loaders_of(data))  # (done already for this λ: a no-op)
        surgery, metrics["surgery"] = fit_surgery(merged, experts, data, settings, trainer.strategy.root_device, bar)
    if settings.eval is not None:
        with stages.stage("evaluating the merge + surgery"), surgery.applied(merged):
            _record(metrics, f"{label} + surgery", evaluation.merge(trainer, module))
    metrics["timing_s"]["surgery"] = time.perf_counter() - started
    return surgery


def _train(
    method: LearnedMethod,
    module: MergingModule,
    settings: FitSettings,
    experts: ExpertSet,
    data: L.LightningDataModule,
    evaluation: ScoredEvaluation | GeneratedEvaluation | None,
    targets: ExpertTargets | None,
    safeguard: KeepBestCoefficients | None,
    staging: Path,
    resume: ResumeState,
    stages: Stages,
    metrics: dict[str, Any],
) -> tuple[MergingModule, L.Trainer]:
    """The method's training stages, each guarded by its own safeguard; the last stage's module."""
    fit_started = time.perf_counter()
    with stages.stage("fitting" if method.stages == 1 else "fitting stage 1", total=settings.steps) as bar:
        trainer = _trainer(settings, staging, "logs", [safeguard, resume.callback(1), bar])
        trainer.fit(module, datamodule=data, ckpt_path=resume.resume_from(1))
        resume.finish_stage(trainer, 1)
    if safeguard is not None:
        metrics["safeguard"] = {"stage 1": safeguard.summary()}
    for stage in range(2, method.stages + 1):
        if settings.eval is not None and stage == 2 and method.scores_stage_one:
            with stages.stage("evaluating stage 1"):
                _test_stage_one(method, trainer, module, evaluation, settings, metrics, time.perf_counter() - fit_started)
        guard = _safeguard(experts, data, settings, f"stage {stage}", safeguard)
        with stages.stage(f"fitting stage {stage}", total=settings.steps) as bar:
            module, trainer = _next_stage(module, method, stage, settings, experts, targets, data, staging, resume, [guard, bar])
        if guard is not None:
            metrics.setdefault("safeguard", {})[f"stage {stage}"] = guard.summary()
    metrics["timing_s"]["fit"] = time.perf_counter() - fit_started
    return module, trainer


@dataclass
class _Loaded:
    """What a run holds once its sources are loaded.

    Attributes:
        settings: the run's settings with the source's defaults filled in (``granularity``).
        method: the configured method.
        experts: the loaded experts (task-specific tensors kept).
        data: calibration / evaluation data (``None``: neither is needed).
        merged: the merged model at the method's start.
        module: its LightningModule.
        targets: the experts' cached outputs, for objectives that need them.
        safeguard: the held-out safeguard of stage one (``None``: off, or a static merge).
    """

    settings: FitSettings
    method: Method
    experts: ExpertSet
    data: L.LightningDataModule | None
    merged: MergedModel
    module: MergingModule
    targets: ExpertTargets | None
    safeguard: KeepBestCoefficients | None


def load_run(settings: FitSettings) -> _Loaded:
    """Experts, data and the merged model at the method's start, as :func:`run_workflow` holds
    them once loaded (the settings with the source's defaults filled in); for commands that then
    drive the merge themselves (``adamerge pareto`` evaluates it at many λ)."""
    return _load(settings)


def evaluation_trainer(settings: FitSettings, root: Path) -> L.Trainer:
    """The Lightning ``Trainer`` a run evaluates merges with (no logger, no callbacks)."""
    return _trainer(settings, root, None, [])


def evaluation_of(
    settings: FitSettings, experts: ExpertSet, data: L.LightningDataModule | None
) -> ScoredEvaluation | GeneratedEvaluation | None:
    """How the run scores ``--eval`` for these experts (``None``: no ``--eval``)."""
    return _evaluation(settings, experts, data)


def _load(settings: FitSettings) -> _Loaded:
    """Experts, data, the merged model at the method's start, its LightningModule and the safeguard."""
    method = get_method(settings.method).configured(settings)
    static_start = start_method(settings, method)
    L.seed_everything(settings.seed, verbose=False)

    experts = load_experts(settings.base, settings.experts, source_options(settings, DTYPES[settings.task_vector_dtype]))
    experts = keep_task_specific(experts, settings.task_specific)
    if settings.surgery_steps:
        check_surgery_target(experts)  # before any data is read
    if settings.granularity is None:  # the source's own default: one λ per decoder block for causal LMs
        settings = dataclasses.replace(settings, granularity=experts.default_granularity)
        logger.info("granularity: %s (the default for these experts)", settings.granularity)
    experts = _with_positions(experts, settings.positions)  # an explicit choice is checked before any data is read
    batchnorm = resolve_policy(settings.batchnorm, experts.tasks, experts.heads, experts.model)
    learned = isinstance(method, LearnedMethod)
    if learned and settings.steps > 0:
        _warn_if_stuck(method, settings.steps)
    if settings.calib is None and batchnorm in REESTIMATING_POLICIES and batchnorm_layers(experts.model):
        chosen = settings.batchnorm + (f" (here {batchnorm})" if batchnorm != settings.batchnorm else "")
        raise AdamergeError(
            f"--batchnorm {chosen} re-estimates BatchNorm statistics on --calib data, and none was given: "
            "pass --calib DIR, or --batchnorm base to keep the base model's statistics"
        )
    generates = experts.task_type.generates  # evaluated on generations: --eval is not a labelled DataModule
    data = None if settings.calib is None and (settings.eval is None or generates) else _datamodule(settings, experts, method)
    if settings.positions == "auto":
        experts = _with_positions(experts, _auto_positions(experts, data))
    task_vectors = started_from(static_start, method, experts, data) if static_start else rewritten(method, experts, data)
    start = method.start(len(experts.tasks))
    merged = MergedModel(
        experts.model,
        task_vectors,
        granularity=settings.granularity if learned else "task",
        constraint=method.constraint,
        init=start,
        heads=experts.heads,
        batchnorm=batchnorm,
        task_specific=experts.task_specific,
        trainable=None if learned else torch.zeros(len(experts.tasks), 1, dtype=torch.bool),
    )
    if settings.gradient_checkpointing and learned:
        logger.info("gradient checkpointing: %d blocks recompute their activations in backward", merged.checkpoint_blocks())
    if data is not None and settings.eval is not None and not generates:
        check_eval_classes(data, lambda task, inputs: merged(inputs, task))
    if not learned:
        static = MergingModule(merged, sources=experts.sources, task_type=experts.task_type)
        return _Loaded(settings, method, experts, data, merged, static, None, None)
    targets = ExpertTargets(experts, data, merged) if method.needs_expert_outputs else None
    module = _module(method, merged, settings, experts, targets)
    safeguard = _safeguard(experts, data, settings) if method.guards_stage(1) else None
    return _Loaded(settings, method, experts, data, merged, module, targets, safeguard)


def _warn_if_stuck(method: LearnedMethod, steps: int) -> None:
    """A warning when ``steps`` of the method's optimiser cannot move λ by :data:`MIN_REACH`."""
    reach = method.reach(steps)
    if reach < MIN_REACH:
        logger.warning(
            "%s: lr %g over %d steps moves each λ by at most %.3g from its start: raise --lr or --steps "
            "(the method's lr suits about %d steps)",
            method.name, method.lr, steps, reach, math.ceil(MIN_REACH / method.reach(1)),
        )  # fmt: skip


def _auto_positions(experts: ExpertSet, data: L.LightningDataModule | None) -> str:
    """``--positions auto`` resolved: ``response`` when the experts generate and every unlabeled
    calibration record of every task is a prompt to answer, else ``all``."""
    prompts = data.calibration_is_prompts() if experts.task_type.generates and hasattr(data, "calibration_is_prompts") else {}
    if prompts and all(prompts.values()):
        logger.info("positions: response (every calibration record is a prompt; --positions all scores every token)")
        return "response"
    if any(prompts.values()):
        documents = sorted(task for task, is_prompt in prompts.items() if not is_prompt)
        logger.warning("positions: all (the calibration of %s holds documents, not only prompts)", ", ".join(documents))
    return "all"


def _with_positions(experts: ExpertSet, positions: str) -> ExpertSet:
    """The experts with their task type scoring ``positions`` of unlabeled prompts (``--positions``;
    ``auto`` is resolved once the calibration data is read, and changes nothing here)."""
    if positions in ("all", "auto"):
        return experts
    if not experts.task_type.generates:
        raise AdamergeError(f"--positions {positions} applies to causal language models; these experts are {experts.task_type.name} models")
    return dataclasses.replace(experts, task_type=dataclasses.replace(experts.task_type, positions=positions))


def _datamodule(settings: FitSettings, experts: ExpertSet, method: Method) -> L.LightningDataModule:
    """The calibration (else evaluation) and evaluation data, checked before any training."""
    learned = isinstance(method, LearnedMethod)
    data = build_datamodule(
        experts,
        settings.calib if settings.calib is not None else settings.eval,
        eval_dir=None if experts.task_type.generates else settings.eval,
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
        with_index=learned and method.needs_expert_outputs,
        holdout=settings.holdout if learned else 0.0,
        **({"group_by_length": True} if settings.group_by_length else {}),
    )
    data.setup("fit")  # fail on bad calibration / evaluation folders before any training
    return data


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


def _module(
    method: LearnedMethod,
    merged: MergedModel,
    settings: FitSettings,
    experts: ExpertSet,
    targets: ExpertTargets | None,
    stage: int = 1,
) -> MergingModule:
    """The LightningModule that trains stage ``stage`` of ``method`` on ``merged`` (the method names its class)."""
    objective = method.build_objective(merged, settings)
    if targets is not None:
        targets.fill(objective)  # the experts' outputs, once, into the alignment objective
    target, options = method.stage_module(stage)
    module_class = method.named_class("stage module", target, MergingModule, "a MergingModule subclass")
    return module_class(
        merged,
        objective=objective,
        optimizer=method.optimizer_factory(),
        scheduler=method.scheduler_factory(settings.steps),
        sources=experts.sources,
        task_type=experts.task_type,
        **options,
    )


def _test_stage_one(
    method: LearnedMethod,
    trainer: L.Trainer,
    module: MergingModule,
    evaluation: ScoredEvaluation | GeneratedEvaluation,
    settings: FitSettings,
    metrics: dict[str, Any],
    fit_s: float,
) -> None:
    """The accuracy of a two-stage method's stage one, under the row name the method gives it.

    Expert Merging++'s stage one runs exactly as ``--method expert-merging`` with the same
    settings, so it is reported under that method's name ("did the chunks help?", and one run
    gives both table rows). The test runs under a forked RNG: stage two draws the same batches as
    when nothing is tested.
    """
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        _record(metrics, method.stage_label(1, settings.granularity), evaluation.merge(trainer, module))
    metrics["timing_s"]["stage_one_fit"] = fit_s
    metrics["timing_s"]["stage_one_test"] = time.perf_counter() - started


def _next_stage(
    module: MergingModule,
    method: LearnedMethod,
    stage: int,
    settings: FitSettings,
    experts: ExpertSet,
    targets: ExpertTargets | None,
    data: L.LightningDataModule,
    staging: Path,
    resume: ResumeState,
    callbacks: list[L.Callback | None],
) -> tuple[MergingModule, L.Trainer]:
    """Train stage ``stage`` (2, 3, ...) on the model the method builds from the previous stage's."""
    refined = _module(method, method.next_stage(module.merged, settings, module), settings, experts, targets, stage)
    trainer = _trainer(settings, staging, f"logs_stage{stage}", [callbacks[0], resume.callback(stage), *callbacks[1:]])
    trainer.fit(refined, datamodule=data, ckpt_path=resume.resume_from(stage))
    resume.finish_stage(trainer, stage)
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
            f"--holdout {settings.holdout:g} leaves no held-out calibration input for {', '.join(missing)} (too few inputs)"
            if missing
            else "this expert source cannot rebuild the experts alone",
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
        precision=settings.precision,
        default_root_dir=root,
        logger=CSVLogger(root, name=log_name, version="") if log_name is not None else False,
        callbacks=[c for c in callbacks if c is not None],
        enable_checkpointing=False,  # resume checkpoints: adamerge.run.resume; the output's last.ckpt: run_fit
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(50, settings.steps // 10)),
        enable_progress_bar=False,  # adamerge.run.progress: one bar for the steps, one line per stage
        enable_model_summary=False,
    )


def _evaluation(
    settings: FitSettings, experts: ExpertSet, data: L.LightningDataModule | None
) -> ScoredEvaluation | GeneratedEvaluation | None:
    """How ``--eval`` is scored for these experts' task type (``None``: no ``--eval``)."""
    if settings.eval is None:
        return None
    if experts.task_type.generates:
        return GeneratedEvaluation.read(settings.eval, experts, settings.eval_batch_size, settings.max_length)
    return ScoredEvaluation(data)


def _record(metrics: dict[str, Any], label: str, scores: tuple[dict[str, float], dict[str, dict[str, float]]]) -> None:
    """One row of ``metrics.json``: the accuracy under ``label``, other figures (perplexity) beside it."""
    accuracy, figures = scores
    if accuracy:
        metrics["accuracy"][label] = accuracy
    for figure, per_task in figures.items():
        metrics.setdefault(figure, {})[label] = per_task | {"average": sum(per_task.values()) / len(per_task)}


def evaluate_experts(experts: ExpertSet, evaluation: ScoredEvaluation | GeneratedEvaluation) -> tuple[dict, dict]:
    """Each expert alone on its own task (nothing when the source cannot rebuild the experts)."""
    if experts.expert_model is None:
        logger.warning("this expert source cannot rebuild the experts alone: their accuracy is not reported")
        return {}, {}
    return evaluation.experts(experts)
