"""Methods as objects: the registry, methods written outside the package, and the one workflow
that runs static and learned methods alike (a static merge equals fit's start, to the digit)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adamerge.cli import main
from adamerge.errors import AdamergeError
from adamerge.methods import LearnedMethod, StaticMethod, get_method, method_names, register_method
from tests.conftest import HEAD
from tests.test_cli import run_fails
from tests.tiny import tiny_convnet


def common(setup, output) -> list[str]:
    return ["--base", f"tests.tiny:tiny_convnet@{setup.base}", "--experts", *setup.expert_args(),
            "--calib", str(setup.calib), "--eval", str(setup.eval), "--head-pattern", HEAD,
            "--image-size", "12", "--output", str(output)]  # fmt: skip


def test_builtin_registry_finds_each_method_by_name_and_kind():
    learned, static = method_names(learned=True), method_names(learned=False)
    assert learned and static and not set(learned) & set(static) and set(learned) | set(static) == set(method_names())
    for name in method_names():
        method = get_method(name)
        assert method.name == name and method.paper and method.learned == (name in learned)
        assert isinstance(method, LearnedMethod if method.learned else StaticMethod)
    with pytest.raises(AdamergeError, match="already registered"):
        register_method(LearnedMethod("adamerging"))
    with pytest.raises(AdamergeError, match="static method: run it with adamerge merge"):
        get_method("ties", learned=True)
    with pytest.raises(AdamergeError, match="cannot import"):
        get_method("tests.plugins.nowhere:METHOD")
    with pytest.raises(AdamergeError, match="objective"):
        LearnedMethod("x", objective="magic")


def test_a_method_from_outside_runs_through_fit_and_merge(tiny_setup, tmp_path):
    fit_output = tmp_path / "fit"
    assert main(["fit", "--method", "tests.plugins.my_methods:GENTLE_ADAMERGING", "--steps", "3", "--batch-size", "4",
                 *common(tiny_setup, fit_output)]) == 0  # fmt: skip
    metrics = json.loads((fit_output / "metrics.json").read_text())
    assert metrics["method"]["name"] == "gentle-adamerging" and metrics["method"]["init"] == 0.5
    assert "task arithmetic (λ=0.5)" in metrics["accuracy"] and metrics["steps"] == 3

    import tests.plugins.my_methods  # noqa: F401  (registers "dense-ties")

    merge_output = tmp_path / "merge"
    assert main(["merge", "--method", "dense-ties", *common(tiny_setup, merge_output)]) == 0
    metrics = json.loads((merge_output / "metrics.json").read_text())
    assert metrics["method"]["preset"]["density"] == 0.5 and set(metrics["accuracy"]["dense-ties"]) == {"alpha", "beta", "average"}
    coefficients = json.loads((merge_output / "coefficients.json").read_text())
    assert json.dumps(coefficients).count("0.5") >= 2  # λ = 0.5 for both tasks, fixed


@pytest.mark.parametrize("batchnorm", ["per-task", "reestimate"])
def test_static_task_arithmetic_equals_the_fit_start_row(tiny_setup, tmp_path, batchnorm):
    merge_output, fit_output = tmp_path / "merge", tmp_path / "fit"
    assert main(["merge", "--method", "task-arithmetic", "--batchnorm", batchnorm, *common(tiny_setup, merge_output)]) == 0
    assert main(["fit", "--method", "adamerging", "--steps", "1", "--batchnorm", batchnorm,
                 *common(tiny_setup, fit_output)]) == 0  # fmt: skip
    static = json.loads((merge_output / "metrics.json").read_text())["accuracy"]["task-arithmetic"]
    start = json.loads((fit_output / "metrics.json").read_text())["accuracy"]["task arithmetic (λ=0.3)"]
    assert static == start  # the same model, statistics and evaluation: equal to the last digit


def test_static_ties_export_equals_the_static_merge_function(tiny_setup, tmp_path):
    from adamerge.rewrite.static_merge import static_merge
    from adamerge.sources import load_file_experts

    output = tmp_path / "ties"
    args = common(tiny_setup, output)
    assert main(["merge", "--method", "ties", "--batchnorm", "base", "--options", "{density: 0.4}", *args]) == 0
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD, "base")
    delta = static_merge("ties", dict(experts.task_vectors.items()), density=0.4)
    exported = torch.load(output / "merged.pt", weights_only=True)
    base = experts.model.state_dict()
    for name, change in delta.items():
        torch.testing.assert_close(exported[name], base[name] + change, rtol=1e-5, atol=1e-6)
    tiny_convnet(num_classes=3).load_state_dict(exported | torch.load(output / "heads" / "alpha.pt", weights_only=True))


def test_bad_static_options_fail_before_anything_is_written(tiny_setup, tmp_path, caplog):
    output = tmp_path / "o"
    message = run_fails(["merge", "--method", "ties", "--options", "{densty: 0.4}", *common(tiny_setup, output)], caplog)
    assert "--options ['densty']: not options of 'ties'" in message and not output.exists()
    dare = get_method("dare").configured(drop_rate=0.3)
    assert isinstance(dare, StaticMethod) and dare.merge().drop_rate == 0.3 and dare.merge().seed == 0


def test_stage_one_row_is_named_by_the_method():
    assert get_method("expert-merging++").stage_label(1, "layer") == "expert-merging (layer)"
    assert get_method("expert-merging++").stage_label(2, "layer") == "expert-merging++ stage 2 (layer)"
    unnamed = dataclasses.replace(get_method("expert-merging++"), name="my-two-stage", stage_one="")
    assert unnamed.stage_label(1, "layer") == "my-two-stage stage 1 (layer)"


def test_an_objective_from_outside_runs_through_fit(tiny_setup, tmp_path):
    from tests.plugins.my_methods import MaxConfidence

    MaxConfidence.calls = 0
    output = tmp_path / "fit"
    assert main(["fit", "--method", "tests.plugins.my_methods:CONFIDENT_MERGING", "--steps", "2", "--batch-size", "4",
                 "--holdout", "0", *common(tiny_setup, output)]) == 0  # fmt: skip
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["method"]["objective"] == "tests.plugins.my_methods:MaxConfidence" and metrics["steps"] == 2
    assert MaxConfidence.calls == 2 * 2  # two steps, two tasks
    with pytest.raises(AdamergeError, match="not an adamerge Objective"):
        LearnedMethod("x", objective="tests.plugins.my_methods:GENTLE_ADAMERGING").objective_class()
    with pytest.raises(AdamergeError, match=r"needs labelled calibration data \(--shots N\)"):
        LearnedMethod("x", objective="cross-entropy").build_objective(None, type("S", (), {"shots": None, "task_weights": None})())
