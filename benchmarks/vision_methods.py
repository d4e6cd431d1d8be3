#!/usr/bin/env python
"""Every method on the real MobileNetV2 vision experts: per-task accuracy, wall time, peak RSS.

The experts, calibration and test folders come from :mod:`adamerge.demo.vision` (built and cached
on first use from ``../shared/data``). Each method runs as ``adamerge merge`` (static) or
``adamerge fit`` (learned) in a fresh process, so its wall time and peak RSS are its own.

    python -m benchmarks.vision_methods --out benchmarks/results/vision.json
    python -m benchmarks.vision_methods --quick --out /tmp/vision-quick.json   # minutes
    OMP_NUM_THREADS=1 python -m benchmarks.vision_methods --workers 2 --out ...  # one process per core

The experts alone and the initial merge (task arithmetic at λ = 0.3) are evaluated once, by the
layer-wise AdaMerging row; the other learned rows evaluate their learned merge only. The Expert
Merging row is stage one of the Expert Merging++ run (the same method and options; its wall time
is that stage's, marked † in the table). Learned rows take :data:`STEPS` steps, as in the text
benchmark (the few-shot curve keeps aTLAS's 10 epochs, 100 steps). Two of the rows
with options of their own (``OPTION_ROWS``) also keep each expert's BatchNorm weight and bias per task
(``--task-specific batchnorm``): task arithmetic, and Expert Merging with one λ per task and chunk
of 128 per tensor (``--granularity chunk:128``). That row takes 100 steps (``ROW_STEPS``) unless
``--steps`` or ``--quick`` sets the steps of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from benchmarks.runner import cpu_slot, run_all, write_results  # (one fresh, measured process per row)

PRETRAINED = "pretrained (λ=0, expert heads)"  # the base backbone with each expert's head
STATIC = ["average", "task-arithmetic", "ties", "dare", "breadcrumbs", "consensus", "lines",
          "pcb", "tsv-m", "iso-c", "iso-cts", "fisher", "regmean"]  # fmt: skip
LEARNED = {
    # name in the table: (method, granularity, extra options)
    "adamerging (task-wise)": ("adamerging", "task", []),
    "adamerging (layer-wise)": ("adamerging", "layer", []),
    "adamerging++ (layer-wise)": ("adamerging++", "layer", []),
    # the mask stage and then AdaMerging, each STEPS steps at the default batch (the mask stage
    # splits each step's batch into its inner and outer halves)
    "concrete-adamerging (layer-wise)": ("concrete-adamerging", "layer", []),
    # FusionBench's budget: 10 Frank-Wolfe steps of 100 inputs per task
    "fw-merging (task-wise)": ("fw-merging", "task", ["--steps", "10", "--batch-size", "100"]),
    # input-routed merges (λ stays at task arithmetic's 0.3; the routers learn); the table's label
    # names the routing, the run's granularity is that of its static merge
    "wemoe (routed blocks)": ("wemoe", "task", []),
    "twin-merging (routed)": ("twin-merging", "task", []),
    "atlas tta (layer-wise)": ("atlas", "layer", ["--init", "0.3", "--pseudo-label-threshold", "0.9"]),
    # Expert Merging starts from the task-arithmetic merge it refines (λ = 0.3, as the table's
    # task-arithmetic row; the paper's 0.1 is its own 8-task value) and aligns to the experts on all
    # the calibration inputs every other row sees (with the paper's 10 per task: 86.3 % vision, 94.8 % LoRA)
    "expert-merging (layer-wise)": ("expert-merging", "layer", ["--init", "0.3"]),
    "expert-merging++": ("expert-merging++", "layer", ["--init", "0.3"]),
}
# Expert Merging++'s stage one is Expert Merging with the same options, and its run reports that
# stage's accuracy: the Expert Merging row comes from it (no run of its own) when both rows are run
STAGE_ONE_ROWS = {"expert-merging (layer-wise)": "expert-merging++"}  # row: the row whose run reports it
# steps of every learned row, vision and text: one full cycle of Expert Merging's cosine restarts
# (T_0 = 50), ending at a learning rate near 0. Standalone text Expert Merging / ++ runs at 50 steps
# (RESULTS.md): full 95.8 / 96.6 %, LoRA 96.9 / 97.2 % normalized, against 96.0 / 96.5 and 96.9 / 97.2
# at 70; the whole suite from scratch then took 54.5 and 55.6 minutes (at 70 steps: 67.2)
STEPS = 50
REFERENCE_FIT = "adamerging (layer-wise)"  # also evaluates the experts alone and its λ = 0.3 start
# vision only: each task also keeps its expert's BatchNorm weight and bias (--task-specific batchnorm)
EXPERT_BATCHNORM = ["--task-specific", "batchnorm"]
OPTION_ROWS = {  # rows with options of their own
    # name in the table: (method, granularity or None for a static merge, extra options)
    "task-arithmetic + expert BatchNorm": ("task-arithmetic", None, EXPERT_BATCHNORM),
    # 128 contiguous chunks of each merged tensor (groups of output channels of a convolution): at
    # most 6,656 λ per task over MobileNetV2's 52 merged convolutions. Standalone runs with expert
    # BatchNorm (RESULTS.md): at 70 steps layer-wise 89.7, chunk:4 92.2, :16 92.1, :32 93.6, :64 95.1,
    # :128 95.0, :256 94.1 % normalized; over seeds 0-2, :64 93.6-94.3 and :128 94.6-95.0 at 70
    # steps, :128 94.9-95.1 at 100 (ROW_STEPS)
    "expert-merging + expert BatchNorm (chunk:128)": ("expert-merging", "chunk:128", ["--init", "0.3", *EXPERT_BATCHNORM]),
    # the subspace merges with every convolution kernel decomposed as its (out, in·k·k) patch
    # matrix (FusionBench averages them: on MobileNetV2 its TSV-M and Iso rows are the average)
    **{f"{m} (conv kernels as matrices)": (m, None, ["--options", "{conv_kernels: matrix}"]) for m in ("tsv-m", "iso-c", "iso-cts")},
    # Twin-Merging without compressing the exclusive knowledge (each expert's θ_k − θ* kept whole:
    # the paper's 10 % of singular vectors leaves little of MobileNetV2's small 1×1 convolutions)
    "twin-merging (routed, uncompressed)": ("twin-merging", "task", ["--options", "{density: 1.0}"]),
    # WEMoE at ten times FusionBench's learning rate, 200 steps (ROW_STEPS; 500 steps: 89.6 %, RESULTS.md)
    "wemoe (routed blocks, lr 1e-3)": ("wemoe", "task", ["--options", "{lr: 0.001}"]),
}
# rows whose default steps differ from STEPS: the headline row takes two full cycles of Expert
# Merging's cosine restarts (T_0 = 50), ending at a learning rate near 0 (70 steps would stop in the
# middle of the second, at about a third of the peak)
ROW_STEPS = {"expert-merging + expert BatchNorm (chunk:128)": 100, "wemoe (routed blocks, lr 1e-3)": 200}
# "ROW + surgery": the run of ROW with Representation Surgery after it (--surgery-steps, FusionBench's
# 1000 steps); its table row is that run's "<merge> + surgery" accuracy
SURGERY = " + surgery"
SURGERY_OPTIONS = ["--surgery-steps", "1000"]
SURGERY_ROWS = ["task-arithmetic + surgery", "adamerging (layer-wise) + surgery"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small demo assets and few steps")
    parser.add_argument("--steps", type=int, default=None, help=f"steps of every learned method (default {STEPS}, as the text benchmark; quick 20)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of table rows to run")
    parser.add_argument("--batchnorm", default="per-task", choices=["per-task", "reestimate", "base"],
                        help="BatchNorm statistics policy of every method (default: per-task)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=1,
                        help="rows run side by side (default 1; set OMP_NUM_THREADS=1 for more)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from adamerge.demo.vision import build_vision_demo

    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with cpu_slot():
        assets = build_vision_demo(data_root=args.data_root, cache_dir=args.cache_dir, quick=args.quick)
    build_s = time.perf_counter() - started
    steps = default_steps(args)
    common = [
        "--base", f"torchvision:mobilenet_v2@{assets.base}",
        "--experts", *[f"{t}={p}" for t, p in assets.experts.items()],
        "--eval", str(assets.eval_dir),
        "--head-pattern", r"^classifier\.",
        "--image-size", str(assets.image_size),
        "--batchnorm", args.batchnorm,
    ]
    work = Path(tempfile.mkdtemp(prefix="adamerge-vision-"))
    rows = [PRETRAINED, *STATIC, *LEARNED, *OPTION_ROWS, *SURGERY_ROWS] if args.methods is None else args.methods
    outputs = {row: work / row.replace(" ", "_").replace("(", "").replace(")", "") for row in rows}
    jobs = []
    for row in rows_with_a_run(rows):
        base = without_surgery(row)
        if is_static(row):
            if base == PRETRAINED:
                method, options = "task-arithmetic", ["--options", "{scale: 0.0}"]
            elif base in OPTION_ROWS:
                method, _, options = OPTION_ROWS[base]
            else:
                method, options = base, []
            argv = ["merge", "--method", method, *options, *common, "--calib", str(assets.calib_dir), "--output", str(outputs[row])]
        else:
            method, granularity, extra = LEARNED.get(base) or OPTION_ROWS[base]
            argv = [
                "fit", "--method", method, "--granularity", granularity, *common, "--calib", str(assets.calib_dir),
                "--steps", str(row_steps(base, args)), "--output", str(outputs[row]), "--progress-bar", "false", *extra,
            ]
            if row != REFERENCE_FIT:  # the experts and the initial merge are evaluated once, by this row
                argv += ["--eval-experts", "false", "--eval-init", "false"]
        if row != base:
            argv += SURGERY_OPTIONS
        jobs.append((row, argv))
    jobs.sort(key=lambda job: is_static(job[0]))  # the long fits first, then the merges
    results: dict[str, dict] = {}

    def collect(row: str, measured: dict) -> None:
        output = outputs[row]
        if row == REFERENCE_FIT:  # learned λ per task and tensor, for benchmarks/plots.py's heatmap
            shutil.copyfile(output / "coefficients.json", args.out.with_name(f"{args.out.stem}_coefficients_adamerging.json"))
        metrics = json.loads((output / "metrics.json").read_text())
        shutil.rmtree(output, ignore_errors=True)  # the exported model is not needed (GBs per text run)
        accuracy = metrics["accuracy"]
        if "expert (alone)" in accuracy:
            results["expert (alone)"] = {"per_task": accuracy["expert (alone)"]}
        if row == REFERENCE_FIT:
            initial = next(k for k in accuracy if k.startswith("task arithmetic"))
            results["task arithmetic (λ=0.3, fit's init)"] = {"per_task": accuracy[initial]}
        final = accuracy[result_key(row)]
        results[row] = {"per_task": final, "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]}
        results.update(stage_one_rows(row, rows, metrics, measured))
        sys.stderr.write(f"{row:30s} average {100 * final['average']:.1f}  {measured['wall_s']:.0f} s\n")

    started = time.perf_counter()
    run_all(jobs, args.workers, collect)
    shutil.rmtree(work, ignore_errors=True)  # the emptied row folders (kept if a row failed)
    rows_s = time.perf_counter() - started
    results = {row: results[row] for row in rows} | {k: v for k, v in results.items() if k not in rows}

    first = ["expert (alone)", PRETRAINED, "task arithmetic (λ=0.3, fit's init)"]
    results = {k: results[k] for k in first if k in results} | {k: v for k, v in results.items() if k not in first}
    manifest = json.loads(Path(assets.manifest).read_text())
    if "expert (alone)" not in results:  # no reference fit among --methods: the build's manifest has them
        per_task = {t: manifest["tasks"][t]["accuracy"] for t in assets.tasks}
        results = {"expert (alone)": {"per_task": per_task | {"average": sum(per_task.values()) / len(per_task)}}} | results
    experts = results["expert (alone)"]["per_task"]
    for entry in results.values():
        per_task = entry["per_task"]
        entry["average"] = per_task["average"]
        entry["normalized"] = sum(per_task[t] / experts[t] for t in assets.tasks) / len(assets.tasks)
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.vision_methods", *sys.argv[1:]]),
        "tasks": assets.tasks,
        "image_size": assets.image_size,
        "steps": steps,
        "row_steps": {row: row_steps(row, args) for row in ROW_STEPS if row in rows},
        "batchnorm": args.batchnorm,
        "assets_manifest": manifest,
        "splits": json.loads(Path(assets.splits).read_text()),
        "build_s": build_s,
        "rows_s": rows_s,
        "workers": args.workers,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "methods": results,
    }
    table = markdown(payload)
    write_results(args.out, payload, f"Command: `{payload['command']}`\n\n{table}\n")
    print(table)


def default_steps(args: argparse.Namespace) -> int:
    """The learned rows' steps: ``--steps``, else 20 with ``--quick``, else :data:`STEPS` (``ROW_STEPS``: :func:`row_steps`)."""
    return args.steps or (20 if args.quick else STEPS)


def row_steps(row: str, args: argparse.Namespace) -> int:
    """A learned row's steps: ``--steps`` or the quick mode's for every row, else its ``ROW_STEPS`` or :func:`default_steps`."""
    steps = default_steps(args)
    if args.steps is not None or args.quick:
        return steps
    return ROW_STEPS.get(row, steps)


def without_surgery(row: str) -> str:
    """The row whose run a ``"ROW + surgery"`` row extends (any other row: itself)."""
    return row.removesuffix(SURGERY)


def is_static(row: str) -> bool:
    """Whether a table row is an ``adamerge merge`` run (no training of λ)."""
    row = without_surgery(row)
    return row in STATIC or row == PRETRAINED or (row in OPTION_ROWS and OPTION_ROWS[row][1] is None)


def rows_with_a_run(rows: list[str]) -> list[str]:
    """The rows that need a run of their own (a stage-one row comes from its ++ row's run)."""
    return [row for row in rows if STAGE_ONE_ROWS.get(row) not in rows]


def stage_one_rows(
    row: str, rows: list[str], metrics: dict, measured: dict,
    stage_one_of: Mapping[str, str] = STAGE_ONE_ROWS, key: Callable[[str], str] | None = None,
) -> dict[str, dict]:  # fmt: skip
    """The table rows that ``row``'s run also reports: Expert Merging from Expert Merging++'s stage one.

    Its wall time is that stage's own (loading, stage-one fit, its test; ``metrics["timing_s"]``);
    the peak RSS is the whole run's. ``stage_one_of`` maps a stage-one row to the row whose run
    reports it and ``key`` names a row's merge in ``metrics.json`` (this benchmark's by default).
    """
    key = key or result_key
    found = {}
    for stage_one, source in stage_one_of.items():
        if source == row and stage_one in rows:
            timing = metrics["timing_s"]
            found[stage_one] = {
                "per_task": metrics["accuracy"][key(stage_one)],
                "wall_s": timing["load"] + timing["stage_one_fit"] + timing["stage_one_test"],
                "peak_rss_mb": measured["peak_rss_mb"],
                "measured_in": f"the {source} run (its stage one)",
            }
    return found


def result_key(row: str) -> str:
    """The key of a row's learned or static merge in its run's ``metrics.json`` accuracy."""
    if row.endswith(SURGERY):
        return result_key(without_surgery(row)) + SURGERY
    if row == PRETRAINED:
        return "task-arithmetic"
    if row in STATIC:
        return row
    method, granularity, _ = LEARNED.get(row) or OPTION_ROWS[row]
    return method if granularity is None else f"{method} ({granularity})"


def markdown(payload: dict) -> str:
    """The Markdown table of a results payload (``tasks``, ``methods``)."""
    return results_table(payload["tasks"], payload["methods"])


def results_table(tasks: list[str], methods: dict[str, dict]) -> str:
    """A Markdown table: per-task accuracy, average, normalized accuracy, wall time and peak RSS."""
    lines = ["| method | " + " | ".join(tasks) + " | average | normalized | wall (s) | peak RSS (MB) |"]
    lines.append("|" + "---|" * (len(tasks) + 5))
    notes = []
    for name, entry in methods.items():
        if "measured_in" in entry:
            notes.append(f"{'†' * (len(notes) + 1)} {name}: measured in {entry['measured_in']}; peak RSS of that run")
            name = f"{name} {'†' * len(notes)}"
        cells = [f"{100 * entry['per_task'][t]:.1f}" for t in tasks]
        cells += [f"{100 * entry['average']:.1f}", f"{100 * entry['normalized']:.1f}"]
        cells += [f"{entry['wall_s']:.0f}" if "wall_s" in entry else "-"]
        cells += [f"{entry['peak_rss_mb']:.0f}" if "peak_rss_mb" in entry else "-"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join([*lines, *(["", *notes] if notes else [])])


if __name__ == "__main__":
    main()
