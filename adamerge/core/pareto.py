"""Amortized Pareto fronts of merging coefficients by quadratic surrogates (MAP).

Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation", 2024 (arXiv 2406.07529). A task arithmetic merge ``θ(λ) = θ_0 + Σ_k λ_k τ_k`` is
evaluated on every task at a few sampled λ; each task's metric is approximated by a quadratic
in λ fitted by least squares; the surrogates are cheap, so many candidate λ are scored and the
non-dominated ones (no other candidate is at least as good on every task and better on one) form
the amortized Pareto front, from which a user's task weights pick one λ.

The pieces, each a pure function of tensors (no model here):

- :func:`quadratic_features` and :func:`fit_quadratic`: the design ``[1, λ_i, λ_i λ_j (i ≤ j)]``
  and its (ridge) least-squares fit; :func:`r_squared`;
- :func:`sobol_box`: seeded scrambled Sobol points in the box ``[low, high]^K``;
- :func:`weighted_optima`: maximisers of ``Σ_k w_k M̂_k(λ)`` over the box by projected gradient
  ascent from several starts, for a batch of preference weights;
- :func:`non_dominated` (the front's filter), :func:`crowding_distance` and :func:`spread_subset`
  (capping a front to a well spread subset), :func:`preference_grid` (weights on the simplex),
  :func:`weighted_pick` (the front point a user's weights prefer).
"""

from __future__ import annotations

import itertools
import math

import torch

#: a weighted-sum optimum is a candidate of the front; this many starts per weight vector
OPTIMUM_STARTS = 4
#: projected gradient ascent steps per start
ASCENT_STEPS = 300


def num_coefficients(num_tasks: int) -> int:
    """Coefficients of a full quadratic in ``num_tasks`` variables: ``(K + 1)(K + 2) / 2``."""
    return (num_tasks + 1) * (num_tasks + 2) // 2


def quadratic_pairs(num_tasks: int) -> list[tuple[int, int]]:
    """The ``(i, j)``, ``i ≤ j``, of the second-order features, in feature order."""
    return [(i, j) for i in range(num_tasks) for j in range(i, num_tasks)]


def quadratic_features(lam: torch.Tensor) -> torch.Tensor:
    """The design matrix ``[1, λ_1 … λ_K, λ_i λ_j (i ≤ j)]`` of points ``lam``.

    Args:
        lam: ``(N, K)`` coefficient vectors.

    Returns:
        ``(N, (K + 1)(K + 2) / 2)`` features, the pairs in :func:`quadratic_pairs` order.
    """
    n, k = lam.shape
    rows, cols = torch.triu_indices(k, k)  # (P2,), (P2,): i ≤ j in row-major order
    second = lam[:, rows] * lam[:, cols]  # (N, P2)
    return torch.cat([torch.ones(n, 1, dtype=lam.dtype), lam, second], dim=1)  # (N, P)


def fit_quadratic(lam: torch.Tensor, values: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Least-squares quadratic coefficients of ``values`` over ``lam``.

    Minimises ``‖X β − y‖² + ridge ‖β_{1:}‖²`` (the constant is not shrunk), solved as the
    augmented least-squares problem ``[X; √ridge D] β ≈ [y; 0]`` in float64.

    Args:
        lam: ``(N, K)`` evaluated points.
        values: ``(N,)`` or ``(N, M)`` measured metrics (one column per task).
        ridge: weight of the penalty on the non-constant coefficients (``>= 0``).

    Returns:
        ``(P,)`` or ``(P, M)`` coefficients, float64, in :func:`quadratic_features` order.
    """
    x = quadratic_features(lam.double())  # (N, P)
    y = values.double()
    column = y.dim() == 1
    y = y[:, None] if column else y  # (N, M)
    p = x.shape[1]
    if ridge > 0:
        penalty = math.sqrt(ridge) * torch.eye(p, dtype=torch.float64)[1:]  # (P - 1, P)
        x = torch.cat([x, penalty])  # (N + P - 1, P)
        y = torch.cat([y, torch.zeros(p - 1, y.shape[1], dtype=torch.float64)])  # (N + P - 1, M)
    beta = torch.linalg.lstsq(x, y, driver="gelsd").solution  # (P, M)
    return beta[:, 0] if column else beta


def predict_quadratic(coefficients: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The surrogates at ``lam``: ``(N, K) , (P,) | (P, M) -> (N,) | (N, M)``."""
    return quadratic_features(lam.double()) @ coefficients.double()


def quadratic_form(coefficients: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c, b, A)`` with ``M̂(λ) = c + bᵀλ + λᵀ A λ`` (``A`` symmetric) for each column.

    Args:
        coefficients: ``(P, M)`` surrogate coefficients.
        num_tasks: K.

    Returns:
        ``c (M,)``, ``b (M, K)``, ``A (M, K, K)``.
    """
    beta = coefficients.double()
    c = beta[0]  # (M,)
    b = beta[1 : num_tasks + 1].T  # (M, K)
    a = torch.zeros(beta.shape[1], num_tasks, num_tasks, dtype=torch.float64)  # (M, K, K)
    for index, (i, j) in enumerate(quadratic_pairs(num_tasks)):
        q = beta[num_tasks + 1 + index]  # (M,)
        if i == j:
            a[:, i, i] = q
        else:
            a[:, i, j] = q / 2
            a[:, j, i] = q / 2
    return c, b, a


def r_squared(measured: torch.Tensor, predicted: torch.Tensor) -> float:
    """The coefficient of determination ``1 − SS_res / SS_tot`` of ``(N,)`` values (``1.0`` for
    a constant target fitted exactly, ``0.0`` for one that is not)."""
    measured, predicted = measured.double(), predicted.double()
    residual = float(((measured - predicted) ** 2).sum())
    total = float(((measured - measured.mean()) ** 2).sum())
    if total <= 1e-24:
        return 1.0 if residual <= 1e-24 else 0.0
    return 1.0 - residual / total


def sobol_box(count: int, low: float, high: float, num_tasks: int, seed: int) -> torch.Tensor:
    """``(count, K)`` scrambled Sobol points (seeded) scaled into ``[low, high]^K``, float64."""
    engine = torch.quasirandom.SobolEngine(num_tasks, scramble=True, seed=seed)
    return low + (high - low) * engine.draw(count, dtype=torch.float64)  # (count, K)


def preference_grid(num_tasks: int, max_count: int = 64) -> torch.Tensor:
    """Preference weights on the simplex: every ``w`` with entries in ``{0, 1/r, …, 1}`` summing
    to 1, for the finest ``r`` (at least 1) giving at most ``max_count`` vectors.

    Returns:
        ``(W, K)`` weights, float64, rows summing to 1 (the corners included).
    """
    if num_tasks == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    steps = 1
    while math.comb(steps + 1 + num_tasks - 1, num_tasks - 1) <= max_count:
        steps += 1
    rows = [c for c in itertools.product(range(steps + 1), repeat=num_tasks) if sum(c) == steps]
    return torch.tensor(rows, dtype=torch.float64) / steps  # (W, K)


def weighted_optima(
    coefficients: torch.Tensor,
    weights: torch.Tensor,
    low: float,
    high: float,
    seed: int = 0,
    starts: int = OPTIMUM_STARTS,
    steps: int = ASCENT_STEPS,
) -> torch.Tensor:
    """For each weight vector ``w``, the λ in ``[low, high]^K`` maximising ``Σ_k w_k M̂_k(λ)``.

    The weighted sum is one quadratic ``c + bᵀλ + λᵀAλ``; projected gradient ascent
    ``λ ← clip(λ + η (b + 2Aλ))`` with ``η = 1 / (2‖A‖₂)`` (the gradient's Lipschitz constant)
    runs from the box's centre and ``starts − 1`` Sobol points; the best end point is kept. For a
    concave sum this is the global maximiser; otherwise the best local one found.

    Args:
        coefficients: ``(P, K)`` surrogate coefficients, one column per task.
        weights: ``(W, K)`` non-negative preference weights.
        low: lower bound of every λ_k.
        high: upper bound of every λ_k.
        seed: seed of the Sobol starts.
        starts: starting points per weight vector.
        steps: ascent steps.

    Returns:
        ``(W, K)`` maximisers, float64.
    """
    num_tasks = weights.shape[1]
    c, b, a = quadratic_form(coefficients, num_tasks)  # (K,), (K, K), (K, K, K): per task
    w = weights.double()  # (W, K)
    bw = w @ b  # (W, K): Σ_m w_m b_m
    aw = torch.einsum("wm,mij->wij", w, a)  # (W, K, K): Σ_m w_m A_m
    lipschitz = 2 * torch.linalg.matrix_norm(aw, ord=2)  # (W,)
    eta = torch.where(lipschitz > 1e-12, 1.0 / lipschitz.clamp_min(1e-12), torch.full_like(lipschitz, (high - low) * 1e6))
    centre = torch.full((1, num_tasks), (low + high) / 2, dtype=torch.float64)
    points = torch.cat([centre, sobol_box(max(starts - 1, 0), low, high, num_tasks, seed)])  # (S, K)
    lam = points[:, None, :].expand(-1, w.shape[0], -1).clone()  # (S, W, K)
    for _ in range(steps):
        gradient = bw + 2 * torch.einsum("wij,swj->swi", aw, lam)  # (S, W, K)
        lam = (lam + eta[None, :, None] * gradient).clamp(low, high)
    value = (bw * lam).sum(-1) + torch.einsum("swi,wij,swj->sw", lam, aw, lam)  # (S, W), constant left out
    best = value.argmax(0)  # (W,)
    return lam[best, torch.arange(w.shape[0])]  # (W, K)


def non_dominated(values: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Which points no other point dominates, every column maximised.

    ``j`` dominates ``i`` when ``v_j ≥ v_i`` in every column and ``v_j > v_i`` in one; equal
    points do not dominate each other, so duplicates of a front point are all kept.

    A dominator has a larger column sum, so the points are visited in decreasing sum, ``chunk`` at
    a time: a point is dominated if a point of its own chunk or of the front found so far
    dominates it (a dominated dominator is itself dominated by a front point, which then dominates
    the point too). The cost is ``N × (front + chunk) × M`` comparisons, not ``N² × M``.

    Args:
        values: ``(N, M)`` objective values.
        chunk: points compared at a time.

    Returns:
        ``(N,)`` boolean mask of the non-dominated points.
    """

    def dominated_by(block: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        geq = (others[None, :, :] >= block[:, None, :]).all(-1)  # (C, F): v_j ≥ v_i everywhere
        gt = (others[None, :, :] > block[:, None, :]).any(-1)  # (C, F): v_j > v_i somewhere
        return (geq & gt).any(-1)  # (C,)

    n = values.shape[0]
    order = torch.sort(values.double().sum(-1), descending=True, stable=True).indices  # (N,)
    keep = torch.zeros(n, dtype=torch.bool)
    front = values[:0]  # (F, M): the non-dominated points found so far
    for start in range(0, n, chunk):
        rows = order[start : start + chunk]  # (C,)
        block = values[rows]  # (C, M)
        kept = ~(dominated_by(block, block) | dominated_by(block, front))  # (C,)
        keep[rows[kept]] = True
        front = torch.cat([front, block[kept]])
    return keep


def crowding_distance(values: torch.Tensor) -> torch.Tensor:
    """NSGA-II crowding distance of ``(N, M)`` points: per column, the normalised gap between each
    point's two neighbours in sorted order, summed; each column's extremes get infinity.

    Returns:
        ``(N,)`` distances (float64).
    """
    n, m = values.shape
    distance = torch.zeros(n, dtype=torch.float64)
    if n <= 2:
        return torch.full((n,), math.inf, dtype=torch.float64)
    for column in range(m):
        order = torch.sort(values[:, column].double(), stable=True).indices  # (N,)
        sorted_values = values[order, column].double()  # (N,)
        span = float(sorted_values[-1] - sorted_values[0])
        gaps = (sorted_values[2:] - sorted_values[:-2]) / (span if span > 0 else 1.0)  # (N - 2,)
        distance[order[1:-1]] += gaps
        distance[order[0]] = math.inf
        distance[order[-1]] = math.inf
    return distance


def spread_subset(values: torch.Tensor, size: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of at most ``size`` points of ``values`` kept spread out: repeatedly drop the most
    crowded half of the excess (smallest :func:`crowding_distance`, ``protected`` points last).

    Args:
        values: ``(N, M)`` points (a front).
        size: how many to keep.
        protected: ``(N,)`` boolean mask of points dropped only when nothing else is left.

    Returns:
        Sorted ``(min(N, size),)`` indices into ``values``.
    """
    index = torch.arange(values.shape[0])
    shielded = protected.clone() if protected is not None else torch.zeros(values.shape[0], dtype=torch.bool)
    if int(shielded.sum()) >= size:  # more protected points than room: crowding decides among them alone
        index, shielded = index[shielded], torch.zeros_like(shielded)
    while index.numel() > size:
        distance = crowding_distance(values[index])  # (n,)
        distance = torch.where(shielded[index], torch.full_like(distance, math.inf), distance)
        excess = index.numel() - size
        drop = max(1, excess // 2)
        order = torch.sort(distance, stable=True).indices  # most crowded first
        keep = torch.ones(index.numel(), dtype=torch.bool)
        keep[order[:drop]] = False
        index = index[keep]
    return torch.sort(index).values


def weighted_scores(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_k w_k M_k / Σ_k w_k`` ``(F,)`` of each row of ``(F, K)`` metrics (float64)."""
    return values.double() @ weights.double() / weights.double().sum()  # (F,)


def weighted_pick(values: torch.Tensor, weights: torch.Tensor) -> int:
    """The row of ``(F, K)`` predicted metrics maximising ``Σ_k w_k M̂_k / Σ_k w_k`` (the first on a tie)."""
    return int(torch.argmax(weighted_scores(values, weights)))


def amortized_front(
    coefficients: torch.Tensor,
    low: float,
    high: float,
    candidates: int,
    front_size: int,
    seed: int,
    extra_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The amortized Pareto front of the surrogates over the box ``[low, high]^K``.

    The candidates are ``candidates`` Sobol points and the weighted-sum optima
    (:func:`weighted_optima`) of a :func:`preference_grid` and of ``extra_weights`` (a user's
    pick); the non-dominated candidates under the surrogates (:func:`non_dominated`) are capped to
    ``front_size`` by :func:`spread_subset`, the weighted-sum optima dropped last.

    Args:
        coefficients: ``(P, K)`` surrogate coefficients, one column per task.
        low: lower bound of every λ_k.
        high: upper bound of every λ_k.
        candidates: Sobol candidates drawn.
        front_size: most front points kept.
        seed: seed of the candidates and the ascent starts.
        extra_weights: ``(E, K)`` more preference weights whose optima join the candidates.

    Returns:
        ``λ (F, K)`` and predicted metrics ``(F, K)``, float64, sorted by the first task's metric.
    """
    num_tasks = coefficients.shape[1]
    weights = preference_grid(num_tasks)  # (W, K)
    if extra_weights is not None:
        weights = torch.cat([weights, extra_weights.double() / extra_weights.double().sum(-1, keepdim=True)])
    optima = torch.unique(weighted_optima(coefficients, weights, low, high, seed=seed + 2), dim=0)  # (W', K), corners once
    pool = torch.cat([optima, sobol_box(candidates, low, high, num_tasks, seed + 1)])  # (W + C, K)
    predicted = predict_quadratic(coefficients, pool)  # (W + C, K)
    front = non_dominated(predicted)  # (W + C,)
    protected = torch.zeros(pool.shape[0], dtype=torch.bool)
    protected[: optima.shape[0]] = True
    lam, values, protected = pool[front], predicted[front], protected[front]
    kept = spread_subset(values, front_size, protected)
    lam, values = lam[kept], values[kept]
    order = torch.sort(values[:, 0], stable=True).indices
    return lam[order], values[order]
