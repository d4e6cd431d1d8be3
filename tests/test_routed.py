"""Input-routed merging (WEMoE, Twin-Merging): the routed layers against naive per-input calls,
one-hot routing against the experts, the router steps against naive autograd, the CLI end to end
with the export run without adamerge, and FusionBench's WEMoE."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from adamerge.cli import main
from adamerge.core import routed_weights
from adamerge.core.merged_model import MergedModel
from adamerge.core.routed_weights import RoutedWeights, layer_kind, svd_factors
from adamerge.core.routing_plan import routed_blocks, twin_vectors, weight_ensembling
from adamerge.core.task_vectors import TaskVectors
from adamerge.objectives.task_objectives import Entropy, ModelOutputs, TaskBatch
from adamerge.run.routed_merge import TaskRouterModule, WeightEnsemblingModule
from tests.conftest import HEAD
from tests.test_cli import fit_args, run_fails

FB_PYTHON = Path("/tmp/fbvenv/bin/python")
K, B = 3, 4


def _layers() -> nn.Module:
    """Every routable kind: convolutions (grouped too), BatchNorm, GroupNorm, linear, LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, stride=2),
        nn.GroupNorm(2, 8), nn.Flatten(1), nn.Linear(8 * 3 * 3, 6), nn.LayerNorm(6),
    ).double()  # fmt: skip


def _whole_model_routing(model: nn.Module, deltas: dict[str, torch.Tensor], coefficients: torch.Tensor) -> RoutedWeights:
    """Every routable layer of ``model`` in one block (the model) with fixed coefficients."""
    leaves = {name: {"block": 0, "kind": layer_kind(m)} for name, m in model.named_modules() if layer_kind(m)}
    config = {"router": "blocks", "experts": K, "leaves": leaves, "blocks": [{"name": "", "dim": 1, "channels_first": True}]}
    routing = RoutedWeights(config, deltas).double()
    routing.coefficients_from_gate = lambda block, features: coefficients
    return routing


def _naive(model: nn.Module, deltas: dict[str, torch.Tensor], coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One functional call per input with its own weights ``W + Σ_k c_bk Δ_k``."""
    params = dict(model.named_parameters())
    rows = []
    for b in range(x.shape[0]):
        weights = {n: p + sum(coefficients[b, k] * deltas[n][k] for k in range(K)) if n in deltas else p for n, p in params.items()}
        rows.append(functional_call(model, weights, (x[b : b + 1],)))
    return torch.cat(rows)


def test_routed_layers_equal_one_functional_call_per_input():
    torch.manual_seed(0)
    model = _layers().eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2.0)
    deltas = {n: 0.1 * torch.randn(K, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    x, c = torch.randn(B, 3, 8, 8, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    routed = copy.deepcopy(model)
    _whole_model_routing(routed, deltas, c).install(routed)
    torch.testing.assert_close(routed(x), _naive(model, deltas, c, x), rtol=1e-12, atol=1e-12)


def test_low_rank_deltas_are_their_product_applied_as_thin_layers():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(1), nn.Linear(8 * 36, 5)).double()
    dense, factored = {}, {}
    for n, p in model.named_parameters():
        delta = 0.1 * torch.randn(K, *p.shape, dtype=p.dtype)
        if n.endswith("weight"):
            factors = [svd_factors(d, 2) for d in delta]
            factored[f"{n}.U"], factored[f"{n}.V"] = torch.stack([u for u, _ in factors]), torch.stack([v for _, v in factors])
            delta = torch.stack([(u @ v).reshape(p.shape) for u, v in factors])
        else:
            factored[n] = delta
        dense[n] = delta
    x, c = torch.randn(B, 3, 8, 8, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    routed = copy.deepcopy(model)
    _whole_model_routing(routed, factored, c).install(routed)
    torch.testing.assert_close(routed(x), _naive(model, dense, c, x), rtol=1e-12, atol=1e-12)


def test_embeddings_shared_position_ids_and_transformers_conv1d_are_routed_per_input():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.position = nn.Embedding(5, 6)  # called with one row of ids for the whole batch, as BERT's
            self.proj = Conv1D(4, 6)  # weight (in 6, out 4)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.proj(self.embed(ids) + self.position(torch.arange(ids.shape[1]).unsqueeze(0)))

    model = Tokens().double()
    deltas = {n: 0.1 * torch.randn(K, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    ids, c = torch.randint(0, 11, (B, 5)), torch.randn(B, K, dtype=torch.float64)
    routed = copy.deepcopy(model)
    _whole_model_routing(routed, deltas, c).install(routed)
    torch.testing.assert_close(routed(ids), _naive(model, deltas, c, ids), rtol=1e-12, atol=1e-12)


def test_routed_batchnorm_trains_and_counts_statistics_as_the_layer_at_zero_routing():
    torch.manual_seed(3)
    model = _layers().train()
    deltas = {n: torch.randn(K, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    routed = copy.deepcopy(model)
    _whole_model_routing(routed, deltas, torch.zeros(B, K, dtype=torch.float64)).install(routed)
    x = torch.randn(B, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(routed(x), model(x))
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(dict(routed.named_buffers())[name], buffer, msg=name)


def _pool(seed: int = 0, model: nn.Module | None = None) -> tuple[MergedModel, dict[str, dict[str, torch.Tensor]]]:
    """A two-block MLP (``blocks.0``, ``blocks.1``) with a task head, its three experts."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Sequential(nn.Linear(8, 5), nn.LayerNorm(5))])
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    net = (model or Net()).double()
    base = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("head")}
    experts = {t: {n: v + 0.3 * torch.randn_like(v) for n, v in base.items()} for t in ("a", "b", "c")}
    heads = {t: {"head.weight": torch.randn(3, 5, dtype=torch.float64), "head.bias": torch.randn(3, dtype=torch.float64)} for t in experts}
    vectors = TaskVectors(tuple(experts), {n: torch.stack([experts[t][n] - base[n] for t in experts]) for n in base})
    return MergedModel(net, vectors, "task", "clamp", 0.3, heads=heads, batchnorm="base"), experts


def _expert_logits(merged: MergedModel, experts: dict, task: str, x: torch.Tensor) -> torch.Tensor:
    return functional_call(merged.model, experts[task] | merged.heads.for_task(task), (x,))


def test_wemoe_starts_at_task_arithmetic_and_one_hot_gates_give_each_expert():
    merged, experts = _pool()
    x = torch.randn(B, 6, dtype=torch.float64)
    static = merged(x, "a").detach()
    expected = {task: _expert_logits(merged, experts, task, x) for task in merged.tasks}
    routing = weight_ensembling(merged, router_hidden_layers=0)
    assert [b["name"] for b in routing.config["blocks"]] == ["blocks.0", "blocks.1"]
    routing.double().install(merged.model)
    torch.testing.assert_close(merged(x, "a"), static, rtol=1e-12, atol=1e-13)  # the gates start at λ = 0.3: the static merge
    for k, task in enumerate(merged.tasks):
        with torch.no_grad():
            for gate in routing.routers:
                gate.weight.copy_(torch.nn.functional.one_hot(torch.tensor(k), 3).double())
        torch.testing.assert_close(merged(x, task), expected[task], rtol=1e-12, atol=1e-12)


def test_twin_with_the_full_rank_and_one_hot_routing_is_each_expert():
    merged, experts = _pool(1)
    x = torch.randn(B, 6, dtype=torch.float64)
    expected = {task: _expert_logits(merged, experts, task, x) for task in merged.tasks}
    routing = twin_vectors(merged, density=1.0).double()
    assert routing.config["head"] == "head"
    routing.install(merged.model)
    for k, task in enumerate(merged.tasks):
        routing.coefficients_from_features = lambda features, k=k: torch.nn.functional.one_hot(
            torch.full((features.shape[0],), k), 3
        ).double()
        torch.testing.assert_close(merged(x, task), expected[task], rtol=1e-12, atol=1e-12)


def test_twin_compresses_each_exclusive_matrix_to_its_top_singular_vectors():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 20))
    model.head = nn.Linear(20, 2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = model[:3], model.head

        def forward(self, x):
            return self.head(self.body(x))

    merged, experts = _pool(2, Net())
    routing = twin_vectors(merged, density=0.1)
    shared = merged.merged_tensors()
    for name in ("body.0.weight", "body.2.weight"):
        u, v = routing.delta(f"{name}.U"), routing.delta(f"{name}.V")
        assert u.shape[-1] == 2  # ⌊0.1 · min(20, 30)⌋
        for k, task in enumerate(merged.tasks):
            exclusive = (experts[task][name] - shared[name]).detach()
            left, values, right = torch.linalg.svd(exclusive, full_matrices=False)
            torch.testing.assert_close(u[k] @ v[k], (left[:, :2] * values[:2]) @ right[:2], rtol=1e-9, atol=1e-9)
    assert routing.delta("body.0.bias").shape == (3, 30)  # biases stay dense


def test_a_wemoe_step_is_naive_autograd_of_the_entropy_through_per_input_weights():
    merged, _ = _pool(3)
    plain = copy.deepcopy(merged.model)  # the naive reference runs the layers unrouted
    module = WeightEnsemblingModule(merged, objective=Entropy(), lr=1e-2)
    module.install()
    routing = module.routing
    batch = {t: torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(merged.tasks)}
    module.training_step(batch, 0).backward()
    ours = [p.grad.clone() for p in routing.routers.parameters()]

    # naive: per input, the gate on each block's input, θ_0 + Σ_k r_k τ_k, autograd of the summed entropies
    gates = copy.deepcopy(routing.routers)
    base = {n: p.detach() for n, p in merged.model.named_parameters()}
    vectors = dict(merged.task_vectors.items())
    total = 0
    for task, x in batch.items():
        head = merged.heads.for_task(task)
        logits = []
        for row in x:
            h = row.unsqueeze(0)
            for i, block in enumerate(plain.blocks):
                r = gates[i](h).mean(dim=0)  # (K,)
                names = [n for n in vectors if n.startswith(f"blocks.{i}.")]
                weights = {n.removeprefix(f"blocks.{i}."): base[n] + sum(r[k] * vectors[n][k] for k in range(3)) for n in names}
                h = functional_call(block, weights, (h,))
            logits.append(torch.nn.functional.linear(h, head["head.weight"], head["head.bias"]))
        total = total + Entropy()(task, ModelOutputs(torch.cat(logits)), TaskBatch(inputs=x))
    total.backward()
    for mine, reference in zip(ours, [p.grad for p in gates.parameters()], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)


def test_the_safeguard_keeps_and_restores_the_routers():
    merged, _ = _pool(6)
    module = WeightEnsemblingModule(merged, objective=Entropy())
    kept = module.learned_state()
    with torch.no_grad():
        for p in module.routing.routers.parameters():
            p.add_(1.0)
    module.restore_learned_state(kept)
    for name, tensor in module.routing.routers.state_dict().items():
        torch.testing.assert_close(tensor, kept[name], rtol=0, atol=0)


def test_the_twin_router_learns_which_task_an_input_comes_from():
    merged, _ = _pool(4)
    module = TaskRouterModule(merged, objective=Entropy(), density=0.5, lr=1e-2)
    module.install()
    generator = torch.Generator().manual_seed(0)
    centres = {t: 2 * torch.nn.functional.one_hot(torch.tensor(2 * k), 6).double() for k, t in enumerate(merged.tasks)}
    optimizer = module.configure_optimizers()
    module.train()
    for step in range(200):
        batch = {t: centres[t] + 0.3 * torch.randn(16, 6, dtype=torch.float64, generator=generator) for t in merged.tasks}
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
    module.eval()
    routed = []
    original = module.routing.coefficients_from_features
    module.routing.coefficients_from_features = lambda features: routed.append(original(features)) or routed[-1]
    for k, task in enumerate(merged.tasks):
        x = centres[task] + 0.3 * torch.randn(32, 6, dtype=torch.float64, generator=generator)
        with torch.no_grad():
            merged(x, task)  # routes: the static pre-pass's head input, then the routed pass
        assert (routed[-1].argmax(-1) == k).float().mean() > 0.9, task


def test_routed_blocks_auto_takes_the_mlp_of_each_layer_or_the_blocks_of_a_cnn():
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

    clip = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4)
    )
    found = routed_blocks(clip)
    assert len(found) == 2 and all(name.endswith(f"encoder.layers.{i}.mlp") for i, name in enumerate(found))
    bert = BertModel(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=20))
    assert routed_blocks(bert) == ["encoder.layer.0", "encoder.layer.1"]
    import torchvision

    blocks = routed_blocks(torchvision.models.mobilenet_v2(num_classes=3))
    assert blocks == [f"features.{i}" for i in range(19)]  # the classifier holds one layer: not a stack


def test_fit_end_to_end_and_the_export_runs_without_adamerge(tiny_setup, tmp_path):
    from adamerge.sources import load_file_experts

    for method in ("wemoe", "twin-merging"):
        output = tmp_path / method
        extra = ("--eval", str(tiny_setup.eval), "--batch-size", "6", "--batchnorm", "reestimate", "--steps", "4")
        assert main([*fit_args(tiny_setup, output, "--method", method), *extra]) == 0
        metrics = json.loads((output / "metrics.json").read_text())
        assert f"{method} (layer)" in metrics["accuracy"] and metrics["routing"]["layers"] == 4
        assert set(metrics["safeguard"]["stage 1"]["agreement"]) == {"0", "1", "2", "3", "4"}  # the routers are guarded too
        assert {"routing/routing.json", "routing/routing.pt", "routing/adamerge_routing.py"} <= set(metrics["files"].values())
        checkpoint = torch.load(output / "checkpoints" / "last.ckpt", weights_only=False)
        assert any(k.startswith("routing.routers.") for k in checkpoint["state_dict"])

        # adamerge's routed forward: the static merge at λ = 0.3, the exported routers installed
        experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
        merged = MergedModel(experts.model, experts.task_vectors, "task", heads=experts.heads, batchnorm="base")
        exported = torch.load(output / "merged.pt", weights_only=True)
        merged.model.load_state_dict({k: v for k, v in exported.items() if "running" in k or "num_batches" in k}, strict=False)
        routed_weights.load(output / "routing", merged.model)
        x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = merged.eval()(x, "beta")
        # the export alone, in a python where adamerge cannot be imported: torch and the exported file
        script = f"""
import sys, torch
from torch import nn
sys.path.insert(0, {str(output / "routing")!r})
sys.modules["adamerge"] = None  # installed in this venv: any import of it from here on fails
import adamerge_routing
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                      nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
model.load_state_dict(torch.load({str(output / "merged.pt")!r}) | torch.load({str(output / "heads" / "beta.pt")!r}))
adamerge_routing.load({str(output / "routing")!r}, model.eval())
x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    torch.save(model(x), {str(tmp_path / "theirs.pt")!r})
"""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        torch.testing.assert_close(torch.load(tmp_path / "theirs.pt", weights_only=True), ours, rtol=1e-5, atol=1e-6)


def test_refusals_name_what_is_wrong(tiny_setup, tmp_path, caplog):
    message = run_fails(fit_args(tiny_setup, tmp_path / "none", "--method", "wemoe", "--options", "{routed: nothing.here}"), caplog)
    assert "routed 'nothing.here': no module of Sequential has a matching name" in message
    merged, _ = _pool(5)
    merged.heads = type(merged.heads)({})
    with pytest.raises(Exception, match="no task heads"):
        twin_vectors(merged)


@pytest.mark.skipif(
    not FB_PYTHON.exists(), reason=f"FusionBench venv not found at {FB_PYTHON} (see benchmarks/peers/fusionbench_wemoe_check.py)"
)
def test_wemoe_agrees_with_fusionbench(tmp_path):
    from benchmarks.peers.fusionbench_wemoe_check import compare

    report = compare(str(FB_PYTHON), tmp_path)
    for routing, row in report.items():
        assert row["moved"] > 1e-4 and row["outputs_moved"] > 1e-4, routing
        assert row["outputs_before"] < 1e-12, routing
        assert row["outputs_after"] < 1e-8 and row["routers"] < 1e-8, routing  # FusionBench's 1e-8 inside the entropy's log
    logging.getLogger(__name__).info("WEMoE against FusionBench: %s", report)
