"""Input-routed merging: the static merge's weights mixed per input by trained routers.

- ``wemoe``: Tang et al., "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts"
  (ICML 2024), with FusionBench 0.2.33's defaults (``weight_ensembling_moe.yaml``): task
  arithmetic at λ = 0.3 everywhere, the MLP of every transformer layer (a CNN's residual blocks)
  upscaled to a weight-ensembling MoE whose depth-2 router starts at 0.3, trained on the entropy
  of the unlabeled calibration data with Adam at lr 1e-4 (FusionBench: 1000 steps of batch 16).
  FusionBench trains with one routing per batch (``batch_reduce: true``) and evaluates per input;
  here both are per input by default (``--options '{batch_reduce: true}'`` for FusionBench's).
  FusionBench draws the routers' output weights ``N(0, 0.01²)``, which starts each block near the
  static merge, by an amount that grows with the scale of the block's inputs (unnormalised
  convolution features move it most). Here they start at zero (``output_std: 0``; ``0.01`` for
  FusionBench's): the routed merge starts exactly at task arithmetic, the start it is compared with.
- ``twin-merging``: Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model
  Merging" (NeurIPS 2024), with the reference code's discriminative defaults: the shared merge
  ``θ*`` is task arithmetic (0.29 there, 0.3 here), each expert's exclusive knowledge
  ``θ_k − θ*`` keeps 10 % of each weight matrix's singular vectors (``mask_rate 0.9``,
  ``mask_strategy svd``), and a router (two hidden layers of 2·D with BatchNorm and dropout 0.5)
  learns which task an input belongs to from the shared merge's features, by cross-entropy over
  the task folders (Adam, lr 5e-4); ``θ(x) = θ* + Σ_k softmax(router(x))_k (θ_k − θ*)_compressed``.
  Differences: the reference leaves biases out of both merges (the model of the input's task keeps
  its own: a leak of the task identity), here they are merged and routed like every tensor; the
  reference's router reads the mean of a text model's last hidden states, here the input of the
  task heads (for a text classifier, its pooled features).

The routed model needs its routers at inference, so the export adds ``routing/`` beside the
static merge: the routers, the deltas, and ``adamerge_routing.py``, a torch-only file that installs
the routing into the architecture loaded with the static merge's weights
(:mod:`adamerge.core.routed_weights`). Causal language models are not routed yet. LoRA task
vectors are densified (with a warning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adamerge.methods.learned import LearnedMethod, densified

if TYPE_CHECKING:
    from adamerge.core.task_vectors import TaskVectors

WEMOE = "Tang et al., Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, ICML 2024"
TWIN_MERGING = "Lu et al., Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging, NeurIPS 2024"


@dataclass(frozen=True)
class RoutedMethod(LearnedMethod):
    """A method that trains routers over a fixed static merge (λ stays at ``init``)."""

    def rewrite(self, task_vectors: TaskVectors) -> TaskVectors:
        """Dense task vectors (LoRA factors densified, with a warning): routed layers mix whole weights."""
        return densified(task_vectors)

    def reach(self, steps: int) -> float:
        """Routers are unbounded networks, not λ: no bound to warn about."""
        return math.inf


@dataclass(frozen=True)
class WeightEnsemblingMethod(RoutedMethod):
    """WEMoE (see the module docstring).

    Attributes:
        routed: the blocks to route, a regular expression over module names, or ``auto``.
        router_hidden_layers: each router's depth (0, 1 or 2).
        batch_reduce: one routing per batch while training and evaluating.
        output_std: the std of the routers' initial output weights (FusionBench: 0.01).
    """

    lr: float = 1e-4
    routed: str = "auto"
    router_hidden_layers: int = 2
    batch_reduce: bool = False
    output_std: float = 0.0

    def stage_module(self, stage: int) -> tuple[str, dict[str, Any]]:
        options = {"routed": self.routed, "router_hidden_layers": self.router_hidden_layers, "init": self.init,
                   "batch_reduce": self.batch_reduce, "output_std": self.output_std, "lr": self.lr}  # fmt: skip
        return "adamerge.run.routed_merge:WeightEnsemblingModule", options


@dataclass(frozen=True)
class TwinMergingMethod(RoutedMethod):
    """Twin-Merging (see the module docstring).

    Attributes:
        density: the share of each exclusive weight matrix's rank kept (0.1).
    """

    lr: float = 5e-4
    density: float = 0.1

    def stage_module(self, stage: int) -> tuple[str, dict[str, Any]]:
        return "adamerge.run.routed_merge:TaskRouterModule", {"density": self.density, "lr": self.lr}
