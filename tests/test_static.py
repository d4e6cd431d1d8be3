"""adamerge.rewrite.static_merge: presets and options against naive per-entry merges."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite import operations as pp
from adamerge.rewrite.static_merge import STATIC_METHODS, StaticMerge, static_merge, static_preset

K = 3
SHAPES = {
    "embed.weight": (4, 3),
    "blocks.0.attn.weight": (5,),
    "blocks.0.mlp.weight": (2, 3, 2),
    "blocks.1.attn.weight": (3, 3),
    "blocks.2.attn.weight": (2, 2),
    "head.weight": (4,),
}
DEPTH = {  # LiNeS depth, L = 3, by the reference code's rule: tensors outside the blocks get α
    "embed.weight": 0,
    "blocks.0.attn.weight": 0,
    "blocks.0.mlp.weight": 0,
    "blocks.1.attn.weight": 1,
    "blocks.2.attn.weight": 2,
    "head.weight": 0,
}


def make_tv(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((K, *s), generator=g).to(dtype) for n, s in SHAPES.items()}


# ----------------------------------------------------------------------------------------------
# naive references


def sign(v: float) -> float:
    return float((v > 0) - (v < 0))


def naive_trim(tv, density, scope="model", outliers=0.0, count="ties"):
    """Per task, rank |τ| over the model (or tensor) and keep ranks [⌊γn⌋, ⌊γn⌋ + n_keep).

    ``n_keep`` is ``⌊dn⌋ + 1`` for ``count="ties"`` (the TIES reference), ``max(1, ⌊dn⌋)`` for ``"floor"``.
    """
    out = {n: t.clone().float() for n, t in tv.items()}
    groups = [list(tv)] if scope == "model" else [[n] for n in tv]
    for k in range(next(iter(tv.values())).shape[0]):
        for group in groups:
            entries = [(n, i, abs(v)) for n in group for i, v in enumerate(tv[n][k].reshape(-1).tolist())]
            size = len(entries)
            floor = int(density * size + 1e-9)
            keep = min(size, floor + 1 if count == "ties" else max(1, floor))
            top = min(int(outliers * size + 1e-9), size - keep)
            kept = {(n, i) for n, i, _ in sorted(entries, key=lambda e: -e[2])[top : top + keep]}
            for n, i, _ in entries:
                if (n, i) not in kept:
                    out[n][k].view(-1)[i] = 0.0
    return out


def naive_merge(per_task, aggregate="sum", weights=None, sign_rule=None, keep=None):
    """Merge entry by entry: optional sign filter and keep-mask, then weighted sum / mean / disjoint mean."""
    weights = weights or [1.0] * K
    out = {}
    for name, t in per_task.items():
        flat = t.float().reshape(K, -1)
        merged = []
        for i in range(flat.shape[1]):
            values = flat[:, i].tolist()
            if sign_rule is not None:
                mass = sign(sum(values))
                votes = sign(sum(sign(v) for v in values))
                elected = mass if sign_rule == "sum" or votes == 0 else votes
                values = [v if v != 0 and sign(v) == elected else 0.0 for v in values]
            if keep is not None:
                values = [v if keep[name].reshape(K, -1)[k, i] else 0.0 for k, v in enumerate(values)]
            total = sum(w * v for w, v in zip(weights, values))
            if aggregate == "mean":
                total /= K
            elif aggregate == "disjoint_mean":
                total /= max(1, sum(v != 0 for v in values))
            merged.append(total)
        out[name] = torch.tensor(merged).reshape(t.shape[1:])
    return out


def naive_tall(tv, lam):
    out = {}
    for name, t in tv.items():
        flat = t.float().reshape(K, -1)
        rows = [
            [abs(flat[k, i]) > lam * abs(flat[:, i].sum() - flat[k, i]) for i in range(flat.shape[1])]
            for k in range(K)
        ]
        out[name] = torch.tensor(rows).reshape(t.shape)
    return out


def naive_consensus_keep(tv, lam, min_agreement):
    tall = naive_tall(tv, lam)
    return {n: (m.sum(0, keepdim=True) >= min_agreement).expand_as(m) for n, m in tall.items()}


def scaled(delta, factor):
    return {n: t * (factor[n] if isinstance(factor, dict) else factor) for n, t in delta.items()}


def assert_close(actual, expected):
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].float(), expected[name].float(), msg=name)


# ----------------------------------------------------------------------------------------------
# presets


def test_every_preset_is_a_registered_static_method():
    from adamerge.methods import StaticMethod, get_method

    for name, merge in STATIC_METHODS.items():
        method = get_method(name, learned=False)
        assert isinstance(method, StaticMethod) and method.merge() == merge and method.paper


@pytest.mark.parametrize("seed", [0, 1])
def test_average_and_task_arithmetic(seed):
    tv = make_tv(seed)
    assert_close(static_merge("average", tv), {n: t.mean(0) for n, t in tv.items()})
    assert_close(static_merge("task-arithmetic", tv), {n: 0.3 * t.sum(0) for n, t in tv.items()})
    assert_close(StaticMerge().merged_delta(tv), static_merge("task-arithmetic", tv))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_preset_is_trim_elect_disjoint_sum(seed):
    tv = make_tv(seed)
    expected = scaled(naive_merge(naive_trim(tv, 0.2), sign_rule="sum"), 0.3)
    assert_close(static_merge("ties", tv), expected)
    # the composition of the preprocess pieces gives the same merge
    assert_close(static_merge("ties", tv), {n: 0.3 * t.sum(0) for n, t in pp.ties(tv, 0.2).items()})


@pytest.mark.parametrize("rule", ["sum", "count"])
@pytest.mark.parametrize("aggregate", ["sum", "mean", "disjoint_mean"])
def test_ties_options_match_naive(rule, aggregate):
    tv = make_tv(3)
    merge = static_preset("ties", sign=rule, aggregate=aggregate, density=0.4, scale=1.0)
    assert_close(merge.merged_delta(tv), naive_merge(naive_trim(tv, 0.4), aggregate, sign_rule=rule))


def test_ties_paper_variant_disjoint_mean():
    tv = make_tv(4)
    expected = naive_merge(naive_trim(tv, 0.2), "disjoint_mean", sign_rule="sum")
    assert_close(static_merge("ties", tv, aggregate="disjoint_mean", scale=1.0), expected)


def test_ties_with_all_agreeing_signs_is_trimmed_task_arithmetic():
    tv = {n: t.abs() for n, t in make_tv(5).items()}
    expected = {n: 0.3 * t.sum(0) for n, t in naive_trim(tv, 0.2).items()}
    assert_close(static_merge("ties", tv), expected)
    assert_close(static_merge("ties", tv, sign="count"), expected)


def test_dare_preset_is_rescaled_random_drop_then_task_arithmetic():
    tv = make_tv(6)
    expected = {n: 0.3 * t.sum(0) for n, t in pp.dare(tv, 0.5, seed=0).items()}
    assert_close(static_merge("dare", tv), expected)
    assert_close(static_merge("dare", tv), static_merge("dare", tv))  # deterministic
    other = static_merge("dare", tv, seed=1)
    assert any(not torch.equal(other[n], expected[n]) for n in tv)
    assert_close(static_merge("dare", tv, drop_rate=0.0), static_merge("task-arithmetic", tv))


def test_dare_ties_combination():
    tv = make_tv(7)
    dropped = pp.dare(tv, 0.3, seed=2)
    merge = StaticMerge(sparsify="dare", drop_rate=0.3, seed=2, sign="sum", scale=0.5)
    assert_close(merge.merged_delta(tv), scaled(naive_merge(dropped, sign_rule="sum"), 0.5))


@pytest.mark.parametrize("scope", [None, "tensor", "model"])
def test_breadcrumbs_preset_matches_naive(scope):
    tv = make_tv(8)
    expected = scaled(naive_merge(naive_trim(tv, 0.15, scope or "tensor", outliers=0.006, count="floor")), 0.2)
    assert_close(static_merge("breadcrumbs", tv, scope=scope), expected)
    wide = scaled(naive_merge(naive_trim(tv, 0.5, scope or "tensor", outliers=0.1, count="floor")), 0.2)
    assert_close(static_merge("breadcrumbs", tv, scope=scope, density=0.5, outlier_fraction=0.1), wide)


@pytest.mark.parametrize("min_agreement", [1, 2, 3])
def test_consensus_preset_matches_naive(min_agreement):
    tv = make_tv(9)
    keep = naive_consensus_keep(tv, 0.4, min_agreement)
    expected = scaled(naive_merge(tv, keep=keep), 0.3)
    assert_close(static_merge("consensus", tv, min_agreement=min_agreement), expected)


def test_tall_mask_option_keeps_each_task_own_entries():
    tv = make_tv(10)
    expected = naive_merge(tv, keep=naive_tall(tv, 0.3))
    assert_close(StaticMerge(mask="tall", mask_lambdas=0.3, scale=1.0).merged_delta(tv), expected)


def test_consensus_after_ties_masks_from_raw_vectors():
    tv = make_tv(11)
    keep = naive_consensus_keep(tv, 0.4, 2)
    expected = scaled(naive_merge(naive_trim(tv, 0.3), sign_rule="sum", keep=keep), 0.3)
    merge = static_preset("ties", density=0.3, mask="consensus")
    assert_close(merge.merged_delta(tv), expected)


def test_lines_preset_scales_task_arithmetic_by_depth():
    tv = make_tv(12)
    factor = {n: 1 / K + 0.5 * DEPTH[n] / 2 for n in tv}  # automatic α = 1/K for task arithmetic
    assert_close(static_merge("lines", tv), scaled({n: t.sum(0) for n, t in tv.items()}, factor))


def test_lines_reference_rule_and_position_rule():
    tv = make_tv(16)
    summed = {n: t.sum(0) for n, t in tv.items()}
    # the reference: "head.weight", after the last block, keeps α (not α + β)
    reference = static_merge("lines", tv, lines=(0.125, 0.5))
    torch.testing.assert_close(reference["head.weight"], 0.125 * summed["head.weight"])
    position = static_merge("lines", tv, lines=(0.125, 0.5), lines_unindexed="position")
    torch.testing.assert_close(position["head.weight"], 0.625 * summed["head.weight"])
    torch.testing.assert_close(position["blocks.1.attn.weight"], reference["blocks.1.attn.weight"])


def test_ties_trim_count_options():
    tv = make_tv(17)
    total = sum(t[0].numel() for t in tv.values())
    for count, kept in (("ties", int(0.2 * total) + 1), ("floor", int(0.2 * total))):
        merge = StaticMerge(sparsify="magnitude", density=0.2, trim_count=count, scale=1.0)
        delta = merge.merged_delta({n: t[:1] for n, t in tv.items()})  # one task: the trim alone
        assert sum(int((d != 0).sum()) for d in delta.values()) == kept
        assert_close(delta, {n: t.sum(0) for n, t in naive_trim({n: t[:1] for n, t in tv.items()}, 0.2, count=count).items()})


def test_lines_explicit_alpha_and_automatic_alpha_after_ties():
    tv = make_tv(13)
    summed = {n: t.sum(0) for n, t in tv.items()}
    explicit = static_merge("lines", tv, lines=(0.1, 0.9))
    assert_close(explicit, scaled(summed, {n: 0.1 + 0.9 * DEPTH[n] / 2 for n in tv}))
    ties_sum = naive_merge(naive_trim(tv, 0.2), sign_rule="sum")
    l1 = lambda delta: sum(float(t.abs().sum()) for t in delta.values())  # noqa: E731
    alpha = l1(summed) / (K * l1(ties_sum))
    merge = static_preset("ties", scale=1.0, lines=(None, 0.5))
    assert_close(merge.merged_delta(tv), scaled(ties_sum, {n: alpha + 0.5 * DEPTH[n] / 2 for n in tv}))


def test_per_task_scale_weights_tasks():
    tv = make_tv(14)
    weights = [0.1, 0.5, 1.0]
    assert_close(static_merge("task-arithmetic", tv, scale=weights), naive_merge(tv, weights=weights))
    assert_close(
        static_merge("ties", tv, scale=weights, aggregate="disjoint_mean"),
        naive_merge(naive_trim(tv, 0.2), "disjoint_mean", weights=weights, sign_rule="sum"),
    )


def test_density_one_magnitude_is_plain_task_arithmetic():
    tv = make_tv(15)
    assert_close(StaticMerge(sparsify="magnitude", density=1.0).merged_delta(tv), static_merge("task-arithmetic", tv))


# ----------------------------------------------------------------------------------------------
# contracts


@pytest.mark.parametrize("method", sorted(STATIC_METHODS))
def test_presets_pure_and_dtype_preserving(method):
    tv = make_tv(16)
    before = {n: t.clone() for n, t in tv.items()}
    delta = static_merge(method, tv)
    assert all(torch.equal(tv[n], before[n]) for n in tv)
    assert list(delta) == list(tv)
    assert all(delta[n].shape == tv[n].shape[1:] and delta[n].dtype == torch.float32 for n in tv)


@pytest.mark.parametrize("method", sorted(STATIC_METHODS))
def test_bf16_task_vectors(method):
    tv = make_tv(17, dtype=torch.bfloat16)
    delta = static_merge(method, tv)
    assert all(d.dtype == torch.bfloat16 for d in delta.values())
    reference = static_merge(method, {n: t.float() for n, t in tv.items()})
    for n in tv:
        torch.testing.assert_close(delta[n].float(), reference[n], atol=2e-2, rtol=2e-2)
    assert all(d.dtype == torch.float32 for d in static_merge(method, tv, dtype=torch.float32).values())


def test_unknown_method_lists_valid_names():
    with pytest.raises(AdamergeError, match="valid") as info:
        static_merge("fisher", make_tv())
    assert all(name in str(info.value) for name in STATIC_METHODS)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"densty": 0.3}, r"StaticMerge field\(s\) \[.densty.\]: not options of"),
        ({"density": 0.0}, "density"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"sparsify": "random"}, "sparsify"),
        ({"sign": "max"}, "sign"),
        ({"mask": "magnitude"}, "mask"),
        ({"aggregate": "max"}, "aggregate"),
        ({"scope": "layer"}, "scope"),
        ({"min_agreement": -1}, "min_agreement"),
        ({"lines": (0.1, 0.5)}, "scale=1.0"),
        ({"lines": (0.1,), "scale": 1.0}, "lines"),
    ],
)
def test_invalid_options_refused(overrides, match):
    with pytest.raises(AdamergeError, match=match):
        static_merge("ties", make_tv(), **overrides)


def test_per_task_option_lengths_checked_against_k():
    with pytest.raises(AdamergeError, match="scale"):
        static_merge("task-arithmetic", make_tv(), scale=[0.3, 0.3])
    with pytest.raises(AdamergeError, match="mask_lambdas"):
        static_merge("consensus", make_tv(), mask_lambdas=[0.4])


class ItemsOnly:
    """A store with ``items()`` only, like ``adamerge.core.task_vectors.TaskVectors``."""

    def __init__(self, tv):
        self._tv = tv

    def items(self):
        return iter(self._tv.items())


@pytest.mark.parametrize("method", ["ties", "consensus", "lines"])
def test_accepts_any_store_with_items(method):
    tv = make_tv(18)
    assert_close(static_merge(method, ItemsOnly(tv)), static_merge(method, tv))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(STATIC_METHODS))
def test_cuda_matches_cpu(method):
    tv = make_tv(19)
    on_gpu = static_merge(method, {n: t.cuda() for n, t in tv.items()})
    assert all(d.is_cuda for d in on_gpu.values())
    if method != "dare":  # DARE draws from the device's own random stream
        assert_close({n: d.cpu() for n, d in on_gpu.items()}, static_merge(method, tv))


def test_static_merge_is_a_frozen_config():
    merge = STATIC_METHODS["ties"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        merge.scale = 1.0  # type: ignore[misc]
    assert static_preset("ties", scale=[0.1, 0.2, 0.3]).scale == (0.1, 0.2, 0.3)
    assert STATIC_METHODS["ties"].scale == 0.3
