"""FW-Merging: the Frank–Wolfe steps against a naive reference in weight space, the command line end
to end, the refusals, and FusionBench 0.2.33's own ``FrankWolfeHardAlgorithm.run`` (when its venv is
at ``/tmp/fbvenv``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from adamerge.cli import main
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import AdamergeError
from adamerge.methods import get_method
from adamerge.objectives.task_objectives import Entropy
from adamerge.run.frank_wolfe import FrankWolfeModule
from tests.test_cli import fit_args, run_fails
from tests.tiny import tiny_mlp

FB_PYTHON = Path("/tmp/fbvenv/bin/python")
TASKS = ("alpha", "beta", "gamma")


def _merged(granularity: str) -> MergedModel:
    torch.manual_seed(0)
    model = tiny_mlp(in_features=6, hidden=8, num_classes=3).double()
    params = dict(model.named_parameters())
    names = [n for n in params if not n.startswith("2.")]
    vectors = {
        n: torch.randn(len(TASKS), *params[n].shape, dtype=torch.float64)
        * torch.tensor([0.5, 0.3, 0.05]).double().view(-1, *[1] * params[n].dim())
        for n in names
    }
    heads = {t: {"2.weight": torch.randn(3, 8, dtype=torch.float64), "2.bias": torch.randn(3, dtype=torch.float64)} for t in TASKS}
    return MergedModel(model, TaskVectors(TASKS, vectors), granularity, "none", 0.3, heads=heads, batchnorm="base")


def _naive(merged: MergedModel, steps: list[dict[str, torch.Tensor]], granularity: str) -> dict[str, torch.Tensor]:
    """Frank–Wolfe in weight space: whole checkpoints, per-tensor cosines, θ ← θ + s (θ_v − θ)."""
    base = {n: p.detach().clone() for n, p in merged.model.named_parameters()}
    tau = dict(merged.task_vectors.items())
    vertices = [{n: base[n] + tau[n][k] for n in tau} for k in range(len(TASKS))]
    vertices.append({n: base[n] + 0.3 * tau[n].sum(0) for n in tau})  # the initial merge
    theta = {n: v.clone() for n, v in vertices[-1].items()}
    for t, batch in enumerate(steps):
        leaves = {n: v.clone().requires_grad_() for n, v in theta.items()}
        loss = 0.0
        for task, x in batch.items():
            params = base | leaves | merged.heads.for_task(task)
            p = torch.softmax(functional_call(merged.model, params, (x,)), -1)
            loss = loss - (p * p.log()).sum(-1).mean()
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        cos = {
            n: torch.stack([torch.dot(grads[n].flatten(), v[n].flatten()) / (grads[n].norm() * v[n].norm()) for v in vertices]) for n in tau
        }
        groups = [list(tau)] if granularity == "task" else [[n] for n in tau]
        s = 2 / (t + 2) * 0.1 * 0.3
        for names in groups:
            chosen = int(torch.stack([cos[n] for n in names]).sum(0).argmin())
            for n in names:
                theta[n] = theta[n] + s * (vertices[chosen][n] - theta[n])
    return theta


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_steps_match_frank_wolfe_in_weight_space(granularity):
    merged = _merged(granularity)
    generator = torch.Generator().manual_seed(1)
    steps = [{t: torch.randn(7, 6, generator=generator, dtype=torch.float64) for t in TASKS} for _ in range(5)]
    module = FrankWolfeModule(merged, objective=Entropy(), micro_batch=3)  # micro-batches of 3, 3 and 1
    for index, batch in enumerate(steps):
        module.training_step(batch, index)
    reference = _naive(_merged(granularity), steps, granularity)
    ours = {n: t.detach() for n, t in merged.merged_tensors().items()}
    start = _merged(granularity).merged_tensors()
    moved = max(float((ours[n] - start[n]).abs().max()) for n in reference)
    assert moved > 1e-3
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name].detach(), tensor, rtol=1e-6, atol=1e-6)


def test_refusals():
    with pytest.raises(AdamergeError, match="group of whole tensors"):
        FrankWolfeModule(_merged("chunk:2"), objective=Entropy())
    with pytest.raises(AdamergeError, match="constraint 'none'"):
        merged = _merged("task")
        FrankWolfeModule(MergedModel(merged.model, merged.task_vectors, "task", "clamp", 0.3), objective=Entropy())
    with pytest.raises(AdamergeError, match="--constraint none"):
        get_method("fw-merging").configured(constraint="clamp")


def test_fit_end_to_end(tiny_setup, tmp_path, caplog):
    output = tmp_path / "run"
    args = fit_args(tiny_setup, output, "--method", "fw-merging", "--granularity", "task", "--eval", str(tiny_setup.eval))
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert "fw-merging (task)" in metrics["accuracy"]
    coefficients = json.loads((output / "coefficients.json").read_text())
    values = [v for task in coefficients.values() for v in task.values()]
    assert values != [0.3] * len(values)  # three steps moved the coefficients off task arithmetic
    assert "group of whole tensors" in run_fails(
        fit_args(tiny_setup, tmp_path / "chunks", "--method", "fw-merging", "--granularity", "chunk:4"), caplog
    )


@pytest.mark.skipif(
    not FB_PYTHON.exists(), reason=f"FusionBench venv not found at {FB_PYTHON} (see benchmarks/peers/fusionbench_fw_check.py)"
)
def test_agrees_with_fusionbench(tmp_path):
    from benchmarks.peers.fusionbench_fw_check import compare

    report = compare(str(FB_PYTHON), tmp_path)
    for granularity, row in report.items():
        assert row["moved"] > 1e-3, granularity
        assert row["relative"] < 1e-6, granularity  # float32 coefficients against FusionBench's float64 weights
    logging.getLogger(__name__).info("FW-Merging against FusionBench: %s", report)
