"""FW-Merging: Frank–Wolfe steps from the initial merge toward the most aligned checkpoint of the pool.

Chen et al., "Scaling Model Merging with Frank-Wolfe Optimization" (2025), hard variant, with the
defaults of FusionBench 0.2.33's ``fw_hard.yaml`` (step size 0.1, scaling factor 0.3, task
granularity, the initial merge task arithmetic at 0.3). Each step linearises the objective at the
current merge, picks per coefficient group the checkpoint (an expert, or the initial merge) whose
weights are least aligned with the gradient, and steps toward it by ``2 / (t + 2) · 0.1 · 0.3``
(:mod:`adamerge.run.frank_wolfe`). The merge stays ``θ_0 + Σ_k c_k τ_k``: it exports as every
other merge does.

The objective is the entropy of the unlabeled calibration data (FusionBench's ``loss_fn:
entropy``; its default is cross-entropy on labelled training data). FusionBench takes 10
iterations of 100 inputs per task at batch size 1: ``--steps 10 --batch-size 100`` is that budget
(each step's batch runs in micro-batches of ``micro_batch`` inputs). LoRA task vectors are
densified (with a warning): the alignment is with each checkpoint's whole weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adamerge.errors import AdamergeError
from adamerge.methods.learned import LearnedMethod, densified

if TYPE_CHECKING:
    from adamerge.core.task_vectors import TaskVectors

FW_MERGING = "Chen et al., Scaling Model Merging with Frank-Wolfe Optimization, 2025"


@dataclass(frozen=True)
class FrankWolfeMethod(LearnedMethod):
    """FW-Merging (hard): see the module docstring.

    Attributes:
        step_size: the step size (FusionBench 0.1).
        scaling_factor: the scaling factor (FusionBench 0.3); the initial merge is task arithmetic
            at ``init`` (0.3, the same value by default).
        micro_batch: inputs per forward and backward within a task's batch.
    """

    constraint: str = "none"  # type: ignore[assignment]
    step_size: float = 0.1
    scaling_factor: float = 0.3
    micro_batch: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.constraint != "none":
            raise AdamergeError(f"method {self.name!r}: Frank-Wolfe steps between checkpoints need --constraint none")
        if self.step_size <= 0 or self.scaling_factor <= 0:
            raise AdamergeError(f"method {self.name!r}: step_size and scaling_factor must be positive")

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """Dense task vectors (LoRA factors densified, with a warning)."""
        return densified(task_vectors)

    def stage_module(self, stage: int) -> tuple[str, dict[str, Any]]:
        options = {"step_size": self.step_size, "scaling_factor": self.scaling_factor, "micro_batch": self.micro_batch}
        return "adamerge.run.frank_wolfe:FrankWolfeModule", options

    def reach(self, steps: int) -> float:
        """How far the coefficients can move toward a vertex: the sum of the step lengths (at most 1)."""
        return min(1.0, sum(2.0 / (t + 2) * self.step_size * self.scaling_factor for t in range(steps)))
