#!/usr/bin/env python
"""aTLAS few-shot on the real MobileNetV2 vision experts: accuracy vs labelled shots per class.

For each number of shots per class (1, 2, 4, 8, 16) one fresh ``adamerge fit --method atlas
--shots N`` process (via :func:`runner.run`, so wall time and peak RSS are its own) learns
layer-wise coefficients (aTLAS's ``--blockwise`` default; one λ per task and parameter tensor,
init 0, no constraint) by cross-entropy on the labelled shots (AdamW lr 1e-1, wd 0.1, cosine), and
is evaluated on the same held-out test folders as ``vision.json``.

The demo has no labelled split besides the test rows, so the shots are drawn from its
**fine-tuning** rows (disjoint from test and calibration by construction; the experts have seen
them, as aTLAS's shots come from the experts' training sets): every fine-tuning row is written as
``<pool>/<task>/<label>_<class>/<row>.png`` and ``adamerge fit --shots N --seed S`` draws N per
class (seed ``S + 1000·(task position + 1)``; the draws are nested, 1 ⊂ 2 ⊂ 4 ...). The rows
each run used are recorded in the JSON.

Steps: 100 per run at batch 16 per task: aTLAS over-samples its shots to at least 10 batches an
epoch and trains ~10 epochs, i.e. >= 100 steps; at 16 shots (160 images a task) 100 steps of 16 are
exactly 10 epochs. ``--init`` / ``--lr`` override aTLAS's λ = 0 start and lr 1e-1 (e.g. ``--init 0.3
--lr 0.01``: start at task arithmetic, as the benchmark's ``atlas tta`` row does, with smaller steps).

    python -m benchmarks.fewshot_curve --out benchmarks/results/vision_fewshot.json
    python -m benchmarks.fewshot_curve --quick --out /tmp/fewshot-quick.json   # a minute or two

Writes ``<out>.json``, ``<out>.md`` and ``<name>_fewshot.png`` (``plots.py``) beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.plots import load_fewshot, plot_fewshot
from benchmarks.runner import cpu_slot, run_all, write_results
from benchmarks.vision_methods import results_table

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
QUICK_SHOTS = (1, 4)
REFERENCE_ROWS = ("atlas tta (layer-wise)", "adamerging (layer-wise)", "task-arithmetic")


def _sha256_rows(rows: list[int]) -> str:
    return hashlib.sha256(" ".join(map(str, rows)).encode()).hexdigest()


def build_shot_pool(assets, data_root: str | None, pool: Path) -> dict:
    """Write every fine-tuning row of every task as a labelled folder; return its record.

    The split is recomputed from the demo's recipe and checked against ``splits.json`` (sha256 of
    the indices), and the pool's rows are checked disjoint from the test rows.
    """
    import numpy as np

    from adamerge.datasets.vision import load_vision_task, resolve_data_root
    from adamerge.demo.vision import describe_split, split_indices, task_seed, write_eval_folder

    manifest = json.loads(Path(assets.manifest).read_text())
    recorded = json.loads(Path(assets.splits).read_text())
    root = resolve_data_root(data_root)
    pool.mkdir(parents=True, exist_ok=True)
    record = {
        "source": "the fine-tuning part of the demo's split (disjoint from its test and calibration parts)",
        "layout": "<pool>/<task>/<label>_<class>/<row>.png, row = index into the source data set",
        "tasks": {},
    }
    for task in assets.tasks:
        settings = manifest["tasks"][task]["fingerprint"]["settings"]
        seed = task_seed(settings["seed"], task)
        arrays = load_vision_task(task, root)
        sizes = {"test": settings["test_size"], "calib": settings["calib_size"], "finetune": settings["finetune_size"]}
        parts = split_indices(len(arrays), sizes, seed)
        if describe_split(len(arrays), seed, parts) != recorded[task]:
            raise SystemExit(f"{task}: recomputed split differs from {assets.splits}; rebuild the demo")
        if np.intersect1d(parts["finetune"], parts["test"]).size:
            raise SystemExit(f"{task}: fine-tuning and test rows overlap")
        names = {f"{i:0{len(str(len(arrays) - 1))}d}" for i in parts["finetune"].tolist()}
        if {p.stem for p in (pool / task).rglob("*.png")} != names:  # reuse a complete pool (--pool)
            write_eval_folder(arrays, parts["finetune"], pool / task)
        test_names = {p.stem for p in (Path(assets.eval_dir) / task).rglob("*.png")}
        pool_names = {p.stem for p in (pool / task).rglob("*.png")}
        if test_names & pool_names:
            raise SystemExit(f"{task}: {len(test_names & pool_names)} shot-pool images are also test images")
        record["tasks"][task] = {
            "rows": len(parts["finetune"]),
            "perm_range": recorded[task]["parts"]["finetune"]["perm_range"],
            "sha256": recorded[task]["parts"]["finetune"]["sha256"],
            "demo_task_seed": seed,
        }
    return record


def drawn_shots(pool: Path, tasks: list[str], shots: int, seed: int) -> tuple[dict, dict]:
    """The rows ``adamerge fit --shots shots --seed seed`` trains on (same draw as its datamodule)."""
    from adamerge.data.images import LabelledImageFolder, few_shot_indices

    split, seeds = {}, {}
    for position, task in enumerate(tasks):
        seeds[task] = seed + 1000 * (position + 1)
        folder = LabelledImageFolder(pool / task, transform=None)
        rows = sorted(int(folder.samples[i][0].stem) for i in few_shot_indices(folder, shots, seeds[task]))
        split[task] = {"images": len(rows), "classes": len(folder.classes), "rows": " ".join(map(str, rows)),
                       "rows_sha256": _sha256_rows(rows)}
    return split, seeds


def references(path: Path | None, assets, tasks: list[str]) -> dict[str, dict]:
    """Rows of ``vision.json`` to draw beside the curve, only if it was measured on these experts."""
    if path is None or not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    ours = json.loads(Path(assets.manifest).read_text())["tasks"]
    theirs = payload.get("assets_manifest", {}).get("tasks", {})
    if payload.get("tasks") != tasks or any(
        theirs.get(t, {}).get("expert", {}).get("sha256") != ours[t]["expert"]["sha256"] for t in tasks
    ):
        sys.stderr.write(f"{path}: other experts, no reference rows\n")
        return {}
    return {
        f"{name} [{path.name}]": {k: payload["methods"][name][k] for k in ("per_task", "average", "normalized")}
        for name in REFERENCE_ROWS
        if name in payload.get("methods", {})
    }


def git_commit() -> str | None:
    """``$ADAMERGE_COMMIT`` (a run from an exported tree), else ``git rev-parse HEAD``."""
    if os.environ.get("ADAMERGE_COMMIT"):
        return os.environ["ADAMERGE_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent)
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small demo assets (own cache folder), shots 1 4, 10 steps")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help=f"shots per class (default {DEFAULT_SHOTS})")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 100, quick 10)")
    parser.add_argument("--batch-size", type=int, default=16, help="labelled images per task per step (default 16)")
    parser.add_argument("--granularity", default="layer", help="λ layout (default layer: aTLAS's --blockwise)")
    parser.add_argument("--init", type=float, default=None, help="initial λ (default: aTLAS's 0, the pretrained model)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: aTLAS few-shot's 1e-1)")
    parser.add_argument("--batchnorm", default="per-task", choices=["per-task", "reestimate", "base"],
                        help="BatchNorm statistics policy (default: per-task, as vision_methods.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shot draws and of each fit (default 0)")
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parent / "results" / "vision.json",
                        help="results JSON whose rows are drawn as references (if its experts are these)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None, help="demo cache (quick default: a separate demo-vision-quick folder)")
    parser.add_argument("--pool", type=Path, default=None, help="folder of the labelled shot pool (reused if complete; default: a temporary one)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs side by side (default 1; set OMP_NUM_THREADS=1 for more)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from adamerge.demo.vision import build_vision_demo

    cache_dir = args.cache_dir  # quick assets live in their own folder (build_vision_demo)
    shots_list = sorted(set(args.shots or (QUICK_SHOTS if args.quick else DEFAULT_SHOTS)))
    steps = args.steps or (10 if args.quick else 100)

    started = time.perf_counter()
    with cpu_slot():
        assets = build_vision_demo(data_root=args.data_root, cache_dir=cache_dir, quick=args.quick)
    build_s = time.perf_counter() - started
    work = Path(tempfile.mkdtemp(prefix="adamerge-fewshot-"))
    started = time.perf_counter()
    pool = args.pool or work / "shots"
    with cpu_slot():
        pool_record = build_shot_pool(assets, args.data_root, pool)
    pool_s = time.perf_counter() - started
    tasks = assets.tasks
    common = [
        "--base", f"torchvision:mobilenet_v2@{assets.base}",
        "--experts", *[f"{t}={p}" for t, p in assets.experts.items()],
        "--eval", str(assets.eval_dir),
        "--head-pattern", r"^classifier\.",
        "--image-size", str(assets.image_size),
        "--batchnorm", args.batchnorm,
    ]
    fixed: dict[str, dict] = {}
    curve: dict[str, dict] = {}
    jobs = []
    for position, shots in enumerate(shots_list):
        first = "true" if position == 0 else "false"  # the experts and the initial merge are evaluated once
        argv = [
            "fit", "--method", "atlas", "--shots", str(shots), "--granularity", args.granularity, *common,
            "--calib", str(pool), "--steps", str(steps), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--output", str(work / f"atlas_{shots}shot"), "--progress-bar", "false",
            "--eval-experts", first, "--eval-init", first,
        ]  # fmt: skip
        for option in ("init", "lr"):
            if getattr(args, option) is not None:
                argv += [f"--{option}", str(getattr(args, option))]
        jobs.append((shots, argv))
    load_before = os.getloadavg()[0]

    def collect(shots: int, measured: dict) -> None:
        output = work / f"atlas_{shots}shot"
        metrics = json.loads((output / "metrics.json").read_text())
        shutil.rmtree(output, ignore_errors=True)  # the exported model is not needed
        accuracy = metrics["accuracy"]
        for name in accuracy:  # the experts alone and the initial merge (λ = init), from the first run
            if name != f"atlas ({args.granularity})" and name not in fixed:
                fixed[name] = {"per_task": accuracy[name]}
        split, seeds = drawn_shots(pool, tasks, shots, args.seed)
        final = accuracy[f"atlas ({args.granularity})"]
        curve[str(shots)] = {
            "per_task": final,
            "wall_s": measured["wall_s"],
            "peak_rss_mb": measured["peak_rss_mb"],
            "fit_s": metrics["timing_s"]["fit"],
            "steps": metrics["steps"],
            "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # start of the curve, this run's end
            "seeds": {"fit": args.seed, "shot_draw": seeds},
            "split": split,
        }
        sys.stderr.write(f"{shots:3d} shots: average {100 * final['average']:.1f}  {measured['wall_s']:.0f} s\n")

    run_all(jobs, args.workers, collect)
    shutil.rmtree(work, ignore_errors=True)  # the emptied row folders and the temporary shot pool (kept if a row failed)
    curve = {str(shots): curve[str(shots)] for shots in shots_list}
    write_curve(args, assets, fixed, curve, pool_record, build_s, pool_s, steps)


def write_curve(args, assets, fixed: dict, curve: dict, pool_record: dict, build_s: float, pool_s: float,
                steps: int) -> None:
    """Write ``<out>.json`` and ``<out>.md`` (and the plot) from the runs done so far."""
    tasks = assets.tasks
    experts = fixed["expert (alone)"]["per_task"]
    refs = {name: dict(entry) for name, entry in fixed.items()}
    refs |= references(args.reference, assets, tasks)
    for entry in [*curve.values(), *refs.values()]:
        entry["average"] = entry["per_task"]["average"]
        entry["normalized"] = sum(entry["per_task"][t] / experts[t] for t in tasks) / len(tasks)
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.fewshot_curve", *sys.argv[1:]]),
        "commit": git_commit(),
        "tasks": tasks,
        "method": "atlas",
        "granularity": args.granularity,
        "objective": "cross-entropy on the labelled shots (AdamW, weight decay 0.1, cosine schedule)",
        "init": 0.0 if args.init is None else args.init,
        "batchnorm": args.batchnorm,
        "lr": 0.1 if args.lr is None else args.lr,
        "steps": steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "workers": args.workers,
        "load_1min_at_end": round(os.getloadavg()[0], 2),
        "image_size": assets.image_size,
        "assets_manifest": json.loads(Path(assets.manifest).read_text()),
        "splits": json.loads(Path(assets.splits).read_text()),
        "shot_pool": pool_record,
        "test": "the demo's eval/<task> folders (its test part)" + ("" if args.quick else ", the same as vision.json's"),
        "build_s": build_s,
        "pool_s": pool_s,
        "shots": curve,
        "references": refs,
    }
    table = markdown(payload)
    write_results(args.out, payload, f"Command: `{payload['command']}`\n\n{table}\n")
    tasks, curve, refs = load_fewshot(args.out)
    title = f"aTLAS few-shot (init {payload['init']:g}, lr {payload['lr']:g}), accuracy vs shots per class"
    sys.stderr.write(f"wrote {plot_fewshot(tasks, curve, args.out.with_suffix('.png'), refs, title)}\n")
    print(table)


def markdown(payload: dict) -> str:
    tasks = payload["tasks"]
    lines = [
        f"aTLAS few-shot ({payload['granularity']}-wise λ, init {payload['init']:g}, lr {payload['lr']:g}, "
        f"{payload['steps']} steps, batch {payload['batch_size']} "
        f"per task, seed {payload['seed']}); shots drawn from the demo's fine-tuning rows, test = {payload['test']}. "
        "Wall time and peak RSS are each run's whole `adamerge fit` process (load, evaluation, fit); the 1-minute "
        "load average at the start of the curve and at each run's end is in the JSON (`load_1min`).",
        "",
    ]
    rows = {f"{shots}": entry for shots, entry in payload["shots"].items()} | dict(payload["references"])
    table = results_table(tasks, rows).splitlines()
    lines += ["| shots per class " + table[0].removeprefix("| method "), *table[1:]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
