"""BatchNorm statistics policies: per-task statistics against a naive reference, and their export."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from adamerge.cli import main
from adamerge.core.batchnorm import per_task_running_stats, resolve_policy, running_stat_names
from adamerge.core.merged_model import MergedModel
from adamerge.errors import DataError
from adamerge.sources import load_file_experts
from tests.conftest import HEAD
from tests.test_cli import fit_args
from tests.tiny import tiny_convnet


def task_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two tasks whose inputs differ in scale and offset, so their statistics differ clearly."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "alpha": torch.randn(24, 3, 12, 12, generator=generator),  # (N, C, H, W)
        "beta": 3.0 * torch.randn(20, 3, 12, 12, generator=generator) + 2.0,
    }


def naive_statistics(model: nn.Module, inputs: torch.Tensor, chunks: int = 1) -> dict[str, torch.Tensor]:
    """Reference: a copy of the model in train mode with cumulative averaging (every batch counts
    equally), run on ``inputs`` in ``chunks`` batches."""
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    reference.train()
    with torch.no_grad():
        for chunk in inputs.chunk(chunks):
            reference(chunk)
    return {k: v for k, v in reference.state_dict().items() if "running" in k or "num_batches" in k}


def test_running_stat_names_lists_every_batchnorm_buffer():
    names = running_stat_names(tiny_convnet())
    assert names == [f"{layer}.{b}" for layer in (1, 4) for b in ("running_mean", "running_var", "num_batches_tracked")]
    assert running_stat_names(nn.Linear(2, 2)) == []


@pytest.mark.parametrize("chunks", [1, 3])
def test_per_task_statistics_match_a_naive_reference_and_leave_the_model_untouched(chunks):
    torch.manual_seed(0)
    model = tiny_convnet().eval()
    before = copy.deepcopy(model.state_dict())
    data = task_inputs()

    def run(task: str) -> int:
        for chunk in data[task].chunk(chunks):
            model(chunk)
        return len(data[task])

    statistics = per_task_running_stats(model, ["alpha", "beta"], run)
    for task, inputs in data.items():
        expected = naive_statistics(model, inputs, chunks)
        assert statistics[task].keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(statistics[task][name].float(), value.float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(statistics["alpha"]["1.running_var"], statistics["beta"]["1.running_var"])
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name])
    assert not model[1].training and model[1].momentum == 0.1  # modes and momenta restored


def test_a_task_without_data_is_named():
    with pytest.raises(DataError, match="task 'beta' has no calibration data"):
        per_task_running_stats(tiny_convnet(), ["alpha", "beta"], lambda task: 4 if task == "alpha" else 0)


def test_merged_model_uses_each_tasks_statistics_in_eval_and_batch_statistics_in_training(tiny_setup):
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    merged = MergedModel(experts.model, experts.task_vectors, "layer", heads=experts.heads, batchnorm="per-task")
    data = task_inputs()
    seen = merged.reestimate_batchnorm([(t, x) for t, inputs in data.items() for x in inputs.chunk(2)])
    assert seen == 44
    x = torch.randn(5, 3, 12, 12)
    for task, inputs in data.items():
        plain = merged.merge_and_unload(task)  # merged weights, this task's head and statistics
        expected = naive_statistics(plain, inputs, chunks=2)
        for name, value in expected.items():
            torch.testing.assert_close(plain.state_dict()[name].float(), value.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.eval()(x, task), plain(x), rtol=1e-5, atol=1e-6)
    stored = {k: v.clone() for k, v in merged.statistics.for_task("alpha").items()}
    merged.train()
    merged(x, "alpha").sum()  # a training forward: batch statistics, stored ones untouched
    for name, value in merged.statistics.for_task("alpha").items():
        torch.testing.assert_close(value, stored[name])
    with pytest.raises(Exception, match="pass task="):
        merged.eval().merge_and_unload()


def test_fit_with_per_task_statistics_exports_them_with_each_head(tiny_setup, tmp_path):
    output = tmp_path / "run"
    assert main(fit_args(tiny_setup, output, "--batchnorm", "per-task", "--eval", str(tiny_setup.eval))) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    merged_file = torch.load(output / "merged.pt", weights_only=True)
    heads = {t: torch.load(output / "heads" / f"{t}.pt", weights_only=True) for t in ("alpha", "beta")}
    assert "1.running_mean" in heads["alpha"] and not torch.equal(heads["alpha"]["1.running_mean"], heads["beta"]["1.running_mean"])
    # the exported files alone reproduce the reported accuracy of each task
    for task, classes in (("alpha", 3), ("beta", 4)):
        model = tiny_convnet(num_classes=classes)
        model.load_state_dict(merged_file | heads[task])
        assert accuracy_on_folder(model.eval(), tiny_setup.eval / task) == pytest.approx(
            metrics["accuracy"]["adamerging (layer)"][task], abs=1e-5
        )


def per_task_merge_args(setup, method: str, output, *extra: str) -> list[str]:
    """``adamerge merge`` of the tiny experts with per-task statistics, evaluated."""
    return ["merge", "--method", method, "--batchnorm", "per-task",
            "--base", f"tests.tiny:tiny_convnet@{setup.base}", "--experts", *setup.expert_args(),
            "--calib", str(setup.calib), "--eval", str(setup.eval),
            "--head-pattern", HEAD, "--image-size", "12", "--output", str(output), *extra]  # fmt: skip


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_static_merge_with_per_task_statistics(tiny_setup, tmp_path, method):
    output = tmp_path / method
    assert main(per_task_merge_args(tiny_setup, method, output)) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    merged_file = torch.load(output / "merged.pt", weights_only=True)
    for task, classes in (("alpha", 3), ("beta", 4)):
        head = torch.load(output / "heads" / f"{task}.pt", weights_only=True)
        assert {"1.running_var", "4.running_mean"} <= set(head)
        model = tiny_convnet(num_classes=classes)
        model.load_state_dict(merged_file | head)
        assert accuracy_on_folder(model.eval(), tiny_setup.eval / task) == pytest.approx(metrics["accuracy"][method][task], abs=1e-5)


def test_per_task_statistics_need_calibration_data(tiny_setup, tmp_path, caplog):
    from tests.test_cli import run_fails

    args = ["merge", "--method", "task-arithmetic", "--batchnorm", "per-task",
            "--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}", "--experts", *tiny_setup.expert_args(),
            "--eval", str(tiny_setup.eval), "--head-pattern", HEAD, "--output", str(tmp_path / "o")]  # fmt: skip
    assert "--batchnorm per-task re-estimates BatchNorm statistics on --calib data, and none was given" in run_fails(args, caplog)
    assert not (tmp_path / "o").exists()


def accuracy_on_folder(model: nn.Module, folder) -> float:
    """Top-1 accuracy on ``folder/<class>/<image>.png`` with adamerge's image transform (12 px)."""
    from PIL import Image

    from adamerge.data.images import build_image_transform

    transform = build_image_transform(12)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                prediction = model(transform(Image.open(path).convert("RGB"))[None]).argmax(-1).item()
                correct += int(prediction == label)
                total += 1
    return correct / total


def calibration_images(folder) -> torch.Tensor:
    """Every image of an unlabeled ``folder``, in file order, with adamerge's transform (12 px)."""
    from PIL import Image

    from adamerge.data.images import build_image_transform

    transform = build_image_transform(12)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())])  # (N, 3, 12, 12)


@pytest.mark.parametrize("method", ["adamerging", "expert-merging"])
@pytest.mark.parametrize("limit", [None, 3])
def test_statistics_use_every_calibration_image_whatever_the_objective_trains_on(tiny_setup, tmp_path, method, limit):
    """``--calib-limit`` subsets what the objective trains on; the exported per-task statistics are
    still those of all the task's calibration images (statistics of 3 images are noise)."""
    output = tmp_path / "run"
    extra = ["--calib-limit", str(limit)] if limit is not None else []
    assert main(fit_args(tiny_setup, output, "--method", method, "--batchnorm", "per-task", *extra)) == 0
    merged_file = torch.load(output / "merged.pt", weights_only=True)
    for task, classes in (("alpha", 3), ("beta", 4)):
        head = torch.load(output / "heads" / f"{task}.pt", weights_only=True)
        model = tiny_convnet(num_classes=classes)
        model.load_state_dict(merged_file | head)
        images = calibration_images(tiny_setup.calib / task)
        assert len(images) == 12 and head["1.num_batches_tracked"].item() == 3  # 12 images in batches of 4
        expected = naive_statistics(model, images, chunks=3)
        for name in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
            torch.testing.assert_close(head[name], expected[name], rtol=1e-4, atol=1e-5)


def test_auto_policy_is_per_task_with_heads_and_pooled_without(tiny_setup, tmp_path):
    """``--batchnorm auto`` (the default): per-task statistics when every task has its own head."""
    assert main(fit_args(tiny_setup, tmp_path / "run")) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["batchnorm"] == "per-task"
    head = torch.load(tmp_path / "run" / "heads" / "alpha.pt", weights_only=True)
    assert "1.running_mean" in head and "8.weight" in head  # the task's statistics travel with its head
    model = tiny_convnet()
    assert resolve_policy("auto", ["a", "b"], {"a": {"8.weight": 1}, "b": {"8.weight": 2}}, model) == "per-task"
    assert resolve_policy("auto", ["a", "b"], {"a": {"8.weight": 1}}, model) == "reestimate"  # b has no head
    assert resolve_policy("auto", ["a", "b"], {}, model) == "reestimate"
    assert resolve_policy("base", ["a", "b"], {}, model) == "base"
