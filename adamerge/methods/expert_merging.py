"""Expert Merging++: Expert Merging, then a second stage on importance-guided chunks.

Stage one is Expert Merging itself (layer-wise λ). Stage two splits each tensor into a number of
chunks that grows with its importance (:mod:`adamerge.methods.importance`: the stage-one λ times the task
vectors' magnitude, a budget ``B`` of chunks shared with sharpness κ), starts every chunk at its
tensor's stage-one value and trains the chunks that received a share of the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adamerge.errors import AdamergeError
from adamerge.methods.learned import LearnedMethod

if TYPE_CHECKING:
    from lightning import LightningModule

    from adamerge.core.merged_model import MergedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRefinedMethod(LearnedMethod):
    """A learned method whose second stage refines a layer-wise first stage into chunks.

    Attributes:
        stage_one: the registered method that stage one is (same objective, options and steps),
            whose name labels stage one's accuracy; empty: ``"<name> stage 1"``.
    """

    stage_one: str = ""

    @property
    def stages(self) -> int:
        return 2

    def stage_label(self, stage: int, granularity: str) -> str:
        if stage == 1 and self.stage_one:
            return f"{self.stage_one} ({granularity})"
        return super().stage_label(stage, granularity)

    def next_stage(self, previous: MergedModel, settings: Any, trained: LightningModule | None = None) -> MergedModel:
        """The chunk-wise model of stage two, every chunk starting at its tensor's stage-one λ.

        Raises:
            AdamergeError: the first stage was not layer-wise (one λ per tensor).
        """
        import torch

        from adamerge.core.granularity import ChunkWise
        from adamerge.core.merged_model import MergedModel
        from adamerge.methods.importance import chunk_budget, layer_importance

        if previous.layout.tensor_groups != tuple(range(len(previous.layout.tensor_names))):
            raise AdamergeError(f"{self.name} refines a layer-wise first stage: use --granularity layer")
        stage_one = previous.coefficients().detach()  # (K, L)
        importance = layer_importance(stage_one, previous.task_vectors.items())
        budget = settings.chunk_budget or 2 * len(importance)
        chunks = chunk_budget(importance, budget, settings.chunk_kappa)
        granularity = ChunkWise({n: max(1, m) for n, m in chunks.items()})
        layout = granularity.compile(previous.layout.tensor_names, previous.task_vectors.numels())
        init = torch.cat(
            [stage_one[:, [i]].expand(-1, c) for i, c in enumerate(layout.tensor_chunks)], dim=1
        )  # (K, G2): every chunk starts at its tensor's stage-one value
        trainable = torch.cat(
            [torch.full((stage_one.shape[0], c), chunks[n] > 0) for n, c in zip(layout.tensor_names, layout.tensor_chunks)],
            dim=1,
        )
        logger.info(
            "%s: %d of %d tensors refined into %d chunks (budget %d, kappa %g)",
            self.name,
            sum(m > 0 for m in chunks.values()),
            len(chunks),
            sum(chunks.values()),
            budget,
            settings.chunk_kappa,
        )
        return MergedModel(
            previous.model,
            previous.task_vectors,
            granularity,
            self.constraint,
            init.clamp(1e-4, 1 - 1e-4) if self.constraint == "sigmoid" else init,
            heads={t: previous.heads.for_task(t) for t in previous.heads.tasks},
            batchnorm=previous.batchnorm,
            trainable=trainable,
            task_specific={t: previous.kept.for_task(t) for t in previous.kept.tasks},
        )
