#!/usr/bin/env python
"""FW-Merging with irrelevant checkpoints in the pool: does the merge for the tasks with data stay put?

Chen et al. motivate FW-Merging by large pools in which most checkpoints do not help the tasks at
hand. This runs the vision benchmark's MobileNetV2 experts (:mod:`adamerge.demo.vision`) with
data for three tasks (:data:`RELEVANT`) and three pools:

- ``relevant``: those three experts;
- ``+ other tasks``: also the experts of the two other tasks (:data:`OTHERS`);
- ``+ other tasks + noise``: also :data:`NOISE` random checkpoints, ``θ_0`` plus Gaussian noise
  scaled per tensor to the experts' mean task-vector norm, with the mnist expert's head.

A checkpoint without data of its own gets task weight 0 (``--task-weights``): it is a vertex of
the pool and part of the initial merge (task arithmetic over the whole pool, as FusionBench
starts), and its loss counts for nothing. Every pool runs task arithmetic at λ = 0.3 (``merge``)
and ``fit --method fw-merging`` at FusionBench's budget (task granularity, 10 steps of 100 inputs
per task); the table reports the relevant tasks' accuracy, normalized by their experts'.

    OMP_NUM_THREADS=1 python -m benchmarks.fw_pool --data-root ../shared/data --workers 2 --out benchmarks/results/fw_pool.json
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

RELEVANT = ("mnist", "fashion_mnist", "cifar10")
OTHERS = ("usps", "kannada_mnist")
NOISE = 3
FW_OPTIONS = ["--granularity", "task", "--steps", "10", "--batch-size", "100"]


def noise_experts(base_file: Path, expert_files: dict[str, Path], folder: Path, count: int, seed: int = 0) -> dict[str, Path]:
    """``count`` checkpoints ``θ_0 + ε`` (ε Gaussian, per tensor of the experts' mean task-vector
    norm; the head copied from mnist's expert), saved as state dicts in ``folder``."""
    import torch

    base = torch.load(base_file, weights_only=True)
    experts = [torch.load(path, weights_only=True) for path in expert_files.values()]
    generator = torch.Generator().manual_seed(seed)
    head = torch.load(expert_files["mnist"], weights_only=True)
    files = {}
    for index in range(count):
        state = {}
        for name, tensor in base.items():
            if name.startswith("classifier."):
                state[name] = head[name].clone()
            elif tensor.is_floating_point() and "running" not in name:
                norm = sum(float((e[name] - tensor).norm()) for e in experts) / len(experts)
                noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                state[name] = tensor + noise * (norm / max(float(noise.norm()), 1e-12))
            else:
                state[name] = tensor.clone()
        files[f"noise{index}"] = folder / f"noise{index}.pth"
        torch.save(state, files[f"noise{index}"])
    return files


def task_folders(source: Path, target: Path, tasks: dict[str, str]) -> Path:
    """``target/<task>`` linked to ``source/<of>`` for every ``task: of`` (a noise checkpoint borrows mnist's)."""
    target.mkdir(parents=True, exist_ok=True)
    for task, of in tasks.items():
        (target / task).symlink_to((source / of).resolve(), target_is_directory=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from adamerge.demo.vision import build_vision_demo

    with cpu_slot():
        assets = build_vision_demo(data_root=args.data_root, cache_dir=args.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="adamerge-fw-pool-"))
    noise = noise_experts(Path(assets.base), {t: Path(p) for t, p in assets.experts.items()}, work, NOISE)
    files = {t: Path(p) for t, p in assets.experts.items()} | noise
    borrowed = {t: (t if t in assets.experts else "mnist") for t in files}
    calib = task_folders(Path(assets.calib_dir), work / "calib", borrowed)
    evaluation = task_folders(Path(assets.eval_dir), work / "eval", borrowed)
    pools = {
        "relevant": list(RELEVANT),
        "+ other tasks": [*RELEVANT, *OTHERS],
        "+ other tasks + noise": [*RELEVANT, *OTHERS, *noise],
    }
    jobs = []
    for pool, tasks in pools.items():
        common = [
            "--base", f"torchvision:mobilenet_v2@{assets.base}",
            "--experts", *[f"{t}={files[t]}" for t in tasks],
            "--calib", str(calib), "--eval", str(evaluation),
            "--head-pattern", r"^classifier\.", "--image-size", str(assets.image_size), "--batchnorm", "per-task",
        ]  # fmt: skip
        zero = {t: 0 for t in tasks if t not in RELEVANT}
        weights = ["--task-weights", json.dumps(zero)] if zero else []
        jobs.append(
            ((pool, "task arithmetic (λ=0.3)"), ["merge", "--method", "task-arithmetic", *common, "--output", str(work / f"{pool}-ta")])
        )
        fit = ["fit", "--method", "fw-merging", *FW_OPTIONS, *common, *weights, "--progress-bar", "false", "--eval-init", "false"]
        jobs.append(
            ((pool, "fw-merging (task)"), [*fit, "--eval-experts", str(pool == "relevant").lower(), "--output", str(work / f"{pool}-fw")])
        )
    results: dict[str, dict] = {pool: {} for pool in pools}
    experts: dict[str, float] = {}

    def collect(key: tuple[str, str], measured: dict) -> None:
        pool, row = key
        output = work / f"{pool}-{'ta' if row.startswith('task') else 'fw'}"
        accuracy = json.loads((output / "metrics.json").read_text())["accuracy"]
        shutil.rmtree(output, ignore_errors=True)
        if "expert (alone)" in accuracy:
            experts.update({t: accuracy["expert (alone)"][t] for t in RELEVANT})
        scores = accuracy["task-arithmetic" if row.startswith("task") else row]
        results[pool][row] = {
            "per_task": {t: scores[t] for t in RELEVANT},
            "wall_s": measured["wall_s"],
            "peak_rss_mb": measured["peak_rss_mb"],
        }

    started = time.perf_counter()
    run_all(jobs, args.workers, collect)
    for rows in results.values():
        for entry in rows.values():
            entry["average"] = sum(entry["per_task"].values()) / len(RELEVANT)
            entry["normalized"] = sum(entry["per_task"][t] / experts[t] for t in RELEVANT) / len(RELEVANT)
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.fw_pool", *sys.argv[1:]]),
        "relevant": list(RELEVANT), "pools": pools, "experts": experts, "results": results,
        "rows_s": time.perf_counter() - started, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }  # fmt: skip
    lines = ["| pool | checkpoints | " + " | ".join(f"TA {t}" for t in RELEVANT) + " | TA normalized | "
             + " | ".join(f"FW {t}" for t in RELEVANT) + " | FW normalized | FW wall (s) |", "|" + "---|" * (2 * len(RELEVANT) + 5)]  # fmt: skip
    for pool, rows in results.items():
        ta, fw = rows["task arithmetic (λ=0.3)"], rows["fw-merging (task)"]
        cells = [f"{100 * ta['per_task'][t]:.1f}" for t in RELEVANT] + [f"{100 * ta['normalized']:.1f}"]
        cells += [f"{100 * fw['per_task'][t]:.1f}" for t in RELEVANT] + [f"{100 * fw['normalized']:.1f}", f"{fw['wall_s']:.0f}"]
        lines.append(f"| {pool} | {len(pools[pool])} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    write_results(args.out, payload, f"Command: `{payload['command']}`\n\n{table}\n")
    shutil.rmtree(work, ignore_errors=True)
    print(table)


if __name__ == "__main__":
    main()
