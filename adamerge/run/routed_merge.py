"""Training the routers of an input-routed merge (WEMoE, Twin-Merging) with the merge held fixed.

Both modules install a :class:`~adamerge.core.routed_weights.RoutedWeights` into the merged model
when training starts: from then on every forward of the merged model (training, BatchNorm
re-estimation, evaluation) is routed per input; before, it is the static merge (the start that
``--eval`` reports). λ stays at the static
merge's start; only the routers learn.

- :class:`WeightEnsemblingModule` (WEMoE, Tang et al. 2024): each step, every task's batch runs
  through the routed model and its entropy (the method's objective) is back-propagated into the
  block routers, one task at a time (FusionBench's ``use_grad_accumulate``); one Adam step
  (lr 1e-4) on their sum.
- :class:`TaskRouterModule` (Twin-Merging, Lu et al. 2024): each step, every task's batch runs
  through the static merge (routing off, no gradient); the router learns to tell the tasks apart
  from the features entering the head, by cross-entropy on the task of each input (the task
  folders name it: no labels are read), one Adam step (lr 5e-4) on the batch of all tasks.

Checkpoints hold λ and the routers; the exported routing (:func:`write_routing`) is the routers,
the deltas and ``adamerge_routing.py``, which runs it without adamerge.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adamerge.choices import HEAD_INPUT, REESTIMATING_POLICIES
from adamerge.core import routed_weights
from adamerge.core.batchnorm import batchnorm_layers
from adamerge.core.merge import PrecomputedGradient
from adamerge.core.merged_model import MergedModel
from adamerge.core.routed_weights import RoutedWeights, pooled
from adamerge.core.routing_plan import describe, twin_vectors, weight_ensembling
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import as_task_batch
from adamerge.run.module import MergingModule, statistics_loaders_of
from adamerge.storage.output_folder import inside

logger = logging.getLogger(__name__)

ROUTING_PREFIX = "routing.routers."


class RoutedMergeModule(MergingModule):
    """A :class:`~adamerge.run.module.MergingModule` whose merged model is routed per input and
    whose routers are what learns (see the module docstring).

    Subclasses build their routing after this constructor and hand it to :meth:`attach`.

    Args:
        merged: the model at the method's start (the static merge), dense task vectors.
        lr: Adam learning rate of the routers.
        **kwargs: as :class:`~adamerge.run.module.MergingModule` (objective, sources, task type);
            its ``optimizer`` and ``scheduler`` are not used.
    """

    routing: RoutedWeights

    def __init__(self, merged: MergedModel, lr: float, **kwargs: Any) -> None:
        kwargs.pop("optimizer", None)
        kwargs.pop("scheduler", None)
        merged.coefficients.raw.requires_grad_(False)  # λ stays at the static merge (and DDP need not reduce it)
        super().__init__(merged, sparse_tables=False, low_rank_step="per-step", **kwargs)
        if self.task_type.generates:
            raise AdamergeError(
                "input-routed merging (wemoe, twin-merging) routes classifiers for now: a causal language model's "
                "generation would re-route at every new token"
            )
        self.lr = float(lr)

    def attach(self, routing: RoutedWeights) -> None:
        """Hold ``routing`` (its routers in float64 for a float64 model), installed when training starts."""
        dtype = next((t.dtype for t in self.merged.base_tensors().values() if t.is_floating_point()), torch.float32)
        self.routing = routing
        if dtype == torch.float64:
            self.routing.routers.double()
        self._ddp_params_and_buffers_to_ignore += [f"routing.{name}" for name, _ in self.routing.named_buffers()]
        logger.info("routing: %s", dict(describe(self.routing)))

    def on_train_start(self) -> None:
        super().on_train_start()
        self.install()

    def install(self) -> None:
        """Route the merged model from now on (the start is evaluated as the static merge it is)."""
        if not self.routing.installed:
            self.routing.install(self.merged.model)

    def on_train_batch_end(self, *args: Any) -> None:
        self._bn_estimated_for = None  # the routers moved: the routed model's BatchNorm statistics are re-estimated before use

    def static_tensors(self) -> dict[str, torch.Tensor]:
        """The static merge's tensors (λ at its start), without a graph."""
        with torch.no_grad():
            return self.merged.merged_tensors()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.routing.routers.parameters(), lr=self.lr, betas=(0.9, 0.999))

    def learned_state(self) -> dict[str, torch.Tensor]:
        """A copy of the routers' weights (and buffers): what the held-out safeguard keeps the best of."""
        return {name: tensor.detach().clone() for name, tensor in self.routing.routers.state_dict().items()}

    @torch.no_grad()
    def restore_learned_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.routing.routers.load_state_dict(state)
        self._bn_estimated_for = None  # the routed model's BatchNorm statistics belong to other routers

    def routing_summary(self) -> dict[str, Any]:
        """For ``metrics.json``: the routing's kind and sizes."""
        return dict(describe(self.routing))

    # -- checkpoints: λ and the routers ---------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] |= {k: v for k, v in state.items() if k.startswith(ROUTING_PREFIX)}


class WeightEnsemblingModule(RoutedMergeModule):
    """WEMoE: block routers trained on the method's objective (entropy) through the routed model.

    Args:
        merged: the static merge (task arithmetic at λ = ``init``).
        routed: the blocks to route (:func:`~adamerge.core.routing_plan.routed_blocks`).
        router_hidden_layers: each gate's depth (FusionBench: 2).
        init: the gates' output bias, the static merge's λ.
        batch_reduce: one routing per batch (FusionBench's training default) instead of per input.
        output_std: the std of the gates' initial output weights (FusionBench: 0.01; see
            :class:`~adamerge.core.routed_weights.WeightEnsemblingGate`).
        lr: Adam learning rate (FusionBench: 1e-4).
        **kwargs: as :class:`RoutedMergeModule`.
    """

    def __init__(
        self,
        merged: MergedModel,
        *,
        routed: str = "auto",
        router_hidden_layers: int = 2,
        init: float = 0.3,
        batch_reduce: bool = False,
        output_std: float = 0.0,
        lr: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        _check_start(merged, init, "wemoe")
        super().__init__(merged, lr, **kwargs)
        seed = torch.initial_seed() % 2**31
        self.attach(weight_ensembling(merged, routed, router_hidden_layers, init, batch_reduce, seed, output_std))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        static = self.static_tensors()
        params = [p for p in self.routing.routers.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), device=self.device)
        for task, item in batch.items():
            task_batch = as_task_batch(item)
            task_loss = self.objective(task, *self._outputs(task_batch, task, static))
            for grad, part in zip(grads, torch.autograd.grad(task_loss, params, allow_unused=True), strict=True):
                if part is not None:
                    grad += part
            total += task_loss.detach()
            self._log_training(f"train/loss/{task}", task_loss.detach(), batch_size=task_batch.size)
        self._log_training("train/loss", total, prog_bar=True, batch_size=1)
        return PrecomputedGradient.apply(total, tuple(grads), *params)  # hands Σ_task ∂L/∂(routers) to the routers


class TaskRouterModule(RoutedMergeModule):
    """Twin-Merging: a router that tells the tasks apart from the static merge's head input.

    Args:
        merged: the shared merge ``θ*`` (task arithmetic at λ = its start).
        density: the share of each exclusive weight matrix's singular vectors kept (the
            reference's ``mask_rate`` 0.9: 0.1).
        lr: Adam learning rate of the router (the reference: 5e-4).
        **kwargs: as :class:`RoutedMergeModule`.
    """

    def __init__(self, merged: MergedModel, *, density: float = 0.1, lr: float = 5e-4, **kwargs: Any) -> None:
        super().__init__(merged, lr, **kwargs)
        self.attach(twin_vectors(merged, density, seed=torch.initial_seed() % 2**31))

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.merged.batchnorm in REESTIMATING_POLICIES and batchnorm_layers(self.merged.model):
            self._estimate_prepass_statistics()

    @torch.no_grad()
    def _estimate_prepass_statistics(self) -> None:
        """The shared merge's BatchNorm statistics over every task's calibration inputs (routing
        removed while they are estimated): the router's features are the shared merge's, as the
        reference's router reads the shared expert's, normalised without knowing the task."""
        loaders = statistics_loaders_of(getattr(self._trainer, "datamodule", None))
        if loaders is None:
            return
        model = self.merged.model
        layers = {name: m for name, m in model.named_modules() if name in self.routing.config["leaves"] and m in batchnorm_layers(model)}
        saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
        self.routing.remove()
        try:
            self.merged.reestimate_batchnorm(self.statistics_batches(loaders), pooled=True)
            statistics = {
                name: {"running_mean": m.running_mean.clone(), "running_var": m.running_var.clone()} for name, m in layers.items()
            }
        finally:
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])
            self.routing.install(model)
        self.routing.set_prepass_statistics(statistics)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        static = self.static_tensors()
        features, labels = [], []
        was_training = self.merged.training
        self.merged.eval()  # the features the router reads at inference: the shared merge in eval mode
        with torch.no_grad(), self.routing.off():
            for task, item in batch.items():
                task_batch = as_task_batch(item)
                inputs = self.task_type.model_inputs(task_batch.inputs, task_batch.labels)
                with self.merged.capture([HEAD_INPUT]) as captured:
                    self.merged(inputs, task, merged=static)
                found = pooled(captured[HEAD_INPUT], False).mean(dim=1)  # (B, D)
                features.append(found)
                labels.append(torch.full((found.shape[0],), self.tasks.index(task), device=found.device))
        self.merged.train(was_training)
        logits = self.routing.routers[0](torch.cat(features))  # (Σ B, K)
        target = torch.cat(labels)
        loss = F.cross_entropy(logits, target)
        self._log_training("train/loss", loss.detach(), prog_bar=True, batch_size=1)
        self._log_training("train/router_accuracy", (logits.argmax(-1) == target).float().mean(), batch_size=1)
        return loss


def _check_start(merged: MergedModel, init: float, method: str) -> None:
    """Refuse a static merge whose λ is not ``init`` everywhere (the gates' offset assumes it)."""
    lam = merged.coefficients().detach()
    if not torch.allclose(lam, torch.full_like(lam, init)):
        raise AdamergeError(
            f"{method}: the static merge's λ must be {init:g} everywhere (the routers' start); got {lam.min():.3g}..{lam.max():.3g}"
        )


def write_routing(directory: Path, module: RoutedMergeModule) -> dict[str, str]:
    """``routing/``: ``routing.json``, ``routing.pt`` and ``adamerge_routing.py`` (see
    :func:`adamerge.core.routed_weights.save`).

    Raises:
        AdamergeError: a router weight is not finite (nothing is written then).
    """
    for name, tensor in module.routing.routers.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdamergeError(f"refusing to write non-finite router weights ({name!r}): lower --lr")
    module.install()
    folder = inside(directory, "routing", routed_weights.CONFIG_FILE).parent
    names = routed_weights.save(module.routing, folder)
    return {f"routing/{name}": f"routing/{name}" for name in names}
