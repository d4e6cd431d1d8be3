"""benchmarks/runner.py: measured processes side by side, CPU slots shared across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import HEAD, REPO, load_benchmark

pytestmark = pytest.mark.lab  # the benchmarks' own scripts, not the library

runner_module = load_benchmark("runner")


def _fit(setup, output: Path, *extra: str) -> list[str]:
    return [
        "fit", "--base", f"tests.tiny:tiny_convnet@{setup.base}", "--experts", *setup.expert_args(),
        "--calib", str(setup.calib), "--eval", str(setup.eval), "--head-pattern", HEAD, "--output", str(output),
        "--steps", "2", "--image-size", "12", "--batch-size", "4", "--progress-bar", "false", *extra,
    ]  # fmt: skip


def _overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


# a child process that loads benchmarks/runner.py as ``r`` (the tests' children take real slots)
CHILD_PREAMBLE = textwrap.dedent(
    f"""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("r", {str(REPO / "benchmarks" / "runner.py")!r})
    r = importlib.util.module_from_spec(spec); spec.loader.exec_module(r)
    """
)


@pytest.mark.parametrize("slots", [1, 2])
def test_cpu_slots_bound_the_processes_running_at_once(tmp_path, slots):
    folder = runner_module.make_slots(tmp_path / "slots", slots)
    log = tmp_path / "log"
    log.mkdir()
    child = CHILD_PREAMBLE + textwrap.dedent(
        f"""
        with r.cpu_slot(poll_s=0.01):
            start = time.time(); time.sleep(0.3); end = time.time()
        open({str(log)!r} + "/" + sys.argv[1], "w").write(f"{{start}} {{end}}")
        """
    )
    env = os.environ | {runner_module.SLOTS_ENV: str(folder)}
    processes = [subprocess.Popen([sys.executable, "-c", child, str(i)], env=env) for i in range(4)]
    assert [p.wait(timeout=60) for p in processes] == [0, 0, 0, 0]
    intervals = [tuple(map(float, (log / str(i)).read_text().split())) for i in range(4)]
    assert _overlap(intervals) == slots


def test_a_waiting_process_is_served_before_a_holder_that_asks_again(tmp_path):
    folder = runner_module.make_slots(tmp_path / "slots", 1)
    log = tmp_path / "log"
    log.mkdir()
    child = CHILD_PREAMBLE + textwrap.dedent(
        f"""
        name, rounds, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
        time.sleep(delay)
        for i in range(rounds):  # a worker thread's loop: the next row asks for a slot at once
            with r.cpu_slot(poll_s=0.02):
                start = time.time(); time.sleep(0.4); end = time.time()
            open({str(log)!r} + f"/{{name}}-{{i}}", "w").write(f"{{start}} {{end}}")
        """
    )
    env = os.environ | {runner_module.SLOTS_ENV: str(folder)}
    greedy = subprocess.Popen([sys.executable, "-c", child, "greedy", "3", "0"], env=env)
    waiter = subprocess.Popen([sys.executable, "-c", child, "waiter", "1", "0.6"], env=env)
    assert greedy.wait(timeout=60) == 0 and waiter.wait(timeout=60) == 0
    spans = {p.name: tuple(map(float, p.read_text().split())) for p in log.iterdir()}
    order = sorted(spans, key=lambda name: spans[name][0])
    assert _overlap(list(spans.values())) == 1
    # the waiter queued while greedy-0 or greedy-1 held the slot: it runs next, not after greedy-2
    assert order.index("waiter-0") < order.index("greedy-2"), order
    assert not list((folder / "queue").iterdir())  # every ticket removed


def test_no_slots_folder_means_no_waiting(monkeypatch):
    monkeypatch.delenv(runner_module.SLOTS_ENV, raising=False)
    with runner_module.cpu_slot():
        pass


def test_empty_slots_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(runner_module.SLOTS_ENV, str(tmp_path))
    with pytest.raises(SystemExit, match="no slot-"):
        with runner_module.cpu_slot():
            pass


def test_run_all_measures_every_fit_and_reports_each_once(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(runner_module.SLOTS_ENV, str(runner_module.make_slots(tmp_path / "slots", 2)))
    jobs = [
        ("reference", _fit(tiny_setup, tmp_path / "a")),
        ("lean", _fit(tiny_setup, tmp_path / "b", "--eval-experts", "false", "--eval-init", "false")),
    ]
    done: dict[str, dict] = {}

    def collect(key: str, measured: dict) -> None:
        assert key not in done
        done[key] = measured

    runner_module.run_all(jobs, workers=2, on_done=collect)
    assert set(done) == {"reference", "lean"}
    for measured in done.values():
        assert measured["code"] == 0 and measured["wall_s"] > 0 and measured["peak_rss_mb"] > 50
    reference = json.loads((tmp_path / "a" / "metrics.json").read_text())["accuracy"]
    lean = json.loads((tmp_path / "b" / "metrics.json").read_text())["accuracy"]
    assert set(reference) == {"expert (alone)", "task arithmetic (λ=0.3)", "adamerging (layer)"}
    assert set(lean) == {"adamerging (layer)"}  # --eval-init false: only the learned merge is evaluated
    assert lean["adamerging (layer)"] == reference["adamerging (layer)"]  # same seed, same fit


def test_run_all_exits_on_a_failing_row_without_reporting_it(tiny_setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    bad = _fit(tiny_setup, tmp_path / "bad")
    bad[bad.index("--calib") + 1] = str(tmp_path / "missing")
    done: list[str] = []
    with pytest.raises(SystemExit, match="failed: adamerge fit"):
        runner_module.run_all([("bad", bad)], workers=1, on_done=lambda key, _: done.append(key))
    assert done == []
    assert "missing" in capsys.readouterr().err  # the child's own error names the folder
    assert not (tmp_path / "bad").exists()


def test_run_all_reports_each_job_as_soon_as_it_is_done():
    import threading
    import time

    release = threading.Event()
    reported: list[str] = []

    def runner(argv: list[str]) -> dict:
        if argv == ["slow"]:
            assert release.wait(timeout=30), "the fast job was not reported while the slow one ran"
        return {"argv": argv}

    def on_done(key: str, measured: dict) -> None:
        reported.append(key)
        if key == "fast":
            release.set()  # the slow job may end only once the fast one has been handed back

    started = time.perf_counter()
    runner_module.run_all([("slow", ["slow"]), ("fast", ["fast"])], 2, on_done, runner=runner)
    assert reported == ["fast", "slow"] and time.perf_counter() - started < 30


def test_run_all_refuses_zero_workers():
    with pytest.raises(SystemExit, match="--workers 0"):
        runner_module.run_all([], workers=0, on_done=lambda *_: None)


def test_every_vision_row_is_one_run_whose_result_key_is_known():
    vision = load_benchmark("vision_methods")
    rows = [vision.PRETRAINED, *vision.STATIC, *vision.LEARNED, *vision.OPTION_ROWS]
    static = [row for row in rows if vision.is_static(row)]
    conv = [f"{m} (conv kernels as matrices)" for m in ("tsv-m", "iso-c", "iso-cts")]
    assert static == [vision.PRETRAINED, *vision.STATIC, "task-arithmetic + expert BatchNorm", *conv]
    assert vision.result_key("task-arithmetic + expert BatchNorm") == "task-arithmetic"
    assert [vision.result_key(row) for row in conv] == ["tsv-m", "iso-c", "iso-cts"]
    assert vision.result_key("expert-merging + expert BatchNorm (chunk:128)") == "expert-merging (chunk:128)"
    assert vision.result_key(vision.PRETRAINED) == "task-arithmetic"
    assert all(vision.result_key(row) == f"{m} ({g})" for row, (m, g, _) in vision.LEARNED.items())


def test_a_surgery_row_extends_its_row_run_with_surgery():
    vision = load_benchmark("vision_methods")
    assert vision.SURGERY_ROWS and all(vision.without_surgery(row) in {*vision.STATIC, *vision.LEARNED} for row in vision.SURGERY_ROWS)
    assert vision.is_static("task-arithmetic + surgery") and not vision.is_static("adamerging (layer-wise) + surgery")
    assert vision.result_key("task-arithmetic + surgery") == "task-arithmetic + surgery"
    assert vision.result_key("adamerging (layer-wise) + surgery") == "adamerging (layer) + surgery"
    assert vision.without_surgery("adamerging (layer-wise)") == "adamerging (layer-wise)"


@pytest.mark.parametrize(
    ("steps_option", "quick", "expected_chunk_row", "expected_other_rows"),
    [(None, False, 100, 50), (None, True, 20, 20), (40, False, 40, 40), (40, True, 40, 40)],
)
def test_vision_row_steps_default_per_row_and_give_way_to_steps_and_quick(steps_option, quick, expected_chunk_row, expected_other_rows):
    import argparse

    vision = load_benchmark("vision_methods")
    args = argparse.Namespace(steps=steps_option, quick=quick)  # main()'s --steps and --quick
    assert vision.STEPS == 50 and set(vision.ROW_STEPS) <= set(vision.OPTION_ROWS)
    assert vision.row_steps("expert-merging + expert BatchNorm (chunk:128)", args) == expected_chunk_row
    assert all(vision.row_steps(row, args) == expected_other_rows for row in vision.LEARNED)
    assert vision.default_steps(args) == expected_other_rows  # the payload's "steps"


def _row_options(method: str, granularity: str, extra: list[str]) -> dict:
    """A benchmark row's ``adamerge fit`` options as a recipe's YAML keys."""
    options = {"method": method, "granularity": granularity}
    for flag, value in zip(extra[::2], extra[1::2]):
        options[flag.removeprefix("--").replace("-", "_")] = yaml.safe_load(value)
    return options


@pytest.mark.parametrize(
    ("recipe", "script", "row"),
    [("expert_merging_text.yaml", "text_methods", "expert-merging (layer-wise)"),
     ("expert_merging_vision.yaml", "vision_methods", "expert-merging + expert BatchNorm (chunk:128)")],
)
def test_each_recipe_is_the_benchmark_row_it_names(recipe, script, row):
    benchmark = load_benchmark(script)
    recipe_options = yaml.safe_load((REPO / "configs" / "recipes" / recipe).read_text())
    assert f"`{row}`" in (REPO / "configs" / "recipes" / recipe).read_text()  # the row its comment names
    table = {**benchmark.LEARNED, **getattr(benchmark, "OPTION_ROWS", {})}
    vision = load_benchmark("vision_methods")
    expected = _row_options(*table[row]) | {"steps": vision.ROW_STEPS.get(row, vision.STEPS)}
    assert {key: recipe_options[key] for key in expected} == expected


def test_the_expert_merging_row_comes_from_the_plus_plus_run_it_is_stage_one_of():
    vision = load_benchmark("vision_methods")
    text = load_benchmark("text_methods")
    for table in (vision.LEARNED, text.LEARNED):  # the same options, so stage one is that method's run
        for stage_one, source in vision.STAGE_ONE_ROWS.items():
            (method, granularity, extra), (source_method, source_granularity, source_extra) = table[stage_one], table[source]
            assert (source_method, source_granularity, source_extra) == (f"{method}++", granularity, extra)
    rows = list(vision.LEARNED)
    assert vision.rows_with_a_run(rows) == [row for row in rows if row != "expert-merging (layer-wise)"]
    assert vision.rows_with_a_run(["expert-merging (layer-wise)"]) == ["expert-merging (layer-wise)"]
    per_task = {"mnist": 0.9, "average": 0.9}
    metrics = {
        "accuracy": {"expert-merging (layer)": per_task, "expert-merging++ (layer)": {"mnist": 0.95, "average": 0.95}},
        "timing_s": {"load": 1.0, "stage_one_fit": 20.0, "stage_one_test": 3.0, "fit": 45.0},
    }
    found = vision.stage_one_rows("expert-merging++", rows, metrics, {"wall_s": 60.0, "peak_rss_mb": 512.0})
    assert found == {
        "expert-merging (layer-wise)": {
            "per_task": per_task, "wall_s": 24.0, "peak_rss_mb": 512.0,
            "measured_in": "the expert-merging++ run (its stage one)",
        }
    }  # fmt: skip
    assert vision.stage_one_rows("expert-merging++", ["expert-merging++"], metrics, {"peak_rss_mb": 1.0}) == {}
    assert vision.stage_one_rows("adamerging (layer-wise)", rows, metrics, {"peak_rss_mb": 1.0}) == {}
    entry = found["expert-merging (layer-wise)"] | {"average": 0.9, "normalized": 0.95}
    table = vision.results_table(["mnist"], {"expert-merging (layer-wise)": entry})
    assert "| expert-merging (layer-wise) † | 90.0 |" in table
    assert table.endswith("† expert-merging (layer-wise): measured in the expert-merging++ run (its stage one); peak RSS of that run")


def test_rows_fork_from_a_server_that_has_done_the_imports_every_row_needs(tmp_path):
    out = tmp_path / "imported"
    check = "import sys; open(OUT, 'w').write(' '.join(m for m in MODULES if m in sys.modules))"
    modules = [*runner_module.PRELOAD, "lightning", "torch"]
    process = runner_module.fork_server().Process(target=exec, args=(check, {"OUT": str(out), "MODULES": modules}))
    process.start()
    process.join()
    assert process.exitcode == 0 and out.read_text().split() == modules


def test_the_suites_machine_speed_is_the_probes_last_printed_number_to_a_tenth(monkeypatch):
    suite = load_benchmark("suite")
    monkeypatch.setattr(suite, "SPEED_PROBE", "print('warmed up'); print(123.456)")
    assert suite.machine_speed(os.environ.copy()) == 123.5
    monkeypatch.setattr(suite, "SPEED_PROBE", "import sys; sys.exit('no torch here')")
    with pytest.raises(subprocess.CalledProcessError):  # a failed probe stops the suite, no made-up speed
        suite.machine_speed(os.environ.copy())


def test_the_speed_probe_is_one_threads_matmul_flops_over_three_seconds(monkeypatch):
    # the real probe under a clock that reads 0, 0.25, 0.5 ... and a stand-in torch: the products
    # at readings 0.25 ... 2.75 are counted (11), 3.0 ends the loop and the rate is taken at 3.25
    stand_ins = textwrap.dedent(
        """
        import sys, time, types

        class Matrix:
            def __matmul__(self, other):
                return self

        def set_num_threads(count):
            assert count == 1, count

        torch = types.ModuleType("torch")
        torch.set_num_threads, torch.randn = set_num_threads, lambda *shape: Matrix()
        sys.modules["torch"] = torch
        readings = iter(range(1000))
        time.perf_counter = lambda: 0.25 * next(readings)
        """
    )
    suite = load_benchmark("suite")
    monkeypatch.setattr(suite, "SPEED_PROBE", stand_ins + suite.SPEED_PROBE)
    assert suite.machine_speed(os.environ.copy()) == round(2 * 768 * 384 * 1536 * 11 / 3.25 / 1e9, 1) == 3.1


def test_a_forked_row_starts_at_the_servers_resident_size_as_a_fresh_process_would(tmp_path):
    out = tmp_path / "rss"
    rss = "lambda pid: int(open(f'/proc/{pid}/status').read().split('VmRSS:')[1].split()[0])"
    report = f"\nrss = {rss}\nopen(OUT, 'w').write(f'{{rss(\"self\")}} {{rss(os.getppid())}}')"
    code = runner_module.MEASURE.split("target = os.open")[0] + report  # the row's set-up, not its run
    process = runner_module.fork_server().Process(target=exec, args=(code, {"OUT": str(out)}))
    process.start()
    process.join()
    row_kb, server_kb = map(int, out.read_text().split())
    # without mapping the server's resident file pages the row started ~40 % smaller (492 vs 820 MB)
    assert process.exitcode == 0 and row_kb >= 0.97 * server_kb, (row_kb, server_kb)


def test_write_results_writes_json_and_markdown_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "new" / "bench.json"
    runner_module.write_results(out, {"a": [1, 2]}, "| x |\n")
    assert json.loads(out.read_text()) == {"a": [1, 2]}
    assert out.with_suffix(".md").read_text() == "| x |\n"
    runner_module.write_results(out, {"a": 3}, "| y |\n")  # replaces both
    assert json.loads(out.read_text()) == {"a": 3} and out.with_suffix(".md").read_text() == "| y |\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json", "bench.md"]
