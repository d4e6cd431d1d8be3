"""Input-routed weights: layers whose weights are mixed per input, ``W_b = W + Σ_k c_bk Δ_k``.

The shared engine of input-routed merging (WEMoE, Twin-Merging). A *static* merge (the model's own
weights ``W``) is extended, in some of its layers, by per-expert deltas ``Δ_k`` mixed with
per-input coefficients ``c`` of shape ``(B, K)`` that a router computes from the input:

- :class:`RoutedWeights` holds the routers, the deltas and the description of which layers are
  routed; :meth:`RoutedWeights.install` patches those layers of a model so that every forward
  mixes their weights per input; :meth:`RoutedWeights.remove` restores them.
- ``router: blocks`` (WEMoE, Tang et al. 2024): each routed block (a transformer layer's MLP, a
  CNN's residual block) has its own :class:`WeightEnsemblingGate`, applied to the block's input at
  every position (token, pixel) and averaged over the positions; the block's layers then use
  ``θ_0 + Σ_k r_bk τ_k``, written here as the static merge ``θ_0 + Σ_k λ_k τ_k`` plus
  ``Σ_k (r_bk − λ_k) τ_k`` (``offset`` holds λ).
- ``router: model`` (Twin-Merging, Lu et al. 2024): one :class:`TaskRouter` reads the features
  entering the head of the static merge (a first pass through it); ``c = softmax(router)`` mixes
  every routed layer's compressed exclusive knowledge ``Δ_k ≈ θ_k − θ*``.

Supported layers: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (zero padding), ``nn.LayerNorm``,
``nn.BatchNorm1d/2d/3d``, ``nn.GroupNorm``, ``nn.Embedding`` and transformers' ``Conv1D``. Their
weights are mixed per input (a per-sample weight tensor, applied by a batched matmul or a grouped
convolution: one layer's FLOPs per input, whatever K); a low-rank delta ``U_k V_k`` of a linear or
ungrouped convolution is applied as two thin layers instead, without forming the weight.

**This file imports torch only**: exports copy it, as ``adamerge_routing.py``, beside the routing
state, so that a routed merge runs without adamerge::

    import torch, torchvision, adamerge_routing
    model = torchvision.models.mobilenet_v2(num_classes=10)
    model.load_state_dict(torch.load("merged.pt") | torch.load("heads/mnist.pt"))
    adamerge_routing.load("routing", model)  # installs the routing: model(images) is the routed merge
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FORMAT = 1
STATE_FILE = "routing.pt"
CONFIG_FILE = "routing.json"
ROUTERS = ("blocks", "model")
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
SUPPORTED = (nn.Linear, *CONVOLUTIONS, *NORMS, nn.Embedding)


class RoutingError(ValueError):
    """A model, layer or routing state that cannot be routed as asked (one clear line)."""


def layer_kind(module: nn.Module) -> str | None:
    """The routed kind of ``module`` (``linear``, ``conv``, ``norm``, ``embedding``, ``conv1d-t``)
    or ``None`` when its weights cannot be mixed per input here."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CONVOLUTIONS):
        return "conv"
    if isinstance(module, NORMS):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 layer: x @ W + b
        return "conv1d-t"
    return None


class WeightEnsemblingGate(nn.Module):
    """WEMoE's router of one block: ``(..., D) -> (..., K)`` routing weights (FusionBench's
    ``construct_weight_ensembling_gate``, its default depth 2 ``fc2(ReLU(fc1(h)))``).

    FusionBench starts every weight ``N(0, 0.01²)``, the hidden bias at 0 and the output bias at
    ``init``, so that each block starts near the static merge at ``λ = init``; how near depends on
    the scale of the block's inputs. ``output_std`` is the output layer's weight std: 0.01 is
    FusionBench's, 0 starts every block exactly at the static merge, whatever its inputs (the
    output layer still learns from the first step, the hidden one once the output is non-zero).

    Args:
        dim: feature size D of the block's input.
        experts: K.
        hidden_layers: 0 (one learned weight per expert, no input), 1 or 2 (default).
        init: the output bias's start.
        generator: the random generator of the weights.
        output_std: the std of the output layer's initial weights.
    """

    def __init__(
        self,
        dim: int,
        experts: int,
        hidden_layers: int = 2,
        init: float = 0.3,
        generator: torch.Generator | None = None,
        output_std: float = 0.01,
    ) -> None:
        super().__init__()
        if hidden_layers not in (0, 1, 2):
            raise RoutingError(f"router hidden_layers {hidden_layers}: expected 0, 1 or 2")
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            self.weight = nn.Parameter(torch.full((experts,), float(init)))
            return
        if hidden_layers == 2:
            self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, experts)
        with torch.no_grad():
            for layer in (getattr(self, "fc1", None), self.fc2):
                if layer is not None:
                    layer.weight.normal_(0.0, 0.01, generator=generator)
                    layer.bias.zero_()
            self.fc2.weight.normal_(0.0, output_std, generator=generator) if output_std > 0 else self.fc2.weight.zero_()
            self.fc2.bias.fill_(float(init))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_layers == 0:
            return self.weight.expand(*hidden.shape[:-1], -1)
        if self.hidden_layers == 2:
            hidden = F.relu(self.fc1(hidden))
        return self.fc2(hidden)


class TaskRouter(nn.Module):
    """Twin-Merging's router: which task an input belongs to, from the static merge's features.

    ``(N, D) -> (N, K)`` logits: ``Linear(D, 2D) → BatchNorm → LeakyReLU → Dropout(0.5) →
    Linear(2D, 2D) → BatchNorm → LeakyReLU → Dropout(0.5) → Linear(2D, K)``, the reference
    implementation's ``SimpleMLP`` with ``hidden_dim = 2·D``.
    """

    def __init__(self, dim: int, experts: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        hidden = 2 * dim
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            self.layers = nn.Sequential(
                nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(0.5),
                nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(0.5),
                nn.Linear(hidden, experts),
            )  # fmt: skip

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features.to(self.layers[0].weight.dtype))


def pooled(features: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """``(B, ..., D)`` (or ``(B, D, ...)`` when ``channels_first``) as ``(B, P, D)``: every position's features."""
    if features.dim() == 2:
        return features.unsqueeze(1)
    if channels_first:
        return features.flatten(2).transpose(1, 2)  # (B, D, *spatial) -> (B, P, D)
    return features.reshape(features.shape[0], -1, features.shape[-1])


class RoutedWeights(nn.Module):
    """Routers and per-expert deltas of a model's routed layers (see the module docstring).

    Args:
        config: the routing's description: ``router`` (``blocks`` or ``model``), ``experts`` (K),
            ``leaves`` (``{layer name: {"block": i, "kind": ..., "deltas": {param: "dense" |
            "low-rank"}}}``), ``blocks`` (``[{"name", "dim", "channels_first"}]``), ``offset``
            (``(K,)`` subtracted from the router's weights: the static merge's λ), ``head``
            (the head module, ``router: model``), ``batch_reduce`` (one routing per batch),
            ``router_hidden_layers``, ``init``, ``softmax``.
        deltas: ``{"<layer>.<param>": (K, *S)}`` dense deltas and ``{"<layer>.<param>.U": (K, m, r),
            "<layer>.<param>.V": (K, r, n)}`` low-rank ones.
        seed: seed of the routers' initial weights.
        lookup: where the deltas named in ``config["looked_up"]`` are read at every use instead of
            being stored here (a merged model's own task vectors: one copy on any device).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        deltas: Mapping[str, torch.Tensor],
        seed: int = 0,
        lookup: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if config.get("router") not in ROUTERS:
            raise RoutingError(f"routing config: router {config.get('router')!r}, expected one of {', '.join(ROUTERS)}")
        self.config = dict(config)
        self.experts = int(config["experts"])
        self._looked_up = frozenset(config.get("looked_up", ()))
        if self._looked_up and lookup is None:
            raise RoutingError("routing config: deltas are looked up elsewhere ('looked_up') and no lookup was given")
        self._lookup = lookup
        self._keys = {}
        for i, (name, delta) in enumerate(deltas.items()):
            key = f"delta_{i}"
            self.register_buffer(key, delta.detach(), persistent=False)
            self._keys[name] = key
        generator = torch.Generator().manual_seed(seed)
        if config["router"] == "blocks":
            gates = [
                WeightEnsemblingGate(
                    block["dim"],
                    self.experts,
                    config.get("router_hidden_layers", 2),
                    config.get("init", 0.3),
                    generator,
                    config.get("output_std", 0.01),
                )
                for block in config["blocks"]
            ]
            self.routers = nn.ModuleList(gates)
        else:
            self.routers = nn.ModuleList([TaskRouter(config["dim"], self.experts, generator)])
        self.register_buffer("offset", torch.tensor(config.get("offset", [0.0] * self.experts), dtype=torch.float32), persistent=False)
        self._prepass: dict[str, tuple[str, str]] = {}  # BatchNorm layer -> buffers of the static pass's statistics
        self._current: dict[int, torch.Tensor | None] = {}
        self._handles: list[Any] = []
        self._patched: list[tuple[nn.Module, bool, Any]] = []
        self._off = False

    def delta(self, name: str) -> torch.Tensor | None:
        """The stored delta ``name`` (``"<layer>.<param>"``, or with ``.U`` / ``.V``), else ``None``."""
        key = self._keys.get(name)
        if key is not None:
            return getattr(self, key)
        return self._lookup(name) if name in self._looked_up else None

    def set_prepass_statistics(self, statistics: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """The BatchNorm statistics the static pass normalises with, ``{layer: {"running_mean",
        "running_var"}}`` (``router: model``: one set for every task, so that routing needs no task)."""
        for i, (name, stats) in enumerate(statistics.items()):
            keys = (f"prepass_{i}_mean", f"prepass_{i}_var")
            self.register_buffer(keys[0], stats["running_mean"].detach().clone(), persistent=False)
            self.register_buffer(keys[1], stats["running_var"].detach().clone(), persistent=False)
            self._prepass[name] = keys

    def prepass_statistics(self) -> dict[str, dict[str, torch.Tensor]]:
        """What :meth:`set_prepass_statistics` holds."""
        return {name: {"running_mean": getattr(self, m), "running_var": getattr(self, v)} for name, (m, v) in self._prepass.items()}

    def delta_state(self) -> dict[str, torch.Tensor]:
        """``{name: delta}``: every delta, stored or looked up, under its routing name."""
        return {name: getattr(self, key) for name, key in self._keys.items()} | {name: self.delta(name) for name in sorted(self._looked_up)}

    # -- routing ---------------------------------------------------------------------------------
    def coefficients_from_gate(self, block: int, features: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` mixing coefficients of block ``block`` from its input (``router: blocks``)."""
        spec = self.config["blocks"][block]
        gate = self.routers[block]
        weights = gate(pooled(features, spec["channels_first"]).to(_floating(gate))).mean(dim=1)  # (B, P, K) -> (B, K)
        if self.config.get("batch_reduce", False):
            weights = weights.mean(dim=0, keepdim=True).expand_as(weights)
        return weights - self.offset.to(weights.dtype)

    def coefficients_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` mixing coefficients from the static merge's head input (``router: model``):
        the softmax of the router's logits (features of several positions are averaged first)."""
        flat = pooled(features, False).mean(dim=1)  # (B, D)
        logits = self.routers[0](flat)  # (B, K)
        return torch.softmax(logits, dim=-1) if self.config.get("softmax", True) else logits

    def set_model_coefficients(self, coefficients: torch.Tensor | None) -> None:
        """Every routed layer's coefficients (``router: model``), ``(B, K)``; ``None``: the static merge."""
        self._current[0] = coefficients

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Within the block, routed layers run as the static merge. A routed BatchNorm normalises
        with the static pass's own statistics (:meth:`set_prepass_statistics`) where they are set,
        else, in training mode, by the batch's statistics without updating its running ones (the
        static pass of ``router: model`` must not count in the statistics of the routed merge)."""
        previous, self._off = self._off, True
        try:
            yield
        finally:
            self._off = previous

    def route_from_call(self, call: Callable[[], Any], head: nn.Module) -> torch.Tensor:
        """Run ``call`` (the static merge's forward) with routing off, read the input of ``head``
        and set every layer's coefficients from it (``router: model``; the router in eval mode,
        whatever the mode it is trained in); returns them, ``(B, K)``."""
        captured: dict[str, torch.Tensor] = {}
        handle = head.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
        try:
            with self.off(), torch.no_grad():
                call()
        finally:
            handle.remove()
        if "x" not in captured:
            raise RoutingError(f"routing: the head module {self.config.get('head')!r} did not run in the static pass")
        router = self.routers[0]
        training = router.training
        router.eval()  # routing is inference: the router's dropout off, its BatchNorm on running statistics
        try:
            coefficients = self.coefficients_from_features(captured["x"])
        finally:
            router.train(training)
        self.set_model_coefficients(coefficients)
        return coefficients

    # -- installing into a model -----------------------------------------------------------------
    @property
    def installed(self) -> bool:
        """Whether the routing is installed into a model."""
        return bool(self._patched)

    def install(self, model: nn.Module) -> RoutedWeights:
        """Patch ``model``'s routed layers (and, ``router: blocks``, hook its blocks' inputs).

        Raises:
            RoutingError: a routed layer is missing from ``model`` or of an unsupported kind, or
                the routing is installed already.
        """
        if self._patched:
            raise RoutingError("routing is installed already: remove() it first")
        for name, spec in self.config["leaves"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise RoutingError(f"routing: the model has no layer {name!r}") from None
            if layer_kind(module) != spec["kind"]:
                raise RoutingError(f"routing: layer {name!r} is a {type(module).__name__}, the routing expects a {spec['kind']} layer")
            had_own = "forward" in module.__dict__
            self._patched.append((module, had_own, module.__dict__.get("forward")))
            module.forward = functools.partial(self._leaf_forward, module, name, spec, module.forward)
        if self.config["router"] == "blocks":
            for i, block in enumerate(self.config["blocks"]):
                block_module = model.get_submodule(block["name"])
                self._handles.append(block_module.register_forward_pre_hook(functools.partial(self._route_block, i), with_kwargs=True))
        else:
            try:
                head = model.get_submodule(self.config["head"])
            except AttributeError:
                raise RoutingError(f"routing: the model has no head module {self.config['head']!r}") from None
            self._handles.append(model.register_forward_pre_hook(functools.partial(self._route_model, model, head), with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._forget_model_coefficients))
        return self

    def remove(self) -> None:
        """Undo :meth:`install`."""
        for handle in self._handles:
            handle.remove()
        for module, had_own, own in self._patched:
            if had_own:
                module.forward = own
            else:
                del module.forward
        self._handles, self._patched = [], []
        self._current = {}

    def _route_model(self, model: nn.Module, head: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """``router: model``: the static pass (``model.forward``, no hooks) and its head input's routing."""
        if not self._off:
            self.route_from_call(lambda: model.forward(*args, **kwargs), head)

    def _forget_model_coefficients(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.set_model_coefficients(None)

    def _route_block(self, block: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Block ``block``'s routing from its input: the first positional argument, else ``hidden_states``."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise RoutingError(f"routing: block {self.config['blocks'][block]['name']!r} was called without a tensor input")
        self._current[block] = None if self._off else self.coefficients_from_gate(block, hidden)

    def _leaf_forward(
        self, module: nn.Module, name: str, spec: Mapping[str, Any], original: Callable, x: torch.Tensor, *rest: Any, **kw: Any
    ):
        if self._off and isinstance(module, nn.modules.batchnorm._BatchNorm):
            if name in self._prepass:
                mean, var = (getattr(self, key) for key in self._prepass[name])
                return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), module.weight, module.bias, False, 0.0, module.eps)
            if module.training:
                return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)
        coefficients = None if self._off else self._current.get(spec["block"])
        if coefficients is None:
            return original(x, *rest, **kw)
        if x.shape[0] == 1 and coefficients.shape[0] > 1:  # one input shared by the batch (e.g. position ids)
            x = x.expand(coefficients.shape[0], *x.shape[1:])
        if coefficients.shape[0] != x.shape[0]:
            raise RoutingError(
                f"routing: layer {name!r} got a batch of {x.shape[0]} inputs and routing weights for {coefficients.shape[0]} "
                "(routed layers need the batch first)"
            )
        return _routed(self, module, name, spec, x, coefficients)


def _floating(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.float32)


# ------------------------------------------------------------------------------------------------
# the per-input layers


def _mixed(static: torch.Tensor | None, delta: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``static + Σ_k c_bk Δ_k``: ``(*S)`` and ``(K, *S)`` with ``(B, K)`` -> ``(B, *S)``."""
    dtype = static.dtype if static is not None else c.dtype
    mixed = (c.to(dtype) @ delta.to(dtype).reshape(delta.shape[0], -1)).reshape(c.shape[0], *delta.shape[1:])  # (B, *S)
    return mixed if static is None else static.unsqueeze(0) + mixed


def _param(
    routing: RoutedWeights, module: nn.Module, name: str, param: str, c: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(per-input (B, *S) tensor or None, its static value)`` of one parameter of a routed layer."""
    static = getattr(module, param, None)
    delta = routing.delta(f"{name}.{param}")
    if delta is None or static is None:
        return None, static
    return _mixed(static, delta, c), static


def _low_rank(routing: RoutedWeights, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    u, v = routing.delta(f"{name}.weight.U"), routing.delta(f"{name}.weight.V")
    return None if u is None else (u, v)


def _per_input_bias(out: torch.Tensor, bias: torch.Tensor | None, per_input: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """``out`` plus the (per-input ``(B, C)`` or static ``(C,)``) bias along ``channel_dim``."""
    if per_input is not None:
        shape = [out.shape[0]] + [1] * (out.dim() - 1)
        shape[channel_dim] = out.shape[channel_dim]
        return out + per_input.to(out.dtype).reshape(shape)
    if bias is not None:
        shape = [1] * out.dim()
        shape[channel_dim] = out.shape[channel_dim]
        return out + bias.to(out.dtype).reshape(shape)
    return out


def _routed(
    routing: RoutedWeights, module: nn.Module, name: str, spec: Mapping[str, Any], x: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    kind = spec["kind"]
    if kind == "linear":
        return _routed_linear(routing, module, name, x, c, transposed=False)
    if kind == "conv1d-t":
        return _routed_linear(routing, module, name, x, c, transposed=True)
    if kind == "conv":
        return _routed_conv(routing, module, name, x, c)
    if kind == "norm":
        return _routed_norm(routing, module, name, x, c)
    return _routed_embedding(routing, module, name, x, c)


def _routed_linear(
    routing: RoutedWeights, module: nn.Module, name: str, x: torch.Tensor, c: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """``nn.Linear`` (weight ``(out, in)``) or ``Conv1D`` (``transposed``: weight ``(in, out)``) per input."""
    batch = x.shape[0]
    flat = x.reshape(batch, -1, x.shape[-1])  # (B, T, in)
    weight = module.weight.t() if transposed else module.weight  # (out, in) static
    factors = _low_rank(routing, name)
    per_input = None if factors is not None else routing.delta(f"{name}.weight")
    if per_input is not None:
        delta = per_input.transpose(1, 2) if transposed else per_input  # (K, out, in)
        mixed = _mixed(weight, delta, c)  # (B, out, in)
        out = torch.bmm(flat, mixed.transpose(1, 2).to(flat.dtype))  # (B, T, out)
    else:
        out = F.linear(flat, weight.to(flat.dtype))  # (B, T, out)
        if factors is not None:
            u, v = factors  # (K, out, r), (K, r, in)
            k, _, r = u.shape
            thin = flat @ v.to(flat.dtype).reshape(k * r, -1).t()  # (B, T, K·r)
            thin = thin * c.to(flat.dtype).repeat_interleave(r, dim=1).unsqueeze(1)  # scaled per input and expert
            out = out + thin @ u.to(flat.dtype).permute(0, 2, 1).reshape(k * r, -1)  # (B, T, out)
    bias, static_bias = _param(routing, module, name, "bias", c)
    out = _per_input_bias(out, static_bias, bias, channel_dim=2)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _routed_conv(routing: RoutedWeights, module: nn.Module, name: str, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``nn.Conv{1,2,3}d`` per input: a grouped convolution over the batch, or two thin
    convolutions for a low-rank delta."""
    if module.padding_mode != "zeros":
        raise RoutingError(f"routing: convolution {name!r} pads with {module.padding_mode!r}; routed convolutions pad with zeros")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.dim() - 2]
    batch, groups = x.shape[0], module.groups
    factors = _low_rank(routing, name)
    delta = None if factors is not None else routing.delta(f"{name}.weight")
    options = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
    if delta is not None:
        mixed = _mixed(module.weight, delta, c)  # (B, out, in/g, *k)
        folded = x.reshape(1, batch * x.shape[1], *x.shape[2:])  # (1, B·C, *spatial)
        out = conv(folded, mixed.reshape(-1, *mixed.shape[2:]).to(x.dtype), groups=batch * groups, **options)
        out = out.reshape(batch, -1, *out.shape[2:])  # (B, out, *spatial')
    else:
        out = conv(x, module.weight.to(x.dtype), groups=groups, **options)
        if factors is not None:
            u, v = factors  # (K, out, r), (K, r, in·k…)
            k, _, r = u.shape
            thin = conv(x, v.to(x.dtype).reshape(k * r, *module.weight.shape[1:]), **options)  # (B, K·r, *spatial')
            scale = c.to(x.dtype).repeat_interleave(r, dim=1).reshape(batch, k * r, *([1] * (x.dim() - 2)))
            up = u.to(x.dtype).permute(1, 0, 2).reshape(u.shape[1], k * r)  # (out, K·r)
            out = out + torch.einsum("bj...,oj->bo...", thin * scale, up)
    bias, static_bias = _param(routing, module, name, "bias", c)
    return _per_input_bias(out, static_bias, bias, channel_dim=1)


def _routed_norm(routing: RoutedWeights, module: nn.Module, name: str, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """LayerNorm, GroupNorm, BatchNorm: normalised as the layer would, then a per-input affine."""
    if isinstance(module, nn.LayerNorm):
        normalised = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        dims = len(module.normalized_shape)
        weight, static_weight = _param(routing, module, name, "weight", c)
        bias, static_bias = _param(routing, module, name, "bias", c)
        shape = [x.shape[0]] + [1] * (x.dim() - 1 - dims) + list(module.normalized_shape)
        scale = weight.reshape(shape) if weight is not None else static_weight
        shift = bias.reshape(shape) if bias is not None else static_bias
        out = normalised if scale is None else normalised * scale.to(x.dtype)
        return out if shift is None else out + shift.to(x.dtype)
    if isinstance(module, nn.GroupNorm):
        normalised = F.group_norm(x, module.num_groups, None, None, module.eps)
    else:
        normalised = _batch_norm(module, x)
    weight, static_weight = _param(routing, module, name, "weight", c)
    bias, static_bias = _param(routing, module, name, "bias", c)
    out = normalised
    if weight is not None or static_weight is not None:
        shape = [x.shape[0] if weight is not None else 1, x.shape[1]] + [1] * (x.dim() - 2)
        out = out * (weight if weight is not None else static_weight).to(x.dtype).reshape(shape)
    return _per_input_bias(out, static_bias, bias, channel_dim=1)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``module``'s normalisation without its affine, with its own running-statistics logic
    (``torch.nn.modules.batchnorm._BatchNorm.forward``)."""
    factor = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
    training = module.training or (module.running_mean is None and module.running_var is None)
    track = not module.training or module.track_running_stats
    return F.batch_norm(
        x,
        module.running_mean if track else None,
        module.running_var if track else None,
        None,
        None,
        training,
        factor,
        module.eps,
    )


def _routed_embedding(routing: RoutedWeights, module: nn.Embedding, name: str, ids: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """An embedding per input: the static rows plus ``Σ_k c_bk`` of each expert's delta rows."""
    options = {"padding_idx": module.padding_idx, "max_norm": module.max_norm, "norm_type": module.norm_type,
               "scale_grad_by_freq": module.scale_grad_by_freq, "sparse": module.sparse}  # fmt: skip
    out = F.embedding(ids, module.weight, **options)  # (B, ..., D)
    delta = routing.delta(f"{name}.weight")
    if delta is None:
        return out
    k, _, dim = delta.shape
    rows = F.embedding(ids, delta.to(out.dtype).permute(1, 0, 2).reshape(delta.shape[1], k * dim))  # (B, ..., K·D)
    rows = rows.reshape(*ids.shape, k, dim)
    scale = c.to(out.dtype).reshape(ids.shape[0], *([1] * (ids.dim() - 1)), k, 1)
    return out + (rows * scale).sum(dim=-2)


# ------------------------------------------------------------------------------------------------
# the exported form


def save(routing: RoutedWeights, directory: Path | str) -> list[str]:
    """Write ``routing.json`` (the config) and ``routing.pt`` (router weights and deltas) into
    ``directory``, plus this file as ``adamerge_routing.py``; the names written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"routers": {k: v.detach().cpu() for k, v in routing.routers.state_dict().items()},
             "deltas": {k: v.detach().cpu() for k, v in routing.delta_state().items()},
             "prepass": {k: {s: t.detach().cpu() for s, t in v.items()} for k, v in routing.prepass_statistics().items()}}  # fmt: skip
    torch.save(state, directory / STATE_FILE)
    config = {key: value for key, value in routing.config.items() if key != "looked_up"}  # every delta is in the file
    (directory / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, **config}, indent=1))
    (directory / "adamerge_routing.py").write_text(Path(__file__).read_text())
    return [CONFIG_FILE, STATE_FILE, "adamerge_routing.py"]


def load(directory: Path | str, model: nn.Module, map_location: str | torch.device = "cpu") -> RoutedWeights:
    """Install into ``model`` (the static merge's weights and a task's head loaded) the routing of a
    ``routing/`` folder that :func:`save` wrote; every forward of ``model`` is then routed. Returns
    the installed routing (``.remove()`` restores the static merge).

    Raises:
        RoutingError: the folder's format is not this file's.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.pop("format", None) != FORMAT:
        raise RoutingError(f"{directory / CONFIG_FILE}: routing format {config.get('format')!r}, expected {FORMAT}")
    state = torch.load(directory / STATE_FILE, map_location=map_location, weights_only=True)
    routing = RoutedWeights(config, state["deltas"])
    routing.routers.load_state_dict(state["routers"])
    routing.set_prepass_statistics(state.get("prepass", {}))
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        routing.to(reference.device)
    return routing.eval().install(model)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors ``U (m, r)``, ``V (r, n)`` of ``delta`` as an ``(m, n)``
    matrix (``U = U_r S_r``, ``V = V_rᵀ``), in ``delta``'s dtype."""
    matrix = delta.reshape(delta.shape[0], -1).to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = max(1, min(rank, s.numel()))
    return (u[:, :rank] * s[:rank]).to(delta.dtype), vh[:rank].to(delta.dtype)


def low_rank_pays(shape: Sequence[int], rank: int) -> bool:
    """Whether rank-``rank`` factors of a ``shape`` weight take fewer numbers than the weight."""
    rows, cols = shape[0], math.prod(shape[1:])
    return rank * (rows + cols) < rows * cols
