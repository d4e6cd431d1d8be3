"""Stage one of Concrete AdaMerging: a shared Concrete mask over the task vectors, meta-learned.

Each training step (Tang et al.'s bi-level loop, as FusionBench 0.2.33's
``ConcreteLayerWiseAdaMergingForCLIP.train_mask`` runs it):

1. a mask ``m̃`` is sampled from the :class:`~adamerge.core.concrete_mask.ConcreteMask`
   (differentiable in its logits);
2. **inner step**: λ is reset to its start and takes one step of its own Adam (lr ``inner_lr``,
   state kept across steps) on the entropy of every task's first half-batch through
   ``θ_0 + m̃ ⊙ Σ_k λ_k τ_k`` with the mask held fixed; λ is unconstrained here (FusionBench's
   ``clamp_weights: false``);
3. **outer step**: with that λ fixed, the loss of every task's second half-batch through the same
   merge goes to the mask logits, which the step's optimiser (Adam, lr ``mask_lr``) updates.

FusionBench draws a new batch of each task for the outer step; here one step's batch is split in
two halves (the first ``⌈B/2⌉`` inputs inner, the rest outer; a batch of one input serves both),
so ``--batch-size 32`` gives both passes FusionBench's 16. The outer gradient is first-order: λ
after the inner step is a constant, as in FusionBench. Task vectors stored as LoRA factors are
refused (a per-entry mask needs every entry; the method densifies them before). Under DDP the mask logits are all-reduced by the
strategy and the inner step's λ-gradient is averaged over the processes here (not tested
under DDP yet).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from adamerge.core.concrete_mask import ConcreteMask
from adamerge.core.merge import merge_tensor
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import FactoredDelta
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import TaskBatch, as_task_batch
from adamerge.run.module import COEFFICIENT_PREFIX, MergingModule

logger = logging.getLogger(__name__)

MASK_PREFIX = "mask."
INNER_OPTIMIZER_KEY = "concrete_inner_optimizer"


class ConcreteMaskModule(MergingModule):
    """Learns a :class:`~adamerge.core.concrete_mask.ConcreteMask` shared by the experts (see the module docstring).

    Args:
        merged: the model at the method's start (λ = its init); dense task vectors only.
        mask_lr: Adam learning rate of the mask logits (the step's optimiser).
        inner_lr: Adam learning rate of the inner λ step.
        temperature: the Concrete temperature.
        initial_logits: every mask logit's start.
        **kwargs: as :class:`~adamerge.run.module.MergingModule` (objective, sources, task type);
            its ``optimizer`` and ``scheduler`` are not used.
    """

    def __init__(
        self,
        merged: MergedModel,
        *,
        mask_lr: float = 1e-3,
        inner_lr: float = 1.0,
        temperature: float = 0.5,
        initial_logits: float = 0.0,
        **kwargs: Any,
    ) -> None:
        factored = [name for name, tv in merged.task_vectors.parts() if isinstance(tv, FactoredDelta)]
        if factored:
            raise AdamergeError(
                f"concrete-adamerging masks every entry of the task vectors; tensor {factored[0]!r} holds LoRA factors, "
                "whose dense task vectors it needs: the concrete-adamerging method densifies them (drop --start-from, "
                "whose merge kept them factored)"
            )
        kwargs.pop("optimizer", None)
        kwargs.pop("scheduler", None)
        super().__init__(merged, sparse_tables=False, low_rank_step="per-step", **kwargs)
        base = merged.base_tensors()
        shapes = {name: tv.shape[1:] for name, tv in merged.task_vectors.parts()}
        dtype = next((base[name].dtype for name in shapes if base[name].is_floating_point()), torch.float32)
        self.mask = ConcreteMask(shapes, initial_logits, temperature, dtype=dtype)
        self.mask_lr, self.inner_lr = float(mask_lr), float(inner_lr)
        self.register_buffer("start", merged.coefficients.raw.detach().clone(), persistent=False)  # (K, G)
        self.inner_optimizer = torch.optim.Adam([merged.coefficients.raw], lr=self.inner_lr, betas=(0.9, 0.999))
        self._ddp_params_and_buffers_to_ignore.append(f"{COEFFICIENT_PREFIX}raw")  # its inner gradient is averaged here

    def masked_tensors(self, lam: torch.Tensor, mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: θ_0 + m̃ ⊙ Σ_k λ_k τ_k}``, differentiable in ``lam`` and ``mask``.

        Args:
            lam: ``(K, G)`` coefficients (used as given: unconstrained).
            mask: ``{name: m̃}`` of every merged tensor's shape.
        """
        merged = self.merged
        base = merged.base_tensors()
        inverse = merged.partitions.inverse()
        tensors = {}
        rows = zip(merged.task_vectors.parts(), merged.layout.tensor_groups, merged.layout.tensor_chunks, strict=True)
        for (name, tv), group, chunks in rows:
            zero = base[name].new_zeros(()).expand(base[name].shape)
            delta = merge_tensor(name, zero, tv, lam, group, chunks, inverse)  # (*S) = Σ_k λ_k τ_k
            tensors[name] = base[name] + mask[name].to(delta.dtype) * delta
        return tensors

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        inner, outer = _split_halves(batch)
        mask = self.mask.sample()  # {name: m̃}, graph to the logits
        raw = self.merged.coefficients.raw
        point = self.inner_gradient_point().requires_grad_()  # (K, G)
        fixed_mask = {name: m.detach() for name, m in mask.items()}
        inner_loss = self._loss_through(self.masked_tensors(point, fixed_mask), point, inner)
        (grad,) = torch.autograd.grad(inner_loss, [point])  # (K, G); no .grad, no DDP hook
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(grad)
            grad /= torch.distributed.get_world_size()
        with torch.no_grad():
            raw.copy_(self.start)  # the inner step starts from λ's start every step
        raw.grad = grad
        self.inner_optimizer.step()
        raw.grad = None
        self._log_training("train/inner_loss", inner_loss.detach(), batch_size=1)
        outer_loss = self._loss_through(self.masked_tensors(raw.detach(), mask), raw, outer)
        self._log_training("train/loss", outer_loss.detach(), prog_bar=True, batch_size=1)
        self._log_training("train/kept", torch.tensor(self.mask.kept_share()), batch_size=1)
        return outer_loss  # its backward reaches the mask logits only

    def inner_gradient_point(self) -> torch.Tensor:
        """Where the inner step's λ-gradient is taken: λ's start (Tang et al.'s algorithm).

        FusionBench's ``train_mask`` merges before it resets λ, so from its second step on it
        takes the gradient at the previous step's inner λ and applies it from the start;
        ``benchmarks/peers/fusionbench_concrete_check.py`` overrides this method to show that
        this is the only difference.
        """
        return self.start.clone()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.mask.parameters(), lr=self.mask_lr, betas=(0.9, 0.999))

    def on_train_end(self) -> None:
        logger.info("Concrete mask: the hard mask keeps %.1f %% of the task vectors' entries", 100 * self.mask.kept_share())

    # -- checkpoints: λ, the mask logits and the inner optimiser ----------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] |= {k: v for k, v in state.items() if k.startswith(MASK_PREFIX)}
        checkpoint[INNER_OPTIMIZER_KEY] = self.inner_optimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if INNER_OPTIMIZER_KEY in checkpoint:
            self.inner_optimizer.load_state_dict(checkpoint[INNER_OPTIMIZER_KEY])


def _split_halves(batch: Mapping[str, Any]) -> tuple[dict[str, TaskBatch], dict[str, TaskBatch]]:
    """Each task's batch as two halves: the first ``⌈B/2⌉`` inputs and the rest (one input: both)."""
    first, second = {}, {}
    for task, item in batch.items():
        whole = as_task_batch(item)
        size = whole.size
        cut = (size + 1) // 2
        first[task] = whole.rows(slice(0, cut))
        second[task] = whole.rows(slice(cut, size)) if size > 1 else whole
    return first, second
