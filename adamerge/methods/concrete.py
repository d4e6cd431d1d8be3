"""Concrete AdaMerging: a shared mask over the task vectors' entries, then AdaMerging on the masked vectors.

Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion" (2023), with the defaults of its reference implementation (FusionBench 0.2.33,
``clip_concrete_{task,layer}_wise_adamerging``):

- **stage one** (:mod:`adamerge.run.concrete_mask`): one Concrete mask logit per entry of every
  merged tensor, shared by the experts, starting at 0 (keep probability ½), temperature 0.5,
  meta-learned on the entropy of the unlabeled calibration data: each step, λ starts at its
  init (0.3) and takes one inner Adam step (lr 1), and the mask logits one Adam step (lr 1e-3)
  on the loss after it;
- **stage two**: the mask is fixed, by default to its expectation (each entry's keep
  probability ``σ(ℓ)``, rescaled by its mean per tensor: deterministic, and the unmasked merge
  where the logits learned nothing), the task vectors become ``τ'_k = m̃ ⊙ τ_k``, and AdaMerging
  learns λ from its init on them (entropy, Adam 1e-3, clamped to [0, 1] as
  :mod:`adamerge.methods.builtin`'s adamerging).

Both stages take ``--steps`` steps (FusionBench: 1000 each) at ``--granularity`` (task-wise or
layer-wise in the paper). The result is an ordinary merge of the masked task vectors: it exports
as every other merge does, without adamerge. The mask has one logit per entry, so LoRA experts'
task vectors are densified first (with a warning), as for TIES and the other entry-wise methods.

Where this differs from FusionBench, and why: FusionBench evaluates with a mask *sampled* from the
Concrete distribution (``eval_mask_type: continuous``), so two runs from the same mask logits give
two models; here the inference mask is deterministic. ``eval_mask`` chooses it: ``expected``
(default), ``hard`` (``1[σ(ℓ) ≥ ½]`` rescaled by its mean: about half of every tensor dropped and
the rest doubled, which on the vision benchmark's 50 steps costs 8 points against AdaMerging,
``benchmarks/RESULTS.md``) or ``sample`` (FusionBench's kind, drawn once, seeded). FusionBench's
stage two learns λ unclamped; here it is AdaMerging's clamped λ, so that the row compares with the
adamerging row at the same settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adamerge.choices import EVAL_MASKS
from adamerge.errors import AdamergeError
from adamerge.methods.learned import LearnedMethod, densified

if TYPE_CHECKING:
    from lightning import LightningModule

    from adamerge.core.merged_model import MergedModel
    from adamerge.core.task_vectors import TaskVectors

logger = logging.getLogger(__name__)

CONCRETE = "Tang et al., Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion, 2023"


@dataclass(frozen=True)
class ConcreteMaskedMethod(LearnedMethod):
    """A learned method whose first stage meta-learns a shared Concrete mask over the task vectors.

    Attributes:
        mask_lr: Adam learning rate of the mask logits (stage one).
        inner_lr: Adam learning rate of the inner λ step (stage one).
        temperature: Concrete temperature.
        initial_logits: every mask logit's start.
        eval_mask: ``expected`` (σ(ℓ) rescaled), ``hard`` (``1[σ(ℓ) ≥ ½]`` rescaled) or ``sample``
            (one seeded Concrete sample, FusionBench's kind).
    """

    mask_lr: float = 1e-3
    inner_lr: float = 1.0
    temperature: float = 0.5
    initial_logits: float = 0.0
    eval_mask: str = "expected"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_mask not in EVAL_MASKS:
            raise AdamergeError(f"method {self.name!r}: eval_mask {self.eval_mask!r}, expected one of {', '.join(EVAL_MASKS)}")
        if self.temperature <= 0:
            raise AdamergeError(f"method {self.name!r}: temperature {self.temperature}, expected a positive number")

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """Dense task vectors: a per-entry mask needs every entry, so LoRA factors are densified
        (with a warning, as for every entry-wise method)."""
        return densified(task_vectors)

    @property
    def stages(self) -> int:
        return 2

    def stage_module(self, stage: int) -> tuple[str, dict[str, Any]]:
        if stage != 1:
            return super().stage_module(stage)
        options = {
            "mask_lr": self.mask_lr,
            "inner_lr": self.inner_lr,
            "temperature": self.temperature,
            "initial_logits": self.initial_logits,
        }
        return "adamerge.run.concrete_mask:ConcreteMaskModule", options

    def guards_stage(self, stage: int) -> bool:
        """Stage one learns the mask, which the λ safeguard does not see: stage two only."""
        return stage != 1

    def stage_label(self, stage: int, granularity: str) -> str:
        if stage == 1:
            return f"{self.name} mask ({granularity})"
        return super().stage_label(stage, granularity)

    @property
    def scores_stage_one(self) -> bool:
        return False  # stage one's model is λ's start without the mask: nothing to report

    def next_stage(self, previous: MergedModel, settings: Any, trained: LightningModule | None = None) -> MergedModel:
        """Stage two: the masked task vectors ``m̃ ⊙ τ_k`` at λ's start, the same granularity.

        Raises:
            AdamergeError: ``trained`` is not stage one's mask module.
        """
        import torch

        from adamerge.core.merged_model import MergedModel
        from adamerge.core.task_vectors import TaskVectors

        mask_model = getattr(trained, "mask", None)
        if mask_model is None:
            raise AdamergeError(f"{self.name}: stage two needs stage one's Concrete mask")
        if self.eval_mask == "hard":
            mask = mask_model.hard()
        elif self.eval_mask == "expected":
            mask = mask_model.expected()
        else:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(getattr(settings, "seed", 0))
                mask = mask_model.sample()
        logger.info(
            "%s: the %s mask (a hard one would keep %.1f %% of the entries)", self.name, self.eval_mask, 100 * mask_model.kept_share()
        )
        inverse = previous.partitions.inverse()  # partitioned tensors are stored permuted; the mask is in entry order
        masked = {
            name: _entry_order(tv, inverse.get(name)) * mask[name].to(tv.device, tv.dtype) for name, tv in previous.task_vectors.items()
        }  # (K, *S) each, in entry order (the new model permutes partitioned ones again)
        return MergedModel(
            previous.model,
            TaskVectors(previous.task_vectors.tasks, masked),
            settings.granularity,
            self.constraint,
            self.init,
            heads={t: previous.heads.for_task(t) for t in previous.heads.tasks},
            batchnorm=previous.batchnorm,
            task_specific={t: previous.kept.for_task(t) for t in previous.kept.tasks},
        )


def _entry_order(tv, inverse):
    """``(K, *S)`` task vectors stored in a partition's order, back in entry order."""
    if inverse is None:
        return tv
    flat = tv.reshape(tv.shape[0], -1)  # (K, P)
    return flat[:, inverse.to(flat.device)].reshape(tv.shape)
