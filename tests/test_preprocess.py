"""adamerge.rewrite.operations against naive per-entry references written straight from the papers."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.errors import AdamergeError
from adamerge.rewrite import operations as pp

K = 3
SHAPES = {
    "embed.weight": (4, 3),
    "blocks.0.attn.weight": (5,),
    "blocks.0.mlp.weight": (2, 3, 2),
    "blocks.1.attn.weight": (3, 3),
    "norm.weight": (4,),
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_tv(seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random task vectors, K = 3, tensors of different shapes, in model order."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn((K, *s), generator=g).to(device=device, dtype=dtype) for n, s in SHAPES.items()}


def make_distinct_bf16_tv(seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 task vectors whose magnitudes are exact and pairwise distinct per task (no rank ties)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in SHAPES.values())
    tasks = []
    for _ in range(K):
        magnitudes = (torch.randperm(total, generator=g) + 1).float() / 8  # exact in bf16 (≤ 256 values)
        signs = torch.randint(0, 2, (total,), generator=g).float() * 2 - 1
        tasks.append(magnitudes * signs)
    flat = torch.stack(tasks).to(torch.bfloat16)  # (K, P)
    out, offset = {}, 0
    for name, shape in SHAPES.items():
        size = math.prod(shape)
        out[name] = flat[:, offset : offset + size].reshape(K, *shape).clone()
        offset += size
    return out


# ----------------------------------------------------------------------------------------------
# naive references: Python loops over entries


def cells(tv, k, names):
    """[(name, flat index, value)] of task k over ``names``, in model order."""
    return [(n, i, float(v)) for n in names for i, v in enumerate(tv[n][k].reshape(-1).tolist())]


def naive_window(tv, density, outlier_fraction, scope, count="floor"):
    """Per task: drop the ⌊γn⌋ largest |τ|, keep the next max(1, ⌊dn⌋) (``count="ties"``: ⌊dn⌋ + 1), zero the rest."""
    out = {n: t.detach().clone().float() for n, t in tv.items()}
    groups = [list(tv)] if scope == "model" else [[n] for n in tv]
    for k in range(K):
        for group in groups:
            entries = cells(tv, k, group)
            n = len(entries)
            floor = int(density * n + 1e-9)
            n_keep = min(n, floor + 1 if count == "ties" else max(1, floor))
            n_top = min(int(outlier_fraction * n + 1e-9), n - n_keep)
            ranked = sorted(entries, key=lambda c: -abs(c[2]))
            kept = {(c[0], c[1]) for c in ranked[n_top : n_top + n_keep]}
            for name, i, _ in entries:
                if (name, i) not in kept:
                    out[name][k].view(-1)[i] = 0.0
    return out


def sign(v: float) -> float:
    return float((v > 0) - (v < 0))


def naive_elect(values: list[float], rule: str) -> float:
    mass = sign(sum(values))
    if rule == "sum":
        return mass
    votes = sign(sum(sign(v) for v in values))
    return votes if votes != 0 else mass


def per_entry(tv):
    """Yield (name, flat index, [τ_1..τ_K]) for every entry."""
    for name, t in tv.items():
        flat = t.detach().float().reshape(K, -1)
        for i in range(flat.shape[1]):
            yield name, i, flat[:, i].tolist()


def naive_ties(tv, density, rule="sum", scope="model"):
    trimmed = naive_window(tv, density, 0.0, scope, count="ties")
    out = {n: torch.zeros_like(t) for n, t in trimmed.items()}
    for name, i, values in per_entry(trimmed):
        elected = naive_elect(values, rule)
        for k, v in enumerate(values):
            if v != 0 and sign(v) == elected:
                out[name][k].view(-1)[i] = v
    return out


def naive_tall(tv, lambdas):
    out = {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in tv.items()}
    for name, i, values in per_entry(tv):
        total = sum(values)
        for k, v in enumerate(values):
            out[name][k].view(-1)[i] = abs(v) > lambdas[k] * abs(total - v)
    return out


def assert_same(actual: dict, expected: dict, exact: bool = True) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        a, e = actual[name].detach().cpu().float(), expected[name].detach().cpu().float()
        assert a.shape == e.shape, name
        if exact:
            assert torch.equal(a, e), name
        else:
            torch.testing.assert_close(a, e, msg=name)


# ----------------------------------------------------------------------------------------------
# magnitude trim and Breadcrumbs


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_magnitude_trim_matches_naive(scope, density, seed):
    tv = make_tv(seed)
    assert_same(pp.magnitude_trim(tv, density, scope=scope), naive_window(tv, density, 0.0, scope, "ties"))
    floor = pp.magnitude_trim(tv, density, scope=scope, count="floor")
    assert_same(floor, naive_window(tv, density, 0.0, scope, "floor"))


def reference_topk_values_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
    """The TIES reference code's trim rule on ``(K, P)``: keep ``|τ| ≥`` the ``(P − ⌊dP⌋)``-th smallest."""
    k = flat.shape[1] - int(flat.shape[1] * density)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values  # (K, 1)
    return flat.abs() >= kth


@pytest.mark.parametrize("density", [0.05, 0.2, 0.37, 0.9])
def test_ties_trim_keeps_the_reference_count(density):
    tv = make_tv(21)
    flat = torch.cat([t.reshape(K, -1) for t in tv.values()], dim=1)  # (K, P)
    expected = reference_topk_values_mask(flat, density)
    trimmed = pp.magnitude_trim(tv, density)
    kept = torch.cat([t.reshape(K, -1) != 0 for t in trimmed.values()], dim=1)
    assert torch.equal(kept, expected)
    assert kept.sum(dim=1).tolist() == [int(flat.shape[1] * density) + 1] * K
    floor = pp.magnitude_trim(tv, density, count="floor")
    assert [sum(int((t[k] != 0).sum()) for t in floor.values()) for k in range(K)] == [int(flat.shape[1] * density)] * K
    with pytest.raises(AdamergeError, match="count"):
        pp.magnitude_trim(tv, density, count="ceil")


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize(("density", "outliers"), [(0.5, 0.1), (0.15, 0.01), (0.3, 0.2), (0.9, 0.3)])
def test_breadcrumbs_matches_naive(scope, density, outliers):
    tv = make_tv(3)
    assert_same(pp.breadcrumbs(tv, density, outliers, scope=scope), naive_window(tv, density, outliers, scope))


def test_trim_default_scope_is_model_breadcrumbs_default_is_tensor():
    tv = make_tv(4)
    assert_same(pp.magnitude_trim(tv, 0.3), naive_window(tv, 0.3, 0.0, "model", "ties"))
    assert_same(pp.breadcrumbs(tv, 0.3, 0.1), naive_window(tv, 0.3, 0.1, "tensor"))


def test_model_scope_keeps_exact_fraction_per_task():
    tv = make_tv(5)
    total = sum(t[0].numel() for t in tv.values())
    trimmed = pp.magnitude_trim(tv, 0.2)
    for k in range(K):
        assert sum(int((t[k] != 0).sum()) for t in trimmed.values()) == int(0.2 * total) + 1


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_density_one_is_identity(scope):
    tv = make_tv(6)
    assert_same(pp.magnitude_trim(tv, 1.0, scope=scope), tv)
    assert_same(pp.breadcrumbs(tv, 1.0, 0.05, scope=scope), tv)


def test_trim_keeps_ties_and_at_least_one_entry():
    tv = {"a": torch.tensor([[1.0, -1.0, 1.0, 0.5]] * K), "b": torch.tensor([[2.0]] * K)}
    # n = 1 in "b" and density 0.2: still one entry kept; the tie at |1.0| in "a" is kept whole
    expected = {"a": tv["a"] * torch.tensor([1.0, 1, 1, 0]), "b": tv["b"]}
    assert_same(pp.magnitude_trim(tv, 0.2, scope="tensor"), expected)
    assert_same(pp.magnitude_trim(tv, 0.2, scope="tensor", count="floor"), expected)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_density_refused(density):
    tv = make_tv()
    calls = (lambda: pp.magnitude_trim(tv, density), lambda: pp.breadcrumbs(tv, density), lambda: pp.ties(tv, density))
    for call in calls:
        with pytest.raises(AdamergeError, match="density"):
            call()


def test_invalid_scope_and_outlier_fraction_refused():
    tv = make_tv()
    with pytest.raises(AdamergeError, match="scope"):
        pp.magnitude_trim(tv, 0.5, scope="layer")
    with pytest.raises(AdamergeError, match="outlier_fraction"):
        pp.breadcrumbs(tv, 0.5, outlier_fraction=1.0)


# ----------------------------------------------------------------------------------------------
# DARE


def test_dare_drop_zero_is_identity():
    tv = make_tv(7)
    assert_same(pp.dare(tv, 0.0, seed=1), tv)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_survivors_rescaled_and_kept_fraction(p):
    tv = {"w": torch.randn(K, 200, 100, generator=torch.Generator().manual_seed(0))}
    out = pp.dare(tv, p, seed=3)["w"]
    kept = out != 0
    torch.testing.assert_close(out[kept], tv["w"][kept] / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    assert torch.equal(pp.dare(tv, p, seed=3, rescale=False)["w"][kept], tv["w"][kept])


def test_dare_is_unbiased_over_seeds():
    tv = make_tv(8)
    p, seeds = 0.5, 1000
    total = {n: torch.zeros_like(t) for n, t in tv.items()}
    for seed in range(seeds):
        for n, t in pp.dare(tv, p, seed=seed).items():
            total[n] += t
    for n, t in tv.items():
        std = t.abs() * math.sqrt(p / (1 - p) / seeds)  # std of the mean of the rescaled estimate
        assert ((total[n] / seeds - t).abs() <= 5 * std + 1e-6).all(), n


def test_dare_deterministic_given_seed_and_generator():
    tv = make_tv(9)
    assert_same(pp.dare(tv, 0.5, seed=11), pp.dare(tv, 0.5, seed=11))
    assert_same(pp.dare(tv, 0.5, seed=11), pp.dare(tv, 0.5, seed=torch.Generator().manual_seed(11)))
    a, b = pp.dare(tv, 0.5, seed=11), pp.dare(tv, 0.5, seed=12)
    assert any(not torch.equal(a[n], b[n]) for n in tv)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.2])
def test_dare_invalid_drop_rate_refused(p):
    with pytest.raises(AdamergeError, match="drop_rate"):
        pp.dare(make_tv(), p)


# ----------------------------------------------------------------------------------------------
# sign election and TIES


@pytest.mark.parametrize("rule", ["sum", "count"])
def test_elect_sign_and_agreement_match_naive(rule):
    tv = make_tv(10)
    elected = pp.elect_sign(tv, rule)
    agree = pp.sign_agreement_mask(tv, elected)
    for name, i, values in per_entry(tv):
        e = naive_elect(values, rule)
        assert elected[name].reshape(-1)[i].item() == e
        assert agree[name].reshape(K, -1)[:, i].tolist() == [v != 0 and sign(v) == e for v in values]


def test_count_rule_differs_from_sum_rule_and_breaks_ties_by_mass():
    tv = {"w": torch.tensor([[5.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [-1.0, 2.0, 0.0]])}
    assert pp.elect_sign(tv, "sum")["w"].tolist() == [1.0, 1.0, 0.0]
    # entry 0: two negatives outvote one large positive; entry 2: one vote each, mass decides
    assert pp.elect_sign(tv, "count")["w"].tolist() == [-1.0, 1.0, 0.0]
    assert pp.sign_agreement_mask(tv, pp.elect_sign(tv, "sum"))["w"][:, 2].tolist() == [False, False, False]


@pytest.mark.parametrize("rule", ["sum", "count"])
@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
def test_ties_matches_naive(rule, scope, density):
    tv = make_tv(11)
    assert_same(pp.ties(tv, density, rule=rule, scope=scope), naive_ties(tv, density, rule, scope))


def test_ties_with_all_agreeing_signs_is_the_trim():
    tv = {n: t.abs() for n, t in make_tv(12).items()}
    assert_same(pp.ties(tv, 0.2), pp.magnitude_trim(tv, 0.2))
    negative = {n: -t for n, t in tv.items()}
    assert_same(pp.ties(negative, 0.2), pp.magnitude_trim(negative, 0.2))


def test_ties_default_density_is_twenty_percent():
    tv = make_tv(13)
    assert_same(pp.ties(tv), naive_ties(tv, 0.2))


def test_unknown_rule_and_bad_elected_refused():
    tv = make_tv()
    with pytest.raises(AdamergeError, match="rule"):
        pp.elect_sign(tv, "majority")
    with pytest.raises(AdamergeError, match="elected"):
        pp.sign_agreement_mask(tv, {"embed.weight": torch.ones(4, 3)})


# ----------------------------------------------------------------------------------------------
# TALL masks and Consensus


@pytest.mark.parametrize("lambdas", [0.4, 0.2, [0.2, 0.5, 1.0]])
def test_tall_masks_match_naive(lambdas):
    tv = make_tv(14)
    per_task = [lambdas] * K if isinstance(lambdas, float) else lambdas
    assert_same(pp.tall_masks(tv, lambdas), naive_tall(tv, per_task))


def test_tall_masks_strict_and_custom_merged():
    tv = {"w": torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])}
    # entry 0: all zero, never active; entry 1: τ_MTL = τ_1, so task 1 is active, the zeros are not
    assert pp.tall_masks(tv)["w"].tolist() == [[False, True], [False, False], [False, False]]
    merged = {"w": torch.tensor([0.0, 3.0])}
    assert pp.tall_masks(tv, 0.4, merged=merged)["w"].tolist() == [[False, True], [False, False], [False, False]]
    assert pp.tall_masks(tv, 1.0, merged=merged)["w"].tolist() == [[False, False], [False, False], [False, False]]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_consensus_matches_naive(k):
    tv = make_tv(15)
    tall = naive_tall(tv, [0.4] * K)
    expected_mask, expected = {}, {}
    for name, t in tv.items():
        flat = tall[name].reshape(K, -1)
        keep = [sum(flat[task, i].item() for task in range(K)) >= k for i in range(flat.shape[1])]
        expected_mask[name] = torch.tensor(keep).reshape(t.shape[1:])
        expected[name] = torch.where(expected_mask[name], t, torch.zeros(()))
    assert_same(pp.consensus_mask(tv, k), expected_mask)
    assert_same(pp.consensus(tv, k), expected)


def test_consensus_extremes():
    tv = make_tv(16)
    assert_same(pp.consensus(tv, 0), tv)
    assert all(not t.any() for t in pp.consensus(tv, K + 1).values())
    with pytest.raises(AdamergeError, match="min_agreement"):
        pp.consensus(tv, -1)
    with pytest.raises(AdamergeError, match="lambdas"):
        pp.tall_masks(tv, [0.1, 0.2])


# ----------------------------------------------------------------------------------------------
# LiNeS

OPEN_CLIP = [
    "visual.class_embedding",
    "visual.conv1.weight",
    "visual.ln_pre.weight",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "visual.transformer.resblocks.1.attn.in_proj_weight",
    "visual.transformer.resblocks.2.ln_1.weight",
    "visual.ln_post.weight",
    "visual.proj",
]
OPEN_CLIP_DEPTH = [0, 0, 0, 0, 0, 1, 2, 2, 2]


def naive_lines(depths, num_layers, alpha, beta):
    return [alpha + beta * d / (num_layers - 1) for d in depths]


@pytest.mark.parametrize(("alpha", "beta"), [(0.125, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_lines_scaling_open_clip_names(alpha, beta):
    scales = pp.lines_scaling(OPEN_CLIP, alpha, beta)
    assert list(scales) == OPEN_CLIP
    assert list(scales.values()) == pytest.approx(naive_lines(OPEN_CLIP_DEPTH, 3, alpha, beta))


def test_lines_scaling_name_conventions():
    hf = [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "vision_model.encoder.layers.11.mlp.fc1.weight",
        "vision_model.post_layernorm.weight",
    ]
    assert list(pp.lines_scaling(hf, 0.0, 11.0).values()) == pytest.approx([0, 0, 11, 11])
    bert = [
        "embeddings.word_embeddings.weight",
        "encoder.layer.0.output.dense.weight",
        "encoder.layer.3.output.dense.weight",
        "pooler.dense.weight",
    ]
    assert list(pp.lines_scaling(bert, 1.0, 3.0).values()) == pytest.approx([1, 1, 4, 4])
    mobilenet = ["features.0.0.weight", "features.9.conv.1.0.weight", "features.18.0.weight", "classifier.1.weight"]
    assert list(pp.lines_scaling(mobilenet, 0.0, 18.0).values()) == pytest.approx([0, 9, 18, 18])
    resnet = ["conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "fc.weight"]
    assert list(pp.lines_scaling(resnet, 0.0, 4.0).values()) == pytest.approx([0, 1, 4, 4])


def test_lines_scaling_options():
    # the LiNeS reference code gives every non-block tensor the minimum scale α
    first = pp.lines_scaling(OPEN_CLIP, 0.1, 1.0, unindexed="first")
    assert list(first.values()) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.6, 1.1, 0.1, 0.1])
    # explicit L: the last block is not the deepest layer
    deeper = pp.lines_scaling(OPEN_CLIP, 0.0, 1.0, num_layers=5)
    assert deeper["visual.transformer.resblocks.2.ln_1.weight"] == pytest.approx(0.5)
    assert deeper["visual.proj"] == pytest.approx(1.0)
    # a custom regex and a callable
    names = ["stem.w", "tower.a3.w", "tower.a7.w"]
    assert list(pp.lines_scaling(names, 0.0, 1.0, layer_of=r"\.a(\d+)\.").values()) == pytest.approx([0, 3 / 7, 1])
    by_len = pp.lines_scaling(["x", "xx", "xxx"], 0.0, 1.0, layer_of=lambda n: len(n) - 1)
    assert list(by_len.values()) == pytest.approx([0, 0.5, 1])
    # an unindexed tensor between blocks takes the depth of the block before it
    mid = pp.lines_scaling(["blocks.0.w", "shared.w", "blocks.2.w"], 0.0, 1.0)
    assert list(mid.values()) == pytest.approx([0, 0, 1])
    assert list(pp.lines_scaling(["blocks.0.w", "head"], 0.3, 1.0).values()) == pytest.approx([0.3, 0.3])  # L = 1


def test_lines_errors():
    with pytest.raises(AdamergeError, match="layer index"):
        pp.lines_scaling(["a.weight", "b.weight"], 0.1, 0.5)
    with pytest.raises(AdamergeError, match="num_layers"):
        pp.lines_scaling(OPEN_CLIP, 0.1, 0.5, num_layers=2)
    with pytest.raises(AdamergeError, match="group"):
        pp.lines_scaling(OPEN_CLIP, 0.1, 0.5, layer_of=r"resblocks\.\d+")


def test_apply_lines_on_stacked_and_merged_vectors():
    tv = make_tv(17)
    depth = {"embed.weight": 0, "blocks.0.attn.weight": 0, "blocks.0.mlp.weight": 0}
    depth |= {"blocks.1.attn.weight": 1, "norm.weight": 1}
    expected = {n: t * (0.2 + 0.6 * depth[n]) for n, t in tv.items()}
    assert_same(pp.apply_lines(tv, 0.2, 0.6), expected, exact=False)
    merged = {n: t.sum(0) for n, t in tv.items()}
    assert_same(pp.apply_lines(merged, 0.2, 0.6), {n: t.sum(0) for n, t in expected.items()}, exact=False)


def test_lines_alpha():
    tv = make_tv(18)
    summed = {n: t.sum(0) for n, t in tv.items()}
    assert pp.lines_alpha(tv, summed) == pytest.approx(1 / K)
    assert pp.lines_alpha(tv, {n: 0.5 * t for n, t in summed.items()}) == pytest.approx(2 / K)


# ----------------------------------------------------------------------------------------------
# common contracts: validation, purity, dtypes, devices

ALL_CALLS = {
    "magnitude_trim": lambda tv: pp.magnitude_trim(tv, 0.3),
    "magnitude_trim_tensor": lambda tv: pp.magnitude_trim(tv, 0.3, scope="tensor"),
    "breadcrumbs": lambda tv: pp.breadcrumbs(tv, 0.3, 0.1),
    "dare": lambda tv: pp.dare(tv, 0.5, seed=0),
    "elect_sign": lambda tv: pp.elect_sign(tv),
    "ties": lambda tv: pp.ties(tv),
    "tall_masks": lambda tv: pp.tall_masks(tv),
    "consensus": lambda tv: pp.consensus(tv),
    "apply_lines": lambda tv: pp.apply_lines(tv, 0.1, 0.5),
}


@pytest.mark.parametrize("call", ALL_CALLS.values(), ids=ALL_CALLS.keys())
def test_inputs_not_mutated(call):
    tv = make_tv(19)
    before = {n: t.clone() for n, t in tv.items()}
    call(tv)
    assert_same(tv, before)


@pytest.mark.parametrize("call", [c for n, c in ALL_CALLS.items() if n != "apply_lines"])
def test_invalid_task_vectors_refused(call):
    with pytest.raises(AdamergeError, match="empty"):
        call({})
    with pytest.raises(AdamergeError, match="K"):
        call({"a": torch.randn(3, 2), "b": torch.randn(2, 2)})
    with pytest.raises(AdamergeError, match="floating"):
        call({"a": torch.ones(3, 2, dtype=torch.long)})


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_input_matches_float_reference(device):
    tv = {n: t.to(device) for n, t in make_distinct_bf16_tv(20).items()}
    as_float = {n: t.float().cpu() for n, t in tv.items()}
    trimmed = pp.magnitude_trim(tv, 0.2)
    assert all(t.dtype == torch.bfloat16 and t.device.type == device for t in trimmed.values())
    assert_same(trimmed, naive_window(as_float, 0.2, 0.0, "model", "ties"))
    assert_same(pp.breadcrumbs(tv, 0.4, 0.1), naive_window(as_float, 0.4, 0.1, "tensor"))
    assert_same(pp.ties(tv, 0.3), naive_ties(as_float, 0.3))
    assert_same(pp.tall_masks(tv), naive_tall(as_float, [0.4] * K))
    dropped = pp.dare(tv, 0.5, seed=0)
    assert all(t.dtype == torch.bfloat16 for t in dropped.values())
    for n, t in dropped.items():
        kept = t != 0
        assert torch.equal(t[kept], (tv[n] * 2)[kept])  # ×2 is exact in bf16


@pytest.mark.parametrize("device", DEVICES)
def test_results_stay_on_device(device):
    tv = make_tv(21, device=device)
    for call in ALL_CALLS.values():
        assert all(t.device.type == device for t in call(tv).values())
