#!/usr/bin/env python
"""Every method on real all-MiniLM-L6-v2 text experts (SST-2, TREC, SUBJ, MPQA, AG News, SMS Spam),
once with fully fine-tuned experts and once with peft LoRA adapters.

The base, the experts and the calibration / few-shot / test files come from
:mod:`adamerge.demo.text` (built and cached on first use from ``../shared/data``). Each method runs
as ``adamerge merge`` (static) or ``adamerge fit`` (learned) in a fresh process, so its wall time
and peak RSS are its own. Results: ``--out`` JSON (per flavour and method: ``per_task``,
``average``, ``normalized`` = mean over tasks of merged ÷ expert accuracy, ``wall_s``,
``peak_rss_mb``; plus the seeds, splits and the assets' manifest) and a Markdown table beside it.

    python -m benchmarks.text_methods --out benchmarks/results/text.json
    python -m benchmarks.text_methods --quick --out /tmp/text-quick.json      # minutes

Rows of both flavours can run side by side, one single-threaded process per core::

    OMP_NUM_THREADS=1 python -m benchmarks.text_methods --workers 2 --out benchmarks/results/text.json

Learned rows train on length-grouped batches (``adamerge fit --group-by-length true``: each
step's texts per task are a random draw of similar length, so a step pads far less). The experts'
own accuracies come from the build's manifest (measured on the same test rows); the
initial merge (task arithmetic at λ = 0.3) is evaluated once, by the layer-wise AdaMerging row;
the Expert Merging row is stage one of the Expert Merging++ run (see ``vision_methods.py``).
Flavours run separately can be joined::

    python -m benchmarks.text_methods --flavours full --out /tmp/text_full.json
    python -m benchmarks.text_methods --flavours lora --out /tmp/text_lora.json
    python -m benchmarks.text_methods --join /tmp/text_full.json /tmp/text_lora.json --out benchmarks/results/text.json
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
from benchmarks.vision_methods import LEARNED as VISION_LEARNED
from benchmarks.vision_methods import (
    REFERENCE_FIT,
    STATIC,
    STEPS,
    SURGERY_OPTIONS,
    SURGERY_ROWS,
    results_table,
    rows_with_a_run,
    stage_one_rows,
    without_surgery,
)  # fmt: skip

# the vision benchmark's rows plus aTLAS few-shot on the labelled 16-per-class pool
LEARNED = dict(VISION_LEARNED)
LEARNED["atlas 16-shot (layer-wise)"] = ("atlas", "layer", ["--shots", "16"])
# methods that need dense task vectors (magnitude / sign statistics over every entry, chunks): on
# LoRA experts they densify each adapter's B·A (adamerge warns; peak RSS shows the cost)
DENSE_ONLY = {"ties", "dare", "breadcrumbs", "consensus", "lines", "pcb", "tsv-m", "iso-c", "iso-cts", "fisher", "regmean",
              "adamerging++ (layer-wise)", "concrete-adamerging (layer-wise)", "fw-merging (task-wise)",
              "expert-merging++", "wemoe (routed blocks)", "twin-merging (routed)"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small demo assets and few steps")
    parser.add_argument("--flavours", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=None, help=f"steps of every learned method (default {STEPS}, as the vision benchmark; quick 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration texts per task per step")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of table rows to run")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=1,
                        help="rows run side by side, over both flavours (default 1; set OMP_NUM_THREADS=1 for more)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--join", type=Path, nargs="+", default=None, help="join the flavours of these result files")
    args = parser.parse_args()
    if args.join:
        parts = [json.loads(path.read_text()) for path in args.join]
        payload = parts[0] | {"flavours": {k: v for part in parts for k, v in part["flavours"].items()}}
        payload["command"] = " && ".join(part["command"] for part in parts)
        write(payload, args.out)
        return

    from adamerge.demo.text import build_text_demo

    args.out.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    with cpu_slot():
        assets = build_text_demo(data_root=args.data_root, cache_dir=args.cache_dir, quick=args.quick)
    build_s = time.perf_counter() - started
    steps = args.steps or (5 if args.quick else STEPS)
    work = Path(tempfile.mkdtemp(prefix="adamerge-text-"))
    rows = [*STATIC, *LEARNED, *SURGERY_ROWS] if args.methods is None else args.methods
    jobs = []
    for flavour in args.flavours:
        prefix = "hf:" if flavour == "full" else "peft:"
        common = [
            "--base", f"hf:{assets.base_dir}",
            "--experts", *[f"{t}={prefix}{p}" for t, p in assets.experts[flavour].items()],
            "--eval", str(assets.test_dir),
            "--max-length", str(assets.max_length),
            # length-sorted batches of 32 carry 1.05× the test texts' tokens, of 128 (the CLI's
            # default) 1.26×: evaluation and the expert targets cost less, accuracy is the same
            "--eval-batch-size", "32",
        ]
        for row in rows_with_a_run(rows):
            output = work / flavour / row.replace(" ", "_").replace("(", "").replace(")", "")
            base = without_surgery(row)
            if base in STATIC:
                argv = ["merge", "--method", base, *common, "--calib", str(assets.calib_dir), "--output", str(output)]
            else:
                method, granularity, extra = LEARNED[base]
                calib = assets.fewshot_dir if "--shots" in extra else assets.calib_dir
                argv = [
                    "fit", "--method", method, "--granularity", granularity, *common, "--calib", str(calib),
                    "--steps", str(steps), "--batch-size", str(args.batch_size), "--output", str(output),
                    "--progress-bar", "false", "--group-by-length", "true", *extra,
                ]
                argv += ["--eval-experts", "false"]  # the build measured each expert on these test rows
                if row != REFERENCE_FIT:  # the initial merge (λ = 0.3) is evaluated once, by this row
                    argv += ["--eval-init", "false"]
            if row != base:
                argv += SURGERY_OPTIONS
            jobs.append(((flavour, row, output), argv))
    jobs.sort(key=lambda job: without_surgery(job[0][1]) in STATIC)  # the long fits first, then the merges
    measured_rows: dict[str, dict[str, dict]] = {flavour: {} for flavour in args.flavours}

    def collect(key: tuple[str, str, Path], measured: dict) -> None:
        flavour, row, output = key
        results = measured_rows[flavour]
        if row == REFERENCE_FIT:  # learned λ per task and tensor, for benchmarks/plots.py
            target = args.out.with_name(f"{args.out.stem}_coefficients_adamerging_{flavour}.json")
            shutil.copyfile(output / "coefficients.json", target)
        metrics = json.loads((output / "metrics.json").read_text())
        accuracy = metrics["accuracy"]
        shutil.rmtree(output, ignore_errors=True)  # the exported model is not needed (GBs per text run)
        if "expert (alone)" in accuracy:
            results["expert (alone)"] = {"per_task": accuracy["expert (alone)"]}
        if row == REFERENCE_FIT:
            initial = next(k for k in accuracy if k.startswith("task arithmetic"))
            results["task arithmetic (λ=0.3, fit's init)"] = {"per_task": accuracy[initial]}
        base = without_surgery(row)
        final = accuracy[(base if base in STATIC else f"{LEARNED[base][0]} ({LEARNED[base][1]})") + row.removeprefix(base)]
        results[row] = {"per_task": final, "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]}
        if flavour == "lora" and row in DENSE_ONLY:
            results[row]["densified"] = True  # ran on the adapters' dense B·A
        results.update(stage_one_rows(row, rows, metrics, measured))
        sys.stderr.write(f"{flavour:4s} {row:30s} average {100 * final['average']:.1f}  {measured['wall_s']:.0f} s\n")

    started = time.perf_counter()
    run_all(jobs, args.workers, collect)
    shutil.rmtree(work, ignore_errors=True)  # the emptied row folders (kept if a row failed)
    rows_s = time.perf_counter() - started
    flavours: dict[str, dict] = {}
    for flavour in args.flavours:
        results = measured_rows[flavour]
        results = {row: results[row] for row in rows} | {k: v for k, v in results.items() if k not in rows}
        zero_shot = dict(assets.zero_shot_accuracy)
        results["pretrained (zero-shot prompts)"] = {"per_task": zero_shot | {"average": sum(zero_shot.values()) / len(zero_shot)}}
        first = ["expert (alone)", "pretrained (zero-shot prompts)", "task arithmetic (λ=0.3, fit's init)"]
        results = {k: results[k] for k in first if k in results} | {k: v for k, v in results.items() if k not in first}
        if "expert (alone)" not in results:  # each expert's accuracy on the test rows, from the build's manifest
            per_task = dict(assets.accuracy[flavour])
            results = {"expert (alone)": {"per_task": per_task | {"average": sum(per_task.values()) / len(per_task)}}} | results
        experts = results["expert (alone)"]["per_task"]
        for entry in results.values():
            per_task = entry["per_task"]
            entry["average"] = per_task["average"]
            entry["normalized"] = sum(per_task[t] / experts[t] for t in assets.tasks) / len(assets.tasks)
        flavours[flavour] = results
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.text_methods", *sys.argv[1:]]),
        "tasks": assets.tasks,
        "max_length": assets.max_length,
        "steps": steps,
        "batch_size": args.batch_size,
        "assets_manifest": json.loads(Path(assets.manifest).read_text()),
        "splits": json.loads(Path(assets.splits).read_text()),
        "build_s": build_s,
        "rows_s": rows_s,
        "workers": args.workers,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "flavours": flavours,
    }
    write(payload, args.out)


def write(payload: dict, out: Path) -> None:
    """``out`` (JSON) and the Markdown tables beside it."""
    tables = "\n\n".join(f"### {name}\n\n{results_table(payload['tasks'], rows)}" for name, rows in payload["flavours"].items())
    write_results(out, payload, f"Command: `{payload['command']}`\n\n{tables}\n")
    print(tables)


if __name__ == "__main__":
    main()
