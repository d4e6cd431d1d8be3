"""Learned-coefficient methods: training stages of the one parametrisation ``θ_0 + Σ_k g(λ_k) ⊙ τ_k``.

A :class:`LearnedMethod` fixes the constraint ``g``, the initial λ, the objective, the optimiser
and schedule, and optionally a TIES rewrite of the task vectors; the granularity is chosen
independently. The built-in ones (:mod:`adamerge.methods.builtin`):

| method | g / init | objective | optimiser |
|---|---|---|---|
| adamerging | clamp / 0.3 | entropy | Adam 1e-3 |
| adamerging++ | as adamerging, on TIES-trimmed task vectors (top 20 %, elected sign) | | |
| concrete-adamerging | a shared Concrete mask over τ meta-learned first (:mod:`adamerge.methods.concrete`), then adamerging on the masked τ | entropy | mask Adam 1e-3, inner λ Adam 1 |
| fw-merging | none / 0.3 (the initial merge); Frank–Wolfe steps toward the least gradient-aligned checkpoint (:mod:`adamerge.methods.frank_wolfe`) | entropy | FW step 2/(t+2)·0.1·0.3 |
| atlas | none / 0.3 (few-shot: 0) | pseudo-labels (unlabeled) or cross-entropy (``--shots``) | AdamW wd 0.1, 1e-3 (few-shot 1e-1, cosine) |
| expert-merging | sigmoid / 0.1 | hidden-state MSE + T²·KL to each expert + γ·mean|λ−λ₀| | AdamW 0.5, wd 1e-5, cosine restarts T₀=50 |
| expert-merging++ | expert-merging, then importance-guided chunks (:mod:`adamerge.methods.expert_merging`) | | |

aTLAS without labels starts where the other unsupervised methods start, at task arithmetic's
λ = 0.3: from λ = 0 (the pretrained backbone with each expert's head) its confident pseudo-labels
are too few and too wrong to move anything. Few-shot aTLAS keeps the paper's λ = 0, which labels
move.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from adamerge.errors import AdamergeError, check_options
from adamerge.methods.method import Method

if TYPE_CHECKING:  # torch is imported when a factory is built, so that ``--help`` lists the methods fast
    import torch
    from lightning import LightningModule
    from torch import nn

    from adamerge.core.merged_model import MergedModel
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.objectives.task_objectives import Objective

    OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
else:
    OptimizerFactory = SchedulerFactory = Any

# objective name -> the :class:`~adamerge.objectives.task_objectives.Objective` subclass it builds, as
# "module:Class" (imported when a run builds it); a method may also name "package.module:Class" itself
OBJECTIVES: dict[str, str] = {
    "entropy": "adamerge.objectives.task_objectives:Entropy",
    "pseudo-label": "adamerge.objectives.task_objectives:PseudoLabel",
    "cross-entropy": "adamerge.objectives.task_objectives:CrossEntropy",
    "expert-alignment": "adamerge.objectives.task_objectives:ExpertAlignment",
}
FEW_SHOT_LR = 1e-1  # aTLAS few-shot learning rate (with a cosine schedule)
FEW_SHOT_INIT = 0.0  # aTLAS few-shot start: the pretrained model


def densified(task_vectors: TaskVectors) -> TaskVectors:
    """``task_vectors`` with LoRA factors densified (with a warning), for methods that need every
    entry (a per-entry mask, whole-weight alignments, per-input mixing); dense ones as they are."""
    if not task_vectors.factored_names():
        return task_vectors
    from adamerge.core.task_vectors import TaskVectors

    return TaskVectors(task_vectors.tasks, dict(task_vectors.items()))


@dataclass(frozen=True)
class LearnedMethod(Method):
    """A method that learns λ in one training stage.

    Attributes:
        name: the ``--method`` name.
        paper: reference.
        constraint: ``clamp``, ``sigmoid`` or ``none``.
        init: initial (constrained) λ.
        objective: ``entropy``, ``pseudo-label``, ``cross-entropy`` or ``expert-alignment``
            (override :meth:`build_objective` for another).
        optimizer: ``adam`` or ``adamw``.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        scheduler: ``None``, ``cosine`` or ``cosine-restarts``.
        trim_density: ``None``, or the TIES rewrite of the task vectors before learning (keep this
            share per task, elect the sign: AdaMerging++'s 0.2).
        few_shot: whether ``--shots`` switches the method to its few-shot setting (aTLAS:
            cross-entropy on labelled shots, λ = 0, lr 1e-1, cosine).
        start_from: ``None``, or the static merge whose rewritten task vectors the method learns
            on, scaled so that λ = ``init`` is that merge (``--start-from``;
            :mod:`adamerge.run.task_vector_rewrites`).
    """

    constraint: str = "clamp"  # type: ignore[assignment]  (a field here, a property on Method)
    init: float = 0.3
    objective: str = "entropy"
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    scheduler: str | None = None
    trim_density: float | None = None
    few_shot: bool = False
    start_from: str | None = None

    learned: ClassVar[bool] = True

    def __post_init__(self) -> None:
        named = self.objective in OBJECTIVES or ":" in self.objective
        if not named and type(self).build_objective is LearnedMethod.build_objective:
            raise AdamergeError(
                f"method {self.name!r}: objective {self.objective!r}, expected one of {', '.join(OBJECTIVES)} or package.module:Class"
            )

    # -- configuration -------------------------------------------------------------------------
    def configured(self, settings: Any = None, **options: Any) -> LearnedMethod:
        """The method with ``init``, ``constraint``, ``lr`` and ``shots`` applied, from the run's
        settings or keywords (``get_method("atlas").configured(shots=4)``: few-shot aTLAS)."""
        method = self
        value = lambda name: options.get(name, getattr(settings, name, None))  # noqa: E731
        shots = value("shots")
        if shots is not None:
            if not self.few_shot:
                raise AdamergeError(f"--shots is for a few-shot method (atlas); {self.name} learns from unlabeled data")
            if shots < 1:
                raise AdamergeError(f"--shots {shots}: expected at least 1 labelled image per class")
            method = replace(method, init=FEW_SHOT_INIT, objective="cross-entropy", lr=FEW_SHOT_LR, scheduler="cosine")
        overrides = {k: value(k) for k in ("init", "constraint", "lr", "start_from")}
        method = replace(method, **{k: v for k, v in overrides.items() if v is not None})
        extra = dict(getattr(settings, "options", None) or {}) | dict(options.get("options") or {})
        check_options(self.name, extra, {f.name for f in dataclasses.fields(method)} - {"name", "paper"})
        method = replace(method, **extra)
        method.check_start()
        return method

    def check_start(self) -> None:
        """Refuse a ``start_from`` this method cannot scale to.

        Raises:
            AdamergeError: ``start_from`` with a TIES trim of its own (two rewrites), or with
                λ = 0 at the start (no scale maps 0 onto the static merge's λ).
        """
        if self.start_from is None:
            return
        if self.trim_density is not None:
            raise AdamergeError(
                f"--start-from {self.start_from}: {self.name} rewrites the task vectors itself (TIES trim); "
                "start the method without its trim (adamerging) or drop --start-from"
            )
        if self.init == 0:
            raise AdamergeError(
                f"--start-from {self.start_from}: {self.name} starts at λ = 0, which no scale of the task vectors "
                "maps onto that merge: pass --init (e.g. 0.5)"
            )

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """The TIES-trimmed task vectors when ``trim_density`` is set, else the experts' own."""
        if self.trim_density is None:
            return task_vectors
        from adamerge.core.task_vectors import TaskVectors
        from adamerge.rewrite.operations import ties

        return TaskVectors(task_vectors.tasks, ties(dict(task_vectors.items()), density=self.trim_density))

    def start(self, num_tasks: int) -> float:
        return self.init

    def start_label(self) -> str:
        if self.start_from is not None:
            return f"{self.start_from} (start, λ={self.init:g})"
        if self.init == 0:
            return "pretrained (λ=0)"
        if self.trim_density is not None:
            return f"TIES-trimmed task arithmetic (λ={self.init:g})"
        return f"task arithmetic (λ={self.init:g})"

    # -- training ------------------------------------------------------------------------------
    def objective_class(self) -> type[Objective]:
        """The :class:`~adamerge.objectives.task_objectives.Objective` subclass ``objective`` names.

        Raises:
            AdamergeError: the name cannot be imported or is not an objective.
        """
        from adamerge.objectives.task_objectives import Objective

        target = OBJECTIVES.get(self.objective, self.objective)
        return self.named_class("objective", target, Objective, "an adamerge Objective subclass")

    def named_class(self, kind: str, target: str, base: type, what: str) -> type:
        """The subclass of ``base`` that ``target`` (``"package.module:Class"``) names, for this method.

        Args:
            kind: what the class is to the method, for the messages (``objective``).
            target: ``"package.module:Class"``.
            base: the class it must derive from.
            what: ``base`` in the message (``an adamerge Objective subclass``).

        Raises:
            AdamergeError: ``target`` cannot be imported or is not a subclass of ``base``.
        """
        import importlib

        module, _, attribute = target.partition(":")
        try:
            found = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, ValueError) as error:
            raise AdamergeError(f"method {self.name!r}: {kind} {target!r} cannot be imported ({error})") from None
        if not (isinstance(found, type) and issubclass(found, base)):
            raise AdamergeError(f"method {self.name!r}: {kind} {target!r} is not {what}")
        return found

    @property
    def needs_expert_outputs(self) -> bool:
        """Whether the objective needs each expert's outputs on the calibration data (cached once)."""
        return self.objective_class().needs_index

    def build_objective(self, merged: MergedModel, settings: Any) -> Objective:
        """The objective for this model (its :meth:`~adamerge.objectives.task_objectives.Objective.for_run`),
        each task's loss weighted by ``--task-weights`` unless the objective weights tasks itself
        (Expert Merging's β is that weight).

        Raises:
            AdamergeError: the objective needs labelled calibration data and the run has none.
        """
        from adamerge.objectives.task_objectives import TaskWeighted

        cls = self.objective_class()
        if cls.needs_labels and getattr(settings, "shots", None) is None:
            raise AdamergeError(f"method {self.name!r}: objective {self.objective!r} needs labelled calibration data (--shots N)")
        objective = cls.for_run(merged, settings)
        if settings.task_weights and not cls.weights_tasks:
            return TaskWeighted(objective, merged.tasks, settings.task_weights)
        return objective

    def optimizer_factory(self) -> OptimizerFactory:
        """``params -> Optimizer`` with this method's settings."""
        import torch

        if self.optimizer == "adam":
            return functools.partial(torch.optim.Adam, lr=self.lr, betas=(0.9, 0.999))
        if self.optimizer == "adamw":
            return functools.partial(torch.optim.AdamW, lr=self.lr, weight_decay=self.weight_decay)
        raise AdamergeError(f"optimizer {self.optimizer!r}: expected 'adam' or 'adamw'")

    def reach(self, steps: int) -> float:
        """The most any constrained λ can move from its start in ``steps`` steps of this method.

        Adam's update of a parameter is at most about ``lr`` per step whatever the gradient's
        scale, so a raw coefficient moves at most ``lr · steps`` (less under a decaying schedule);
        a sigmoid's slope is at most ¼.
        """
        travel = self.lr * steps
        return travel / 4 if self.constraint == "sigmoid" else travel

    def scheduler_factory(self, steps: int) -> SchedulerFactory | None:
        """Per-step learning-rate schedule over ``steps`` steps (``None``: constant)."""
        import torch

        if self.scheduler is None:
            return None
        if self.scheduler == "cosine":
            return functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max(1, steps))
        if self.scheduler == "cosine-restarts":
            return functools.partial(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, T_0=50)
        raise AdamergeError(f"scheduler {self.scheduler!r}: expected 'cosine' or 'cosine-restarts'")

    # -- stages --------------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        """Training stages (one; Expert Merging++ has two)."""
        return 1

    def stage_label(self, stage: int, granularity: str) -> str:
        """The accuracy table's row name of stage ``stage``'s merge, for methods of several stages."""
        return f"{self.name} stage {stage} ({granularity})"

    def stage_module(self, stage: int) -> tuple[str, dict[str, Any]]:
        """``("package.module:Class", keyword options)`` of the LightningModule that trains stage
        ``stage`` (default: :class:`adamerge.run.module.MergingModule`, which learns λ)."""
        return "adamerge.run.module:MergingModule", {}

    def guards_stage(self, stage: int) -> bool:
        """Whether the held-out safeguard (keep the best λ seen) watches stage ``stage``."""
        return True

    @property
    def scores_stage_one(self) -> bool:
        """Whether ``--eval`` also scores stage one's merge of a method with several stages."""
        return True

    def next_stage(self, previous: MergedModel, settings: Any, trained: LightningModule | None = None) -> MergedModel:
        """The model the next stage trains, built from the previous stage's (stages > 1 only).

        Args:
            previous: the previous stage's merged model.
            settings: the run's settings.
            trained: the previous stage's LightningModule (what it learned beside λ).
        """
        raise AdamergeError(f"method {self.name!r} has a single training stage")
