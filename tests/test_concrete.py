"""Concrete AdaMerging: the mask's samples, the bi-level step against a naive autograd reference,
the method end to end from the command line, and FusionBench 0.2.33's own code (when its venv is at
``/tmp/fbvenv``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from adamerge.cli import main
from adamerge.core.concrete_mask import ConcreteMask
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import Entropy
from adamerge.run.concrete_mask import ConcreteMaskModule
from tests.conftest import HEAD
from tests.test_cli import fit_args
from tests.tiny import tiny_mlp

FB_PYTHON = Path("/tmp/fbvenv/bin/python")
TASKS = ("alpha", "beta")


def test_samples_are_torch_relaxed_bernoulli_rescaled_and_the_hard_mask_keeps_nonnegative_logits():
    mask = ConcreteMask({"a.weight": (3, 4), "a.bias": (5,)}, temperature=0.5)
    with torch.no_grad():
        for logits in mask.logits:
            logits.normal_(generator=torch.Generator().manual_seed(logits.numel()))
    torch.manual_seed(7)
    ours = mask.sample()
    torch.manual_seed(7)
    for name, logits in mask.named_logits():
        draw = torch.distributions.RelaxedBernoulli(logits=logits, temperature=0.5).rsample()
        torch.testing.assert_close(ours[name], draw / draw.mean(), rtol=0, atol=0)
        assert float(ours[name].detach().mean()) == pytest.approx(1.0)
    hard, expected = mask.hard(), mask.expected()
    for name, logits in mask.named_logits():
        kept = (logits >= 0).float()
        torch.testing.assert_close(hard[name], kept / kept.mean())
        probs = torch.sigmoid(logits.detach())
        torch.testing.assert_close(expected[name], probs / probs.mean())
    flat = ConcreteMask({"w": (4, 2)}, initial_logits=0.0)  # untrained: the expected mask is the unmasked merge
    torch.testing.assert_close(flat.expected()["w"], torch.ones(4, 2))
    assert mask.kept_share() == pytest.approx(sum(float((p >= 0).sum()) for p in mask.logits) / 17)


def _merged(granularity: str = "layer", seed: int = 0) -> MergedModel:
    torch.manual_seed(seed)
    model = tiny_mlp(in_features=6, hidden=8, num_classes=3)
    names = [n for n, _ in model.named_parameters() if not n.startswith("2.")]
    vectors = {n: 0.5 * torch.randn(len(TASKS), *dict(model.named_parameters())[n].shape) for n in names}
    heads = {t: {"2.weight": torch.randn(3, 8), "2.bias": torch.randn(3)} for t in TASKS}
    return MergedModel(model, TaskVectors(TASKS, vectors), granularity, "none", 0.3, heads=heads, batchnorm="base")


@pytest.mark.parametrize("granularity", ["layer", "task", "chunk:3", "partition:2"])
def test_masked_tensors_with_a_unit_mask_are_the_merge(granularity):
    merged = _merged(granularity)
    module = ConcreteMaskModule(merged, objective=Entropy())
    lam = torch.rand(merged.coefficients.raw.shape)
    ones = {name: torch.ones(tv.shape[1:]) for name, tv in merged.task_vectors.parts()}
    expected = merged.merged_tensors(lam)
    for name, tensor in module.masked_tensors(lam, ones).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6)


def _naive_steps(merged: MergedModel, steps: list[dict[str, torch.Tensor]], inner_lr: float, mask_lr: float) -> dict[str, torch.Tensor]:
    """The bi-level loop by plain autograd: θ = θ_0 + m̃ ⊙ Σ_k λ_k τ_k per entry, no leaves, no halves helper."""
    from torch.func import functional_call

    base = {n: p.detach().clone() for n, p in merged.model.named_parameters()}
    tau = dict(merged.task_vectors.items())
    logits = {n: torch.zeros(t.shape[1:], requires_grad=True) for n, t in tau.items()}
    start = merged.coefficients.raw.detach().clone()  # (K, L)
    lam = start.clone().requires_grad_()
    inner_opt = torch.optim.Adam([lam], lr=inner_lr)
    mask_opt = torch.optim.Adam(list(logits.values()), lr=mask_lr)
    heads = {t: merged.heads.for_task(t) for t in TASKS}
    groups = {n: merged.layout.group_of(n) for n in tau}

    def loss(lam_values, mask, batch):
        total = 0.0
        for task, x in batch.items():
            params = dict(base)
            for n, t in tau.items():
                delta = sum(lam_values[k, groups[n]] * t[k] for k in range(len(TASKS)))
                params[n] = base[n] + mask[n] * delta
            params |= heads[task]
            p = torch.softmax(functional_call(merged.model, params, (x,)), -1)
            total = total - (p * p.log()).sum(-1).mean()
        return total

    for batch in steps:
        eps = torch.finfo(torch.float32).eps
        mask = {}
        for n, logit in logits.items():  # torch's RelaxedBernoulli rsample, rescaled
            probs = torch.sigmoid(logit).clamp(eps, 1 - eps)
            u = torch.rand(logit.shape).clamp(eps, 1 - eps)
            soft = torch.sigmoid((u.log() - (-u).log1p() + probs.log() - (-probs).log1p()) / 0.5).clamp(
                torch.finfo(torch.float32).tiny, 1 - eps
            )
            mask[n] = soft / soft.mean()
        half = {t: x.shape[0] // 2 for t, x in batch.items()}
        with torch.no_grad():
            lam.copy_(start)
        inner_opt.zero_grad()
        loss(lam, {n: m.detach() for n, m in mask.items()}, {t: x[: half[t]] for t, x in batch.items()}).backward()
        inner_opt.step()
        mask_opt.zero_grad()
        loss(lam.detach(), mask, {t: x[half[t] :] for t, x in batch.items()}).backward()
        mask_opt.step()
    return {n: logit.detach() for n, logit in logits.items()}


def test_bilevel_steps_match_a_naive_autograd_reference():
    merged = _merged()
    generator = torch.Generator().manual_seed(1)
    steps = [{t: torch.randn(8, 6, generator=generator) for t in TASKS} for _ in range(4)]
    module = ConcreteMaskModule(merged, objective=Entropy(), inner_lr=0.5, mask_lr=0.05)
    optimizer = module.configure_optimizers()
    torch.manual_seed(3)
    for index, batch in enumerate(steps):
        optimizer.zero_grad()
        module.training_step(batch, index).backward()
        optimizer.step()
    again = _merged()  # (seeds the generator itself)
    torch.manual_seed(3)
    reference = _naive_steps(again, steps, inner_lr=0.5, mask_lr=0.05)
    moved = 0.0
    for name, logits in module.mask.named_logits():
        torch.testing.assert_close(logits.detach(), reference[name], rtol=1e-4, atol=1e-5)
        moved = max(moved, float(logits.detach().abs().max()))
    assert moved > 0.1  # four steps of lr 0.05 moved the logits


def test_lora_task_vectors_are_refused():
    from adamerge.core.task_vectors import FactoredDelta, LowRankFactor

    merged = _merged()
    factored = FactoredDelta((8, 6), 2, [0], torch.randn(1, 8, 6), [LowRankFactor(1, torch.randn(8, 2), torch.randn(2, 6), 0.5)])
    vectors = {n: (factored if n == "0.weight" else tv) for n, tv in merged.task_vectors.parts()}
    lora = MergedModel(merged.model, TaskVectors(TASKS, vectors), "layer", "none", 0.3, heads={t: merged.heads.for_task(t) for t in TASKS})
    with pytest.raises(AdamergeError, match="'0.weight' holds LoRA factors"):
        ConcreteMaskModule(lora, objective=Entropy())
    from adamerge.methods import get_method

    dense = get_method("concrete-adamerging").rewrite(lora.task_vectors)  # the method densifies them first
    assert not dense.factored_names()
    torch.testing.assert_close(dense["0.weight"], lora.task_vectors["0.weight"])
    ConcreteMaskModule(
        MergedModel(merged.model, dense, "layer", "none", 0.3, heads={t: merged.heads.for_task(t) for t in TASKS}), objective=Entropy()
    )


def test_fit_end_to_end_exports_the_masked_merge(tiny_setup, tmp_path):
    from adamerge.sources import load_file_experts

    output = tmp_path / "run"
    args = fit_args(
        tiny_setup,
        output,
        "--method",
        "concrete-adamerging",
        "--eval",
        str(tiny_setup.eval),
        "--batch-size",
        "6",
        "--options",
        "{eval_mask: hard}",
    )
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"expert (alone)", "task arithmetic (λ=0.3)", "concrete-adamerging (layer)"}
    assert set(metrics["timing_s"]["stages"]) >= {"fitting stage 1", "fitting stage 2"}
    exported = torch.load(output / "merged.pt", weights_only=True)
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    table = json.loads((output / "coefficients.json").read_text())
    plain = MergedModel(experts.model, experts.task_vectors, "layer", heads=experts.heads)
    values = torch.tensor([[table[t][g] for g in plain.layout.group_names] for t in plain.tasks])
    plain.coefficients.set_values(values)
    unmasked = plain.merged_state_dict()
    base = plain.base_tensors()
    differs = 0
    for name in plain.layout.tensor_names:  # θ_0 + m̃ ⊙ Σ λ τ: each entry is θ_0, or θ_0 + (Σ λ τ) / keep share
        delta, exported_delta = unmasked[name] - base[name], exported[name] - base[name]
        kept = exported_delta.abs() > 1e-7
        ratio = exported_delta[kept] / delta[kept]
        if kept.any():
            torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-3, atol=1e-4)
        differs += int((~kept & (delta.abs() > 1e-6)).sum())
    assert differs > 0  # the hard mask dropped some entries


def test_checkpoint_keeps_the_mask_and_the_inner_optimiser():
    merged = _merged()
    module = ConcreteMaskModule(merged, objective=Entropy())
    optimizer = module.configure_optimizers()
    torch.manual_seed(0)
    batch = {t: torch.randn(4, 6) for t in TASKS}
    optimizer.zero_grad()
    module.training_step(batch, 0).backward()
    optimizer.step()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert {k for k in checkpoint["state_dict"] if k.startswith("mask.")} == {f"mask.logits.{i}" for i in range(len(module.mask.logits))}
    fresh = ConcreteMaskModule(_merged(), objective=Entropy())
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    for a, b in zip(fresh.mask.logits, module.mask.logits, strict=True):
        torch.testing.assert_close(a, b)
    assert fresh.inner_optimizer.state_dict()["state"][0]["step"] == 1


@pytest.mark.skipif(
    not FB_PYTHON.exists(), reason=f"FusionBench venv not found at {FB_PYTHON} (see benchmarks/peers/fusionbench_concrete_check.py)"
)
def test_agrees_with_fusionbench(tmp_path):
    from benchmarks.peers.fusionbench_concrete_check import compare

    report = compare(str(FB_PYTHON), tmp_path)
    same_order = report["fusionbench"]
    assert same_order["moved"] > 1e-3  # stage one moved the logits
    assert same_order["logits"] < 1e-4 and same_order["flipped"] == 0  # FusionBench's entropy eps only
    assert same_order["lambda"] < 1e-6 and same_order["merged"] < 1e-10
    logging.getLogger(__name__).info("paper order against FusionBench: %s", report["paper"])
