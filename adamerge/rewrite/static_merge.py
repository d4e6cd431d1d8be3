"""Static merges as one generalised task-arithmetic merge with orthogonal options.

    θ = θ_0 + merged_delta,    merged_delta = s(ℓ) · AGG_k( λ_k · M_k ⊙ E_k ⊙ S(τ_k) )

applied in that order, tensor by tensor, which is task arithmetic with fixed λ on rewritten task
vectors: ``merged_delta = Σ_k λ_k τ'_k`` (:meth:`StaticMerge.rewrite`, :meth:`StaticMerge.coefficients`):

- ``sparsify`` S: none, ``"magnitude"`` (TIES trim), ``"dare"``, ``"breadcrumbs"``;
- ``sign`` E: none, or keep the entries agreeing with the sign elected (``"sum"``/``"count"``)
  from the sparsified vectors;
- ``mask`` M: none, each task's own ``"tall"`` mask, or the shared ``"consensus"`` mask, both
  computed from the raw task vectors with ``τ_MTL = Σ_k τ_k``;
- ``aggregate`` AGG: ``"sum"``, ``"mean"`` over the K tasks, or ``"disjoint_mean"`` (TIES: mean
  over the tasks whose entry survived);
- ``scale`` λ: one float or one per task;
- ``lines``: ``(α, β)`` LiNeS depth profile ``s(ℓ) = α + β·ℓ/(L−1)`` (α ``None``: the LiNeS
  reference code's ``‖Σ_k τ_k‖₁ / (K‖τ_MTL‖₁)``), which replaces ``scale``; tensors outside the
  blocks (embeddings, final norm, projection, head) get α, as in the reference code
  (``lines_unindexed="position"`` places them by their position instead).

The published methods are presets of :class:`StaticMerge` in :data:`STATIC_METHODS`; run one
with :func:`static_merge`. Tensors are processed one at a time, so apart from the result only
one tensor's K-stacked temporaries are alive at any moment (model-scope magnitude thresholds are
computed first, from one P-length buffer per task).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from adamerge.errors import AdamergeError, check_options
from adamerge.rewrite import operations as pp
from adamerge.rewrite.presets import STATIC_PRESETS

logger = logging.getLogger(__name__)

Sparsify = Literal["magnitude", "dare", "breadcrumbs"]
Aggregate = Literal["sum", "mean", "disjoint_mean"]

_CHOICES = {
    "sparsify": (None, "magnitude", "dare", "breadcrumbs"),
    "sign": (None, "sum", "count"),
    "mask": (None, "tall", "consensus"),
    "aggregate": ("sum", "mean", "disjoint_mean"),
    "scope": (None, "model", "tensor"),
    "trim_count": (None, "ties", "floor"),
    "lines_unindexed": ("first", "position"),
}


@dataclass(frozen=True)
class StaticMerge:
    """A task-arithmetic merge with orthogonal sparsify / sign / mask / aggregate / scale options.

    The defaults are plain task arithmetic with λ = 0.3. Options unused by the chosen strategies
    (e.g. ``drop_rate`` without DARE) are validated but ignored.

    Attributes:
        sparsify: per-task sparsification, ``None``, ``"magnitude"``, ``"dare"`` or ``"breadcrumbs"``.
        density: fraction kept by ``"magnitude"`` and ``"breadcrumbs"``, in (0, 1].
        scope: ranking scope of ``"magnitude"``/``"breadcrumbs"``; ``None`` picks each one's own
            default (magnitude: ``"model"`` as TIES, breadcrumbs: ``"tensor"`` as its paper).
        trim_count: entries a density keeps out of ``P`` (:func:`adamerge.rewrite.operations.kept_count`):
            ``"ties"`` ``⌊density·P⌋ + 1`` (the TIES reference code, FusionBench), ``"floor"``
            ``⌊density·P⌋`` (mergekit); ``None``: ``"ties"`` for magnitude, ``"floor"`` for
            breadcrumbs.
        outlier_fraction: largest magnitudes dropped by ``"breadcrumbs"``, in [0, 1).
        drop_rate: DARE drop probability, in [0, 1).
        rescale: DARE rescales survivors by 1/(1 − drop_rate).
        seed: DARE seed.
        sign: ``None``, or the election rule ``"sum"`` (TIES) or ``"count"``; non-agreeing entries
            are dropped.
        mask: ``None``, ``"tall"`` (each task keeps its own TALL-mask entries) or ``"consensus"``.
        mask_lambdas: TALL-mask λ, one for all tasks or one per task.
        min_agreement: Consensus k (tasks whose TALL mask must be active).
        aggregate: ``"sum"``, ``"mean"`` or ``"disjoint_mean"``.
        scale: λ, a float or one per task (per-task values weight the tasks before aggregation).
        lines: ``(α, β)`` for LiNeS, α ``None`` for the automatic α; ``scale`` must then be 1.
        num_layers: LiNeS ``L`` (default: parsed from the names).
        layer_of: LiNeS depth regex (one group) or callable; default
            :data:`adamerge.rewrite.operations.DEFAULT_LAYER_PATTERN`.
        lines_unindexed: LiNeS depth of tensors outside the blocks: ``"first"`` (α, the reference
            code's rule) or ``"position"`` (before the first block α, after the last α + β).
    """

    sparsify: Sparsify | None = None
    density: float = 0.2
    scope: Literal["model", "tensor"] | None = None
    trim_count: Literal["ties", "floor"] | None = None
    outlier_fraction: float = 0.01
    drop_rate: float = 0.5
    rescale: bool = True
    seed: int = 0
    sign: Literal["sum", "count"] | None = None
    mask: Literal["tall", "consensus"] | None = None
    mask_lambdas: float | tuple[float, ...] = 0.4
    min_agreement: int = 2
    aggregate: Aggregate = "sum"
    scale: float | tuple[float, ...] = 0.3
    lines: tuple[float | None, float] | None = None
    num_layers: int | None = None
    layer_of: str | Callable[[str], int | None] | None = None
    lines_unindexed: Literal["first", "position"] = "first"

    def __post_init__(self) -> None:
        for field, choices in _CHOICES.items():
            if getattr(self, field) not in choices:
                raise AdamergeError(f"{field} must be one of {list(choices)}, got {getattr(self, field)!r}")
        pp.check_density(self.density)
        pp.check_fraction(self.outlier_fraction, "outlier_fraction")
        pp.check_fraction(self.drop_rate, "drop_rate")
        pp.check_min_agreement(self.min_agreement)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise AdamergeError(f"seed must be an int, got {self.seed!r}")
        for field in ("scale", "mask_lambdas"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)):
                object.__setattr__(self, field, tuple(float(v) for v in value))
        self._check_lines()

    def _check_lines(self) -> None:
        if self.lines is None:
            return
        if len(self.lines) != 2:
            raise AdamergeError(f"lines must be (alpha, beta) with alpha None for automatic, got {self.lines!r}")
        object.__setattr__(self, "lines", tuple(self.lines))
        scales = self.scale if isinstance(self.scale, tuple) else (self.scale,)
        if any(s != 1.0 for s in scales):
            raise AdamergeError(f"lines replaces scale with the depth profile α + β·ℓ/(L−1): set scale=1.0, got scale={self.scale!r}")

    # ------------------------------------------------------------------------------------------

    def is_linear(self) -> bool:
        """Whether the merge is ``Σ_k c_k τ_k`` of the unchanged task vectors (average, task arithmetic)."""
        return (
            self.sparsify is None and self.sign is None and self.mask is None and self.lines is None and (self.aggregate != "disjoint_mean")
        )

    def coefficients(self, num_tasks: int, like: torch.Tensor | None = None) -> torch.Tensor:
        """The fixed λ ``(K,)`` of the merge ``θ_0 + Σ_k λ_k τ'_k`` over the rewritten vectors τ'.

        ``scale`` per task, divided by K for ``aggregate="mean"``.
        """
        like = torch.zeros(()) if like is None else like
        weights = pp.per_task_values(self.scale, num_tasks, "scale", like).float()  # (K,)
        return weights / num_tasks if self.aggregate == "mean" else weights

    def rewrite(self, tv: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rewritten task vectors τ' with ``merged_delta = Σ_k λ_k τ'_k`` (λ: :meth:`coefficients`).

        Sparsification, the sign filter and the masks zero entries of each τ_k; the disjoint mean
        divides each entry by the number of tasks that kept it; LiNeS multiplies each tensor by
        its depth scale. So every static merge is task arithmetic, with λ fixed, on its own
        rewritten vectors, and runs through the same :class:`~adamerge.core.merged_model.MergedModel`
        as a learned merge.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order (a ``TaskVectors`` store works too).

        Returns:
            ``{name: Tensor(K, *shape)}`` in model order and the input dtype (computed in float32
            or wider).

        Raises:
            AdamergeError: invalid ``tv``, or per-task ``scale``/``mask_lambdas`` of the wrong length.
        """
        items = pp.as_items(tv)
        first = items[0][1]
        num_tasks = first.shape[0]
        weights = self.coefficients(num_tasks, first)  # (K,)
        lambdas = pp.per_task_values(self.mask_lambdas, num_tasks, "mask_lambdas", first)  # (K,)
        windows = self._windows(tv)
        generator = pp.make_generator(self.seed, first.device) if self.sparsify == "dare" else None
        rewritten, summed_norm, merged_norm = {}, 0.0, 0.0
        for name, x in items:
            y = self._rewrite(name, x, windows, generator, lambdas)  # (K, *shape)
            if self.aggregate == "disjoint_mean":
                wide = torch.promote_types(y.dtype, torch.float32)
                y = y.to(wide) / (y != 0).sum(dim=0).clamp_min(1)  # (K, *shape) / (*shape)
            if self.lines is not None and self.lines[0] is None:
                summed_norm += float(x.sum(dim=0, dtype=torch.float32).abs().sum())
                merged_norm += float(torch.tensordot(weights, y.float(), dims=1).abs().sum())
            rewritten[name] = y
        if self.lines is not None:
            scales = self._lines_scales(list(rewritten), summed_norm, merged_norm, num_tasks)
            rewritten = {name: y * scales[name] for name, y in rewritten.items()}
        return {name: y.to(x.dtype) for (name, y), (_, x) in zip(rewritten.items(), items)}

    def merged_delta(self, tv: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The merged task vector, ``θ = θ_0 + merged_delta = θ_0 + Σ_k λ_k τ'_k``.

        Args:
            tv: ``{name: Tensor(K, *shape)}`` in model order (a ``TaskVectors`` store works too).
            dtype: result dtype; default the task vectors' dtype. Aggregation runs in float32.

        Returns:
            ``{name: Tensor(*shape)}`` in model order.

        Raises:
            AdamergeError: invalid ``tv``, or per-task ``scale``/``mask_lambdas`` of the wrong length.
        """
        items = pp.as_items(tv)
        first = items[0][1]
        weights = self.coefficients(first.shape[0], first).to(first.device)  # (K,)
        out_dtype = first.dtype if dtype is None else dtype
        rewritten = dict(items) if self.is_linear() else self.rewrite(tv)
        return {name: torch.tensordot(weights, y.float(), dims=1).to(out_dtype) for name, y in rewritten.items()}

    def _windows(self, tv: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        if self.sparsify not in ("magnitude", "breadcrumbs") or self.density == 1.0:
            return None
        outliers = self.outlier_fraction if self.sparsify == "breadcrumbs" else 0.0
        scope = self.scope or ("model" if self.sparsify == "magnitude" else "tensor")
        count = self.trim_count or ("ties" if self.sparsify == "magnitude" else "floor")
        return pp.magnitude_windows(tv, self.density, outliers, scope, count)

    def _rewrite(
        self,
        name: str,
        x: torch.Tensor,
        windows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
        generator: torch.Generator | None,
        lambdas: torch.Tensor,
    ) -> torch.Tensor:
        """Sparsify, sign-filter and mask the stacked tensor ``x`` ``(K, *shape)`` called ``name``."""
        y = x
        if windows is not None:
            y = pp.window_tensor(y, *windows[name])
        elif generator is not None:
            y = pp.dare_tensor(y, self.drop_rate, generator, self.rescale)
        if self.sign is not None:
            y = torch.where(pp.agreement_tensor(y, pp.elect_sign_tensor(y, self.sign)), y, pp.zeros_like_scalar(y))
        if self.mask is not None:
            active = pp.tall_mask_tensor(x, lambdas)  # (K, *shape), from the raw vectors
            if self.mask == "consensus":
                active = (active.sum(dim=0) >= self.min_agreement).expand_as(active)
            y = torch.where(active, y, pp.zeros_like_scalar(y))
        return y

    def _lines_scales(self, names: list[str], summed_norm: float, merged_norm: float, num_tasks: int) -> dict[str, float]:
        alpha, beta = self.lines
        if alpha is None:
            if merged_norm == 0.0:
                raise AdamergeError("the merged vector is all zeros: the automatic LiNeS α is undefined")
            alpha = summed_norm / (num_tasks * merged_norm)
        scales = pp.lines_scaling(names, alpha, beta, self.num_layers, self.layer_of, self.lines_unindexed)
        low, high = min(scales.values()), max(scales.values())
        logger.info("LiNeS: α = %.4g, β = %.4g, scales from %.4g to %.4g", alpha, beta, low, high)
        return scales


#: One :class:`StaticMerge` per preset of :data:`adamerge.rewrite.presets.STATIC_PRESETS` (the
#: published defaults and their sources are documented there).
STATIC_METHODS: dict[str, StaticMerge] = {name: StaticMerge(**fields) for name, fields in STATIC_PRESETS.items()}


def static_preset(method: str, **overrides: object) -> StaticMerge:
    """The :data:`STATIC_METHODS` preset ``method`` with some fields overridden.

    Raises:
        AdamergeError: unknown method (the message lists the valid ones) or unknown field.
    """
    if method not in STATIC_METHODS:
        raise AdamergeError(f"unknown static merge method {method!r}; valid: {sorted(STATIC_METHODS)}")
    check_options(method, overrides, (f.name for f in dataclasses.fields(StaticMerge)), given_as="StaticMerge field(s)")
    return dataclasses.replace(STATIC_METHODS[method], **overrides)


def static_merge(
    method: str,
    tv: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    **overrides: object,
) -> dict[str, torch.Tensor]:
    """Merged task vector of a named static method: ``θ = θ_0 + static_merge(method, tv)``.

    Args:
        method: one of :data:`STATIC_METHODS`.
        tv: ``{name: Tensor(K, *shape)}`` in model order.
        dtype: result dtype (default: the task vectors').
        **overrides: :class:`StaticMerge` fields replacing the preset's, e.g. ``scale=0.4``.

    Returns:
        ``{name: Tensor(*shape)}``.

    Raises:
        AdamergeError: unknown method or option, invalid option value or task vectors.
    """
    merge = static_preset(method, **overrides)
    logger.info("static merge %s: %s", method, merge)
    return merge.merged_delta(tv, dtype=dtype)
