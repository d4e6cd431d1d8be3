"""The cached vision demo on the real data: splits, folder layout, experts, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from adamerge.datasets import load_vision_task
from adamerge.demo import vision as demo
from adamerge.demo.vision import build_vision_demo, class_folder_names, split_indices, task_seed

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [pytest.mark.lab, pytest.mark.skipif(
    not (DATA_ROOT / "backbones" / "mobilenet_v2-b0353104.pth").is_file(),
    reason=f"real data and mobilenet_v2 weights not found at {DATA_ROOT}",
)]  # the demo, not the library

TASKS = ("usps", "mnist")
TINY = dict(image_size=32, finetune_size=64, calib_size=8, test_size=16, epochs=1, batch_size=32, max_steps=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo")
    return build_vision_demo(DATA_ROOT, cache, tasks=TASKS, **TINY)


def _mtimes(assets) -> dict[str, int]:
    return {task: path.stat().st_mtime_ns for task, path in assets.experts.items()}


# --------------------------------------------------------------------------- splits


def test_split_is_disjoint_sized_and_deterministic():
    sizes = {"test": 50, "calib": 30, "finetune": 100}
    parts = split_indices(1000, sizes, seed=7)
    assert {name: len(p) for name, p in parts.items()} == sizes
    union = np.concatenate(list(parts.values()))
    assert len(np.unique(union)) == len(union) and union.max() < 1000
    again = split_indices(1000, sizes, seed=7)
    assert all(np.array_equal(parts[name], again[name]) for name in sizes)
    assert not np.array_equal(parts["test"], split_indices(1000, sizes, seed=8)["test"])


def test_split_keeps_test_and_calib_when_finetune_size_changes():
    small = split_indices(500, {"test": 40, "calib": 20, "finetune": 10}, seed=1)
    large = split_indices(500, {"test": 40, "calib": 20, "finetune": 1000}, seed=1)
    assert np.array_equal(small["test"], large["test"]) and np.array_equal(small["calib"], large["calib"])
    assert len(large["finetune"]) == 440  # capped by the rows left


def test_split_rejects_sizes_larger_than_the_data():
    with pytest.raises(demo.DataError, match="leave nothing"):
        split_indices(100, {"test": 60, "calib": 40, "finetune": 1}, seed=0)


def test_unknown_task_fails_before_building(tmp_path):
    with pytest.raises(demo.DataError, match="unknown vision task"):
        build_vision_demo(DATA_ROOT, tmp_path, tasks=("mnist", "svhn"))
    assert not (tmp_path / "manifest.json").exists()


def test_task_seeds_differ_per_task_and_are_stable():
    assert task_seed(0, "mnist") == task_seed(0, "mnist") != task_seed(0, "usps")


def test_class_folders_sort_in_label_order():
    names = class_folder_names(load_vision_task("fashion_mnist", DATA_ROOT).classes)
    assert sorted(names) == names and names[0] == "00_T-shirt_top" and names[9] == "09_Ankle_boot"
    assert sorted(class_folder_names([f"c{i}" for i in range(12)]))[10] == "10_c10"


# --------------------------------------------------------------------------- built assets


def test_folder_layout(built):
    assert built.tasks == list(TASKS)
    for task in TASKS:
        calib = sorted((built.calib_dir / task).iterdir())
        assert len(calib) == TINY["calib_size"] and all(p.suffix == ".png" for p in calib)
        folders = sorted(p.name for p in (built.eval_dir / task).iterdir())
        assert len(folders) == 10 and [int(name.split("_")[0]) for name in folders] == list(range(10))
        assert sum(1 for _ in (built.eval_dir / task).rglob("*.png")) == TINY["test_size"]
    assert not list(built.root.rglob(".*"))  # no staging or temporary files left


def test_pngs_hold_the_source_pixels_of_the_recorded_split(built):
    arrays = load_vision_task("usps", DATA_ROOT)
    sizes = {"test": TINY["test_size"], "calib": TINY["calib_size"], "finetune": TINY["finetune_size"]}
    parts = split_indices(len(arrays), sizes, task_seed(0, "usps"))
    calib_rows = sorted(int(p.stem) for p in (built.calib_dir / "usps").iterdir())
    assert calib_rows == sorted(parts["calib"].tolist())
    folders = sorted((built.eval_dir / "usps").iterdir())
    for label, folder in enumerate(folders):
        for png in folder.iterdir():
            row = int(png.stem)
            assert row in parts["test"] and arrays.labels[row] == label
            with Image.open(png) as image:
                assert image.mode == "L" and np.array_equal(np.asarray(image), arrays.images[row])
    record = json.loads(built.splits.read_text())["usps"]
    assert record["seed"] == task_seed(0, "usps") and record["parts"]["finetune"]["size"] == TINY["finetune_size"]
    assert record["parts"]["calib"]["perm_range"] == [TINY["test_size"], TINY["test_size"] + TINY["calib_size"]]


def test_experts_load_into_plain_mobilenet_v2(built):
    for path in built.experts.values():
        state = torch.load(path, weights_only=True)
        assert state["classifier.1.weight"].shape == (10, 1280)
        torchvision.models.mobilenet_v2(num_classes=10).load_state_dict(state)
    base = torch.load(built.base, weights_only=True)
    torchvision.models.mobilenet_v2().load_state_dict(base)
    assert demo.sha256_file(built.base) == demo.sha256_file(DATA_ROOT / demo.BASE_WEIGHTS)


def test_manifest_records_settings_versions_and_accuracy(built):
    manifest = json.loads(built.manifest.read_text())
    assert manifest["versions"]["torch"] == torch.__version__
    for task in TASKS:
        entry = manifest["tasks"][task]
        assert entry["fingerprint"]["settings"]["image_size"] == TINY["image_size"]
        assert entry["expert"]["sha256"] == demo.sha256_file(built.experts[task])
        assert 0.0 <= entry["accuracy"] <= 1.0 and entry["accuracy"] == built.accuracy[task]


def test_cross_task_table_diagonal_matches_manifest(built):
    table = demo.cross_task_accuracy(built)
    assert {task: table[task][task] for task in TASKS} == pytest.approx(built.accuracy)
    assert "expert \\ task" in demo.format_table(table)


# --------------------------------------------------------------------------- caching


def test_second_call_reuses_everything_without_data(built, monkeypatch, tmp_path):
    before = _mtimes(built)
    monkeypatch.setattr(demo, "build_task", lambda *a, **k: pytest.fail("cache miss: rebuilt a task"))
    again = build_vision_demo(tmp_path / "no-data-here", built.root, tasks=TASKS, **TINY)
    assert again == built and _mtimes(again) == before


def test_changed_settings_and_corrupted_files_rebuild(tmp_path):
    first = build_vision_demo(DATA_ROOT, tmp_path, tasks=("usps",), **TINY)
    stamp = _mtimes(first)
    changed = build_vision_demo(DATA_ROOT, tmp_path, tasks=("usps",), **{**TINY, "max_steps": 2})
    assert _mtimes(changed) != stamp
    assert json.loads(changed.manifest.read_text())["tasks"]["usps"]["steps"] == 2
    changed.experts["usps"].write_bytes(b"corrupt")
    repaired = build_vision_demo(DATA_ROOT, tmp_path, tasks=("usps",), **{**TINY, "max_steps": 2})
    torchvision.models.mobilenet_v2(num_classes=10).load_state_dict(torch.load(repaired.experts["usps"]))


def test_cli_reuses_cache_and_reports_errors(built, tmp_path, caplog):
    args = ["--cache-dir", str(built.root), "--data-root", str(DATA_ROOT), "--tasks", *TASKS, "--no-table"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    with caplog.at_level("INFO", logger="adamerge.demo.vision"):
        assert demo.main(args) == 0
    assert "reusing cached expert" in caplog.text
    assert demo.main(["--cache-dir", str(tmp_path), "--data-root", str(tmp_path), "--no-table"]) == 2


def test_quick_assets_never_overwrite_the_full_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAMERGE_CACHE", str(tmp_path / "demo"))
    quick = build_vision_demo(DATA_ROOT, None, tasks=("usps",), quick=True, max_steps=1, finetune_size=40, calib_size=4, test_size=8)
    assert quick.root == (tmp_path / "demo-quick").resolve()
    assert not (tmp_path / "demo").exists()
    explicit = build_vision_demo(DATA_ROOT, tmp_path / "mine", tasks=("usps",), quick=True, max_steps=1,
                                 finetune_size=40, calib_size=4, test_size=8)  # fmt: skip
    assert explicit.root == (tmp_path / "mine").resolve()  # an explicit folder is used as given
