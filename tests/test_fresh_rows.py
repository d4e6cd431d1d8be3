"""benchmarks/fresh_rows.py: rows outside every split part, and an exported merge re-tested on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from adamerge.cli import main as adamerge_main
from adamerge.demo.vision import build_vision_demo, describe_split, split_indices
from adamerge.errors import AdamergeError
from tests.conftest import load_benchmark

pytestmark = pytest.mark.lab  # the benchmarks' own scripts, not the library

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
fresh_rows = load_benchmark("fresh_rows")


@pytest.mark.parametrize(
    ("rows", "sizes", "count", "expected"),
    [
        (100, {"test": 10, "calib": 5, "finetune": 20}, 30, 30),
        (100, {"test": 10, "calib": 5, "finetune": 20}, 500, 65),  # every row left, no more
        (40, {"test": 10, "calib": 5, "finetune": 50}, 10, 0),  # fine-tuning took the rest (USPS)
    ],
)
def test_split_rows_are_the_test_part_and_rows_no_part_holds(rows, sizes, count, expected):
    parts = split_indices(rows, sizes, seed=7)
    record = json.loads(json.dumps(describe_split(rows, 7, parts)))  # as read back from splits.json
    found = fresh_rows.split_rows(record, count)
    np.testing.assert_array_equal(found["test"], parts["test"])
    assert len(found["fresh"]) == expected and len(set(found["fresh"].tolist())) == expected
    used = set(np.concatenate(list(parts.values())).tolist())
    assert used.isdisjoint(found["fresh"].tolist())
    assert used | set(found["fresh"].tolist()) <= set(range(rows))


def test_split_rows_refuses_a_record_that_does_not_regenerate():
    record = json.loads(json.dumps(describe_split(100, 7, split_indices(100, {"test": 10, "calib": 5, "finetune": 20}, 7))))
    record["seed"] = 8
    with pytest.raises(AdamergeError, match="'test'.*do not match"):
        fresh_rows.split_rows(record, 10)


@pytest.mark.skipif(not (DATA_ROOT / "backbones" / "mobilenet_v2-b0353104.pth").is_file(), reason="real data not found")
def test_an_exported_chunk_wise_merge_is_retested_on_fresh_rows(tmp_path, monkeypatch):
    tiny = dict(image_size=32, finetune_size=64, calib_size=8, test_size=16, epochs=1, batch_size=32, max_steps=1)
    assets = build_vision_demo(DATA_ROOT, tmp_path / "demo", tasks=("usps", "mnist"), **tiny)
    run = tmp_path / "run"
    assert adamerge_main([
        "fit", "--method", "expert-merging", "--granularity", "chunk:4", "--init", "0.3",
        "--task-specific", "batchnorm", "--batchnorm", "per-task",
        "--base", f"torchvision:mobilenet_v2@{assets.base}",
        "--experts", *[f"{t}={p}" for t, p in assets.experts.items()],
        "--calib", str(assets.calib_dir), "--eval", str(assets.eval_dir), "--head-pattern", r"^classifier\.",
        "--image-size", "32", "--steps", "2", "--batch-size", "4", "--progress-bar", "false", "--output", str(run),
    ]) == 0  # fmt: skip
    out = tmp_path / "fresh.json"
    argv = ["fresh_rows.py", "--cache-dir", str(assets.root), "--data-root", str(DATA_ROOT), "--rows", "24",
            "--runs", f"chunk4={run}", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    fresh_rows.main()  # also checks the plain-torchvision test scores against metrics.json

    payload = json.loads(out.read_text())
    assert payload["fresh_rows"] == {"mnist": 24, "usps": 24} and payload["shared_tasks"] == ["mnist", "usps"]
    metrics = json.loads((run / "metrics.json").read_text())["accuracy"]
    entry = payload["results"]["chunk4"]
    assert entry["test"]["per_task"] == {t: metrics["expert-merging (chunk:4)"][t] for t in ("mnist", "usps")}
    experts = payload["results"]["expert (alone)"]
    assert experts["test"]["per_task"] == {t: metrics["expert (alone)"][t] for t in ("mnist", "usps")}
    for split in ("test", "fresh"):
        ratios = [entry[split]["per_task"][t] / experts[split]["per_task"][t] for t in ("mnist", "usps")]
        assert entry[split]["normalized_shared_tasks"] == pytest.approx(sum(ratios) / 2)
    assert out.with_suffix(".md").read_text().count("\n| ") == 3  # the header and two models


def test_a_folder_that_is_not_a_fit_output_is_named(tmp_path):
    (tmp_path / "heads").mkdir()
    (tmp_path / "merged.pt").write_bytes(b"not a state dict")
    (tmp_path / "heads" / "mnist.pt").write_bytes(b"")
    with pytest.raises(AdamergeError, match="merged.pt: not a readable state dict"):
        fresh_rows.load_merge(tmp_path, "mnist", 10)
    with pytest.raises(AdamergeError, match="usps.pt: not found"):
        fresh_rows.load_merge(tmp_path, "usps", 10)
