"""Which layers of a merged model are routed per input, and with which deltas: the
:class:`~adamerge.core.routed_weights.RoutedWeights` of WEMoE and of Twin-Merging, built from a
:class:`~adamerge.core.merged_model.MergedModel` at its start.

- :func:`weight_ensembling` (WEMoE): one router per block; each block's layers mix the experts'
  task vectors ``τ_k`` (the merged model's own buffers, not copied) around the static merge.
- :func:`twin_vectors` (Twin-Merging): one router for the model; every supported layer mixes each
  expert's exclusive knowledge ``θ_k − θ*`` over the static merge ``θ*``, its weight matrices
  compressed to their top singular vectors.

Blocks (:func:`routed_blocks`): ``routed`` names them by a regular expression; ``auto`` takes
every repeated block of the model (the items of a ``ModuleList`` of layers, else of the outermost
``nn.Sequential`` stacks, as a CNN's residual blocks), and within a transformer layer its MLP
(a child named ``mlp``, ``feed_forward``, ``ffn`` or ``mlp_block``), as WEMoE routes the MLPs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adamerge.core.block_checkpointing import repeated_blocks
from adamerge.core.merged_model import MergedModel
from adamerge.core.routed_weights import RoutedWeights, layer_kind, low_rank_pays, svd_factors
from adamerge.core.task_vectors import FactoredDelta
from adamerge.errors import AdamergeError

logger = logging.getLogger(__name__)

MLP_CHILDREN = ("mlp", "feed_forward", "ffn", "mlp_block")


def routed_blocks(model: nn.Module, routed: str = "auto") -> list[str]:
    """Names of the blocks whose layers are routed (see the module docstring).

    Raises:
        AdamergeError: no module matches ``routed``, or ``auto`` finds no repeated blocks.
    """
    names = {id(module): name for name, module in model.named_modules()}
    if routed != "auto":
        try:
            pattern = re.compile(routed)
        except re.error as error:
            raise AdamergeError(f"routed {routed!r}: not a regular expression ({error})") from None
        found = [name for name, _ in model.named_modules() if name and pattern.fullmatch(name)]
        if not found:
            raise AdamergeError(f"routed {routed!r}: no module of {type(model).__name__} has a matching name")
        return _outermost(found)
    blocks = repeated_blocks(model) or _sequential_blocks(model)
    if not blocks:
        raise AdamergeError(
            f"routed auto: {type(model).__name__} has no repeated blocks (a ModuleList of layers or a Sequential "
            "stack); name the blocks to route with --options '{routed: REGEX}'"
        )
    chosen = []
    for block in blocks:
        mlp = next((getattr(block, child) for child in MLP_CHILDREN if isinstance(getattr(block, child, None), nn.Module)), None)
        chosen.append(names[id(mlp if mlp is not None else block)])
    return chosen


def _sequential_blocks(model: nn.Module) -> list[nn.Module]:
    """The children (with parameters) of the outermost ``nn.Sequential`` modules that hold at
    least two such children: a CNN's stages or residual blocks."""
    blocks, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, nn.Sequential):
            children = [child for child in module if any(True for _ in child.parameters())]
            if len(children) >= 2:
                blocks.extend(children)
                inside.append(name)
    return blocks


def _outermost(names: list[str]) -> list[str]:
    return [n for n in names if not any(n.startswith(other + ".") for other in names if other != n)]


def _dense_task_vectors(merged: MergedModel, method: str) -> dict[str, torch.Tensor]:
    """``{name: (K, *S)}`` of the merged tensors, in entry order.

    Raises:
        AdamergeError: a task vector holds LoRA factors or is stored permuted (random partitions).
    """
    if merged.partitions.names:
        raise AdamergeError(f"{method}: routes whole tensors; a random-partition granularity does not apply (drop --granularity)")
    vectors = {}
    for name, tv in merged.task_vectors.parts():
        if isinstance(tv, FactoredDelta):
            raise AdamergeError(f"{method}: tensor {name!r} holds LoRA factors; the method densifies them (drop --start-from)")
        vectors[name] = tv
    return vectors


def _leaves(model: nn.Module, prefixes: list[str], merged_names: set[str]) -> dict[str, tuple[int, nn.Module, list[str]]]:
    """``{layer name: (block index, module, [its merged parameters])}`` inside the ``prefixes``
    (``""``: the whole model) whose weights can be routed."""
    found = {}
    for block, prefix in enumerate(prefixes):
        root = model.get_submodule(prefix)
        for name, module in root.named_modules():
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            params = [f"{full}.{p}" if full else p for p, _ in module.named_parameters(recurse=False)]
            params = [p for p in params if p in merged_names]
            if params and layer_kind(module) is not None and full not in found:
                found[full] = (block, module, params)
    return found


def _unrouted(model: nn.Module, prefixes: list[str], merged_names: set[str], routed: set[str], method: str) -> None:
    """Log the merged tensors inside the routed blocks that stay at the static merge."""
    inside = [n for n in merged_names if any(n.startswith(p + ".") or not p for p in prefixes) and n not in routed]
    if inside:
        logger.info("%s: %d merged tensors in routed blocks stay at the static merge (their layers are not routable: %s)",
                    method, len(inside), ", ".join(sorted(inside)[:3]) + (", ..." if len(inside) > 3 else ""))  # fmt: skip


def _feature_size(module: nn.Module) -> int:
    """D of a block's input: the in-features of its first routed layer."""
    for sub in module.modules():
        kind = layer_kind(sub)
        if kind == "linear":
            return sub.in_features
        if kind == "conv":
            return sub.in_channels
        if kind == "conv1d-t":
            return sub.weight.shape[0]
        if kind == "norm":
            return (
                sub.normalized_shape[-1]
                if isinstance(sub, nn.LayerNorm)
                else sub.num_features
                if hasattr(sub, "num_features")
                else sub.num_channels
            )
        if kind == "embedding":
            break
    raise AdamergeError(f"a routed block ({type(module).__name__}) has no linear, convolution or normalisation layer to size its router by")


def weight_ensembling(
    merged: MergedModel,
    routed: str = "auto",
    router_hidden_layers: int = 2,
    init: float = 0.3,
    batch_reduce: bool = False,
    seed: int = 0,
    output_std: float = 0.0,
) -> RoutedWeights:
    """WEMoE's routing of ``merged`` (its λ at ``init`` everywhere: the static merge).

    Args:
        merged: the merged model at task arithmetic's λ = ``init``.
        routed: the blocks to route (see :func:`routed_blocks`).
        router_hidden_layers: depth of each block's :class:`~adamerge.core.routed_weights.WeightEnsemblingGate`.
        init: the gates' output bias (the static merge's λ: the routed merge starts there).
        batch_reduce: one routing per batch (the mean over its inputs) instead of one per input.
        seed: seed of the gates' weights.
        output_std: the std of the gates' initial output weights (0: every block starts exactly at
            the static merge; FusionBench's 0.01 starts it near, by an amount that grows with
            the scale of the block's inputs).

    Raises:
        AdamergeError: the blocks hold no routable merged tensor, or a task vector is LoRA / permuted.
    """
    vectors = _dense_task_vectors(merged, "wemoe")
    model = merged.model
    blocks = routed_blocks(model, routed)
    leaves = _leaves(model, blocks, set(vectors))
    if not leaves:
        raise AdamergeError(f"wemoe: the routed blocks ({', '.join(blocks[:3])}, ...) hold no merged linear, convolution or norm weights")
    used = sorted({block for block, _, _ in leaves.values()})
    blocks = [blocks[i] for i in used]  # blocks without routable layers get no router
    renumber = {old: new for new, old in enumerate(used)}
    deltas = {param: vectors[param] for _, _, params in leaves.values() for param in params}
    _unrouted(model, blocks, set(vectors), set(deltas), "wemoe")
    config = {
        "router": "blocks",
        "experts": len(merged.tasks),
        "tasks": list(merged.tasks),
        "leaves": {name: {"block": renumber[block], "kind": layer_kind(module)} for name, (block, module, _) in leaves.items()},
        "blocks": [
            {"name": name, "dim": _feature_size(model.get_submodule(name)), "channels_first": _channels_first(model.get_submodule(name))}
            for name in blocks
        ],
        "looked_up": sorted(deltas),
        "offset": [float(init)] * len(merged.tasks),
        "init": float(init),
        "router_hidden_layers": int(router_hidden_layers),
        "batch_reduce": bool(batch_reduce),
        "output_std": float(output_std),
    }
    logger.info("wemoe: %d blocks routed (%d layers, %d tensors)", len(blocks), len(leaves), len(deltas))
    return RoutedWeights(config, {}, seed=seed, lookup=merged.task_vectors.__getitem__)


def _channels_first(module: nn.Module) -> bool:
    """Whether a block's input is ``(B, C, ...)`` (its first routed layer is a convolution or BatchNorm)."""
    for sub in module.modules():
        kind = layer_kind(sub)
        if kind is not None:
            return kind == "conv" or isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
    return False


def twin_vectors(merged: MergedModel, density: float = 0.1, seed: int = 0) -> RoutedWeights:
    """Twin-Merging's routing of ``merged`` (at its start: the shared merge ``θ*``).

    Each expert's exclusive knowledge ``θ_k − θ* = τ_k − (θ* − θ_0)`` of every merged tensor of a
    routable layer is kept dense, except a linear or ungrouped convolution weight, which keeps
    its top ``max(1, ⌊density · min(m, n)⌋)`` singular vectors (the reference's ``svd``
    compression at ``mask_rate = 1 − density``) where the factors are smaller than the matrix.

    Raises:
        AdamergeError: the model has no task heads (the router reads the head's input), or a task
            vector is LoRA / permuted.
    """
    if not 0 < density <= 1:
        raise AdamergeError(f"twin-merging: density {density}, expected a share in (0, 1]")
    head = merged.head_module
    if head is None or not merged.heads.names:
        raise AdamergeError("twin-merging: the router reads the features entering each task's head; these experts have no task heads")
    vectors = _dense_task_vectors(merged, "twin-merging")
    model = merged.model
    leaves = _leaves(model, [""], set(vectors))
    shared = {name: tensor.detach() for name, tensor in merged.merged_tensors().items()}
    base = merged.base_tensors()
    deltas: dict[str, torch.Tensor] = {}
    compressed = 0
    with torch.no_grad():
        for name, (_, module, params) in leaves.items():
            for param in params:
                exclusive = vectors[param].to(shared[param].dtype) + (base[param] - shared[param]).unsqueeze(0)  # (K, *S)
                rank = int(density * min(exclusive.shape[1], exclusive[0].numel() // exclusive.shape[1]))
                matrix = param.endswith(".weight") and _factorable(module)
                if matrix and density < 1 and low_rank_pays(exclusive.shape[1:], max(1, rank)):
                    factors = [svd_factors(e, rank) for e in exclusive]
                    deltas[f"{param}.U"] = torch.stack([u for u, _ in factors]).to(vectors[param].dtype)  # (K, m, r)
                    deltas[f"{param}.V"] = torch.stack([v for _, v in factors]).to(vectors[param].dtype)  # (K, r, n)
                    compressed += 1
                else:
                    deltas[param] = exclusive.to(vectors[param].dtype)
    routed = {p for _, _, params in leaves.values() for p in params}
    _unrouted(model, [""], set(vectors), routed, "twin-merging")
    head_module = model.get_submodule(head)
    dim = head_module.in_features if isinstance(head_module, nn.Linear) else _feature_size(head_module)
    config = {
        "router": "model",
        "experts": len(merged.tasks),
        "tasks": list(merged.tasks),
        "leaves": {name: {"block": 0, "kind": layer_kind(module)} for name, (_, module, _) in leaves.items()},
        "blocks": [{"name": "", "dim": dim, "channels_first": False}],
        "head": head,
        "dim": dim,
        "density": float(density),
        "softmax": True,
    }
    logger.info("twin-merging: %d layers routed, %d weight matrices compressed to %g of their rank", len(leaves), compressed, density)
    return RoutedWeights(config, deltas, seed=seed)


def _factorable(module: nn.Module) -> bool:
    """Whether a routed layer applies a low-rank weight delta as two thin layers."""
    return isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1)


def describe(routing: RoutedWeights) -> Mapping[str, Any]:
    """A summary for ``metrics.json``: router kind, blocks, layers, stored delta numbers."""
    return {
        "router": routing.config["router"],
        "blocks": len(routing.config["blocks"]),
        "layers": len(routing.config["leaves"]),
        "delta_numbers": sum(t.numel() for t in routing.delta_state().values()),
        "router_parameters": sum(p.numel() for p in routing.routers.parameters()),
    }
