"""MAP (Li et al., 2024, arXiv 2406.07529): the quadratic surrogates, the non-dominated filter,
the weighted pick and the weighted-sum optima against naive references, and ``adamerge pareto``
end to end (accuracy on ``--eval`` against ``adamerge merge``, agreement without labels against a
naive loop, the export against θ_0 + Σ_k λ_k τ_k from the files, the refusals)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from adamerge.cli import _parser, main
from adamerge.core.pareto import (
    amortized_front,
    fit_quadratic,
    non_dominated,
    num_coefficients,
    predict_quadratic,
    quadratic_features,
    r_squared,
    sobol_box,
    spread_subset,
    weighted_optima,
    weighted_pick,
)
from adamerge.run.datamodules import build_datamodule
from adamerge.run.pareto_plot import plot_front
from adamerge.run.settings import ParetoSettings, field_help
from adamerge.sources import load_experts
from tests.conftest import HEAD, tiny_setup  # noqa: F401  (a fixture)
from tests.test_data_merges import HEAD as MLP_HEAD
from tests.test_data_merges import image_mlp, image_setup  # noqa: F401  (a fixture)
from tests.test_hf_source import hf  # noqa: F401  (a fixture)

FAST = ["--candidates", "2000", "--front-size", "50"]

# ----------------------------------------------------------------------------------------------
# naive references


def naive_design(points: list[list[float]]) -> list[list[float]]:
    """``[1, λ_1 … λ_K, λ_i λ_j (i ≤ j)]`` row by row, entry by entry."""
    rows = []
    for lam in points:
        row = [1.0]
        for value in lam:
            row.append(value)
        for i in range(len(lam)):
            for j in range(i, len(lam)):
                row.append(lam[i] * lam[j])
        rows.append(row)
    return rows


def naive_quadratic(coefficients: list[float], lam: list[float]) -> float:
    return sum(c * f for c, f in zip(coefficients, naive_design([lam])[0]))


def brute_force_front(values: list[list[float]]) -> list[bool]:
    """Point i is kept unless some j is ≥ everywhere and > somewhere."""
    keep = []
    for i, vi in enumerate(values):
        dominated = False
        for j, vj in enumerate(values):
            if j != i and all(a >= b for a, b in zip(vj, vi)) and any(a > b for a, b in zip(vj, vi)):
                dominated = True
                break
        keep.append(not dominated)
    return keep


def concave_toy(num_tasks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``M_k(λ) = c_k − (λ − a_k)ᵀ D_k (λ − a_k)``, D_k diagonal positive, a_k inside [0, 1]^K;
    returns the surrogate coefficients fitted exactly on samples, and ``c, a, D``."""
    generator = torch.Generator().manual_seed(3)
    c = torch.rand(num_tasks, generator=generator, dtype=torch.float64)
    a = 0.2 + 0.6 * torch.rand(num_tasks, num_tasks, generator=generator, dtype=torch.float64)  # (task, K)
    d = 0.5 + torch.rand(num_tasks, num_tasks, generator=generator, dtype=torch.float64)  # (task, K)
    lam = sobol_box(60, 0.0, 1.0, num_tasks, seed=0)
    values = torch.stack([c[k] - (d[k] * (lam - a[k]) ** 2).sum(-1) for k in range(num_tasks)], dim=1)  # (N, K)
    return fit_quadratic(lam, values), c, a, d


# ----------------------------------------------------------------------------------------------
# the maths


def test_quadratic_fit_recovers_a_known_quadratic_exactly():
    generator = torch.Generator().manual_seed(0)
    k = 3
    truth = torch.randn(num_coefficients(k), generator=generator, dtype=torch.float64).tolist()
    lam = sobol_box(2 * num_coefficients(k), -0.5, 1.5, k, seed=1)
    points = lam.tolist()
    torch.testing.assert_close(quadratic_features(lam), torch.tensor(naive_design(points), dtype=torch.float64))
    values = torch.tensor([naive_quadratic(truth, p) for p in points], dtype=torch.float64)
    exact = fit_quadratic(lam, values)
    torch.testing.assert_close(exact, torch.tensor(truth, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    ridged = fit_quadratic(lam, values, ridge=1e-6)
    torch.testing.assert_close(ridged, torch.tensor(truth, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    assert r_squared(values, predict_quadratic(exact, lam)) == pytest.approx(1.0, abs=1e-12)
    assert num_coefficients(5) == 21 and len(naive_design([[0.0] * 5])[0]) == 21


def test_non_dominated_filter_equals_brute_force_with_ties():
    generator = torch.Generator().manual_seed(0)
    for n, m in [(120, 2), (200, 3), (60, 5)]:
        values = torch.randint(0, 5, (n, m), generator=generator).double()  # many ties and duplicates
        values = torch.cat([values, values[:7]])  # exact duplicates too
        assert non_dominated(values, chunk=17).tolist() == brute_force_front(values.tolist())
        continuous = torch.rand(n, m, generator=generator, dtype=torch.float64)
        assert non_dominated(continuous).tolist() == brute_force_front(continuous.tolist())


def test_weighted_pick_equals_brute_force_argmax():
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(80, 3, generator=generator, dtype=torch.float64)
    for weights in ([1.0, 1.0, 1.0], [2.0, 0.5, 1.0], [0.1, 0.1, 5.0]):
        scores = [sum(w * v for w, v in zip(weights, row)) / sum(weights) for row in values.tolist()]
        assert weighted_pick(values, torch.tensor(weights)) == max(range(len(scores)), key=lambda i: (scores[i], -i))
    tied = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert weighted_pick(tied, torch.tensor([1.0, 1.0])) == 0  # the first on a tie


def test_weighted_optima_of_a_concave_toy_match_the_closed_form():
    k = 3
    coefficients, _, a, d = concave_toy(k)
    weights = torch.tensor([[1.0, 1.0, 1.0], [0.7, 0.2, 0.1], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3]], dtype=torch.float64)
    found = weighted_optima(coefficients, weights, 0.0, 1.0)
    for w, lam in zip(weights, found):
        # ∂/∂λ_i Σ_k w_k (−D_ki (λ_i − a_ki)²) = 0  →  λ_i = Σ_k w_k D_ki a_ki / Σ_k w_k D_ki
        closed = (w[:, None] * d * a).sum(0) / (w[:, None] * d).sum(0)
        torch.testing.assert_close(lam, closed, rtol=0, atol=1e-6)


def test_front_points_are_non_dominated_under_the_surrogates():
    coefficients, _, _, _ = concave_toy(3)
    lam, values = amortized_front(coefficients, 0.0, 1.0, candidates=3000, front_size=40, seed=0)
    assert 1 <= lam.shape[0] <= 40 and ((lam >= 0) & (lam <= 1)).all()
    torch.testing.assert_close(values, predict_quadratic(coefficients, lam))
    assert all(brute_force_front(values.tolist()))
    # and no Sobol candidate dominates any front point
    pool = predict_quadratic(coefficients, sobol_box(3000, 0.0, 1.0, 3, seed=1))
    for row in values:
        assert not ((pool >= row).all(-1) & (pool > row).any(-1)).any()


def test_capping_a_front_keeps_its_extremes_and_protected_points():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    front = torch.stack([t, 1 - t**2], dim=1)  # (101, 2), every point non-dominated
    protected = torch.zeros(101, dtype=torch.bool)
    protected[[37, 38]] = True
    kept = spread_subset(front, 10, protected)
    assert kept.numel() == 10 and {0, 100, 37, 38} <= set(kept.tolist())
    assert spread_subset(front, 200).tolist() == list(range(101))
    only = torch.zeros(101, dtype=torch.bool)
    only[:20] = True
    assert set(spread_subset(front, 5, only).tolist()) <= set(range(20))


def test_front_plot_for_more_than_two_tasks(tmp_path):
    generator = torch.Generator().manual_seed(0)
    front, measured = torch.rand(20, 3, generator=generator), torch.rand(10, 3, generator=generator)
    assert plot_front(tmp_path / "front.png", ["a", "b", "c"], front, measured, front[:2], "agreement")
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# the command


def test_every_pareto_field_is_one_option():
    parser = _parser(ParetoSettings, "", False)
    primary = [a for a in parser._actions if a.option_strings and a.dest not in {"help", "config", "print_config"}]
    primary = [a for a in primary if not a.option_strings[0].startswith("--no-")]
    assert [a.dest for a in primary] == [f.name for f in dataclasses.fields(ParetoSettings)]
    assert set(field_help(ParetoSettings)) == {f.name for f in dataclasses.fields(ParetoSettings)}


def pareto_args(setup, output: Path, *extra: str) -> list[str]:
    return ["pareto", "--base", f"tests.tiny:tiny_convnet@{setup.base}", "--experts", *setup.expert_args(),
            "--calib", str(setup.calib), "--head-pattern", HEAD, "--image-size", "12", "--output", str(output),
            *FAST, *extra]  # fmt: skip


def test_pareto_end_to_end_with_eval(tiny_setup, tmp_path):
    output = tmp_path / "front"
    assert main(pareto_args(tiny_setup, output, "--eval", str(tiny_setup.eval), "--pick", "{beta: 3}")) == 0
    names = {p.name for p in output.iterdir()}
    expected = {"points.json", "surrogates.json", "front.csv", "front.md", "front.png", "picked.json", "merged.pt", "heads",
                "coefficients.json", "metrics.json", "config.yaml"}  # fmt: skip
    assert expected <= names
    points = json.loads((output / "points.json").read_text())
    assert points["metric"] == "accuracy" and len(points["points"]) == 2 * 6 + 1  # default: twice (K+1)(K+2)/2, plus λ = 0.3
    reference = points["points"][-1]
    assert reference["kind"] == "reference" and reference["lambda"] == {"alpha": 0.3, "beta": 0.3}

    # the reference point's accuracy is adamerge merge's own task arithmetic at λ = 0.3
    merge_output = tmp_path / "merge"
    assert main(["merge", "--method", "task-arithmetic", "--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}",
                 "--experts", *tiny_setup.expert_args(), "--calib", str(tiny_setup.calib), "--eval", str(tiny_setup.eval),
                 "--head-pattern", HEAD, "--image-size", "12", "--output", str(merge_output)]) == 0  # fmt: skip
    merged_accuracy = json.loads((merge_output / "metrics.json").read_text())["accuracy"]["task-arithmetic"]
    assert {t: reference["metric"][t] for t in ("alpha", "beta")} == {t: merged_accuracy[t] for t in ("alpha", "beta")}

    surrogates = json.loads((output / "surrogates.json").read_text())
    assert set(surrogates["tasks"]) == {"alpha", "beta"} and len(surrogates["features"]) == 6
    assert all(len(s["coefficients"]) == 6 and s["r2"] <= 1 + 1e-9 for s in surrogates["tasks"].values())
    with open(output / "front.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and set(rows[0]) == {"lambda_alpha", "lambda_beta", "predicted_alpha", "predicted_beta", "predicted_mean"}
    front = torch.tensor([[float(r["predicted_alpha"]), float(r["predicted_beta"])] for r in rows], dtype=torch.float64)
    picked = json.loads((output / "picked.json").read_text())
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    best = float((front @ weights).max() / 4)
    chosen = picked["predicted"]["alpha"] * 0.25 + picked["predicted"]["beta"] * 0.75
    assert chosen == pytest.approx(best, abs=1e-5)  # the pick is the front's weighted best (front.csv: 6 decimals)
    assert set(picked["measured"]) == {"alpha", "beta", "mean"} and picked["weights"] == {"alpha": 1.0, "beta": 3.0}

    # the export is the pick, or a sampled point that measured better (then named), and is
    # θ_0 + Σ_k λ_k τ_k at its λ, computed from the files
    exported_point = picked["exported"]
    sampled = json.loads((output / "points.json").read_text())["points"]
    scores = [(p["metric"]["alpha"] + 3 * p["metric"]["beta"]) / 4 for p in sampled]
    picked_score = (picked["measured"]["alpha"] + 3 * picked["measured"]["beta"]) / 4
    if exported_point["source"] == "front pick":
        assert max(scores) <= picked_score + 1e-12 and exported_point["lambda"] == picked["lambda"]
    else:
        assert exported_point["index"] == scores.index(max(scores)) and max(scores) > picked_score
    lam = exported_point["lambda"]
    base = torch.load(tiny_setup.base, weights_only=True)
    experts = {t: torch.load(p, weights_only=True) for t, p in tiny_setup.experts.items()}
    exported = torch.load(output / "merged.pt", weights_only=True)
    parameters = [n for n in base if not n.startswith("8.") and ("weight" in n or "bias" in n)]
    for name in parameters:
        naive = base[name].double() + sum(lam[t] * (experts[t][name].double() - base[name].double()) for t in experts)
        torch.testing.assert_close(exported[name].double(), naive, rtol=1e-5, atol=1e-6)
    for task in experts:
        head = torch.load(output / "heads" / f"{task}.pt", weights_only=True)
        torch.testing.assert_close(head["8.weight"], experts[task]["8.weight"])
    coefficients = json.loads((output / "coefficients.json").read_text())
    assert {t: v["all"] if "all" in v else next(iter(v.values())) for t, v in coefficients.items()} == pytest.approx(lam, abs=1e-6)


def test_pareto_agreement_without_eval_equals_a_naive_loop(image_setup, tmp_path):
    folder, base, experts = image_setup
    output = tmp_path / "front"
    spec = f"tests.test_data_merges:image_mlp@{folder / 'base.pt'}"
    args = ["pareto", "--base", spec, "--experts", *[f"{t}={folder / t}.pt" for t in experts], "--calib", str(folder / "calib"),
            "--head-pattern", MLP_HEAD, "--image-size", "6", "--output", str(output), "--points", "7", *FAST]  # fmt: skip
    assert main(args) == 0
    points = json.loads((output / "points.json").read_text())
    assert points["metric"] == "agreement" and len(points["points"]) == 8
    loaded = load_experts(spec, {t: str(folder / f"{t}.pt") for t in experts})
    data = build_datamodule(loaded, folder / "calib", image_size=6)
    data.setup("fit")
    images = {task: torch.cat([item["inputs"] if isinstance(item, dict) else item for item in loader])
              for task, loader in data.target_loaders().items()}  # fmt: skip
    for point in (points["points"][0], points["points"][-1]):
        lam = point["lambda"]
        for task in experts:
            expert = image_mlp().eval()
            expert.load_state_dict(experts[task])
            state = {n: base[n] + sum(torch.tensor(lam[t], dtype=torch.float32) * (experts[t][n] - base[n]) for t in experts)
                     for n in base if not n.startswith("5.")}  # fmt: skip
            state |= {n: experts[task][n] for n in base if n.startswith("5.")}
            merged = image_mlp().eval()
            merged.load_state_dict(state)
            with torch.no_grad():
                agree = (merged(images[task]).argmax(-1) == expert(images[task]).argmax(-1)).float().mean().item()
            assert point["metric"][task] == pytest.approx(agree, abs=1e-6)
    assert (output / "front.png").is_file() and (output / "merged.pt").is_file()


def run_fails(args: list[str], caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="adamerge"):
        assert main(args) == 2
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


REFUSALS = [
    (["--points", "5"], "--points 5"),
    (["--bounds", "1", "0"], "--bounds"),
    (["--bounds", "0.5", "0.5"], "LOW < HIGH"),
    (["--pick", "{gamma: 1}"], "gamma is not a task"),
    (["--pick", "{alpha: 0}"], "> 0"),
    (["--pick", "{alpha: -1}"], "> 0"),
    (["--metric", "accuracy"], "--metric accuracy"),
]


@pytest.mark.parametrize(("extra", "message"), REFUSALS, ids=[" ".join(r[0]) for r in REFUSALS])
def test_bad_input_is_refused_with_one_line_and_nothing_written(tiny_setup, tmp_path, caplog, extra, message):
    output = tmp_path / "front"
    text = run_fails(pareto_args(tiny_setup, output, *extra), caplog)
    assert message in text and len(text.splitlines()) == 1
    assert not output.exists() and not any(p.name.startswith(".front") for p in tmp_path.iterdir())


def test_agreement_without_calib_is_refused(tiny_setup, tmp_path, caplog):
    output = tmp_path / "front"
    args = pareto_args(tiny_setup, output, "--metric", "agreement", "--eval", str(tiny_setup.eval))
    at = args.index("--calib")
    del args[at : at + 2]
    text = run_fails(args, caplog)
    assert "--metric agreement" in text and "--calib" in text
    assert not output.exists()


def test_default_points_are_twice_the_quadratic_coefficients():
    assert [2 * num_coefficients(k) for k in (2, 3, 5)] == [12, 20, 42]


def test_pareto_of_causal_lms_by_agreement_exports_task_arithmetic(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.test_causal_lm import build

    setup = build(tmp_path, "llama")
    output = tmp_path / "front"
    assert main(["pareto", "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(), "--calib", str(setup.calib),
                 "--output", str(output), "--points", "6", *FAST]) == 0  # fmt: skip
    points = json.loads((output / "points.json").read_text())
    assert points["metric"] == "agreement" and all(0 <= p["metric"]["mean"] <= 1 for p in points["points"])
    lam = json.loads((output / "picked.json").read_text())["exported"]["lambda"]
    base = AutoModelForCausalLM.from_pretrained(setup.base).state_dict()
    experts = {t: AutoModelForCausalLM.from_pretrained(p).state_dict() for t, p in setup.experts.items()}
    exported = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
    for name, theta in base.items():
        naive = theta.double() + sum(lam[t] * (experts[t][name].double() - theta.double()) for t in experts)
        torch.testing.assert_close(exported[name].double(), naive, atol=1e-6, rtol=1e-5)


def test_no_data_at_all_is_refused(tiny_setup, tmp_path, caplog):
    args = pareto_args(tiny_setup, tmp_path / "front")
    at = args.index("--calib")
    del args[at : at + 2]
    assert "--metric auto (no --eval: agreement): pass --calib" in run_fails(args, caplog)
    assert not (tmp_path / "front").exists()


def test_pareto_of_text_classifiers_agrees_with_merge(hf, tmp_path):
    from tests.test_hf_source import CLASSES

    common = ["--base", f"hf:{hf.base}", "--experts", *hf.expert_args(), "--eval", str(hf.eval)]
    assert main(["merge", "--method", "task-arithmetic", *common, "--output", str(tmp_path / "ta")]) == 0
    merged_accuracy = json.loads((tmp_path / "ta" / "metrics.json").read_text())["accuracy"]["task-arithmetic"]
    assert main(["pareto", *common, "--output", str(tmp_path / "acc"), "--points", str(num_coefficients(len(CLASSES))), *FAST]) == 0
    reference = json.loads((tmp_path / "acc" / "points.json").read_text())["points"][-1]
    assert {t: reference["metric"][t] for t in CLASSES} == {t: merged_accuracy[t] for t in CLASSES}
    assert main(["pareto", *common, "--calib", str(hf.calib), "--metric", "agreement", "--output", str(tmp_path / "agree"),
                 "--points", str(num_coefficients(len(CLASSES))), *FAST]) == 0  # fmt: skip
    assert json.loads((tmp_path / "agree" / "points.json").read_text())["metric"] == "agreement"
    assert (tmp_path / "agree" / "tasks").is_dir() and (tmp_path / "agree" / "model").is_dir()


def test_a_sampled_point_that_measured_better_than_the_pick_is_exported(caplog):
    from adamerge.run.pareto import exported_point

    lam = torch.tensor([[0.1, 0.2], [0.3, 0.3]], dtype=torch.float64)
    measured = torch.tensor([[0.9, 0.5], [0.6, 0.6]], dtype=torch.float64)  # weighted (1, 3): 0.6, 0.6
    picked = {"lambda": {"a": 0.8, "b": 0.9}, "measured": {"a": 0.5, "b": 0.7}, "predicted": {"a": 0.9, "b": 0.9}}
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert exported_point(picked, lam, measured, weights, ["a", "b"])["source"] == "front pick"  # 0.65 ≥ 0.6
    picked["measured"] = {"a": 0.5, "b": 0.5}
    with caplog.at_level("WARNING", logger="adamerge.run.pareto"):
        chosen = exported_point(picked, lam, measured, weights, ["a", "b"])
    assert chosen["source"] == "sampled point" and chosen["index"] == 0 and chosen["lambda"] == {"a": 0.1, "b": 0.2}
    assert "below sampled point 0" in caplog.text
