"""FW-Merging's training loop: Frank–Wolfe steps of the merged model toward the most aligned checkpoint.

Chen et al.'s hard variant, as FusionBench 0.2.33's ``FrankWolfeHardAlgorithm`` runs it. The pool's
vertices are the experts ``θ_k = θ_0 + τ_k`` and the initial merge ``θ_init = θ_0 + Σ_k c⁰_k τ_k``
(task arithmetic at λ = 0.3); the merge is ``θ = θ_0 + Σ_k c_k τ_k`` throughout, so every step is a
step of the coefficients ``c`` (K, G). Each training step:

1. the gradient ``G_l = ∂L/∂θ_l`` of the objective (entropy of every task's batch) is computed at
   the current merge, for every merged tensor ``l``;
2. the linear minimisation oracle: for every coefficient group ``g`` (the whole model at task
   granularity, one tensor at layer granularity) the vertex ``v`` minimising
   ``Σ_{l ∈ g} cos(G_l, θ_{v,l})`` is chosen (the cosine with the vertex's *weights*, per tensor,
   summed: FusionBench's alignment);
3. the Frank–Wolfe step ``θ ← θ + s_t (θ_v − θ)`` with ``s_t = 2 / (t + 2) · step_size · scaling``,
   i.e. ``c_g ← (1 − s_t) c_g + s_t e_v`` (``e_v``: the one-hot λ of expert v, or ``c⁰`` for the
   initial merge).

FusionBench accumulates the gradient over ``dataset_size`` inputs per task (batch size 1); here
one step's batch per task is the gradient's data (``--batch-size``, run in micro-batches of
``micro_batch`` inputs), the same direction up to a positive scale, which the cosine ignores.
Under DDP the gradients are summed over the processes before the choice, so that every process
takes the same step (not tested under DDP yet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import FactoredDelta
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import as_task_batch
from adamerge.run.module import MergingModule

logger = logging.getLogger(__name__)


class FrankWolfeStep(torch.optim.Optimizer):
    """One Frank–Wolfe step of the coefficients toward the vertices in :attr:`choice`.

    Args:
        params: the raw ``(K, G)`` coefficients (unconstrained).
        start: ``(K, G)`` coefficients of the initial merge (the vertex after the K experts).
        step_size: FW-Merging's step size.
        scaling_factor: FW-Merging's scaling factor (also the initial merge's λ).
    """

    def __init__(self, params: Any, start: torch.Tensor, step_size: float = 0.1, scaling_factor: float = 0.3) -> None:
        super().__init__(params, {"step_size": step_size, "scaling_factor": scaling_factor})
        self.start = start
        self.choice: torch.Tensor | None = None  # (G,) vertex per group: k < K an expert, K the initial merge

    def step_length(self, iteration: int) -> float:
        """``s_t = 2 / (t + 2) · step_size · scaling_factor``."""
        group = self.param_groups[0]
        return 2.0 / (iteration + 2) * group["step_size"] * group["scaling_factor"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.choice is None:
            raise AdamergeError("a Frank-Wolfe step needs the chosen vertices (FrankWolfeModule sets them)")
        (raw,) = self.param_groups[0]["params"]
        state = self.state[raw]
        iteration = int(state.get("iteration", 0))
        num_tasks = raw.shape[0]
        choice = self.choice.to(raw.device)  # (G,)
        experts = torch.nn.functional.one_hot(choice.clamp(max=num_tasks - 1), num_tasks).t().to(raw.dtype)  # (K, G)
        vertex = torch.where(choice == num_tasks, self.start.to(raw), experts)  # (K, G)
        length = self.step_length(iteration)
        raw.mul_(1 - length).add_(vertex, alpha=length)
        state["iteration"] = iteration + 1
        self.choice = None


class FrankWolfeModule(MergingModule):
    """Learns the coefficients of a :class:`MergedModel` by FW-Merging's steps (see the module docstring).

    Args:
        merged: the model at its start (the initial merge); dense task vectors, constraint ``none``,
            granularity of whole tensors (task, layer or group).
        step_size: FW-Merging's step size (FusionBench: 0.1).
        scaling_factor: FW-Merging's scaling factor (FusionBench: 0.3).
        micro_batch: inputs per forward and backward within a task's batch.
        **kwargs: as :class:`~adamerge.run.module.MergingModule`; its ``optimizer`` and
            ``scheduler`` are not used.
    """

    def __init__(
        self, merged: MergedModel, *, step_size: float = 0.1, scaling_factor: float = 0.3, micro_batch: int = 16, **kwargs: Any
    ) -> None:
        factored = [name for name, tv in merged.task_vectors.parts() if isinstance(tv, FactoredDelta)]
        if factored:
            raise AdamergeError(
                f"fw-merging compares whole checkpoints; tensor {factored[0]!r} holds LoRA factors: "
                "the fw-merging method densifies them (drop --start-from, whose merge kept them factored)"
            )
        if any(chunks != 1 for chunks in merged.layout.tensor_chunks):
            raise AdamergeError("fw-merging picks a checkpoint per group of whole tensors: use --granularity task, layer or group:REGEX")
        if merged.coefficients.constraint != "none":
            raise AdamergeError(f"fw-merging steps between checkpoints: constraint 'none', got {merged.coefficients.constraint!r}")
        if micro_batch < 1:
            raise AdamergeError(f"fw-merging micro_batch {micro_batch}: expected at least 1")
        kwargs.pop("optimizer", None)
        kwargs.pop("scheduler", None)
        super().__init__(merged, sparse_tables=False, low_rank_step="per-step", **kwargs)
        self.automatic_optimization = False
        self.step_size, self.scaling_factor, self.micro_batch = float(step_size), float(scaling_factor), int(micro_batch)
        self.register_buffer("start", merged.coefficients().detach().clone(), persistent=False)  # (K, G)
        self._vertex_norms: dict[str, torch.Tensor] | None = None
        self._standalone: FrankWolfeStep | None = None

    def configure_optimizers(self) -> FrankWolfeStep:
        return FrankWolfeStep([self.merged.coefficients.raw], self.start, self.step_size, self.scaling_factor)

    def _optimizer(self) -> Any:
        """The trainer's (Lightning-wrapped) step; outside a Trainer, one of this module's own."""
        if self._trainer is not None:
            return self.optimizers()
        if self._standalone is None:
            self._standalone = self.configure_optimizers()
        return self._standalone

    @torch.no_grad()
    def vertex_norms(self) -> dict[str, torch.Tensor]:
        """``{tensor: (K + 1,)}`` norms of every vertex's weights: the K experts, then the initial merge."""
        if self._vertex_norms is None:
            base = self.merged.base_tensors()
            norms = {}
            for (name, tv), group in zip(self.merged.task_vectors.parts(), self.merged.layout.tensor_groups, strict=True):
                flat_base = base[name].reshape(1, -1).to(torch.float32)  # (1, P)
                flat_tv = tv.reshape(tv.shape[0], -1).to(torch.float32)  # (K, P)
                initial = flat_base[0] + self.start[:, group].to(flat_tv) @ flat_tv  # (P,)
                norms[name] = torch.cat([(flat_base + flat_tv).norm(dim=1), initial.norm().reshape(1)])  # (K + 1,)
            self._vertex_norms = norms
        return self._vertex_norms

    def alignment(self, gradients: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(K + 1, G)``: per group, ``Σ_{l ∈ g} cos(G_l, θ_{v,l})`` for every vertex ``v``
        (a tensor without gradient adds nothing)."""
        merged = self.merged
        base = merged.base_tensors()
        norms = self.vertex_norms()
        num_tasks = len(self.tasks)
        scores = torch.zeros(num_tasks + 1, merged.layout.num_groups, dtype=torch.float64, device=self.start.device)
        for (name, tv), group in zip(merged.task_vectors.parts(), merged.layout.tensor_groups, strict=True):
            grad = gradients.get(name)
            if grad is None:
                continue
            flat_grad = grad.reshape(-1).to(torch.float32)  # (P,)
            grad_norm = flat_grad.norm()
            if not bool(grad_norm > 0):
                continue
            on_base = flat_grad @ base[name].reshape(-1).to(torch.float32)  # ⟨G, θ_0⟩
            on_tv = tv.reshape(num_tasks, -1).to(torch.float32) @ flat_grad  # (K,) ⟨G, τ_k⟩
            inner = torch.cat([on_base + on_tv, (on_base + self.start[:, group].to(on_tv) @ on_tv).reshape(1)])  # (K + 1,)
            vertex_norms = norms[name].to(inner)
            cosine = torch.where(vertex_norms > 0, inner / (grad_norm * vertex_norms.clamp_min(1e-30)), torch.zeros_like(inner))
            scores[:, group] += cosine.double()
        return scores

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            merged = self.merged.merged_tensors(self.merged.coefficients())  # θ at the current coefficients
        leaves = {name: t.detach().requires_grad_() for name, t in merged.items()}
        total = torch.zeros((), device=self.device)
        for task, item in batch.items():
            whole = as_task_batch(item)
            for rows, weight in _micro_batches(whole.size, self.micro_batch):
                part = whole.rows(rows)
                loss = self.objective(task, *self._outputs(part, task, leaves)) * weight
                loss.backward(inputs=list(leaves.values()))  # ∂L/∂θ accumulates in the leaves
                total += loss.detach()
        gradients = {name: leaf.grad for name, leaf in leaves.items() if leaf.grad is not None}
        if not gradients:
            raise AdamergeError("no merged tensor received a gradient: does the loss depend on the model?")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for grad in gradients.values():  # every process then chooses the same vertices
                torch.distributed.all_reduce(grad)
        scores = self.alignment(gradients)  # (K + 1, G)
        optimizer = self._optimizer()
        getattr(optimizer, "optimizer", optimizer).choice = scores.argmin(0)  # (G,) on the FrankWolfeStep itself
        optimizer.step()
        chosen = torch.bincount(scores.argmin(0), minlength=len(self.tasks) + 1)
        self._log_training("train/loss", total, prog_bar=True, batch_size=1)
        self._log_training("train/initial_chosen", chosen[-1].float(), batch_size=1)
        return total


def _micro_batches(size: int, micro: int) -> list[tuple[slice, float]]:
    """``(rows, weight)`` pieces of a batch of ``size``: the weights make the pieces' mean losses the batch's mean."""
    return [(slice(start, min(start + micro, size)), (min(start + micro, size) - start) / size) for start in range(0, size, micro)]
