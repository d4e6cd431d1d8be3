"""Representation Surgery (``--surgery-steps``): the adapter against the formula, training on
cached features against a naive loop through the real models, ``adamerge merge`` end to end with
the export applied in plain torch, the refusals, and FusionBench 0.2.33 when its venv is at
``/tmp/fbvenv``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from adamerge.cli import main
from adamerge.core.merged_model import MergedModel
from adamerge.core.surgery import RepresentationSurgery, SurgeryAdapter
from adamerge.run import module as module_file
from adamerge.run.datamodules import build_datamodule
from adamerge.run.surgery import fit_surgery, surgery_batches
from adamerge.sources import SourceOptions, load_experts
from tests.conftest import HEAD as TINY_HEAD
from tests.test_causal_lm import build as build_lm
from tests.test_data_merges import FB_PYTHON, image_mlp, image_setup  # noqa: F401  (image_setup: a fixture)
from tests.test_hf_source import hf  # noqa: F401  (a fixture: tiny BERT sequence classifiers)
from tests.test_open_clip_source import clip_setup  # noqa: F401  (a fixture: a tiny CLIP, zero-shot heads)
from tests.test_open_clip_source import fit_args as clip_fit_args
from tests.tiny import tiny_convnet

MLP_HEAD = r"^5\."  # image_mlp's classifier


def run_fails(args: list[str], caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="adamerge"):
        assert main(args) == 2
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


# ----------------------------------------------------------------------------------------------
# the module


def test_adapter_is_the_formula_per_example():
    torch.manual_seed(0)
    adapter = SurgeryAdapter(7, 3)
    with torch.no_grad():
        adapter.up.weight.normal_()  # (D, r); a trained adapter: not the identity
    features = torch.randn(4, 2, 7)  # (B, T, D): the formula applies along the last dimension
    down, up = adapter.down.weight, adapter.up.weight
    naive = torch.stack([torch.stack([x - up @ torch.relu(down @ x) for x in row]) for row in features])
    torch.testing.assert_close(adapter(features), naive, rtol=1e-6, atol=1e-6)
    assert down.shape == (3, 7) and up.shape == (7, 3)


def test_surgery_starts_as_the_identity_and_is_seeded():
    surgery = RepresentationSurgery(["a", "b.c"], dim=10, rank=16, seed=3)
    features = torch.randn(5, 10)
    for task in surgery.tasks:
        assert torch.equal(surgery(features, task), features)
        state = surgery.task_state_dict(task)
        assert set(state) == {"down.weight", "up.weight"} and state["down.weight"].shape == (16, 10)
        assert not state["up.weight"].any() and state["down.weight"].abs().max() <= 1 / 10**0.5  # kaiming_uniform(a=√5)
    again = RepresentationSurgery(["a", "b.c"], dim=10, rank=16, seed=3)
    other = RepresentationSurgery(["a", "b.c"], dim=10, rank=16, seed=4)
    assert torch.equal(again.task_state_dict("b.c")["down.weight"], surgery.task_state_dict("b.c")["down.weight"])
    assert not torch.equal(other.task_state_dict("a")["down.weight"], surgery.task_state_dict("a")["down.weight"])
    assert not torch.equal(surgery.task_state_dict("a")["down.weight"], surgery.task_state_dict("b.c")["down.weight"])


def test_batches_are_seeded_shuffled_passes():
    batches = surgery_batches({"a": 10, "b": 3}, 4, seed=0)
    steps = [next(batches) for _ in range(6)]
    first_pass = torch.cat([s["a"] for s in steps[:3]])
    assert [len(s["a"]) for s in steps] == [4, 4, 2, 4, 4, 2] and sorted(first_pass.tolist()) == list(range(10))
    assert all(sorted(s["b"].tolist()) == [0, 1, 2] for s in steps)
    again = surgery_batches({"a": 10, "b": 3}, 4, seed=0)
    assert all(torch.equal(s["a"], t["a"]) for s, t in zip(steps, (next(again) for _ in range(6))))


# ----------------------------------------------------------------------------------------------
# training on cached features = the naive loop through the real models


def test_training_on_cached_features_equals_the_naive_loop(image_setup):
    folder, base, states = image_setup
    references = {t: str(folder / f"{t}.pt") for t in states}
    experts = load_experts(f"tests.test_data_merges:image_mlp@{folder / 'base.pt'}", references, SourceOptions(head_pattern=MLP_HEAD))
    data = build_datamodule(experts, folder / "calib", image_size=6, batch_size=4, seed=0)
    data.setup("fit")
    merged = MergedModel(experts.model, experts.task_vectors, granularity="task", init=0.3, heads=experts.heads, batchnorm="base")
    settings = SimpleNamespace(surgery_steps=7, surgery_rank=5, surgery_lr=1e-2, batch_size=4, seed=1)
    surgery, report = fit_surgery(merged, experts, data, settings, torch.device("cpu"))

    # the naive loop: both models re-run on each step's batch, the head input read by a hook
    images = {task: torch.cat(list(loader)) for task, loader in data.calibration_loaders(shuffle=False).items()}  # (N, 3, 6, 6)
    models = {}
    for task, state in states.items():
        expert = image_mlp().eval()
        expert.load_state_dict(state)
        models[task] = (merged.merge_and_unload(task), expert)
    reference = RepresentationSurgery(list(states), 12, 5, seed=1)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2, betas=(0.9, 0.999))
    batches = surgery_batches({task: len(x) for task, x in images.items()}, 4, seed=1)
    losses = []
    for _ in range(7):
        picks = next(batches)
        loss = 0
        for task, rows in picks.items():
            merged_features, expert_features = (head_input(model, images[task][rows]) for model in models[task])
            loss = loss + F.l1_loss(reference(merged_features, task), expert_features)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for task in states:
        for name, value in reference.task_state_dict(task).items():
            torch.testing.assert_close(surgery.task_state_dict(task)[name], value, rtol=1e-5, atol=1e-6)
        assert surgery.task_state_dict(task)["up.weight"].abs().max() > 1e-3  # it trained
    torch.testing.assert_close(torch.tensor(report["loss"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    assert report["inputs"] == {"alpha": 9, "beta": 9} and report["features"] == 12 and report["head"] == "5"


def head_input(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s last layer (the head) on ``images``, without gradient."""
    seen = {}
    handle = model[-1].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["x"]


# ----------------------------------------------------------------------------------------------
# adamerge merge end to end, the export applied in plain torch


def merge_args(setup, output: Path, *extra: str) -> list[str]:
    return ["merge", "--method", "task-arithmetic", "--base", f"tests.tiny:tiny_convnet@{setup.base}",
            "--experts", *setup.expert_args(), "--head-pattern", TINY_HEAD, "--image-size", "12", "--batch-size", "4",
            "--output", str(output), *extra]  # fmt: skip


def exported_model(output: Path, task: str, classes: int) -> torch.nn.Module:
    """The architecture with ``merged.pt`` and ``heads/<task>.pt`` loaded, plain torch."""
    model = tiny_convnet(num_classes=classes)
    model.load_state_dict(
        torch.load(output / "merged.pt", weights_only=True) | torch.load(output / "heads" / f"{task}.pt", weights_only=True)
    )
    return model.eval()


def test_merge_with_surgery_exports_adapters_that_plain_torch_applies(tiny_setup, tmp_path, monkeypatch):
    evaluated = []  # (task, inputs, logits) of every evaluation batch adamerge scores
    original = module_file.MergingModule._common_eval_step

    def recording(self, batch, dataloader_idx):
        original(self, batch, dataloader_idx)
        task = self.tasks[dataloader_idx]
        evaluated.append((task, batch[0], batch[1], self.merged(batch[0], task, merged=self._eval_merged).detach()))

    monkeypatch.setattr(module_file.MergingModule, "_common_eval_step", recording)
    output = tmp_path / "run"
    args = merge_args(tiny_setup, output, "--calib", str(tiny_setup.calib), "--eval", str(tiny_setup.eval), "--surgery-steps", "20")
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"task-arithmetic", "task-arithmetic + surgery"}
    surgery = metrics["surgery"]
    assert surgery["steps"] == 20 and len(surgery["loss"]) == 20 and surgery["rank"] == 16 and surgery["lr"] == 1e-3
    assert sum(surgery["loss"][-5:]) < sum(surgery["loss"][:5])  # the loss decreases
    for task in tiny_setup.classes:
        assert surgery["l1"]["with surgery"][task] < surgery["l1"]["without surgery"][task]
    assert metrics["files"]["surgery/alpha"] == "surgery/alpha.pt" and "surgery" in metrics["timing_s"]

    # plain torch: the architecture, merged.pt + heads/<task>.pt, surgery/<task>.pt before the head
    half = len(evaluated) // 2
    plain_logits = {}
    for with_surgery, batches in ((False, evaluated[:half]), (True, evaluated[half:])):
        correct = {}
        for task, inputs, labels, logits in batches:
            model = exported_model(output, task, tiny_setup.classes[task])
            if with_surgery:
                s = torch.load(output / "surgery" / f"{task}.pt", weights_only=True)  # {"down.weight": (r, D), "up.weight": (D, r)}
                model[8].register_forward_pre_hook(lambda m, a, s=s: (a[0] - torch.relu(a[0] @ s["down.weight"].T) @ s["up.weight"].T,))
            with torch.no_grad():
                ours = model(inputs)
            torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)
            plain_logits[(with_surgery, task)] = ours
            hits = correct.setdefault(task, [0, 0])
            hits[0] += int((ours.argmax(-1) == labels).sum())
            hits[1] += len(labels)
        label = "task-arithmetic + surgery" if with_surgery else "task-arithmetic"
        for task, (hit, total) in correct.items():
            assert metrics["accuracy"][label][task] == pytest.approx(hit / total, abs=1e-6)
    assert not torch.allclose(plain_logits[(True, "beta")], plain_logits[(False, "beta")])

    # on the evaluation inputs too, the surgery's head inputs are closer to the expert's
    for task in tiny_setup.classes:
        inputs = torch.cat([batch[1] for batch in evaluated[half:] if batch[0] == task])
        expert = tiny_convnet(num_classes=tiny_setup.classes[task])
        expert.load_state_dict(torch.load(tiny_setup.experts[task], weights_only=True))
        model = exported_model(output, task, tiny_setup.classes[task])
        target, merged_features = head_input(expert.eval(), inputs), head_input(model, inputs)
        s = torch.load(output / "surgery" / f"{task}.pt", weights_only=True)
        corrected = merged_features - torch.relu(merged_features @ s["down.weight"].T) @ s["up.weight"].T
        assert F.l1_loss(corrected, target) < F.l1_loss(merged_features, target)


def test_fit_with_surgery_reports_both_rows(tiny_setup, tmp_path):
    output = tmp_path / "fit"
    args = ["fit", "--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}", "--experts", *tiny_setup.expert_args(),
            "--calib", str(tiny_setup.calib), "--eval", str(tiny_setup.eval), "--head-pattern", TINY_HEAD, "--image-size", "12",
            "--batch-size", "4", "--steps", "2", "--progress-bar", "false", "--no-eval-experts", "--no-eval-init",
            "--surgery-steps", "3", "--surgery-rank", "2", "--output", str(output)]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"adamerging (layer)", "adamerging (layer) + surgery"}
    assert metrics["surgery"]["inputs"] == {"alpha": 11, "beta": 11}  # the hold-out (10 %) stays out
    state = torch.load(output / "surgery" / "beta.pt", weights_only=True)
    assert state["down.weight"].shape == (2, 16) and state["up.weight"].shape == (16, 2)


def test_sequence_classifiers_and_open_clip_heads(hf, clip_setup, tmp_path):
    output = tmp_path / "text"
    args = ["merge", "--base", f"hf:{hf.base}", "--experts", *hf.expert_args(), "--method", "task-arithmetic",
            "--calib", str(hf.calib), "--eval", str(hf.eval), "--surgery-steps", "4", "--output", str(output)]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"task-arithmetic", "task-arithmetic + surgery"} and metrics["surgery"]["head"] == "classifier"
    for task in hf.experts:
        assert torch.load(output / "surgery" / f"{task}.pt", weights_only=True)["up.weight"].shape == (32, 16)

    output = tmp_path / "clip"
    assert main(clip_fit_args(clip_setup, output) + ["--surgery-steps", "4"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert "adamerging (layer) + surgery" in metrics["accuracy"] and metrics["surgery"]["head"] == "head"
    assert {p.name for p in (output / "surgery").iterdir()} == {"a.pt", "b.pt"}


# ----------------------------------------------------------------------------------------------
# refusals: one line, exit 2, nothing written


def test_merge_with_surgery_needs_calib(tiny_setup, tmp_path, caplog):
    output = tmp_path / "never"
    message = run_fails(merge_args(tiny_setup, output, "--batchnorm", "base", "--surgery-steps", "5"), caplog)
    assert "--surgery-steps" in message and "--calib" in message and "\n" not in message
    assert not output.exists()


@pytest.mark.parametrize(("option", "value"), [("--surgery-rank", "0"), ("--surgery-steps", "-1"), ("--surgery-lr", "0")])
def test_bad_surgery_values_are_refused(tiny_setup, tmp_path, caplog, option, value):
    output = tmp_path / "never"
    message = run_fails(merge_args(tiny_setup, output, "--calib", str(tiny_setup.calib), "--surgery-steps", "5", option, value), caplog)
    assert message.startswith(f"{option} ") and "\n" not in message
    assert not output.exists()


@pytest.mark.parametrize("command", ["merge", "fit"])
def test_causal_lm_is_refused_before_loading(tmp_path, caplog, monkeypatch, command):
    lm = build_lm(tmp_path, "llama")

    def never(*args, **kwargs):
        raise AssertionError("the experts were loaded")

    monkeypatch.setattr("adamerge.run.workflow.load_experts", never)
    output = tmp_path / "never"
    args = [command, "--base", f"hf:{lm.base}", "--experts", *lm.expert_args(), "--calib", str(lm.calib),
            "--surgery-steps", "5", "--output", str(output)]  # fmt: skip
    args += ["--method", "task-arithmetic"] if command == "merge" else ["--steps", "2"]
    message = run_fails(args, caplog)
    assert "causal language model" in message and "per-task heads" in message and "\n" not in message
    assert not output.exists()


def test_experts_without_per_task_heads_are_refused(image_setup, caplog):
    folder, _, states = image_setup
    output = folder / "never"
    args = ["merge", "--method", "task-arithmetic", "--base", f"tests.test_data_merges:image_mlp@{folder / 'base.pt'}",
            "--experts", *[f"{t}={folder / t}.pt" for t in states], "--image-size", "6", "--calib", str(folder / "calib"),
            "--surgery-steps", "5", "--output", str(output)]  # fmt: skip
    message = run_fails(args, caplog)
    assert "--head-pattern" in message and "\n" not in message
    assert not output.exists()


# ----------------------------------------------------------------------------------------------
# FusionBench 0.2.33 (SurgeryModelWrapper and its training loop)


@pytest.mark.slow
@pytest.mark.skipif(
    not FB_PYTHON.exists(), reason=f"FusionBench venv not found at {FB_PYTHON} (see benchmarks/peers/fusionbench_surgery_check.py)"
)
def test_agrees_with_fusionbench(tmp_path):
    from benchmarks.peers.fusionbench_surgery_check import compare

    report = compare(str(FB_PYTHON), tmp_path)
    assert report["moved"] > 1e-2, report  # the adapters trained
    assert report["weights"] < 1e-6 and report["features"] < 1e-5, report
