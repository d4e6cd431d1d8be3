#!/usr/bin/env python
"""Every learned method with its **default** command line, against the merge it starts from.

A user runs ``adamerge fit --method M`` on their own experts with nothing else but the description
of their data; this is that run on the benchmarks' experts. Each row passes only what describes the
experts and the data: ``--base``, ``--experts``, ``--calib``, ``--eval``, ``--head-pattern``, and
for the vision experts ``--image-size 64`` (they were fine-tuned at 64 px; the model's metadata says
224 and the calibration images differ in size, so nothing else can tell) and for the text experts
``--max-length`` of the build. Steps, batch size, λ start, BatchNorm policy, the held-out
safeguard: all defaults. Each run evaluates its own start (``--eval-init``, on by default) and
its learned merge on the labelled test split; the table reports both, normalized by the experts'
own accuracy, and the step the safeguard kept.

    OMP_NUM_THREADS=1 python -m benchmarks.default_rows --benchmark vision --workers 2 --out benchmarks/results/defaults_vision.json
    OMP_NUM_THREADS=1 python -m benchmarks.default_rows --benchmark text-full --workers 2 --out benchmarks/results/defaults_text_full.json

Expert Merging is Expert Merging++'s stage one (the same defaults; its run reports that stage),
so four runs give the five rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.runner import cpu_slot, run_all, write_results  # (one fresh, measured process per row)

# method: what its run reports (the row of its own method, and for ++ its stage one's)
RUNS = {
    "expert-merging++": ["expert-merging++", "expert-merging"],
    "adamerging": ["adamerging"],
    "adamerging++": ["adamerging++"],
    "atlas": ["atlas"],
}
BENCHMARKS = ("vision", "text-full", "text-lora")


def data_flags(benchmark: str, args: argparse.Namespace) -> tuple[list[str], list[str], dict]:
    """``(flags, tasks, manifest)``: the options that describe a benchmark's experts and data."""
    if benchmark == "vision":
        from adamerge.demo.vision import build_vision_demo

        with cpu_slot():
            assets = build_vision_demo(data_root=args.data_root, cache_dir=args.cache_dir, quick=args.quick)
        flags = [
            "--base", f"torchvision:mobilenet_v2@{assets.base}",
            "--experts", *[f"{t}={p}" for t, p in assets.experts.items()],
            "--calib", str(assets.calib_dir), "--eval", str(assets.eval_dir),
            "--head-pattern", r"^classifier\.", "--image-size", str(assets.image_size),
        ]
        return flags, assets.tasks, json.loads(Path(assets.manifest).read_text())
    from adamerge.demo.text import build_text_demo

    with cpu_slot():
        assets = build_text_demo(data_root=args.data_root, cache_dir=args.cache_dir, quick=args.quick)
    flavour = benchmark.removeprefix("text-")
    prefix = "hf:" if flavour == "full" else "peft:"
    flags = [
        "--base", f"hf:{assets.base_dir}",
        "--experts", *[f"{t}={prefix}{p}" for t, p in assets.experts[flavour].items()],
        "--calib", str(assets.calib_dir), "--eval", str(assets.test_dir), "--max-length", str(assets.max_length),
    ]
    return flags, list(assets.experts[flavour]), json.loads(Path(assets.manifest).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=BENCHMARKS, required=True)
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=None, help="override the default steps (smoke runs only)")
    parser.add_argument("--quick", action="store_true", help="the demos' quick assets")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=1, help="runs side by side (set OMP_NUM_THREADS=1 for more)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--from-metrics", nargs="+", default=[],
        help="METHOD=metrics.json of runs made earlier: their rows are taken from the file (wall time: the run's own "
        "timing_s.total), the other --methods are run",
    )
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    flags, tasks, manifest = data_flags(args.benchmark, args)
    work = Path(tempfile.mkdtemp(prefix="adamerge-defaults-"))
    jobs = []
    for position, method in enumerate(args.methods):
        argv = ["fit", "--method", method, *flags, "--output", str(work / method), "--progress-bar", "false"]
        if args.steps is not None:
            argv += ["--steps", str(args.steps)]
        if position > 0:  # the experts alone are evaluated once, by the first run
            argv += ["--eval-experts", "false"]
        jobs.append((method, argv))
    rows: dict[str, dict] = {}
    experts: dict[str, float] = {}
    started = time.perf_counter()

    def collect(method: str, measured: dict) -> None:
        metrics = json.loads((work / method / "metrics.json").read_text())
        shutil.rmtree(work / method, ignore_errors=True)
        experts.update(metrics["accuracy"].get("expert (alone)", {}))
        rows.update(row_entries(method, metrics, measured["wall_s"]))
        if experts or manifest_experts(manifest, tasks):  # rewritten after every run
            write(args, tasks, experts or manifest_experts(manifest, tasks), rows, time.perf_counter() - started)
        sys.stderr.write(f"{method:20s} {measured['wall_s']:.0f} s\n")

    if args.from_metrics:  # runs made earlier (e.g. cut short): their metrics.json, METHOD=PATH
        for item in args.from_metrics:
            method, _, path = item.partition("=")
            metrics = json.loads(Path(path).read_text())
            experts.update(metrics["accuracy"].get("expert (alone)", {}))
            rows.update(row_entries(method, metrics, metrics["timing_s"]["total"]))
        jobs = [job for job in jobs if job[0] not in rows]
    run_all(jobs, args.workers, collect)
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(write(args, tasks, experts or manifest_experts(manifest, tasks), rows, time.perf_counter() - started)))


def row_entries(method: str, metrics: dict, wall_s: float | None) -> dict[str, dict]:
    """The table rows one run's ``metrics.json`` gives (two for Expert Merging++: its stage one)."""
    accuracy = metrics["accuracy"]
    start_label = next(k for k in accuracy if k != "expert (alone)")
    entries = {}
    for reported in RUNS[method]:
        final = next(v for k, v in accuracy.items() if k.startswith(f"{reported} ("))
        stage = "stage 1" if reported != method or "stage 2" not in metrics.get("safeguard", {}) else "stage 2"
        guard = metrics.get("safeguard", {}).get(stage, {})
        entries[reported] = {
            "start_label": start_label,
            "start": accuracy[start_label],
            "learned": final,
            "kept_step": guard.get("kept_step"),
            "steps": metrics["steps"] if reported == method else None,
            "batchnorm": metrics.get("batchnorm"),
            "wall_s": wall_s if reported == method else None,
            "measured_in": None if reported == method else f"the {method} run (its stage one)",
        }
    return entries


def manifest_experts(manifest: dict, tasks: list[str]) -> dict[str, float]:
    """The experts' own accuracies from the build's manifest (vision: ``tasks``; text: ``accuracy``)."""
    if "tasks" in manifest and all(t in manifest["tasks"] for t in tasks):
        return {t: manifest["tasks"][t]["accuracy"] for t in tasks}
    return {}


def write(args: argparse.Namespace, tasks: list[str], experts: dict, rows: dict, rows_s: float) -> dict:
    """The results so far as ``--out`` JSON and Markdown (rewritten after every run)."""
    order = ["adamerging", "adamerging++", "atlas", "expert-merging", "expert-merging++"]
    done = {}
    for name in order:
        if name in rows:
            row = dict(rows[name])
            for key in ("start", "learned"):
                row[f"{key}_normalized"] = sum(row[key][t] / experts[t] for t in tasks) / len(tasks)
            done[name] = row
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.default_rows", *sys.argv[1:]]),
        "benchmark": args.benchmark,
        "tasks": tasks,
        "experts": experts,
        "rows_s": rows_s,
        "workers": args.workers,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": done,
    }
    write_results(args.out, payload, f"Command: `{payload['command']}`\n\n{markdown(payload)}\n")
    return payload


def markdown(payload: dict) -> str:
    """Start and learned merge of every default run, normalized accuracy (%)."""
    lines = [
        "| method (defaults) | starts from | start | learned | Δ | safeguard kept step | steps | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, row in payload["rows"].items():
        if row["measured_in"]:
            notes.append(f"† {name}: {row['measured_in']}")
            name += " †"
        start, learned = 100 * row["start_normalized"], 100 * row["learned_normalized"]
        kept = "-" if row["kept_step"] is None else str(row["kept_step"])
        steps = "-" if row["steps"] is None else str(row["steps"])
        wall = "-" if row["wall_s"] is None else f"{row['wall_s']:.0f}"
        lines.append(f"| {name} | {row['start_label']} | {start:.1f} | {learned:.1f} | {learned - start:+.1f} | {kept} | {steps} | {wall} |")
    return "\n".join([*lines, *(["", *notes] if notes else [])])


if __name__ == "__main__":
    main()
