"""PCB merging, TSV-M, Iso-C and Iso-CTS against naive references written from the papers'
equations (loops over tasks and entries, numpy step by step), their behavioural properties, the
``adamerge merge`` export, and FusionBench 0.2.33 when its venv is at ``/tmp/fbvenv``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adamerge.cli import main
from adamerge.core.task_vectors import FactoredDelta, LowRankFactor, TaskVectors
from adamerge.errors import AdamergeError
from adamerge.methods import StaticMethod, get_method
from adamerge.rewrite.isotropic import IsoCMerge, IsoCTSMerge, subspace_sizes
from adamerge.rewrite.pcb import PCBMerge
from adamerge.rewrite.tsv import TSVMerge
from tests.tiny import tiny_mlp

FB_PYTHON = Path("/tmp/fbvenv/bin/python")
NAMES = ("pcb", "tsv-m", "iso-c", "iso-cts")
SHAPES = {"fc.weight": (10, 8), "fc.bias": (10,), "proj.weight": (6, 9), "conv.weight": (2, 3, 2, 2)}


def make_tv(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64, shapes=SHAPES) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn((num_tasks, *s), generator=generator, dtype=torch.float64).to(dtype) for n, s in shapes.items()}


def assert_close(actual: dict, expected: dict, **tolerance) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        got, want = torch.as_tensor(actual[name]).double(), torch.as_tensor(expected[name]).double()
        torch.testing.assert_close(got, want, msg=name, **tolerance)


# ----------------------------------------------------------------------------------------------
# naive references, from the papers' equations


def naive_pcb(tv: dict[str, torch.Tensor], ratio: float, scale: float, scope: str) -> dict[str, torch.Tensor]:
    """PCB (Du et al. 2024, Sec. 3.2) entry by entry in Python floats: Norm and Softmax over the scope."""
    names = list(tv)
    num_tasks = tv[names[0]].shape[0]
    flat = {n: tv[n].reshape(num_tasks, -1).tolist() for n in names}
    merged = {n: [0.0] * len(flat[n][0]) for n in names}
    groups = [names] if scope == "model" else [[n] for n in names]

    def norm(values):
        lo, hi = min(values), max(values)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]

    def softmax(values):
        exps = [math.exp(v) for v in values]
        return [e / sum(exps) for e in exps]

    for group in groups:
        entries = [(n, i) for n in group for i in range(len(flat[n][0]))]
        task = [[flat[n][k][i] for n, i in entries] for k in range(num_tasks)]
        size = len(entries)
        beta = []
        for k in range(num_tasks):
            intra = softmax([num_tasks * z for z in norm([v * v for v in task[k]])])
            cross = [softmax(norm([a * b for a, b in zip(task[k], task[j])])) for j in range(num_tasks)]
            beta.append([intra[d] * sum(cross[j][d] for j in range(num_tasks)) for d in range(size)])
        kept = []
        for k in range(num_tasks):
            threshold = sorted(beta[k])[int((1 - ratio) * size + 1e-9)]
            kept.append([b if b >= threshold else 0.0 for b in beta[k]])
        for d, (n, i) in enumerate(entries):
            total = sum(kept[k][d] for k in range(num_tasks))
            value = sum(kept[k][d] * task[k][d] for k in range(num_tasks)) / total if total > 0 else 0.0
            merged[n][i] = scale * value
    return {n: torch.tensor(merged[n], dtype=torch.float64).view(tv[n].shape[1:]) for n in names}


def polar(a: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def naive_tsv(tv: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, np.ndarray]:
    """TSV-M (Gargiulo et al. 2025, Alg. 1) with numpy, one task at a time."""
    out = {}
    for name, x in tv.items():
        x = x.double().numpy()
        if x.ndim != 3:
            out[name] = scale * x.mean(axis=0)
            continue
        k = min(x.shape[1:]) // x.shape[0]
        us, ss, vhs = [], [], []
        for t in range(x.shape[0]):
            u, s, vh = np.linalg.svd(x[t], full_matrices=False)
            us.append(u[:, :k])
            ss.extend(s[:k])
            vhs.append(vh[:k])
        out[name] = scale * polar(np.concatenate(us, axis=1)) @ np.diag(ss) @ polar(np.concatenate(vhs, axis=0))
    return out


def naive_iso_c(tv: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, np.ndarray]:
    """Iso-C (Marczak et al. 2025, Eq. 8): the sum with its spectrum replaced by its mean."""
    out = {}
    for name, x in tv.items():
        x = x.double().numpy()
        if x.ndim != 3:
            out[name] = scale * x.mean(axis=0)
            continue
        u, s, vh = np.linalg.svd(x.sum(axis=0), full_matrices=False)
        out[name] = scale * u @ np.diag(np.full(len(s), s.mean())) @ vh
    return out


def naive_iso_cts(tv: dict[str, torch.Tensor], sizes: dict[str, tuple[int, int]], scale: float = 1.0) -> dict[str, np.ndarray]:
    """Iso-CTS (Marczak et al. 2025, Alg. 1): common subspace of the sum, task subspaces of the residuals."""
    out = {}
    for name, x in tv.items():
        x = x.double().numpy()
        if x.ndim != 3:
            out[name] = scale * x.mean(axis=0)
            continue
        common, per_task = sizes[name]
        u, s, vh = np.linalg.svd(x.sum(axis=0), full_matrices=False)
        us, ss, vhs = [u[:, :common]], list(s[:common]), [vh[:common]]
        projector = u[:, :common] @ u[:, :common].T
        for t in range(x.shape[0]):
            ut, st, vht = np.linalg.svd(x[t] - projector @ x[t], full_matrices=False)
            us.append(ut[:, :per_task])
            ss.extend(st[:per_task])
            vhs.append(vht[:per_task])
        out[name] = scale * np.mean(ss) * polar(np.concatenate(us, axis=1)) @ polar(np.concatenate(vhs, axis=0))
    return out


# ----------------------------------------------------------------------------------------------
# PCB


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("ratio", [0.1, 0.35, 1.0])
@pytest.mark.parametrize("num_tasks", [1, 3])
def test_pcb_matches_the_papers_equations(scope, ratio, num_tasks):
    tv = make_tv(num_tasks, seed=num_tasks)
    merge = PCBMerge(scale=1.2, ratio=ratio, scope=scope)
    assert_close(merge.merged_delta(tv), naive_pcb(tv, ratio, 1.2, scope), rtol=1e-9, atol=1e-12)


def test_pcb_defaults_and_per_task_parts():
    merge = get_method("pcb").configured().merge()
    assert (merge.ratio, merge.scale, merge.scope) == (0.1, 1.2, "model")
    tv = make_tv(3, seed=5)
    copy = {n: t.clone() for n, t in tv.items()}
    parts = merge.rewrite(tv)
    assert all(torch.equal(tv[n], copy[n]) for n in tv)  # inputs untouched
    assert_close({n: 1.2 * p.sum(0) for n, p in parts.items()}, naive_pcb(tv, 0.1, 1.2, "model"), rtol=1e-9, atol=1e-12)
    shuffled = {n: t[[2, 0, 1]] for n, t in tv.items()}
    assert_close(merge.merged_delta(shuffled), merge.merged_delta(tv), rtol=1e-9, atol=1e-12)  # task order does not matter
    # one task: the top 10 % of its entries by magnitude, times λ
    single = {n: t[:1] for n, t in tv.items()}
    flat = torch.cat([t.reshape(-1) for t in single.values()])
    keep = len(flat) - math.floor(0.9 * len(flat))
    cut = flat.abs().topk(keep).values.min()
    expected = {n: 1.2 * torch.where(t[0].abs() >= cut, t[0], 0.0) for n, t in single.items()}
    assert_close(merge.merged_delta(single), expected)


# ----------------------------------------------------------------------------------------------
# TSV-M


@pytest.mark.parametrize("num_tasks", [1, 2, 3])
def test_tsv_matches_the_naive_svd_steps(num_tasks):
    tv = make_tv(num_tasks, seed=10 + num_tasks)
    assert_close(get_method("tsv-m").configured().merge().merged_delta(tv), naive_tsv(tv), rtol=1e-9, atol=1e-12)
    assert_close(TSVMerge(scale=0.5).merged_delta(tv), naive_tsv(tv, 0.5), rtol=1e-9, atol=1e-12)


def test_tsv_properties():
    tv = make_tv(3, seed=20)
    single = {n: t[:1] for n, t in tv.items()}
    assert_close(TSVMerge().merged_delta(single), {n: t[0] for n, t in single.items()}, rtol=1e-9, atol=1e-12)  # full rank: τ
    order = [2, 0, 1]
    assert_close(TSVMerge().merged_delta({n: t[order] for n, t in tv.items()}), TSVMerge().merged_delta(tv), rtol=1e-9, atol=1e-12)
    parts = TSVMerge().rewrite(tv)["fc.weight"]  # (K, 10, 8): per-task components in orthogonal subspaces
    for i in range(3):
        for j in range(3):
            if i != j:
                assert float((parts[i].T @ parts[j]).abs().max()) < 1e-10 and float((parts[i] @ parts[j].T).abs().max()) < 1e-10
    with pytest.raises(AdamergeError, match="rank_fraction"):
        TSVMerge(rank_fraction=0.5).rewrite(tv)  # 3 tasks × 4 components > 8
    fc = {"fc.weight": tv["fc.weight"]}
    assert_close(TSVMerge(rank_fraction=0.25).merged_delta(fc), TSVMerge().merged_delta(fc), rtol=1e-9, atol=1e-12)  # ⌊8/4⌋ = ⌊8/3⌋


# ----------------------------------------------------------------------------------------------
# Iso-C and Iso-CTS


def test_iso_c_matches_the_naive_steps_and_is_flat():
    tv = make_tv(3, seed=30)
    merged = get_method("iso-c").configured().merge().merged_delta(tv)
    assert_close(merged, naive_iso_c(tv), rtol=1e-9, atol=1e-12)
    spectrum = torch.linalg.svdvals(merged["fc.weight"])
    expected = torch.linalg.svdvals(tv["fc.weight"].sum(0)).mean()
    torch.testing.assert_close(spectrum, expected.expand_as(spectrum))
    shuffled = {n: t[[1, 2, 0]] for n, t in tv.items()}
    assert_close(IsoCMerge(scale=1.3).merged_delta(shuffled), naive_iso_c(tv, 1.3), rtol=1e-9, atol=1e-12)


def test_iso_cts_subspace_sizes_follow_the_reference_rounding():
    assert subspace_sizes(8, 3, 0.8) == (5, 1)  # ⌊6.4⌋ = 6, 3·round(2/3) = 3
    assert subspace_sizes(6, 3, 0.8) == (3, 1)  # ⌊4.8⌋ = 4, 3·round(2/3) = 3
    assert subspace_sizes(48, 3, 0.8) == (39, 3)
    assert subspace_sizes(7, 5, 0.8) == (7, 0)  # round(0.4) = 0: no task-specific space
    assert subspace_sizes(10, 4, 0.8) == (10, 0)  # round(0.5) = 0 (ties to even, as Python's round)
    assert subspace_sizes(6, 8, 0.1) == (6, 0)  # 8·round(0.75) = 8 > 6: floored


def test_iso_cts_matches_the_naive_steps_and_its_properties():
    tv = make_tv(3, seed=40)
    sizes = {"fc.weight": subspace_sizes(8, 3, 0.8), "proj.weight": subspace_sizes(6, 3, 0.8)}
    merged = get_method("iso-cts").configured().merge().merged_delta(tv)
    assert_close(merged, naive_iso_cts(tv, sizes), rtol=1e-9, atol=1e-12)
    spectrum = torch.linalg.svdvals(merged["fc.weight"])
    torch.testing.assert_close(spectrum, spectrum.mean().expand_as(spectrum))  # flat
    shuffled = {n: t[[2, 1, 0]] for n, t in tv.items()}
    assert_close(IsoCTSMerge().merged_delta(shuffled), merged, rtol=1e-9, atol=1e-12)
    assert_close(IsoCTSMerge(common_fraction=1.0).merged_delta(tv), naive_iso_c(tv), rtol=1e-9, atol=1e-12)
    parts = IsoCTSMerge().rewrite(tv)
    assert_close({n: p.sum(0) for n, p in parts.items()}, merged, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# shared contract: dtypes, options, LoRA, registration


@pytest.mark.parametrize("name", NAMES)
def test_dtype_in_dtype_out_and_no_mutation(name):
    merge = get_method(name).configured().merge()
    tv32 = make_tv(3, seed=50, dtype=torch.float32)
    reference = merge.merged_delta(tv32)
    for dtype in (torch.bfloat16, torch.float64):
        tv = {n: t.to(dtype) for n, t in tv32.items()}
        copy = {n: t.clone() for n, t in tv.items()}
        parts = merge.rewrite(tv)
        assert all(p.dtype == dtype and p.shape == tv[n].shape for n, p in parts.items())
        assert all(torch.equal(tv[n], copy[n]) for n in tv)
        if name != "pcb":  # PCB's kept set may flip at the threshold under bf16 rounding
            tolerance = {"rtol": 0.05, "atol": 0.05} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
            assert_close(merge.merged_delta(tv), reference, **tolerance)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("pcb", {"ratio": 0.0}, "ratio must be in"),
        ("pcb", {"ratio": 1.5}, "ratio must be in"),
        ("pcb", {"scope": "layer"}, "scope must be"),
        ("pcb", {"scale": -1.0}, "scale must be"),
        ("tsv-m", {"rank_fraction": 0.0}, "rank_fraction must be"),
        ("tsv-m", {"scale": float("nan")}, "scale must be"),
        ("iso-c", {"scale": -0.1}, "scale must be"),
        ("iso-cts", {"common_fraction": 0.0}, "common_fraction must be"),
        ("iso-cts", {"common_fraction": 1.2}, "common_fraction must be"),
        ("iso-cts", {"densty": 0.3}, r"\['densty'\]: not options of 'iso-cts'"),
    ],
)
def test_bad_options_raise_one_line(name, options, message):
    with pytest.raises(AdamergeError, match=message) as info:
        get_method(name).configured(**options)
    assert "\n" not in str(info.value)


def test_registered_as_static_methods_with_a_fixed_start():
    for name in NAMES:
        method = get_method(name, learned=False)
        assert isinstance(method, StaticMethod) and method.paper and not method.learned
        torch.testing.assert_close(method.start(3), torch.full((3, 1), method.merge().scale))
    assert get_method("pcb").configured(scale=0.7).start(2).flatten().tolist() == pytest.approx([0.7, 0.7])


def test_factored_lora_vectors_are_densified_then_merged():
    generator = torch.Generator().manual_seed(60)
    dense = torch.randn(1, 6, 5, generator=generator)
    left, right = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
    factored = FactoredDelta((6, 5), 2, [0], dense, [LowRankFactor(1, left, right, 0.5)])
    store = TaskVectors(["a", "b"], {"w": factored, "b": torch.randn(2, 6, generator=generator)})
    expected = {"w": torch.stack([dense[0], 0.5 * left @ right]), "b": store["b"]}
    for name in NAMES:
        method = get_method(name).configured()
        rewritten = method.rewrite(store)
        assert rewritten.factored_names() == [] and rewritten.tasks == ("a", "b")
        got = {n: method.merge().scale * t.sum(0) for n, t in rewritten.items()}
        assert_close(got, method.merge().merged_delta(expected), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# end to end: adamerge merge exports θ_0 + the merged delta


@pytest.fixture
def mlp_setup(tmp_path):
    torch.manual_seed(0)
    base = tiny_mlp()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    experts = {}
    for seed, task in enumerate(["alpha", "beta", "gamma"], start=1):
        generator = torch.Generator().manual_seed(seed)
        state = {n: t + 0.05 * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
        torch.save(state, tmp_path / f"{task}.pt")
        experts[task] = state
    return tmp_path, base.state_dict(), experts


@pytest.mark.parametrize("name", NAMES)
def test_merge_command_exports_base_plus_the_merged_delta(mlp_setup, name):
    folder, base, experts = mlp_setup
    output = folder / name
    args = ["merge", "--method", name, "--base", f"tests.tiny:tiny_mlp@{folder / 'base.pt'}",
            "--experts", *[f"{t}={folder / t}.pt" for t in experts], "--head-pattern", r"^2\.", "--output", str(output)]  # fmt: skip
    assert main(args) == 0
    merged_names = [n for n in base if not n.startswith("2.")]
    tv = {n: torch.stack([experts[t][n] - base[n] for t in experts]).double() for n in merged_names}
    reference = {
        "pcb": lambda: naive_pcb(tv, 0.1, 1.2, "model"),
        "tsv-m": lambda: naive_tsv(tv),
        "iso-c": lambda: naive_iso_c(tv),
        "iso-cts": lambda: naive_iso_cts(tv, {"0.weight": subspace_sizes(12, 3, 0.8)}),
    }[name]()
    exported = torch.load(output / "merged.pt", weights_only=True)
    assert_close({n: exported[n] for n in merged_names}, {n: base[n].double() + torch.as_tensor(d) for n, d in reference.items()},
                 rtol=1e-5, atol=1e-5)  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"]["name"] == name and metrics["method"]["rewrite_class"].startswith("adamerge.rewrite.")


# ----------------------------------------------------------------------------------------------
# FusionBench 0.2.33 (TSV-M, Iso-C, Iso-CTS; it has no PCB)


@pytest.mark.slow
@pytest.mark.skipif(
    not FB_PYTHON.exists(), reason=f"FusionBench venv not found at {FB_PYTHON} (see benchmarks/peers/fusionbench_subspace_check.py)"
)
def test_agrees_with_fusionbench(tmp_path):
    from benchmarks.peers.fusionbench_subspace_check import compare

    report = compare(str(FB_PYTHON), tmp_path)
    for method in ("tsv-m", "iso-c", "iso-cts"):
        assert report["float64"][f"{method} (relative)"] < 1e-12, report
        assert report["float32"][f"{method} (relative)"] < 1e-5, report


def test_an_svd_that_does_not_converge_is_taken_again_in_float64_then_transposed(monkeypatch, caplog):
    """LAPACK's gesdd can fail on real experts' concatenated singular vectors (Iso-CTS on
    SmolLM2-135M did): :func:`thin_svd` retries in float64, then on the transpose, and returns the
    caller's dtype; the merges go through it."""
    from adamerge.rewrite.spectral import polar_factor, thin_svd

    real = torch.linalg.svd
    torch.manual_seed(0)
    a = torch.randn(7, 4)

    def failing(rule):
        def svd(x, full_matrices=True):
            if rule(x):
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            return real(x, full_matrices=full_matrices)

        return svd

    for rule in (lambda x: x.dtype == torch.float32, lambda x: x.dtype == torch.float32 or x.shape[-2] > x.shape[-1]):
        monkeypatch.setattr(torch.linalg, "svd", failing(rule))
        u, s, vh = thin_svd(a)
        assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (7, 4) and vh.shape == (4, 4)
        torch.testing.assert_close(u @ torch.diag(s) @ vh, a, atol=1e-5, rtol=0)
        q = polar_factor(a)
        torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-5, rtol=0)
    assert "did not converge; taking it again in float64" in caplog.text


@pytest.mark.parametrize("merge", [TSVMerge(), IsoCMerge(), IsoCTSMerge()])
def test_a_model_of_few_matrices_is_warned_that_the_merge_is_an_average(merge, caplog):
    """Convolution kernels are averaged: a model made mostly of them gets one warning line with
    the covered share; a model of matrices gets none."""
    import logging

    torch.manual_seed(0)
    conv_heavy = {"conv.weight": torch.randn(3, 8, 4, 3, 3), "fc.weight": torch.randn(3, 4, 5)}  # 288 vs 20 entries
    with caplog.at_level(logging.WARNING, logger="adamerge.rewrite"):
        out = merge.rewrite(conv_heavy)
    assert "are in 2-D matrices" in caplog.text and "6.5 %" in caplog.text and "(1 of 2 tensors)" in caplog.text
    torch.testing.assert_close(out["conv.weight"], conv_heavy["conv.weight"] / 3)  # averaged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adamerge.rewrite"):
        merge.rewrite({"fc.weight": torch.randn(3, 4, 5), "fc.bias": torch.randn(3, 4)})
    assert "averaged" not in caplog.text


@pytest.mark.parametrize("merge_class", [TSVMerge, IsoCMerge, IsoCTSMerge])
def test_conv_kernels_as_matrices_are_the_merge_of_their_patch_matrices(merge_class, caplog):
    """``conv_kernels: matrix``: a kernel ``(out, in, k, k)`` merges as the matrix ``(out, in·k·k)``
    it applies to each patch (a 1×1 kernel: the linear layer over channels), then takes its shape
    back; no coverage warning; the default keeps FusionBench's average."""
    import logging

    torch.manual_seed(1)
    kernels = {"conv.weight": torch.randn(3, 8, 4, 3, 3), "pointwise.weight": torch.randn(3, 6, 8, 1, 1), "bn.bias": torch.randn(3, 6)}
    as_matrix = merge_class(conv_kernels="matrix")
    with caplog.at_level(logging.WARNING, logger="adamerge.rewrite"):
        out = as_matrix.rewrite(kernels)
    assert "averaged" not in caplog.text
    flat = merge_class().rewrite(
        {"conv.weight": kernels["conv.weight"].reshape(3, 8, 36), "pointwise.weight": kernels["pointwise.weight"].reshape(3, 6, 8)}
    )
    torch.testing.assert_close(out["conv.weight"], flat["conv.weight"].reshape(3, 8, 4, 3, 3))
    torch.testing.assert_close(out["pointwise.weight"], flat["pointwise.weight"].reshape(3, 6, 8, 1, 1))
    torch.testing.assert_close(out["bn.bias"], kernels["bn.bias"] / 3)  # 1-D: averaged either way
    torch.testing.assert_close(merge_class().rewrite(kernels)["conv.weight"], kernels["conv.weight"] / 3)
    with pytest.raises(AdamergeError, match="conv_kernels 'pixels'"):
        merge_class(conv_kernels="pixels")
