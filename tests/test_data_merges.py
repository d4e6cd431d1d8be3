"""Fisher merging and RegMean: the statistics and the rewrites against naive references, their
properties, ``adamerge merge --method fisher|regmean`` end to end (image MLP, tiny causal LMs), and
FusionBench 0.2.33 when its venv is at ``/tmp/fbvenv``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from adamerge.cli import main
from adamerge.core.task_vectors import FactoredDelta, LowRankFactor, TaskVectors
from adamerge.errors import AdamergeError
from adamerge.methods import StaticMethod, get_method
from adamerge.rewrite.fisher import FisherMerge
from adamerge.rewrite.regmean import LayerInputs, RegMeanMerge
from adamerge.run.calibration_statistics import fisher_diagonals, layer_input_grams
from adamerge.run.datamodules import build_datamodule
from adamerge.sources import load_experts
from adamerge.task_types import CLASSIFICATION, LANGUAGE_MODELLING
from tests.conftest import write_images

FB_PYTHON = Path("/tmp/fbvenv/bin/python")
HEAD = r"^5\."  # the classifier of image_mlp


def image_mlp(num_classes: int = 3, size: int = 6) -> nn.Module:
    """Flatten, two tanh layers and a linear head ``5`` (importable as ``tests.test_data_merges:image_mlp``)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, num_classes))


# ----------------------------------------------------------------------------------------------
# naive references


def naive_fisher(model: nn.Module, rows: list, names: list[str], labels: str = "sqrt-weighted", lm: bool = False) -> dict:
    """Per example: its own forward, ``torch.autograd.grad`` of its score, squared; the mean."""
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    total = {n: torch.zeros_like(params[n]) for n in names}
    for one in rows:
        with torch.enable_grad():
            if lm:
                logits = model(**one).logits[0]  # (T, V)
                mask = one["attention_mask"][0].bool()
                keep = mask[:-1] & mask[1:]
                log_probs = torch.log_softmax(logits[:-1][keep], dim=-1)  # (N, V)
            else:
                log_probs = torch.log_softmax(model(one), dim=-1)  # (1, C)
            p = log_probs.detach().exp()
            if labels == "expected":
                squares = [torch.zeros_like(t) for t in tensors]
                for c in range(log_probs.shape[-1]):
                    grads = torch.autograd.grad(log_probs[0, c], tensors, retain_graph=True, allow_unused=True)
                    for s, g in zip(squares, grads):
                        if g is not None:
                            s += p[0, c] * g**2
            else:
                score = (p.sqrt() * log_probs).sum() if labels == "sqrt-weighted" else log_probs.gather(1, p.argmax(1, keepdim=True)).sum()
                squares = [g**2 if g is not None else torch.zeros_like(t) for g, t in
                           zip(torch.autograd.grad(score, tensors, allow_unused=True), tensors)]  # fmt: skip
        for n, s in zip(names, squares):
            total[n] += s
    return {n: t / len(rows) for n, t in total.items()}


def naive_fisher_merge(base: dict, experts: list[dict], fishers: list[dict], eps: float = 1e-6, normalise: bool = True) -> dict:
    """``θ = Σ_k c_k (F_k + ε) θ_k / Σ_k c_k (F_k + ε)`` entry by entry, ``c_k ∝ 1/(‖F_k‖ + ε)``."""
    norms = [torch.sqrt(sum((f.double() ** 2).sum() for f in fisher.values())) for fisher in fishers]
    c = [1.0 / (n + eps) if normalise else torch.tensor(1.0, dtype=torch.float64) for n in norms]
    out = {}
    for name in base:
        if name not in fishers[0]:
            out[name] = sum(e[name].double() for e in experts) / len(experts)
            continue
        num = sum(ck * (f[name].double() + eps) * e[name].double() for ck, f, e in zip(c, fishers, experts))
        den = sum(ck * (f[name].double() + eps) for ck, f in zip(c, fishers))
        out[name] = num / den
    return out


def naive_regmean_layer(weights: list[torch.Tensor], inputs: list[torch.Tensor], alpha: float, mean: bool = True) -> torch.Tensor:
    """``W = ((Σ_k G̃_k)⁻¹ Σ_k G̃_k W_kᵀ)ᵀ`` of ``nn.Linear`` weights ``(out, in)`` and inputs ``X_k (n_k, in)``."""
    grams = []
    for x in inputs:
        g = x.double().T @ x.double() / (x.shape[0] if mean else 1)
        grams.append(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)))
    rhs = sum(g @ w.double().T for g, w in zip(grams, weights))
    return torch.linalg.solve(sum(grams), rhs).T


def recorded_inputs(model: nn.Module, batches: list, mask: bool = False) -> dict[str, torch.Tensor]:
    """``{module name: X (n, in)}``: every input vector each linear layer saw, concatenated (real tokens only with ``mask``)."""
    seen: dict[str, list[torch.Tensor]] = {}
    current = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach()
            if mask and x.dim() == 3:
                x = x[current["mask"]]
            seen.setdefault(name, []).append(x.reshape(-1, x.shape[-1]))

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                current["mask"] = batch["attention_mask"].bool()
                model(**batch)
            else:
                model(batch)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def stacked(base: dict, experts: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.stack([e[n] - base[n] for e in experts]).double() for n in names}


# ----------------------------------------------------------------------------------------------
# the statistics


def test_expected_fisher_of_a_softmax_layer_is_the_analytic_one():
    """For logits ``W x + b``: ``F[c, j] = p_c (1 − p_c) x_j²`` (the paper's exact expectation);
    argmax labels give ``(1[c = ŷ] − p_c)² x_j²``; sqrt-weighted ``(√p_c − p_c Σ_y √p_y)² x_j²``."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    xs = torch.randn(7, 5, dtype=torch.float64)
    p = torch.softmax(layer(xs), dim=-1).detach()  # (N, C)
    onehot = torch.nn.functional.one_hot(p.argmax(1), 4).double()
    factors = {
        "expected": p * (1 - p),
        "argmax": (onehot - p) ** 2,
        "sqrt-weighted": (p.sqrt() - p * p.sqrt().sum(1, keepdim=True)) ** 2,
    }
    for labels, factor in factors.items():
        fisher = fisher_diagonals(layer, [xs], ["weight", "bias"], CLASSIFICATION, labels)
        torch.testing.assert_close(fisher["weight"].double(), (factor[:, :, None] * xs[:, None, :] ** 2).mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fisher["bias"].double(), factor.mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("labels", ["sqrt-weighted", "expected", "argmax"])
def test_fisher_matches_per_example_autograd(labels):
    torch.manual_seed(1)
    model = image_mlp().eval()
    images = torch.randn(10, 3, 6, 6)
    names = [n for n, _ in model.named_parameters()]
    got = fisher_diagonals(model, [images[:4], images[4:]], names, CLASSIFICATION, labels)
    reference = naive_fisher(model, [images[i : i + 1] for i in range(10)], names, labels)
    for name in names:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-9)


def test_sampled_fisher_is_seeded_and_expected_refused_for_language_models():
    torch.manual_seed(2)
    model = image_mlp().eval()
    images = torch.randn(6, 3, 6, 6)
    names = ["1.weight"]
    one = fisher_diagonals(model, [images], names, CLASSIFICATION, "sample", torch.Generator().manual_seed(3))
    two = fisher_diagonals(model, [images], names, CLASSIFICATION, "sample", torch.Generator().manual_seed(3))
    assert torch.equal(one["1.weight"], two["1.weight"]) and float(one["1.weight"].sum()) > 0
    with pytest.raises(AdamergeError, match="classification only"):
        fisher_diagonals(model, [images], names, LANGUAGE_MODELLING, "expected")


def test_grams_are_the_recorded_inputs_and_skip_padding():
    torch.manual_seed(3)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            return self.proj(self.embed(input_ids))

    model = Toy().eval()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    grams = layer_input_grams(model, [batch], ["embed.weight", "proj.weight", "proj.bias"])
    assert list(grams) == ["proj.weight"] and grams["proj.weight"].rows == 5  # five real tokens
    x = model.embed(batch["input_ids"])[batch["attention_mask"].bool()].detach()  # (5, 4)
    torch.testing.assert_close(grams["proj.weight"].gram, x.T @ x)


# ----------------------------------------------------------------------------------------------
# the rewrites


def test_fisher_merge_is_the_fisher_weighted_mean():
    generator = torch.Generator().manual_seed(4)
    base = {n: torch.randn(shape, generator=generator, dtype=torch.float64) for n, shape in (("w", (4, 3)), ("b", (4,)), ("buf", (2,)))}
    experts = [{n: t + torch.randn(t.shape, generator=generator) for n, t in base.items()} for _ in range(3)]
    fishers = [{n: torch.rand(base[n].shape, generator=generator) * (k + 1) for n in ("w", "b")} for k in range(3)]
    tv = stacked(base, experts, list(base))
    for normalise in (True, False):
        merge = FisherMerge(normalise=normalise)
        got = {n: base[n].double() + t.sum(0) for n, t in merge.rewrite(tv, fishers).items()}
        reference = naive_fisher_merge(base, experts, fishers, normalise=normalise)
        for name in base:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-10, atol=1e-12)


def test_fisher_merge_properties():
    generator = torch.Generator().manual_seed(5)
    tv = {"w": torch.randn(3, 5, 2, generator=generator, dtype=torch.float64)}
    fisher = [{"w": torch.rand(5, 2, generator=generator)} for _ in range(3)]
    one = FisherMerge().rewrite({"w": tv["w"][:1]}, fisher[:1])
    torch.testing.assert_close(one["w"], tv["w"][:1])  # one expert: that expert
    equal = FisherMerge().rewrite(tv, [fisher[0]] * 3)
    torch.testing.assert_close(equal["w"].sum(0), tv["w"].mean(0))  # equal Fishers: the average
    scaled = FisherMerge().rewrite(tv, [{"w": fisher[0]["w"] * s} for s in (1.0, 10.0, 100.0)])
    torch.testing.assert_close(scaled["w"].sum(0), tv["w"].mean(0), rtol=1e-4, atol=1e-6)  # normalised: scale-free
    with pytest.raises(AdamergeError, match="labels must be one of"):
        FisherMerge(labels="true")


def test_regmean_matches_the_direct_solve_and_averages_the_rest():
    generator = torch.Generator().manual_seed(6)
    base = {"fc.weight": torch.randn(5, 4, generator=generator, dtype=torch.float64), "fc.bias": torch.randn(5, generator=generator, dtype=torch.float64)}
    experts = [{n: t + 0.3 * torch.randn(t.shape, generator=generator, dtype=torch.float64) for n, t in base.items()} for _ in range(3)]
    inputs = [torch.randn(8 + 3 * k, 4, generator=generator, dtype=torch.float64) for k in range(3)]
    grams = [{"fc.weight": LayerInputs(x.T @ x, x.shape[0])} for x in inputs]
    tv = stacked(base, experts, list(base))
    for alpha, mean in ((0.9, True), (1.0, False), (0.3, True)):
        out = RegMeanMerge(alpha=alpha, mean=mean).rewrite(tv, grams)
        reference = naive_regmean_layer([e["fc.weight"] for e in experts], inputs, alpha, mean)
        torch.testing.assert_close(base["fc.weight"] + out["fc.weight"].sum(0), reference, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(base["fc.bias"] + out["fc.bias"].sum(0), sum(e["fc.bias"] for e in experts) / 3)


def test_regmean_properties():
    generator = torch.Generator().manual_seed(7)
    weights = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)  # (K, out, in)
    inputs = [torch.randn(20, 5, generator=generator, dtype=torch.float64) for _ in range(3)]
    grams = [{"w": LayerInputs(x.T @ x, 20)} for x in inputs]
    # one expert: that expert
    torch.testing.assert_close(RegMeanMerge().rewrite({"w": weights[:1]}, grams[:1])["w"], weights[:1])
    # α = 0: per input feature, the mean weighted by each expert's squared input
    diagonal = RegMeanMerge(alpha=0.0).rewrite({"w": weights}, grams)["w"].sum(0)
    d = torch.stack([(x**2).mean(0) for x in inputs])  # (K, in)
    torch.testing.assert_close(diagonal, (d[:, None, :] * weights).sum(0) / d.sum(0))
    # the same inputs for every expert, α = 1: the least-squares optimum of Σ_k ‖X Wᵀ − X W_kᵀ‖²
    shared = [{"w": LayerInputs(inputs[0].T @ inputs[0], 20)}] * 3
    merged = RegMeanMerge(alpha=1.0).rewrite({"w": weights}, shared)["w"].sum(0).requires_grad_()
    loss = sum(((inputs[0] @ merged.T - inputs[0] @ w.T) ** 2).sum() for w in weights)
    (gradient,) = torch.autograd.grad(loss, merged)
    assert float(gradient.abs().max()) < 1e-9
    # a feature no expert saw: its column keeps the mean, the others are solved without it
    dead = [torch.cat([x[:, :4], torch.zeros(20, 1, dtype=torch.float64)], 1) for x in inputs]
    out = RegMeanMerge().rewrite({"w": weights}, [{"w": LayerInputs(x.T @ x, 20)} for x in dead])["w"].sum(0)
    torch.testing.assert_close(out[:, 4], weights[:, :, 4].mean(0))
    torch.testing.assert_close(out[:, :4], naive_regmean_layer(list(weights[:, :, :4]), [x[:, :4] for x in dead], 0.9))
    with pytest.raises(AdamergeError, match="alpha must be in"):
        RegMeanMerge(alpha=1.5)


def test_regmean_on_a_model_of_few_linear_layers_warns_that_it_averages(caplog):
    generator = torch.Generator().manual_seed(3)
    tv = {"conv": torch.randn(2, 8, 4, 3, 3, generator=generator), "w": torch.randn(2, 6, 5, generator=generator)}
    x = torch.randn(10, 5, generator=generator)
    grams = [{"w": LayerInputs(x.T @ x, 10)}] * 2
    with caplog.at_level(logging.WARNING, logger="adamerge.rewrite"):
        RegMeanMerge().rewrite(tv, grams)
    assert "RegMean: only 9.4 % of the merged entries (1 of 2 tensors) are in linear layers" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adamerge.rewrite"):
        RegMeanMerge().rewrite({"w": tv["w"]}, grams)
    assert not caplog.text


def test_methods_are_registered_static_and_densify_lora():
    for name in ("fisher", "regmean"):
        method = get_method(name, learned=False)
        assert isinstance(method, StaticMethod) and method.needs_calibration and method.paper
        torch.testing.assert_close(method.start(3), torch.ones(3, 1))
    generator = torch.Generator().manual_seed(8)
    dense = torch.randn(1, 6, 5, generator=generator)
    left, right = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
    store = TaskVectors(["a", "b"], {"w": FactoredDelta((6, 5), 2, [0], dense, [LowRankFactor(1, left, right, 0.5)])})
    fishers = [{"w": torch.rand(6, 5, generator=generator)} for _ in range(2)]
    rewritten = get_method("fisher").configured().rewrite_with_statistics(store, fishers)
    expected = FisherMerge().rewrite({"w": torch.stack([dense[0], 0.5 * left @ right])}, fishers)
    assert rewritten.factored_names() == []
    torch.testing.assert_close(rewritten["w"], expected["w"])
    with pytest.raises(AdamergeError, match="--options"):
        get_method("regmean").configured(density=0.2)


# ----------------------------------------------------------------------------------------------
# end to end: adamerge merge exports θ_0 + the naive reference's delta


@pytest.fixture
def image_setup(tmp_path):
    torch.manual_seed(0)
    base = image_mlp()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    experts = {}
    for seed, task in enumerate(["alpha", "beta"], start=1):
        generator = torch.Generator().manual_seed(seed)
        state = {n: t + 0.2 * torch.randn(t.shape, generator=generator) for n, t in base.state_dict().items()}
        torch.save(state, tmp_path / f"{task}.pt")
        experts[task] = state
        write_images(tmp_path / "calib" / task, 9, seed, size=6)
    return tmp_path, base.state_dict(), experts


def image_args(folder: Path, experts: dict, method: str, *extra: str) -> list[str]:
    return ["merge", "--method", method, "--base", f"tests.test_data_merges:image_mlp@{folder / 'base.pt'}",
            "--experts", *[f"{t}={folder / t}.pt" for t in experts], "--head-pattern", HEAD, "--image-size", "6",
            "--output", str(folder / method), *extra]  # fmt: skip


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_merge_command_exports_the_reference(image_setup, method):
    folder, base, experts = image_setup
    assert main(image_args(folder, experts, method, "--calib", str(folder / "calib"))) == 0
    loaded = load_experts(f"tests.test_data_merges:image_mlp@{folder / 'base.pt'}", {t: str(folder / f"{t}.pt") for t in experts})
    data = build_datamodule(loaded, folder / "calib", image_size=6)
    data.setup("fit")
    images = {task: torch.cat([item["inputs"] if isinstance(item, dict) else item for item in loader])
              for task, loader in data.target_loaders().items()}  # fmt: skip
    modules = {}
    for task, state in experts.items():
        modules[task] = image_mlp().eval()
        modules[task].load_state_dict(state)
    merged_names = [n for n in base if not n.startswith("5.")]
    if method == "fisher":
        fishers = [naive_fisher(modules[t], [x[None] for x in images[t]], merged_names) for t in experts]
        reference = naive_fisher_merge(base, list(experts.values()), fishers)
    else:
        inputs = {t: recorded_inputs(modules[t], [images[t]]) for t in experts}
        reference = {n: sum(e[n].double() for e in experts.values()) / 2 for n in merged_names}
        for layer in ("1", "3"):
            reference[f"{layer}.weight"] = naive_regmean_layer([e[f"{layer}.weight"] for e in experts.values()],
                                                               [inputs[t][layer] for t in experts], 0.9)  # fmt: skip
    exported = torch.load(folder / method / "merged.pt", weights_only=True)
    for name in merged_names:
        torch.testing.assert_close(exported[name].double(), reference[name], rtol=1e-4, atol=1e-5)
    for task in experts:  # heads stay per task
        heads = torch.load(folder / method / "heads" / f"{task}.pt", weights_only=True)
        torch.testing.assert_close(heads["5.weight"], experts[task]["5.weight"])


def test_merge_without_calib_is_refused_before_anything_is_written(image_setup, caplog):
    folder, _, experts = image_setup
    for method in ("fisher", "regmean"):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="adamerge"):
            assert main(image_args(folder, experts, method)) == 2
        assert "pass --calib DIR" in caplog.text and f"--method {method}" in caplog.text
        assert not (folder / method).exists()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_lm_merges_export_the_reference(tmp_path, family):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from tests.test_causal_lm import build

    setup = build(tmp_path, family)
    loaded = setup.load()
    data = build_datamodule(loaded, setup.calib, max_length=16)
    data.setup("fit")
    batches = {task: [dict(item["inputs"]) if "inputs" in item else dict(item) for item in loader]
               for task, loader in data.target_loaders().items()}  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(setup.base).eval()
    experts = {t: AutoModelForCausalLM.from_pretrained(p).eval() for t, p in setup.experts.items()}
    states = {t: m.state_dict() for t, m in experts.items()}
    names = list(loaded.task_vectors.names)
    methods = ["regmean"] if family == "gpt2" else ["fisher", "regmean"]
    for method in methods:
        output = tmp_path / method
        assert main(["merge", "--method", method, "--base", f"hf:{setup.base}", "--experts", *setup.expert_args(),
                     "--calib", str(setup.calib), "--max-length", "16", "--output", str(output)]) == 0  # fmt: skip
        base_state = base.state_dict()
        if method == "fisher":
            fishers = []
            for t, model in experts.items():
                one = [{k: v[i : i + 1] for k, v in b.items()} for b in batches[t] for i in range(len(b["input_ids"]))]
                fishers.append(naive_fisher(model, one, names, lm=True))
            reference = naive_fisher_merge({n: base_state[n] for n in names}, [states[t] for t in experts], fishers)
        else:
            reference = {n: sum(states[t][n].double() for t in experts) / len(experts) for n in names}
            inputs = {t: recorded_inputs(m, batches[t], mask=True) for t, m in experts.items()}
            for module_name, module in base.named_modules():
                weight = f"{module_name}.weight"
                if weight not in names or not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
                    continue
                conv1d = type(module).__name__ == "Conv1D"
                ws = [states[t][weight].T if conv1d else states[t][weight] for t in experts]
                solved = naive_regmean_layer(ws, [inputs[t][module_name] for t in experts], 0.9)
                reference[weight] = solved.T if conv1d else solved
        exported = AutoModelForCausalLM.from_pretrained(output / "model").state_dict()
        for name in names:
            torch.testing.assert_close(exported[name].double(), reference[name], rtol=1e-4, atol=1e-5, msg=f"{method} {name}")


# ----------------------------------------------------------------------------------------------
# FusionBench 0.2.33 (fisher_merging, regmean)


@pytest.mark.slow
@pytest.mark.skipif(not FB_PYTHON.exists(), reason=f"FusionBench venv not found at {FB_PYTHON} (see benchmarks/peers/fusionbench_data_merge_check.py)")
def test_agrees_with_fusionbench(tmp_path):
    from benchmarks.peers.fusionbench_data_merge_check import compare

    report = compare(str(FB_PYTHON), tmp_path)
    assert report["fisher (relative)"] < 1e-10, report
    assert report["regmean (relative)"] < 1e-10, report
    assert report["float64/regmean/α=float32(0.9) (relative)"] < 1e-10, report  # FusionBench rounds α to float32
    assert report["float64/fisher/bs=4 (relative)"] > 1e-3, report  # it squares batch gradients, adamerge per example
