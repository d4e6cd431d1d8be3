"""Task-vector rewriting strategies: sparsify, elect a sign, mask, scale by depth.

Every function takes stacked task vectors ``{name: Tensor(K, *shape)}`` (``τ_k = θ_k − θ_0``, K
experts on dim 0; a :class:`~adamerge.core.task_vectors.TaskVectors` store works too) in model order,
and returns new tensors: inputs are never modified in place, random strategies take a ``seed`` or a
``torch.Generator``, and everything runs on whichever device the tensors live on.

The pieces are orthogonal, in the spirit of mergekit, and :mod:`adamerge.rewrite.static_merge` composes them:

- **sparsify** each task's vector — :func:`magnitude_trim` (TIES trim, keep the top ``density``),
  :func:`dare` (random drop and rescale), :func:`breadcrumbs` (drop the largest outliers and the
  smallest entries);
- **elect a sign** per entry — :func:`elect_sign`, then keep only agreeing entries with
  :func:`sign_agreement_mask`; :func:`ties` chains trim + elect + agree (the AdaMerging++
  preprocessor);
- **mask** by task localisation — :func:`tall_masks`, :func:`consensus_mask`, :func:`consensus`;
- **scale by depth** — :func:`lines_scaling`, :func:`apply_lines`, :func:`lines_alpha` (LiNeS).

Two layers: *tensor kernels* (``*_tensor`` functions, one stacked tensor ``(K, *shape)`` at a time)
and the model-level functions that loop over the tensors in order. Statistics that need the whole
model (per-task magnitude thresholds) are computed once, one task at a time, so no second K×P copy
of the model is ever built besides the result.

Thresholds keep ties: an entry survives a trim if its magnitude is at least the ``n``-th largest
magnitude, as in the TIES reference code, so slightly more than ``density`` may survive when
magnitudes repeat. How many entries ``n`` a density keeps out of ``P`` follows one of two
conventions (:data:`TrimCount`): ``"ties"``, ``⌊density · P⌋ + 1``, is the TIES reference code's
``topk_values_mask`` (also FusionBench's and AdaMerging++'s), the default of the TIES trim;
``"floor"``, ``max(1, ⌊density · P⌋)``, is mergekit's ``magnitude`` and Breadcrumbs' count.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, Optional, Union

import torch

from adamerge.core.granularity import BLOCK_PATTERN
from adamerge.errors import AdamergeError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LAYER_PATTERN",
    "apply_lines",
    "breadcrumbs",
    "consensus",
    "consensus_mask",
    "dare",
    "elect_sign",
    "kept_count",
    "layer_depths",
    "lines_alpha",
    "lines_scaling",
    "magnitude_trim",
    "magnitude_windows",
    "sign_agreement_mask",
    "tall_masks",
    "ties",
]

TaskVectorMap = Mapping[str, torch.Tensor]
Scope = Literal["model", "tensor"]
SignRule = Literal["sum", "count"]
TrimCount = Literal["ties", "floor"]
LayerOf = Union[Callable[[str], Optional[int]], str, "re.Pattern[str]"]

#: Default LiNeS depth pattern: the integer after a block container name (``blocks.3``,
#: ``layers.3``, ``encoder.layer.3``, ``features.3``, ``resblocks.3``, ``h.3``, ``layer3``).
DEFAULT_LAYER_PATTERN = BLOCK_PATTERN  # LiNeS's depth of a tensor: its block index

_EPS_COUNT = 1e-9  # guards floor(density * n) against 0.29 * 100 == 28.999...


# ----------------------------------------------------------------------------------------------
# validation


def as_items(tv: TaskVectorMap, arg: str = "tv") -> list[tuple[str, torch.Tensor]]:
    """``(name, Tensor(K, *shape))`` pairs in model order, validated.

    Raises:
        AdamergeError: ``tv`` is empty, a value is not a floating tensor with an expert dim, the K
            differ across tensors, or the tensors sit on different devices.
    """
    items = list(tv.items())
    if not items:
        raise AdamergeError(f"{arg} is empty: expected {{tensor name: Tensor(K, *shape)}} with at least one tensor")
    first_name, first = items[0]
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1 or not tensor.is_floating_point():
            what = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise AdamergeError(f"{arg}[{name!r}] must be a floating tensor (K, *shape), got {what}")
        if tensor.shape[0] != first.shape[0]:
            raise AdamergeError(
                f"{arg}: mismatched number of experts K: {first_name!r} stacks {first.shape[0]}, {name!r} stacks {tensor.shape[0]}"
            )
        if tensor.device != first.device:
            raise AdamergeError(f"{arg}: {first_name!r} is on {first.device}, {name!r} on {tensor.device}")
    if first.shape[0] == 0:
        raise AdamergeError(f"{arg} stacks zero experts (K = 0)")
    return items


def check_density(density: float, arg: str = "density") -> float:
    """``density`` as a float in (0, 1], else :class:`AdamergeError` naming ``arg``."""
    if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
        raise AdamergeError(f"{arg} must be in (0, 1] (the fraction of entries kept; 1 keeps all), got {density!r}")
    return float(density)


def check_fraction(value: float, arg: str) -> float:
    """``value`` as a float in [0, 1), else :class:`AdamergeError` naming ``arg``."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise AdamergeError(f"{arg} must be in [0, 1), got {value!r}")
    return float(value)


def _check_scope(scope: str) -> str:
    if scope not in ("model", "tensor"):
        raise AdamergeError(f"scope must be 'model' or 'tensor', got {scope!r}")
    return scope


def _check_rule(rule: str) -> str:
    if rule not in ("sum", "count"):
        raise AdamergeError(f"rule must be 'sum' (sign of Σ_k τ_k, TIES) or 'count' (majority of signs), got {rule!r}")
    return rule


def per_task_values(values: float | Sequence[float], num_tasks: int, arg: str, like: torch.Tensor) -> torch.Tensor:
    """A float or a length-K sequence as a float32 ``(K,)`` tensor on ``like``'s device."""
    if isinstance(values, (int, float)):
        values = [float(values)] * num_tasks
    values = [float(v) for v in values]
    if len(values) != num_tasks:
        raise AdamergeError(f"{arg} has {len(values)} values, expected one per task (K = {num_tasks})")
    return torch.tensor(values, dtype=torch.float32, device=like.device)  # (K,)


def _expand(per_task: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a ``(K,)`` tensor as ``(K, 1, ..., 1)`` to broadcast against ``x`` of shape ``(K, *shape)``."""
    return per_task.view(-1, *([1] * (x.dim() - 1)))


def zeros_like_scalar(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim zero with ``x``'s dtype and device (the "else" branch of ``torch.where``)."""
    return torch.zeros((), dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------
# sparsification: magnitude windows (TIES trim, Breadcrumbs) and DARE


def kept_count(n: int, density: float, count: TrimCount = "floor") -> int:
    """Number of entries a ``density`` keeps out of ``n``, at least one and at most ``n``.

    ``count="floor"``: ``⌊density · n⌋`` (mergekit). ``count="ties"``: ``⌊density · n⌋ + 1``, the
    TIES reference code's ``topk_values_mask``, whose threshold is the ``(n − ⌊density · n⌋)``-th
    smallest magnitude and which keeps every entry at or above it.
    """
    if count not in ("ties", "floor"):
        raise AdamergeError(f"count must be 'ties' or 'floor', got {count!r}")
    floor = math.floor(density * n + _EPS_COUNT)
    return min(n, floor + 1 if count == "ties" else max(1, floor))


def _window_ranks(n: int, density: float, outlier_fraction: float, count: TrimCount) -> tuple[int, int]:
    """Descending ranks (1-based) bounding the kept window: ``(first kept, last kept)``.

    The ``⌊outlier_fraction · n⌋`` largest entries are outliers; the next ``kept_count(n, density)``
    are kept. When both do not fit, fewer outliers are dropped (mergekit's convention), so
    ``density = 1`` keeps every entry.
    """
    n_keep = kept_count(n, density, count)
    n_top = min(math.floor(outlier_fraction * n + _EPS_COUNT), n - n_keep)
    return n_top + 1, n_top + n_keep


def _window_of(magnitudes: torch.Tensor, density: float, outlier_fraction: float, count: TrimCount) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds ``(lo, hi)`` per row of ``magnitudes`` ``(R, n)``: keep ``lo ≤ |τ| ≤ hi``.

    ``hi`` is the magnitude of the first kept rank and ``lo`` of the last, both found exactly with
    ``kthvalue`` (ascending rank ``n − r + 1`` is descending rank ``r``).
    """
    n = magnitudes.shape[-1]
    first, last = _window_ranks(n, density, outlier_fraction, count)
    lo = magnitudes.kthvalue(n - last + 1, dim=-1).values  # (R,)
    hi = magnitudes.kthvalue(n - first + 1, dim=-1).values if first > 1 else magnitudes.amax(dim=-1)  # (R,)
    return lo, hi


def magnitude_windows(
    tv: TaskVectorMap,
    density: float,
    outlier_fraction: float = 0.0,
    scope: Scope = "model",
    count: TrimCount = "floor",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per tensor, the per-task magnitude thresholds ``(lo (K,), hi (K,))`` of a kept window.

    With ``scope="model"`` each task is ranked over the whole model (the concatenation of that
    task's magnitudes, one task at a time: one P-length float32 buffer, never K×P); with
    ``scope="tensor"`` each task is ranked within each tensor.

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        density: fraction of entries kept per task, in (0, 1].
        outlier_fraction: fraction of the largest entries dropped first, in [0, 1).
        scope: ``"model"`` or ``"tensor"``.
        count: how many entries a density keeps (:func:`kept_count`).

    Returns:
        ``{name: (lo, hi)}``, float32 ``(K,)`` each; entry ``τ_k`` is kept iff ``lo_k ≤ |τ_k| ≤ hi_k``.
    """
    items = as_items(tv)
    density = check_density(density)
    outlier_fraction = check_fraction(outlier_fraction, "outlier_fraction")
    if _check_scope(scope) == "tensor":
        windows = {}
        for name, x in items:
            magnitudes = x.detach().reshape(x.shape[0], -1).abs().float()  # (K, n)
            windows[name] = _window_of(magnitudes, density, outlier_fraction, count)
        return windows
    num_tasks = items[0][1].shape[0]
    los, his = [], []
    for k in range(num_tasks):
        magnitudes = torch.cat([x[k].detach().reshape(-1).abs().float() for _, x in items])  # (P,)
        lo, hi = _window_of(magnitudes.unsqueeze(0), density, outlier_fraction, count)  # (1,) each
        los.append(lo)
        his.append(hi)
        del magnitudes
    lo, hi = torch.cat(los), torch.cat(his)  # (K,)
    logger.debug("model-scope magnitude window per task: lo=%s hi=%s", lo.tolist(), hi.tolist())
    return {name: (lo, hi) for name, _ in items}


def window_tensor(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Zero every entry of ``x`` ``(K, *shape)`` whose magnitude lies outside ``[lo_k, hi_k]``."""
    magnitude = x.abs()  # (K, *shape)
    keep = (magnitude >= _expand(lo, x)) & (magnitude <= _expand(hi, x))  # (K, *shape)
    return torch.where(keep, x, zeros_like_scalar(x))


def magnitude_trim(tv: TaskVectorMap, density: float, scope: Scope = "model", count: TrimCount = "ties") -> dict[str, torch.Tensor]:
    """Keep the top-``density`` fraction of ``|τ_k|`` per task, zero the rest (TIES "trim").

    By default the ranking runs over the whole model per task and keeps ``⌊density · P⌋ + 1``
    entries, as the TIES and AdaMerging++ reference code does (``topk_values_mask`` on the
    flattened model); ``scope="tensor", count="floor"`` is mergekit's per-tensor ``magnitude``
    sparsification.

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        density: fraction kept per task, in (0, 1]; 1 returns the input tensors unchanged.
        scope: ``"model"`` (default) or ``"tensor"``.
        count: ``"ties"`` (default) or ``"floor"``, see :func:`kept_count`.

    Returns:
        ``{name: Tensor(K, *shape)}`` in the input dtype.

    Raises:
        AdamergeError: empty ``tv``, K mismatch, density outside (0, 1], unknown scope.
    """
    items = as_items(tv)
    if check_density(density) == 1.0:
        _check_scope(scope)
        return dict(items)
    windows = magnitude_windows(tv, density, 0.0, scope, count)
    return {name: window_tensor(x, *windows[name]) for name, x in items}


def breadcrumbs(
    tv: TaskVectorMap,
    density: float,
    outlier_fraction: float = 0.01,
    scope: Scope = "tensor",
) -> dict[str, torch.Tensor]:
    """Model Breadcrumbs (Davari & Belilovsky, 2023): drop the largest outliers and the small entries.

    Per task and, by default, per tensor (the paper masks layer by layer): the
    ``⌊outlier_fraction · n⌋`` largest magnitudes are dropped, then the next
    ``max(1, ⌊density · n⌋)`` are kept and everything smaller is dropped.

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        density: fraction kept, in (0, 1]; 1 returns the input unchanged (no room for outliers).
        outlier_fraction: fraction of the largest magnitudes dropped, in [0, 1); the paper's
            γ ≈ 0.99 percentile, i.e. about 1 % (mergekit's ``gamma``).
        scope: ``"tensor"`` (default) or ``"model"``.

    Returns:
        ``{name: Tensor(K, *shape)}`` in the input dtype.

    Raises:
        AdamergeError: invalid ``density``, ``outlier_fraction``, ``scope`` or ``tv``.
    """
    items = as_items(tv)
    if check_density(density) == 1.0:
        check_fraction(outlier_fraction, "outlier_fraction")
        _check_scope(scope)
        return dict(items)
    windows = magnitude_windows(tv, density, outlier_fraction, scope)
    return {name: window_tensor(x, *windows[name]) for name, x in items}


def make_generator(seed: int | torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, or ``seed`` itself when it is a generator."""
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AdamergeError(f"seed must be an int or a torch.Generator, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def dare_tensor(x: torch.Tensor, drop_rate: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Drop each entry of ``x`` ``(K, *shape)`` with probability ``drop_rate``; rescale the rest."""
    if drop_rate == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= drop_rate  # (K, *shape), P = 1 − p
    kept = x / (1.0 - drop_rate) if rescale else x
    return torch.where(keep, kept, zeros_like_scalar(x))


def dare(
    tv: TaskVectorMap,
    drop_rate: float,
    seed: int | torch.Generator = 0,
    rescale: bool = True,
) -> dict[str, torch.Tensor]:
    """DARE (Yu et al., 2024): drop each entry with probability ``p``, rescale survivors by 1/(1 − p).

    ``E[dare(τ)] = τ`` entry-wise when ``rescale`` is on. Draws are made tensor by tensor in model
    order from one generator, so a seed fixes the result on a given device (CPU and CUDA draw
    different streams).

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        drop_rate: ``p`` in [0, 1); 0 returns the input unchanged.
        seed: an int, or a ``torch.Generator`` on the tensors' device (advanced in place).
        rescale: multiply survivors by ``1 / (1 − p)``.

    Returns:
        ``{name: Tensor(K, *shape)}`` in the input dtype.

    Raises:
        AdamergeError: ``drop_rate`` outside [0, 1), a bad ``seed`` or ``tv``.
    """
    items = as_items(tv)
    drop_rate = check_fraction(drop_rate, "drop_rate")
    generator = make_generator(seed, items[0][1].device)
    return {name: dare_tensor(x, drop_rate, generator, rescale) for name, x in items}


# ----------------------------------------------------------------------------------------------
# sign election (TIES)


def elect_sign_tensor(x: torch.Tensor, rule: SignRule = "sum") -> torch.Tensor:
    """Elected sign ``(*shape)`` of ``x`` ``(K, *shape)``, values in {−1, 0, +1}, in ``x``'s dtype.

    ``"sum"``: ``sign(Σ_k τ_k)`` — the side with the larger total mass (TIES). ``"count"``: the sign
    most tasks share, ties broken by the mass. An entry whose rule gives 0 elects 0 and keeps no
    task (where the masses cancel exactly a plain sum would be 0 there too); the TIES reference
    code instead fills such entries with the model-wide majority sign.
    """
    mass = torch.sign(x.sum(dim=0, dtype=torch.float32))  # (*shape)
    if rule == "count":
        votes = torch.sign(torch.sign(x).sum(dim=0, dtype=torch.float32))  # (*shape)
        mass = torch.where(votes != 0, votes, mass)
    return mass.to(x.dtype)


def agreement_tensor(x: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """Bool ``(K, *shape)``: ``τ_k`` is nonzero and has the elected sign."""
    return (torch.sign(x) == elected.to(x.dtype)) & (elected != 0)  # (K, *shape)


def elect_sign(tv: TaskVectorMap, rule: SignRule = "sum") -> dict[str, torch.Tensor]:
    """Elected sign per entry, ``{name: Tensor(*shape)}`` with values in {−1, 0, +1}.

    Args:
        tv: ``{name: Tensor(K, *shape)}``, usually already trimmed.
        rule: ``"sum"`` (sign of ``Σ_k τ_k``, TIES; mergekit's ``consensus_method: sum``) or
            ``"count"`` (majority of the signs, ties broken by the sum).

    Raises:
        AdamergeError: unknown ``rule`` or invalid ``tv``.
    """
    items = as_items(tv)
    rule = _check_rule(rule)
    return {name: elect_sign_tensor(x, rule) for name, x in items}


def sign_agreement_mask(tv: TaskVectorMap, elected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool ``{name: Tensor(K, *shape)}``: entries of each task that agree with the elected sign.

    Zeros never agree, nor does anything where the elected sign is 0.

    Raises:
        AdamergeError: ``elected`` lacks a tensor of ``tv`` or has another shape.
    """
    items = as_items(tv)
    masks = {}
    for name, x in items:
        if name not in elected:
            raise AdamergeError(f"elected has no sign for tensor {name!r}")
        if tuple(elected[name].shape) != tuple(x.shape[1:]):
            raise AdamergeError(f"elected[{name!r}] has shape {tuple(elected[name].shape)}, expected {tuple(x.shape[1:])}")
        masks[name] = agreement_tensor(x, elected[name])
    return masks


def ties(
    tv: TaskVectorMap,
    density: float = 0.2,
    rule: SignRule = "sum",
    scope: Scope = "model",
    count: TrimCount = "ties",
) -> dict[str, torch.Tensor]:
    """TIES preprocessing (Yadav et al., 2023): trim, elect the sign, keep the agreeing entries.

    Returns the per-task vectors, trimmed to the top ``density`` of each task's magnitudes and
    zeroed wherever they disagree with the elected sign: the AdaMerging++ preprocessor. Summing
    them over tasks is TIES' disjoint sum; dividing by the number of surviving tasks per entry is
    its disjoint mean (see :class:`adamerge.rewrite.static_merge.StaticMerge`).

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        density: fraction kept per task (TIES ``k = 20 %``), in (0, 1].
        rule: sign election rule, ``"sum"`` (TIES) or ``"count"``.
        scope: trim ranking over the ``"model"`` (TIES) or per ``"tensor"``.
        count: entries kept per density, ``"ties"`` (the reference's) or ``"floor"``.

    Returns:
        ``{name: Tensor(K, *shape)}`` in the input dtype.
    """
    rule = _check_rule(rule)
    trimmed = magnitude_trim(tv, density, scope, count)
    result = {}
    for name, x in trimmed.items():
        keep = agreement_tensor(x, elect_sign_tensor(x, rule))  # (K, *shape)
        result[name] = torch.where(keep, x, zeros_like_scalar(x))
    return result


# ----------------------------------------------------------------------------------------------
# TALL masks and Consensus (Wang et al., 2024, "Localizing Task Information for Improved Model
# Merging and Compression")


def tall_mask_tensor(x: torch.Tensor, lambdas: torch.Tensor, merged: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``(K, *shape)``: ``|τ_t| > λ_t · |τ_MTL − τ_t|`` with ``τ_MTL = Σ_k τ_k`` by default."""
    xf = x.float()  # (K, *shape)
    multi = xf.sum(dim=0) if merged is None else merged.float()  # (*shape)
    return xf.abs() > _expand(lambdas, xf) * (multi - xf).abs()  # (K, *shape)


def _merged_for(merged: Mapping[str, torch.Tensor] | None, name: str, x: torch.Tensor) -> torch.Tensor | None:
    if merged is None:
        return None
    if name not in merged:
        raise AdamergeError(f"merged has no tensor {name!r}")
    if tuple(merged[name].shape) != tuple(x.shape[1:]):
        raise AdamergeError(f"merged[{name!r}] has shape {tuple(merged[name].shape)}, expected {tuple(x.shape[1:])}")
    return merged[name]


def tall_masks(
    tv: TaskVectorMap,
    lambdas: float | Sequence[float] = 0.4,
    merged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """TALL masks: per task, the entries where the multi-task vector serves that task.

    ``m_t = |τ_t| > λ_t · |τ_MTL − τ_t|`` (strict, as in the reference code
    ``nik-dim/tall_masks``: a zero ``τ_t`` entry is never active). The paper picks ``λ_t`` per task
    on validation data from {0.2, …, 0.6}; without validation data 0.4, the middle of that grid, is
    the default (FusionBench's ``tall_mask_lambda`` defaults to 0.6).

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        lambdas: one λ for every task or one per task.
        merged: the multi-task vector ``{name: Tensor(*shape)}``; default ``Σ_k τ_k`` (task
            arithmetic with λ = 1, as in the paper); pass a TIES merge to build TIES-based masks.

    Returns:
        Bool ``{name: Tensor(K, *shape)}``.
    """
    items = as_items(tv)
    lam = per_task_values(lambdas, items[0][1].shape[0], "lambdas", items[0][1])  # (K,)
    return {name: tall_mask_tensor(x, lam, _merged_for(merged, name, x)) for name, x in items}


def check_min_agreement(min_agreement: int) -> int:
    """``min_agreement`` as an int ≥ 0, else :class:`AdamergeError`."""
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, int) or min_agreement < 0:
        raise AdamergeError(f"min_agreement must be an int ≥ 0 (number of tasks), got {min_agreement!r}")
    return min_agreement


def consensus_mask(
    tv: TaskVectorMap,
    min_agreement: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    merged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Bool ``{name: Tensor(*shape)}``: entries whose TALL masks are active in ≥ ``min_agreement`` tasks.

    ``min_agreement = 2`` (the paper's default) removes "catastrophic" weights (active in no task)
    and "selfish" ones (active in one); 0 keeps everything; more than K keeps nothing.
    """
    min_agreement = check_min_agreement(min_agreement)
    masks = tall_masks(tv, lambdas, merged)
    return {name: m.sum(dim=0) >= min_agreement for name, m in masks.items()}  # (*shape)


def consensus(
    tv: TaskVectorMap,
    min_agreement: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    merged: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Consensus merging's preprocessor: zero, in every task, the entries fewer than k tasks use.

    Summing the result over tasks equals the paper's ``consensus_mask ⊙ Σ_k τ_k``.

    Args:
        tv: ``{name: Tensor(K, *shape)}``.
        min_agreement: k, the least number of tasks whose TALL mask must be active.
        lambdas: TALL-mask λ, one for all tasks or one per task.
        merged: multi-task vector for the TALL masks (default ``Σ_k τ_k``).

    Returns:
        ``{name: Tensor(K, *shape)}`` in the input dtype.
    """
    items = as_items(tv)
    masks = consensus_mask(tv, min_agreement, lambdas, merged)
    return {name: torch.where(masks[name], x, zeros_like_scalar(x)) for name, x in items}


# ----------------------------------------------------------------------------------------------
# LiNeS (Wang et al., 2024, "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances
# Model Merging")


def _layer_function(layer_of: LayerOf | None) -> Callable[[str], int | None]:
    if callable(layer_of) and not isinstance(layer_of, re.Pattern):
        return layer_of
    pattern = re.compile(DEFAULT_LAYER_PATTERN if layer_of is None else layer_of)
    if pattern.groups < 1:
        raise AdamergeError(f"layer_of pattern {pattern.pattern!r} needs a capturing group for the layer index")

    def parse(name: str) -> int | None:
        match = pattern.search(name)
        return None if match is None else int(match.group(1))

    return parse


def layer_depths(
    names: Sequence[str],
    num_layers: int | None = None,
    layer_of: LayerOf | None = None,
    unindexed: Literal["position", "first"] = "position",
) -> tuple[dict[str, int], int]:
    """Depth ``ℓ`` of each tensor and the number of layers ``L``.

    Indexed tensors take their parsed index. With ``unindexed="position"`` (default) the others
    take their place in model order: before the first block (embeddings, stem) ``ℓ = 0``, after
    the last (final norm, projection, head) ``ℓ = L − 1``, between blocks the depth of the block
    before them. ``unindexed="first"`` gives every unindexed tensor ``ℓ = 0``, as the LiNeS
    reference code does (its non-block parameters get the minimum scale α).

    Args:
        names: tensor names in model order.
        num_layers: ``L``; default ``1 + the largest parsed index``.
        layer_of: ``name -> index or None``, or a regex whose first group is the index; default
            :data:`DEFAULT_LAYER_PATTERN`.
        unindexed: rule for tensors without an index.

    Raises:
        AdamergeError: no name carries an index, an index is ≥ ``num_layers``, bad arguments.
    """
    if unindexed not in ("position", "first"):
        raise AdamergeError(f"unindexed must be 'position' or 'first', got {unindexed!r}")
    parse = _layer_function(layer_of)
    parsed = [parse(name) for name in names]
    indices = [i for i in parsed if i is not None]
    if not indices:
        shown = list(names)[:4]
        raise AdamergeError(
            f"no tensor name carries a layer index (pattern {layer_of or DEFAULT_LAYER_PATTERN!r}; "
            f"names e.g. {shown}); pass layer_of (a regex with one group or a callable)"
        )
    depth_count = max(indices) + 1 if num_layers is None else num_layers
    if isinstance(depth_count, bool) or not isinstance(depth_count, int) or depth_count < 1:
        raise AdamergeError(f"num_layers must be a positive int, got {num_layers!r}")
    if max(indices) >= depth_count or min(indices) < 0:
        raise AdamergeError(f"layer indices span {min(indices)}..{max(indices)}, outside 0..{depth_count - 1} (num_layers)")
    last_indexed = max(i for i, index in enumerate(parsed) if index is not None)
    depths, previous = {}, None
    for position, (name, index) in enumerate(zip(names, parsed)):
        if index is not None:
            depth = previous = index
        elif unindexed == "first" or previous is None:
            depth = 0
        elif position > last_indexed:
            depth = depth_count - 1
        else:
            depth = previous
        depths[name] = depth
    return depths, depth_count


def lines_scaling(
    names: Sequence[str],
    alpha: float,
    beta: float,
    num_layers: int | None = None,
    layer_of: LayerOf | None = None,
    unindexed: Literal["position", "first"] = "position",
) -> dict[str, float]:
    """LiNeS scale per tensor: ``α + β · ℓ / (L − 1)`` (``α`` everywhere when ``L = 1``).

    Shallow layers keep little of the (merged) task vector — they hold general features — and the
    deepest keep ``α + β``. See :func:`layer_depths` for how ``ℓ`` and ``L`` are found.

    Args:
        names: tensor names in model order.
        alpha: scale of the shallowest layer.
        beta: extra scale of the deepest layer over the shallowest.
        num_layers, layer_of, unindexed: see :func:`layer_depths`.

    Returns:
        ``{name: scale}`` in the order of ``names``.
    """
    depths, depth_count = layer_depths(names, num_layers, layer_of, unindexed)
    span = max(depth_count - 1, 1)
    return {name: float(alpha) + float(beta) * depth / span for name, depth in depths.items()}


def apply_lines(
    tv_or_delta: Mapping[str, torch.Tensor],
    alpha: float,
    beta: float,
    num_layers: int | None = None,
    layer_of: LayerOf | None = None,
    unindexed: Literal["position", "first"] = "position",
) -> dict[str, torch.Tensor]:
    """Scale every tensor by its LiNeS factor (stacked ``(K, *shape)`` or merged ``(*shape)`` alike).

    The paper applies it to the merged multi-task vector, ``θ = θ_0 + λ(ℓ) ⊙ τ_MTL``, in place of
    the single task-arithmetic coefficient.

    Returns:
        ``{name: scaled tensor}`` in the input dtype.
    """
    items = list(tv_or_delta.items())
    if not items:
        raise AdamergeError("tv_or_delta is empty")
    scales = lines_scaling([name for name, _ in items], alpha, beta, num_layers, layer_of, unindexed)
    return {name: x * scales[name] for name, x in items}


def lines_alpha(tv: TaskVectorMap, merged: Mapping[str, torch.Tensor]) -> float:
    """The LiNeS reference code's ``α`` for multi-task merging: ``‖Σ_k τ_k‖₁ / (K · ‖τ_MTL‖₁)``.

    ``merged`` is the multi-task vector before any scaling (for task arithmetic ``Σ_k τ_k``, which
    gives ``α = 1/K``; for TIES or Consensus the ratio corrects for their smaller norm).
    """
    items = as_items(tv)
    summed = sum(float(x.sum(dim=0, dtype=torch.float32).abs().sum()) for _, x in items)
    merged_norm = sum(float(_merged_for(merged, name, x).float().abs().sum()) for name, x in items)
    if merged_norm == 0.0:
        raise AdamergeError("merged is all zeros: LiNeS α = ‖Σ τ‖₁ / (K‖τ_MTL‖₁) is undefined")
    return summed / (items[0][1].shape[0] * merged_norm)
