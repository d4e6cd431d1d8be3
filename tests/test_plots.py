"""benchmarks/plots.py: every figure is written from small schema-valid inputs; bad inputs name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

pytestmark = pytest.mark.lab  # the benchmarks' own scripts, not the library

pytest.importorskip("matplotlib")

TASKS = ["mnist", "cifar10", "usps"]

plots = load_benchmark("plots")


def _entry(base: float) -> dict:
    per_task = {t: base + 0.05 * i for i, t in enumerate(TASKS)}
    per_task["average"] = sum(per_task.values()) / len(TASKS)
    return {"per_task": per_task, "average": per_task["average"], "normalized": 0.9, "wall_s": 1.0, "peak_rss_mb": 10.0}


def _write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    methods = {name: _entry(0.3 + 0.04 * i) for i, name in enumerate(["expert (alone)", "average", "adamerging (layer-wise)"])}
    _write(tmp_path / "vision.json", {"tasks": TASKS, "methods": methods, "steps": 5})
    tensors = [f"features.{i}.conv.{j}.weight" for i in range(30) for j in range(3)]  # 90 columns: labels thinned
    coefficients = {t: {n: 0.3 + 0.001 * k + 0.1 * i for k, n in enumerate(tensors)} for i, t in enumerate(TASKS)}
    _write(tmp_path / "vision_coefficients_adamerging.json", coefficients)
    shots = {str(s): _entry(0.2 + 0.1 * i) | {"seeds": {"fit": 0}, "split": {}} for i, s in enumerate([1, 2, 4])}
    _write(tmp_path / "vision_fewshot.json", {"tasks": TASKS, "shots": shots, "references": {"pretrained (λ=0)": _entry(0.1)}})
    return tmp_path


def test_every_figure_is_written(inputs: Path) -> None:
    written = plots.make_plots(inputs / "vision.json")
    names = sorted(p.name for p in written)
    assert names == ["vision_accuracy.png", "vision_coefficients.png", "vision_fewshot.png"]
    for path in written:
        assert path.parent == inputs
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_command_line_and_signed_coefficients(inputs: Path, tmp_path: Path, capsys) -> None:
    signed = {t: {"a.weight": -0.5, "b.weight": 0.25} for t in TASKS}  # aTLAS λ can be negative
    coefficients = _write(tmp_path / "fit_coefficients.json", signed)
    out = tmp_path / "figures"
    assert plots.main(["--coefficients", str(coefficients), "--fewshot", str(inputs / "vision_fewshot.json"),
                       "--name", "run", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["run_coefficients.png", "run_fewshot.png"]
    assert all(p.stat().st_size > 0 for p in out.iterdir())
    assert "run_fewshot.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", "not a readable JSON file"),
        ({"tasks": TASKS}, "'methods'"),
        ({"tasks": TASKS, "methods": {"average": {"per_task": {"mnist": 0.5}}}}, "per_task['cifar10']"),
        ({"methods": {}}, "'tasks'"),
    ],
)
def test_malformed_results_name_the_file(tmp_path: Path, payload, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.raises(plots.PlotInputError) as error:
        plots.make_plots(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_malformed_coefficients_and_fewshot_name_the_file(tmp_path: Path, capsys) -> None:
    ragged = _write(tmp_path / "coefficients.json", {"mnist": {"a": 0.1, "b": 0.2}, "usps": {"a": 0.1}})
    with pytest.raises(plots.PlotInputError, match="same tensors"):
        plots.make_plots(coefficients=ragged)
    fewshot = _write(tmp_path / "x_fewshot.json", {"tasks": TASKS, "shots": {"one": _entry(0.5)}})
    with pytest.raises(plots.PlotInputError, match=r"x_fewshot\.json: shots key 'one'"):
        plots.make_plots(fewshot=fewshot)
    with pytest.raises(SystemExit) as exit_info:  # the command line reports it and exits 2
        plots.main([str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    assert "missing.json: no such file" in capsys.readouterr().err
