"""`adamerge fit` end to end on a tiny model, and every bad-input case of the core issue."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from adamerge.cli import main
from tests.conftest import HEAD, REPO
from tests.tiny import tiny_convnet

QUICK = ["--steps", "3", "--image-size", "12", "--batch-size", "4", "--progress-bar", "false"]


def fit_args(setup, output: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--base", f"tests.tiny:tiny_convnet@{setup.base}",
        "--experts", *setup.expert_args(),
        "--calib", str(setup.calib),
        "--head-pattern", HEAD,
        "--output", str(output),
        *QUICK,
        *extra,
    ]


def run_fails(args: list[str], caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="adamerge"):
        assert main(args) == 2
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_fit_end_to_end_writes_loadable_outputs(tiny_setup, tmp_path):
    output = tmp_path / "run"
    assert main(fit_args(tiny_setup, output, "--eval", str(tiny_setup.eval))) == 0
    names = {p.name for p in output.iterdir()}
    assert {"coefficients.json", "coefficients.tsv", "merged.pt", "heads", "metrics.json", "config.yaml"} <= names
    assert (output / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"expert (alone)", "task arithmetic (λ=0.3)", "adamerging (layer)"}
    assert set(metrics["accuracy"]["adamerging (layer)"]) == {"alpha", "beta", "average"}
    coefficients = json.loads((output / "coefficients.json").read_text())
    assert set(coefficients) == {"alpha", "beta"} and len(coefficients["alpha"]) == 8

    # the export loads into the plain architecture with load_state_dict alone
    state = torch.load(output / "merged.pt", weights_only=True) | torch.load(output / "heads" / "beta.pt", weights_only=True)
    model = tiny_convnet(num_classes=4)
    model.load_state_dict(state)
    assert model.eval()(torch.randn(2, 3, 12, 12)).shape == (2, 4)
    # the checkpoint holds λ only
    checkpoint = torch.load(output / "checkpoints" / "last.ckpt", weights_only=False)
    assert list(checkpoint["state_dict"]) == ["merged.coefficients.raw"]
    assert checkpoint["adamerge"]["tasks"] == ["alpha", "beta"]


def test_exported_model_equals_merged_forward(tiny_setup, tmp_path):
    """The exported state dict gives the same logits as adamerge's merged forward at the learned λ."""
    from adamerge.core.merged_model import MergedModel
    from adamerge.sources import load_file_experts

    output = tmp_path / "run"
    assert main(fit_args(tiny_setup, output, "--batchnorm", "reestimate")) == 0  # statistics in merged.pt
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    merged = MergedModel(experts.model, experts.task_vectors, "layer", heads=experts.heads)
    table = json.loads((output / "coefficients.json").read_text())
    values = torch.tensor([[table[t][g] for g in merged.layout.group_names] for t in merged.tasks])
    merged.coefficients.set_values(values)
    exported = torch.load(output / "merged.pt", weights_only=True)
    for name in merged.layout.tensor_names:
        torch.testing.assert_close(exported[name], merged.merged_state_dict()[name], rtol=1e-5, atol=1e-6)
    # BatchNorm statistics were re-estimated for the learned λ: running the export reproduces them
    model = tiny_convnet(num_classes=3)
    model.load_state_dict(exported | torch.load(output / "heads" / "alpha.pt", weights_only=True))
    merged.model.load_state_dict({k: v for k, v in exported.items() if "running" in k or "num_batches" in k}, strict=False)
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(model.eval()(x), merged.eval()(x, "alpha"), rtol=1e-4, atol=1e-5)


def test_yaml_config_and_print_config(tiny_setup, tmp_path, capsys):
    output = tmp_path / "from-yaml"
    config = {
        "base": f"tests.tiny:tiny_convnet@{tiny_setup.base}",
        "experts": tiny_setup.expert_args(),
        "calib": str(tiny_setup.calib),
        "head_pattern": HEAD,
        "granularity": "task",
        "steps": 2,
        "image_size": 12,
        "batch_size": 4,
        "progress_bar": False,
        "output": str(output),
    }
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["granularity"] == "task" and printed["steps"] == 2
    assert main(["fit", "--config", str(path)]) == 0
    assert len(next(iter(json.loads((output / "coefficients.json").read_text()).values()))) == 1
    assert yaml.safe_load((output / "config.yaml").read_text())["granularity"] == "task"


def test_console_script_runs(tiny_setup, tmp_path):
    output = tmp_path / "script"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    script = Path(sys.executable).with_name("adamerge")
    done = subprocess.run([str(script), *fit_args(tiny_setup, output)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (output / "merged.pt").is_file()


def test_output_exists_is_refused_unless_overwrite(tiny_setup, tmp_path, caplog):
    output = tmp_path / "taken"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    message = run_fails(fit_args(tiny_setup, output), caplog)
    assert "exists" in message and "--overwrite" in message
    assert (output / "keep.txt").read_text() == "mine"
    assert main(fit_args(tiny_setup, output, "--overwrite", "true")) == 0
    assert not (output / "keep.txt").exists() and (output / "merged.pt").exists()


def test_group_by_length_on_image_experts_is_refused(tiny_setup, tmp_path, caplog):
    output = tmp_path / "never"
    message = run_fails(fit_args(tiny_setup, output, "--group-by-length", "true"), caplog)
    assert "--group-by-length" in message and "images" in message
    assert not output.exists()


def test_eval_init_false_evaluates_the_learned_merge_only(tiny_setup, tmp_path):
    output = tmp_path / "lean"
    assert main(fit_args(tiny_setup, output, "--eval", str(tiny_setup.eval), "--eval-init", "false")) == 0
    accuracy = json.loads((output / "metrics.json").read_text())["accuracy"]
    assert set(accuracy) == {"expert (alone)", "adamerging (layer)"}


def expert_with(tmp_path: Path, setup, edit) -> Path:
    state = torch.load(setup.experts["beta"], weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda s: s.__setitem__("0.weight", torch.zeros(8, 3, 5, 5)), r"'0.weight' has shape \(8, 3, 5, 5\), the base has \(8, 3, 3, 3\)"),
        (lambda s: s.pop("3.bias"), r"missing 1 tensor\(s\) of the base, e.g. \['3.bias'\]"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(2)), r"tensor\(s\) the base lacks, e.g. \['extra.weight'\]"),
        (lambda s: s["4.weight"].__setitem__(0, float("nan")), r"'4.weight' holds 1 NaN/Inf"),
    ],
    ids=["shape", "missing", "extra", "nan"],
)
def test_bad_expert_is_named_and_nothing_written(tiny_setup, tmp_path, caplog, edit, expected):
    tiny_setup.experts["beta"] = expert_with(tmp_path, tiny_setup, edit)
    output = tmp_path / "never"
    message = run_fails(fit_args(tiny_setup, output), caplog)
    assert "expert 'beta" in message
    assert __import__("re").search(expected, message), message
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_corrupt_expert_file(tiny_setup, tmp_path, caplog):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00garbage" * 50)
    tiny_setup.experts["beta"] = bad
    message = run_fails(fit_args(tiny_setup, tmp_path / "never"), caplog)
    assert "broken.pt" in message and "not a torch checkpoint" in message


def test_missing_and_empty_calibration(tiny_setup, tmp_path, caplog):
    message = run_fails(fit_args(tiny_setup, tmp_path / "o") + ["--calib", str(tmp_path / "nowhere")], caplog)
    assert "nowhere" in message and "does not exist" in message

    empty = tmp_path / "empty_calib"
    (empty / "alpha").mkdir(parents=True)
    (empty / "beta").mkdir(parents=True)
    (empty / "beta" / "notes.txt").write_text("no images here")
    message = run_fails(fit_args(tiny_setup, tmp_path / "o") + ["--calib", str(empty)], caplog)
    assert "alpha" in message and "no decodable image" in message

    partial = tmp_path / "partial"
    (partial / "alpha").mkdir(parents=True)
    message = run_fails(fit_args(tiny_setup, tmp_path / "o") + ["--calib", str(partial)], caplog)
    assert "no sub-folder for task(s) beta" in message
    assert not (tmp_path / "o").exists()


def test_undecodable_image_is_skipped_with_warning(tiny_setup, tmp_path, caplog):
    (tiny_setup.calib / "alpha" / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        assert main(fit_args(tiny_setup, tmp_path / "ok")) == 0
    assert any("broken.png" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "base,expected",
    [
        ("torchvision:no_such_net@{w}", "torchvision has no model 'no_such_net'"),
        ("open_clip:NoSuchClip@{w}", "open_clip has no model config 'NoSuchClip'"),
        ("nosuchpackage.models:net@{w}", "cannot import 'nosuchpackage.models'"),
        ("tests.tiny:missing_factory@{w}", "has no callable 'missing_factory'"),
        ("mobilenet@{w}", "expected 'torchvision:NAME'"),
        ("tests.tiny:tiny_convnet", "expected ARCH@WEIGHTS"),
        ("torchvision:resnet18@{w}", "do not fit ResNet"),
    ],
)
def test_unknown_architecture_or_mismatched_base(tiny_setup, tmp_path, caplog, base, expected):
    args = fit_args(tiny_setup, tmp_path / "o")
    args[args.index("--base") + 1] = base.format(w=tiny_setup.base)
    message = run_fails(args, caplog)
    assert expected in message, message


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--head-pattern", "^nomatch", "matches no tensor"),
        ("--head-pattern", "([", "not a valid regex"),
        ("--granularity", "diagonal", "granularity 'diagonal'"),
        ("--init", "1.5", "clamped coefficients must start inside [0, 1]"),
    ],
)
def test_bad_options_are_explained(tiny_setup, tmp_path, caplog, flag, value, expected):
    args = fit_args(tiny_setup, tmp_path / "o")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert expected in run_fails(args, caplog)


def test_malformed_experts_argument(tiny_setup, tmp_path, caplog):
    args = fit_args(tiny_setup, tmp_path / "o")
    args[args.index("--experts") + 1] = "just-a-path.pt"
    assert "expected NAME=PATH" in run_fails(args, caplog)


@pytest.mark.parametrize("method", ["task-arithmetic", "ties", "dare"])
def test_static_merge_command_end_to_end(tiny_setup, tmp_path, method):
    output = tmp_path / method
    args = [
        "merge", "--method", method,
        "--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}",
        "--experts", *tiny_setup.expert_args(),
        "--calib", str(tiny_setup.calib), "--eval", str(tiny_setup.eval),
        "--head-pattern", HEAD, "--image-size", "12", "--output", str(output),
    ]
    assert main(args) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert set(metrics["accuracy"][method]) == {"alpha", "beta", "average"}
    model = tiny_convnet(num_classes=3)
    model.load_state_dict(torch.load(output / "merged.pt", weights_only=True) | torch.load(output / "heads" / "alpha.pt", weights_only=True))


def test_static_task_arithmetic_export_equals_merged_model_at_that_lambda(tiny_setup, tmp_path):
    from adamerge.core.merged_model import MergedModel
    from adamerge.sources import load_file_experts

    output = tmp_path / "ta"
    args = ["merge", "--method", "task-arithmetic", "--options", "{scale: 0.4}", "--batchnorm", "base",
            "--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}", "--experts", *tiny_setup.expert_args(),
            "--head-pattern", HEAD, "--output", str(output)]
    assert main(args) == 0
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD, "base")
    merged = MergedModel(experts.model, experts.task_vectors, "task", "none", 0.4, experts.heads, "base")
    exported = torch.load(output / "merged.pt", weights_only=True)
    for name, tensor in merged.merged_state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6)


def test_static_merge_refuses_unknown_and_learned_methods(tiny_setup, tmp_path, caplog):
    common = ["--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}", "--experts", *tiny_setup.expert_args(),
              "--output", str(tmp_path / "o")]  # fmt: skip
    assert "expected one of average, task-arithmetic, ties" in run_fails(["merge", "--method", "magic", *common], caplog)
    assert "learned method: run it with adamerge fit" in run_fails(["merge", "--method", "adamerging", *common], caplog)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(config, tiny_setup, tmp_path, capsys):
    command = "merge" if "static" in config.parts else "fit"
    assert f"adamerge {command} --config configs/" in config.read_text()  # the header runs it
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--config", str(config), "--base", f"tests.tiny:tiny_convnet@{tiny_setup.base}",
              "--experts", *tiny_setup.expert_args(), "--calib", str(tiny_setup.calib),
              "--output", str(tmp_path / "o"), "--print_config"])
    assert exit_info.value.code == 0
    assert "method:" in capsys.readouterr().out


def test_task_weights_apply_to_every_method(tiny_setup, tmp_path, caplog):
    """AdaMerging with beta's entropy weighted 3x learns other λ than with equal weights."""
    assert main(fit_args(tiny_setup, tmp_path / "w", "--task-weights", "{beta: 3}", "--holdout", "0")) == 0
    assert main(fit_args(tiny_setup, tmp_path / "u", "--holdout", "0")) == 0
    weighted, plain = (json.loads((tmp_path / name / "coefficients.json").read_text()) for name in ("w", "u"))
    assert weighted != plain
    assert "--task-weights" in run_fails(fit_args(tiny_setup, tmp_path / "x", "--task-weights", "{gamma: 3}"), caplog)
