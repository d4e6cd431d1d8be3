#!/usr/bin/env python
"""Per-step time and peak memory of adamerge's training step on the real MiniLM text experts.

The six all-MiniLM-L6-v2 experts of :mod:`adamerge.demo.text` (built and cached on first use), full
fine-tunes and LoRA adapters, layer-wise λ (clamp, init 0.3), the entropy objective, Adam on λ;
every step sees one length-grouped batch of ``--batch-size`` calibration texts per task, as the
benchmark's fits do. Modes, each in a fresh process (peak RSS is the process's ``VmHWM``):

- ``plain``: the reference, a plain forward+backward of the same texts through the base model
  with every weight requiring grad (each task with its own head), i.e. what fine-tuning costs;
- ``full``: the full experts, adamerge's default step (embedding tables with row-sparse
  gradients, :mod:`adamerge.core.row_sparse`);
- ``full-dense-tables``: the same with dense embedding-table gradients (``sparse_tables=False``);
- ``lora``: the LoRA adapters, the default ``low_rank_step="auto"`` (here: merged once per step);
- ``lora-at-use``: the adapters merged per task at use time (``low_rank_step="at-use"``).

    .venv/bin/python -m benchmarks.text_step --threads 1 --steps 20 --out benchmarks/results/text_step
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.lora_memory import proc_status  # (the /proc/self/status reader, in MiB)

MODES = ["plain", "full", "full-dense-tables", "lora", "lora-at-use"]
REPO = Path(__file__).resolve().parents[1]  # on the children's PYTHONPATH: they run as benchmarks.text_step


def measure(mode: str, args: argparse.Namespace) -> dict:
    """One mode in this process: ``args.steps`` steps after one warm-up step."""
    import torch

    from adamerge.core.merged_model import MergedModel
    from adamerge.core.model_inputs import call_functional
    from adamerge.demo.text import build_text_demo
    from adamerge.objectives.losses import entropy
    from adamerge.run.datamodules import build_datamodule
    from adamerge.run.module import MergingModule
    from adamerge.sources import SourceOptions, load_experts

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    assets = build_text_demo(cache_dir=args.cache_dir)
    flavour = "lora" if mode.startswith("lora") else "full"
    prefix = "peft:" if flavour == "lora" else "hf:"
    specs = {task: f"{prefix}{path}" for task, path in assets.experts[flavour].items()}
    experts = load_experts(f"hf:{assets.base_dir}", specs, SourceOptions())
    data = build_datamodule(
        experts, assets.calib_dir, batch_size=args.batch_size, max_length=assets.max_length, seed=0, group_by_length=True
    )
    data.setup("fit")
    loaders = {task: iter(loader) for task, loader in data.calibration_loaders(shuffle=True).items()}
    batches = [{task: next(it) for task, it in loaders.items()} for _ in range(args.steps + 1)]
    tokens = sum(int(_inputs(item)["attention_mask"].sum()) for batch in batches for item in batch.values())

    if mode == "plain":
        model = experts.model.requires_grad_(True)
        weights = list(model.parameters())

        def step(batch: dict) -> None:
            for task, item in batch.items():
                logits = call_functional(model, dict(experts.heads[task]), _inputs(item))
                entropy(logits).backward()
            for weight in weights:
                weight.grad = None
    else:
        merged = MergedModel(experts.model, experts.task_vectors, "layer", "clamp", 0.3, heads=experts.heads, batchnorm="base")
        options = {"full-dense-tables": {"sparse_tables": False}, "lora-at-use": {"low_rank_step": "at-use"}}
        module = MergingModule(merged, **options.get(mode, {}))
        module.merged.train()
        optimizer = torch.optim.Adam(merged.coefficients.parameters(), lr=1e-3)

        def step(batch: dict) -> None:
            module.training_step(batch, 0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = []
    for batch in batches:
        started = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - started)
    return {
        "mode": mode,
        "first_step_s": round(times[0], 3),
        "step_s": [round(t, 4) for t in times[1:]],
        "steps": args.steps,
        "tokens_per_step": round(tokens / len(batches)),
        "peak_rss_mb": round(proc_status("VmHWM"), 1),
        "merges_at_use": None if mode == "plain" else module.merges_at_use,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _inputs(item) -> dict:
    """The tokenised inputs of a calibration batch of one task."""
    from adamerge.objectives.task_objectives import as_task_batch

    return as_task_batch(item).inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--steps", type=int, default=10, help="measured steps after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=8, help="texts per task per step")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every mode, the modes in turn (ABC ABC)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", default=None, help="the text demo's cache (default: the usual one)")
    parser.add_argument("--out", type=Path, default=None, help="writes <out>.json and <out>.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    runs = []
    for mode in args.modes * args.repeats:  # in turn: a drift of the machine's speed hits every mode alike
        command = [sys.executable, "-m", "benchmarks.text_step", "--child", mode, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
        if args.cache_dir:
            command += ["--cache-dir", args.cache_dir]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"mode {mode} failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        sys.stderr.write(f"{mode}: median {statistics.median(runs[-1]['step_s']):.3f} s\n")
    summary = {}
    for mode in args.modes:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            "step_median_s": round(statistics.median(t for r in mine for t in r["step_s"]), 3),
            "run_medians_s": [round(statistics.median(r["step_s"]), 3) for r in mine],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "tokens_per_step": mine[0]["tokens_per_step"],
        }
    plain = summary.get("plain", {}).get("step_median_s")
    lines = [
        f"Command: `python -m benchmarks.text_step --threads {args.threads} --steps {args.steps} --repeats "
        f"{args.repeats}`: the six MiniLM experts, layer-wise λ, {args.batch_size} texts per task per step "
        f"(length-grouped, {summary[args.modes[0]]['tokens_per_step']} tokens a step), one fresh process per run, "
        f"the modes in turn; the step time is the median over every run's {args.steps} steps after its first.",
        "",
        "| mode | step median (s) | × plain | each run's median (s) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for mode, row in summary.items():
        ratio = f"{row['step_median_s'] / plain:.2f}" if plain else "-"
        each = ", ".join(f"{t:.3f}" for t in row["run_medians_s"])
        lines.append(f"| {mode} | {row['step_median_s']:.3f} | {ratio} | {each} | {row['peak_rss_mb']:.0f} |")
    print("\n".join(lines))
    if args.out:
        payload = {"summary": summary, "runs": runs, "threads": args.threads, "steps": args.steps, "batch_size": args.batch_size}
        from benchmarks.runner import write_results  # here, not at the top: the measured children need not import it

        write_results(args.out.with_suffix(".json"), payload, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
