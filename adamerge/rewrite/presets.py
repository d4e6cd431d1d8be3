"""The published static merges as presets: :class:`adamerge.rewrite.static_merge.StaticMerge` field values.

Plain data (no torch), so that the command line lists the method names without importing the
merge code; :data:`adamerge.rewrite.static_merge.STATIC_METHODS` builds one ``StaticMerge`` per entry.
"""

from __future__ import annotations

from typing import Any

#: Named presets with the published (or reference-code) defaults for 8-task CLIP ViT-B/32 merging.
#:
#: - ``"average"``: ``θ_0 + mean_k τ_k`` (weight averaging; FusionBench ``simple_average``).
#: - ``"task-arithmetic"``: ``θ_0 + 0.3 Σ_k τ_k`` (Ilharco et al., 2023). λ = 0.3 is the value
#:   AdaMerging's ``main_task_arithmetic.py`` uses and FusionBench's docs select for CLIP models.
#: - ``"ties"``: trim to the top 20 % per task over the model, elect the sign by mass, disjoint
#:   *sum*, λ = 0.3 — FusionBench's ``ties_merging`` (``threshold: 20``, ``merge_func: sum``,
#:   ``scaling_factor`` 0.3 in its docs' CLIP runs) and AdaMerging's ``main_ties_merging.py``
#:   (``K = 20``, ``"dis-sum"``, 0.3), the setting behind the 72.4 % usually cited. The TIES paper's
#:   validation-free variant is ``aggregate="disjoint_mean", scale=1.0``.
#: - ``"dare"``: drop 50 %, rescale, λ = 0.3 — FusionBench ``dare/task_arithmetic.yaml``
#:   (``sparsity_ratio: 0.5``, ``scaling_factor: 0.3``). The DARE paper drops up to 90 % of LLM SFT
#:   deltas; mergekit sets no default (its ``density`` is required).
#: - ``"breadcrumbs"``: per tensor, drop the top 0.6 % and keep the next 15 %, λ = 0.2 — the
#:   starting point of the authors' own search (``rezazzr/breadcrumbs``, ``find_best_hyperparam.py``,
#:   ``middle_keep``: alpha 0.2, beta 0.15, gamma 0.006).
#: - ``"consensus"``: task arithmetic (λ = 0.3) of the entries active in ≥ 2 TALL masks
#:   (``nik-dim/tall_masks`` ``consensus.yaml``: ``prun_thre_k: 2``); TALL λ = 0.4, the middle of
#:   the grid {0.2, …, 0.6} the paper searches per task on validation data.
#: - ``"lines"``: task arithmetic scaled by LiNeS depth profile with the reference code's automatic
#:   α (``‖Σ τ‖₁/(K‖τ_MTL‖₁)``, i.e. 1/K here) and β = 0.5. The paper tunes β on validation data
#:   over (0, 1]; 0.5, the middle, is this package's validation-free choice, not a published value.
STATIC_PRESETS: dict[str, dict[str, Any]] = {
    "average": {"aggregate": "mean", "scale": 1.0},
    "task-arithmetic": {"scale": 0.3},
    "ties": {"sparsify": "magnitude", "density": 0.2, "sign": "sum", "aggregate": "sum", "scale": 0.3},
    "dare": {"sparsify": "dare", "drop_rate": 0.5, "rescale": True, "seed": 0, "scale": 0.3},
    "breadcrumbs": {"sparsify": "breadcrumbs", "density": 0.15, "outlier_fraction": 0.006, "scale": 0.2},
    "consensus": {"mask": "consensus", "min_agreement": 2, "mask_lambdas": 0.4, "scale": 0.3},
    "lines": {"scale": 1.0, "lines": (None, 0.5)},
}
