"""Learned-coefficient methods as configurations of the one parametrisation (DESIGN §1, §3).

A method fixes the defaults of the constraint ``g``, the initial λ, the objective, the optimiser
and an optional task-vector preprocessor; the granularity is chosen independently.

| method | g / init | objective | optimiser |
|---|---|---|---|
| adamerging | clamp / 0.3 | entropy | Adam 1e-3 |
| adamerging++ | as adamerging, on TIES-trimmed task vectors (top 20 %, elected sign) | | |
| atlas | none / 0.3 (few-shot: 0) | pseudo-labels (unlabeled) or cross-entropy (``--shots``) | AdamW wd 0.1, 1e-3 (few-shot 1e-1, cosine) |
| expert-merging | sigmoid / 0.1 | hidden-state MSE + T²·KL to each expert + γ·mean|λ−λ₀| | AdamW 0.5, wd 1e-5, cosine restarts T₀=50 |
| expert-merging++ | expert-merging, then importance-guided chunks | | |

aTLAS without labels starts where the other unsupervised methods start, at task arithmetic's
λ = 0.3: from λ = 0 (the pretrained backbone with each expert's head) its confident pseudo-labels
are too few and too wrong to move anything (vision benchmark: the learned merge is its start,
33 % normalized accuracy). Few-shot aTLAS keeps the paper's λ = 0, which labels move.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from adamerge.errors import AdamergeError

if TYPE_CHECKING:  # torch is imported when a factory is built, so that ``--help`` lists METHODS fast
    import torch
    from torch import nn

    OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
else:
    OptimizerFactory = SchedulerFactory = Any


@dataclass(frozen=True)
class MethodSpec:
    """Defaults of one learned-coefficient method.

    Attributes:
        name: command-line name.
        constraint: ``clamp``, ``sigmoid`` or ``none``.
        init: initial (constrained) λ.
        objective: ``entropy``, ``pseudo-label``, ``cross-entropy`` or ``expert-alignment``.
        optimizer: ``adam`` or ``adamw``.
        lr: learning rate.
        weight_decay: AdamW weight decay.
        scheduler: ``None``, ``cosine`` or ``cosine-restarts``.
        preprocess: ``None`` or ``ties`` (TIES trimming of the task vectors before learning).
        refine_chunks: run a second, importance-guided chunk-wise stage (Expert Merging++).
        paper: reference.
    """

    name: str
    constraint: str
    init: float
    objective: str
    optimizer: str
    lr: float
    weight_decay: float = 0.0
    scheduler: str | None = None
    preprocess: str | None = None
    refine_chunks: bool = False
    paper: str = ""

    def optimizer_factory(self) -> OptimizerFactory:
        """``params -> Optimizer`` with this method's settings."""
        import torch

        if self.optimizer == "adam":
            return functools.partial(torch.optim.Adam, lr=self.lr, betas=(0.9, 0.999))
        if self.optimizer == "adamw":
            return functools.partial(torch.optim.AdamW, lr=self.lr, weight_decay=self.weight_decay)
        raise AdamergeError(f"optimizer {self.optimizer!r}: expected 'adam' or 'adamw'")

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


ADAMERGING = MethodSpec(
    name="adamerging",
    constraint="clamp",
    init=0.3,
    objective="entropy",
    optimizer="adam",
    lr=1e-3,
    paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
)
EXPERT_MERGING = MethodSpec(
    name="expert-merging",
    constraint="sigmoid",
    init=0.1,
    objective="expert-alignment",
    optimizer="adamw",
    lr=0.5,
    weight_decay=1e-5,
    scheduler="cosine-restarts",
    paper="Zhang et al., Expert Merging: Model Merging with Unsupervised Expert Alignment and "
    "Importance-Guided Layer Chunking, 2025",
)

METHODS = {
    "adamerging": ADAMERGING,
    "adamerging++": replace(ADAMERGING, name="adamerging++", preprocess="ties"),
    "atlas": MethodSpec(
        name="atlas",
        constraint="none",
        init=0.3,
        objective="pseudo-label",
        optimizer="adamw",
        lr=1e-3,
        weight_decay=0.1,
        paper="Zhang et al., Knowledge Composition using Task Vectors with Learned Anisotropic Scaling, "
        "NeurIPS 2024",
    ),
    "expert-merging": EXPERT_MERGING,
    "expert-merging++": replace(EXPERT_MERGING, name="expert-merging++", refine_chunks=True),
}
FEW_SHOT_LR = 1e-1  # aTLAS few-shot learning rate (with a cosine schedule)
FEW_SHOT_INIT = 0.0  # aTLAS few-shot start: the pretrained model


def resolve_method(
    name: str,
    init: float | None = None,
    constraint: str | None = None,
    lr: float | None = None,
    shots: int | None = None,
) -> MethodSpec:
    """The method's defaults with the given overrides applied.

    ``shots`` switches aTLAS to its few-shot setting (cross-entropy on labelled shots, λ = 0, lr
    1e-1, cosine); other methods refuse it.
    """
    if name not in METHODS:
        raise AdamergeError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    spec = METHODS[name]
    if shots is not None:
        if spec.name != "atlas":
            raise AdamergeError(f"--shots is for --method atlas (few-shot); {name} learns from unlabeled data")
        if shots < 1:
            raise AdamergeError(f"--shots {shots}: expected at least 1 labelled image per class")
        spec = replace(spec, init=FEW_SHOT_INIT, objective="cross-entropy", lr=FEW_SHOT_LR, scheduler="cosine")
    overrides = {k: v for k, v in {"init": init, "constraint": constraint, "lr": lr}.items() if v is not None}
    return replace(spec, **overrides)
