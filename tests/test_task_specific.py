"""``--task-specific``: tensors each task keeps from its own expert, against naive references."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from adamerge.cli import main
from adamerge.errors import AdamergeError
from adamerge.sources import load_file_experts
from adamerge.sources.task_specific import keep_task_specific, task_specific_names
from tests.conftest import HEAD
from tests.test_batchnorm import accuracy_on_folder, calibration_images, naive_statistics, per_task_merge_args
from tests.test_cli import fit_args, run_fails
from tests.tiny import tiny_convnet

BATCHNORM_AFFINE = ["1.weight", "1.bias", "4.weight", "4.bias"]  # tiny_convnet's two BatchNorm layers


def merged_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("batchnorm", BATCHNORM_AFFINE), ("norm", BATCHNORM_AFFINE), (r"^4\.", ["4.weight", "4.bias"]), (r"\.bias$", ["0.bias", "1.bias", "3.bias", "4.bias", "8.bias"])],
)
def test_specs_select_tensors_in_model_order(spec, expected):
    assert task_specific_names(tiny_convnet(), merged_names(tiny_convnet()), spec) == expected


def test_norm_covers_layer_norm_and_batchnorm_does_not():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert task_specific_names(model, merged_names(model), "norm") == ["1.weight", "1.bias"]
    with pytest.raises(AdamergeError, match="--task-specific 'batchnorm' selects nothing: no batchnorm layer"):
        task_specific_names(model, merged_names(model), "batchnorm")


@pytest.mark.parametrize(("spec", "message"), [("(", "not 'batchnorm', 'norm' or a valid regex"), ("^nope", "'\\^nope' selects nothing")])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(AdamergeError, match=message):
        task_specific_names(tiny_convnet(), merged_names(tiny_convnet()), spec)


def test_kept_tensors_are_each_experts_own_and_leave_the_task_vectors(tiny_setup):
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    kept = keep_task_specific(experts, "batchnorm")
    assert not set(BATCHNORM_AFFINE) & set(kept.task_vectors.names)
    assert set(kept.task_vectors.names) == set(experts.task_vectors.names) - set(BATCHNORM_AFFINE)
    for task, path in tiny_setup.experts.items():
        own = torch.load(path, weights_only=True)
        assert list(kept.task_specific[task]) == BATCHNORM_AFFINE
        for name in BATCHNORM_AFFINE:
            torch.testing.assert_close(kept.task_specific[task][name], own[name])
    assert keep_task_specific(experts, None) is experts


def naive_task_arithmetic(setup, task: str, classes: int, scale: float = 0.3) -> nn.Module:
    """Reference: θ_0 + scale · Σ_k τ_k for every parameter but the head and the BatchNorm affine
    tensors, which are the task's expert's own; statistics of the task's calibration images."""
    base = torch.load(setup.base, weights_only=True)
    states = {t: torch.load(p, weights_only=True) for t, p in setup.experts.items()}
    own = states[task]
    state = {}
    for name, value in own.items():
        if name.startswith("8.") or name in BATCHNORM_AFFINE or not value.is_floating_point() or "running" in name:
            state[name] = value
        else:
            state[name] = base[name] + scale * sum(s[name] - base[name] for s in states.values())
    model = tiny_convnet(num_classes=classes)
    model.load_state_dict(state)
    statistics = naive_statistics(model, calibration_images(setup.calib / task), chunks=1)
    model.load_state_dict(state | statistics)
    return model.eval()


def test_static_merge_keeps_each_experts_batchnorm_affine(tiny_setup, tmp_path):
    output = tmp_path / "ta"
    assert main(per_task_merge_args(tiny_setup, "task-arithmetic", output, "--task-specific", "batchnorm")) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    merged_file = torch.load(output / "merged.pt", weights_only=True)
    x = torch.randn(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    for task, classes in tiny_setup.classes.items():
        head = torch.load(output / "heads" / f"{task}.pt", weights_only=True)
        assert set(BATCHNORM_AFFINE) <= set(head)
        exported = tiny_convnet(num_classes=classes)
        exported.load_state_dict(merged_file | head)
        reference = naive_task_arithmetic(tiny_setup, task, classes)
        with torch.no_grad():
            torch.testing.assert_close(exported.eval()(x), reference(x), rtol=1e-4, atol=1e-5)
        assert accuracy_on_folder(exported, tiny_setup.eval / task) == pytest.approx(metrics["accuracy"]["task-arithmetic"][task], abs=1e-5)


@pytest.mark.parametrize("method", ["adamerging", "expert-merging++"])
def test_fit_learns_no_coefficient_for_kept_tensors_and_exports_them(tiny_setup, tmp_path, method):
    output = tmp_path / "fit"
    extra = ["--method", method, "--batchnorm", "per-task", "--task-specific", "batchnorm", "--eval", str(tiny_setup.eval)]
    assert main(fit_args(tiny_setup, output, *extra)) == 0
    header = (output / "coefficients.tsv").read_text().splitlines()[0].split("\t")  # task, then one column per λ
    assert "0.weight" in header and not set(BATCHNORM_AFFINE) & set(header)
    metrics = json.loads((output / "metrics.json").read_text())
    label = f"{method} (layer)"
    merged_file = torch.load(output / "merged.pt", weights_only=True)
    for task, classes in tiny_setup.classes.items():
        head = torch.load(output / "heads" / f"{task}.pt", weights_only=True)
        own = torch.load(tiny_setup.experts[task], weights_only=True)
        for name in BATCHNORM_AFFINE:
            torch.testing.assert_close(head[name], own[name])
        model = tiny_convnet(num_classes=classes)
        model.load_state_dict(merged_file | head)
        # the statistics are those of the model this task runs: its own BatchNorm affine upstream
        expected = naive_statistics(model, calibration_images(tiny_setup.calib / task), chunks=3)
        for name in ("4.running_mean", "4.running_var"):
            torch.testing.assert_close(head[name], expected[name], rtol=1e-4, atol=1e-5)
        assert accuracy_on_folder(model.eval(), tiny_setup.eval / task) == pytest.approx(metrics["accuracy"][label][task], abs=1e-5)


def test_cli_names_a_spec_that_selects_nothing(tiny_setup, tmp_path, caplog):
    message = run_fails(fit_args(tiny_setup, tmp_path / "run", "--task-specific", "^nothing"), caplog)
    assert "--task-specific '^nothing' selects nothing" in message
    assert not (tmp_path / "run").exists()
