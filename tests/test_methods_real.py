"""Every learned method on a small real model and real data: its objective falls and its
coefficients move; aTLAS few-shot beats its initialisation on held-out labelled data.

Experts: a small conv net (seeded "pretrained" base) fine-tuned briefly on real MNIST and
Fashion-MNIST (../shared/data); calibration, few-shot and evaluation images are disjoint rows.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adamerge.data.images import build_image_transform
from adamerge.run.fit import run_fit
from adamerge.run.settings import FitSettings
from tests.conftest import DATA_ROOT, HEAD
from tests.tiny import tiny_convnet

pytestmark = pytest.mark.skipif(not (DATA_ROOT / "images" / "mnist").is_dir(), reason="../shared/data is not present")

TASKS = ("mnist", "fashion_mnist")
SIZE = 16
ROWS = {"finetune": 1200, "calib": 128, "shots": 200, "eval": 300}


def _save(images: np.ndarray, labels: np.ndarray | None, folder: Path) -> None:
    for i, image in enumerate(images):
        target = folder / str(labels[i]) if labels is not None else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target / f"{i:05d}.png")


def _finetune(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    transform = build_image_transform(SIZE)
    inputs = torch.stack([transform(Image.fromarray(x)) for x in images])  # (N, 3, S, S)
    targets = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.fixture(scope="module")
def real_setup(tmp_path_factory) -> dict:
    from adamerge.datasets.vision import load_vision_task

    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    base = tiny_convnet(width=12)
    torch.save(base.state_dict(), root / "base.pt")
    experts = {}
    rng = np.random.default_rng(0)
    for k, task in enumerate(TASKS):
        arrays = load_vision_task(task, DATA_ROOT)
        order = rng.permutation(len(arrays))
        parts, start = {}, 0
        for name, count in ROWS.items():
            parts[name] = order[start : start + count]
            start += count
        expert = tiny_convnet(width=12)
        expert.load_state_dict(base.state_dict())
        torch.manual_seed(10 + k)
        expert[8] = torch.nn.Linear(24, 10)
        _finetune(expert, arrays.images[parts["finetune"]], arrays.labels[parts["finetune"]], seed=k)
        experts[task] = root / f"{task}.pt"
        torch.save(expert.state_dict(), experts[task])
        _save(arrays.images[parts["calib"]], None, root / "calib" / task)
        _save(arrays.images[parts["shots"]], arrays.labels[parts["shots"]], root / "shots" / task)
        _save(arrays.images[parts["eval"]], arrays.labels[parts["eval"]], root / "eval" / task)
    return {"root": root, "base": root / "base.pt", "experts": experts}


def fit(setup: dict, output: Path, method: str, **overrides) -> tuple[dict, list[dict]]:
    options = {
        "base": f"tests.tiny:tiny_convnet@{setup['base']}",
        "base_kwargs": {"width": 12},
        "experts": {t: str(p) for t, p in setup["experts"].items()},
        "calib": setup["root"] / "calib",
        "eval": setup["root"] / "eval",
        "head_pattern": HEAD,
        "method": method,
        "image_size": SIZE,
        "batch_size": 32,
        "progress_bar": False,
        "output": output,
    }
    metrics = run_fit(FitSettings(**(options | overrides)))
    with open(output / "logs" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return metrics, rows


def losses(rows: list[dict], column: str = "train/loss") -> list[float]:
    return [float(r[column]) for r in rows if r.get(column)]


def moved(output: Path, init: float) -> float:
    table = json.loads((output / "coefficients.json").read_text())
    return max(abs(v - init) for groups in table.values() for v in groups.values())


def test_adamerging_entropy_decreases_and_beats_task_arithmetic(real_setup, tmp_path):
    metrics, rows = fit(real_setup, tmp_path / "ada", "adamerging", steps=40, lr=1e-2)
    entropy = losses(rows)
    # BatchNorm normalises each training batch (policy reestimate), so the entropy of these
    # barely trained experts falls slowly: about 3 % in 40 steps
    assert np.mean(entropy[-3:]) < 0.98 * np.mean(entropy[:3]), entropy
    assert moved(tmp_path / "ada", 0.3) > 0.05
    accuracy = metrics["accuracy"]
    assert accuracy["adamerging (layer)"]["average"] >= accuracy["task arithmetic (λ=0.3)"]["average"] - 0.01


@pytest.mark.parametrize(
    "method,init,overrides",
    [
        ("adamerging++", 0.3, {"lr": 1e-2, "granularity": "task"}),
        # test-time aTLAS from task arithmetic; these small experts are rarely confident, so every
        # prediction becomes a pseudo-label here (thresholding: tests/test_objectives.py)
        ("atlas", 0.3, {"lr": 1e-2, "init": 0.3, "pseudo_label_threshold": 0.0}),
        ("expert-merging", 0.1, {"calib_limit": 64, "lr": 0.1}),
        ("expert-merging++", 0.1, {"calib_limit": 64, "lr": 0.1}),
    ],
)
def test_learned_method_objective_falls_and_coefficients_move(real_setup, tmp_path, method, init, overrides):
    output = tmp_path / method
    _, rows = fit(real_setup, output, method, steps=25, **overrides)
    series = losses(rows)
    assert np.mean(series[-3:]) < np.mean(series[:3]), series
    assert moved(output, init) > 1e-3


def test_atlas_few_shot_improves_over_its_initialisation(real_setup, tmp_path):
    metrics, rows = fit(
        real_setup, tmp_path / "fewshot", "atlas", steps=40, shots=8, calib=real_setup["root"] / "shots"
    )
    accuracy = metrics["accuracy"]
    assert accuracy["atlas (layer)"]["average"] > accuracy["pretrained (λ=0)"]["average"] + 0.05
    assert losses(rows)[-1] < losses(rows)[0]


def test_expert_merging_plus_plus_reports_its_stage_one_as_expert_merging(real_setup, tmp_path):
    """Stage one of Expert Merging++ is Expert Merging: one run gives both results, and testing
    stage one does not change what stage two learns."""
    common = {"steps": 12, "calib_limit": 64, "lr": 0.1, "eval_init": False, "eval_experts": False}
    alone, _ = fit(real_setup, tmp_path / "em", "expert-merging", **common)
    both, _ = fit(real_setup, tmp_path / "empp", "expert-merging++", **common)
    untested, _ = fit(real_setup, tmp_path / "empp-no-eval", "expert-merging++", **(common | {"eval": None}))
    assert both["accuracy"]["expert-merging (layer)"] == alone["accuracy"]["expert-merging (layer)"]
    assert set(both["accuracy"]) == {"expert-merging (layer)", "expert-merging++ (layer)"}
    assert {"stage_one_fit", "stage_one_test"} <= set(both["timing_s"])
    assert "expert-merging (layer)" not in untested["accuracy"]
    tested = json.loads((tmp_path / "empp" / "coefficients.json").read_text())
    assert tested == json.loads((tmp_path / "empp-no-eval" / "coefficients.json").read_text())
