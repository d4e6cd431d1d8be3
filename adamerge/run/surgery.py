"""Representation Surgery after a merge (``--surgery-steps N``): the per-task adapters of
:mod:`adamerge.core.surgery` trained, unlabeled, to bring the merged model's head inputs to each
expert's.

The merged model is frozen during surgery, so the features entering each task's head, the merged
model's ``f`` and expert ``k``'s own ``f_k``, are computed once per calibration input (no
gradient) and the adapters train on those cached features. Each step draws one batch of
``--batch-size`` cached inputs per task (seeded shuffled passes, a shorter batch at the end of
each pass) and takes one Adam step on

    loss = Σ_k mean |surgery_k(f) − f_k|        (F.l1_loss per task)

which is what re-running both models on the same batches every step (FusionBench's loop, one
Adam step per task on disjoint parameters) gives, at a fraction of the cost. The inputs are each
task's calibration inputs the objective trains on (``--calib-limit``; a fit's hold-out is kept
out), the BatchNorm statistics those of the exported merge.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from adamerge.choices import HEAD_INPUT
from adamerge.core.hooks import capture_hidden
from adamerge.core.merged_model import MergedModel
from adamerge.core.model_inputs import call_module, move_inputs
from adamerge.core.surgery import RepresentationSurgery
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import as_task_batch
from adamerge.run.progress import StepBar
from adamerge.sources import ExpertSet
from adamerge.sources.transformers_files import is_causal_lm

logger = logging.getLogger(__name__)

CAUSAL_LM_REFUSAL = (
    "--surgery-steps: representation surgery corrects the features entering each task's own head; "
    "a causal language model has no per-task heads (one merged model serves every task)"
)


@dataclass
class TaskFeatures:
    """The features entering one task's head on its calibration inputs, in loader order.

    Attributes:
        merged: ``(N, ..., D)`` of the merged model (its BatchNorm statistics, the task's head).
        expert: ``(N, ..., D)`` of the task's expert alone.
    """

    merged: torch.Tensor
    expert: torch.Tensor


def check_surgery_settings(settings: Any) -> None:
    """Refuse ``--surgery-steps`` where it cannot run, before anything is loaded.

    Raises:
        AdamergeError: no ``--calib`` (the surgery trains on it), or a ``hf:`` base whose config
            records a causal language model.
    """
    if not settings.surgery_steps:
        return
    if settings.calib is None:
        raise AdamergeError(
            "--surgery-steps: representation surgery trains on unlabeled inputs: pass --calib DIR (one sub-folder per task)"
        )
    if settings.base.startswith("hf:"):
        config = Path(settings.base[len("hf:") :]) / "config.json"
        try:
            architectures = json.loads(config.read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):
            return  # the source reports an unreadable folder itself
        if is_causal_lm(SimpleNamespace(architectures=architectures)):
            raise AdamergeError(CAUSAL_LM_REFUSAL)


def check_surgery_target(experts: ExpertSet) -> None:
    """Refuse experts that representation surgery cannot serve (once loaded, before any data).

    Raises:
        AdamergeError: a causal language model, experts without per-task heads, or a source that
            cannot rebuild each expert alone (whose features are the targets).
    """
    if experts.task_type.generates:
        raise AdamergeError(CAUSAL_LM_REFUSAL)
    if not experts.heads:
        raise AdamergeError(
            "--surgery-steps: representation surgery corrects the features entering each task's own head, and these "
            "experts share one merged head: name the heads with --head-pattern (task-specific tensors)"
        )
    if experts.expert_model is None:
        raise AdamergeError("--surgery-steps: representation surgery needs each expert alone, which this expert source cannot rebuild")


def fit_surgery(
    merged: MergedModel,
    experts: ExpertSet,
    data: L.LightningDataModule,
    settings: Any,
    device: torch.device,
    bar: StepBar | None = None,
) -> tuple[RepresentationSurgery, dict[str, Any]]:
    """Cache the head inputs, train the surgery, report it: what ``--surgery-steps`` runs.

    Args:
        merged: the final merge (statistics estimated); frozen, left on its device and in its mode.
        experts: the experts (each rebuilt alone for its features).
        data: the run's DataModule (its ``calibration_loaders``).
        settings: the run's settings (``surgery_steps``, ``surgery_rank``, ``surgery_lr``,
            ``batch_size``, ``seed``).
        device: where the features are computed and the surgery trained.
        bar: advanced once per step.

    Returns:
        The trained surgery (on the CPU) and its ``metrics.json`` entry: settings, the loss per
        step, the mean L1 distance to each expert's features over the cached inputs without and
        with surgery, timings.
    """
    started = time.perf_counter()
    loaders = data.calibration_loaders(shuffle=False)  # {task: the inputs the objective trains on}
    home = merged.coefficients.raw.device
    try:
        features = cache_features(merged.to(device), experts, loaders, device)
    finally:
        merged.to(home)
    cached_s = time.perf_counter() - started
    dim = next(iter(features.values())).merged.shape[-1]
    surgery = RepresentationSurgery(experts.tasks, dim, settings.surgery_rank, settings.seed).to(device)
    without = distances(surgery, features)
    losses = train_surgery(surgery, features, settings.surgery_steps, settings.batch_size, settings.surgery_lr, settings.seed, bar)
    with_surgery = distances(surgery, features)
    logger.info(
        "representation surgery: mean L1 to the experts' head inputs %.4g -> %.4g (loss %.4g -> %.4g over %d steps)",
        sum(without.values()) / len(without), sum(with_surgery.values()) / len(with_surgery), losses[0], losses[-1], len(losses),
    )  # fmt: skip
    report = {
        "steps": settings.surgery_steps,
        "rank": settings.surgery_rank,
        "lr": settings.surgery_lr,
        "batch_size": settings.batch_size,
        "head": merged.head_module,
        "features": dim,
        "inputs": {task: int(f.merged.shape[0]) for task, f in features.items()},
        "loss": losses,
        "l1": {"without surgery": without, "with surgery": with_surgery},
        "timing_s": {"features": cached_s, "training": time.perf_counter() - started - cached_s},
    }
    return surgery.cpu(), report


@torch.no_grad()
def cache_features(
    merged: MergedModel, experts: ExpertSet, loaders: Mapping[str, Any], device: torch.device | str = "cpu"
) -> dict[str, TaskFeatures]:
    """The features entering each task's head, of the merged model and of the task's expert alone,
    on every batch of the task's loader (in its order).

    Args:
        merged: the merged model (run in eval mode with its merged weights and statistics).
        experts: the experts (``expert_model``).
        loaders: ``{task: loader}`` of unlabeled inputs.
        device: where both models run.

    Raises:
        AdamergeError: a task's head inputs vary in shape from batch to batch (text features per
            token, padded per batch).
    """
    was_training = merged.training
    merged.eval()
    try:
        tensors = merged.merged_tensors()  # θ(λ), once
        features = {}
        for task in experts.tasks:
            expert = experts.expert_model(task).to(device).eval()
            ours, theirs = [], []
            for item in loaders[task]:
                inputs = move_inputs(as_task_batch(item).inputs, device)
                with merged.capture([HEAD_INPUT]) as captured:
                    merged(inputs, task, merged=tensors)
                ours.append(captured[HEAD_INPUT].float())  # (B, ..., D)
                with capture_hidden(expert, [HEAD_INPUT], merged.head_module) as captured:
                    call_module(expert, inputs)
                theirs.append(captured[HEAD_INPUT].float())  # (B, ..., D)
            del expert
            shapes = {tuple(part.shape[1:]) for part in ours + theirs}
            if len(shapes) != 1:
                raise AdamergeError(
                    f"--surgery-steps: the features entering the head {merged.head_module!r} of task {task!r} vary in shape "
                    f"({', '.join(map(str, sorted(shapes)))}); representation surgery needs one feature shape per input"
                )
            features[task] = TaskFeatures(torch.cat(ours), torch.cat(theirs))  # (N, ..., D) each
    finally:
        merged.train(was_training)
    return features


def surgery_batches(sizes: Mapping[str, int], batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless ``{task: (B,) indices}``, one batch per task per step: each task goes through
    seeded random permutations of its ``size`` inputs, ``batch_size`` at a time (a pass's last
    batch may be shorter), its own generator seeded ``seed + 1 + position``."""
    generators = {task: torch.Generator().manual_seed(seed + 1 + position) for position, task in enumerate(sizes)}
    queues: dict[str, list[torch.Tensor]] = {task: [] for task in sizes}
    while True:
        step = {}
        for task, size in sizes.items():
            if not queues[task]:
                queues[task] = list(torch.randperm(size, generator=generators[task]).split(batch_size))  # a pass, in batches
            step[task] = queues[task].pop(0)  # (B,)
        yield step


def train_surgery(
    surgery: RepresentationSurgery,
    features: Mapping[str, TaskFeatures],
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    seed: int = 0,
    bar: StepBar | None = None,
) -> list[float]:
    """``steps`` Adam steps (betas 0.9, 0.999) on Σ_k L1(surgery_k(f), f_k) over one batch per task.

    Args:
        surgery: the adapters (trained in place, on the features' device).
        features: ``{task: TaskFeatures}`` (cached head inputs).
        steps: optimisation steps.
        batch_size: cached inputs per task per step.
        lr: Adam's learning rate.
        seed: seed of the batches (:func:`surgery_batches`).
        bar: advanced once per step.

    Returns:
        The loss of every step (summed over tasks, before that step's update).
    """
    optimizer = torch.optim.Adam(surgery.parameters(), lr=lr, betas=(0.9, 0.999))
    batches = surgery_batches({task: int(f.merged.shape[0]) for task, f in features.items()}, batch_size, seed)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            picks = next(batches)
            loss = sum(F.l1_loss(surgery(features[t].merged[i], t), features[t].expert[i]) for t, i in picks.items())  # Σ_k mean |·|
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.advance()
    return losses


@torch.no_grad()
def distances(surgery: RepresentationSurgery, features: Mapping[str, TaskFeatures]) -> dict[str, float]:
    """``{task: mean |surgery_k(f) − f_k|}`` over every cached input of each task."""
    return {task: float(F.l1_loss(surgery(f.merged, task), f.expert)) for task, f in features.items()}
