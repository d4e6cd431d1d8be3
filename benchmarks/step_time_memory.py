#!/usr/bin/env python
"""Per-step time and peak memory of layer-wise AdaMerging against a plain forward+backward.

Model: open_clip ``ViT-B-32`` image tower (87.8 M parameters, random weights) with a per-task
linear head (512 -> 10, never merged). K experts = random task vectors. One AdaMerging step sees
``--batch-size`` images of every task (K × batch images per step) through adamerge's
:class:`~adamerge.run.module.MergingModule` training step plus Adam on λ. The reference is a plain
training step of the same K × batch images through the unmerged tower (all weights require grad).

Every (mode, K) runs in a fresh process so that peak RSS (``ru_maxrss``) is its own.

    python -m benchmarks.step_time_memory --experts 1 2 4 8 --threads 1 \
        --out benchmarks/results/step_time_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # on the children's PYTHONPATH: they run as benchmarks.step_time_memory


def build(num_experts: int, dtype_name: str, arch: str):
    import open_clip
    import torch
    from torch import nn

    from adamerge.core.merged_model import MergedModel
    from adamerge.core.task_vectors import TaskVectors

    torch.manual_seed(0)
    visual = open_clip.create_model(arch, pretrained=None).visual
    model = nn.Sequential()
    model.add_module("tower", visual)
    model.add_module("head", nn.Linear(visual.output_dim, 10))
    names = [n for n, _ in model.named_parameters() if not n.startswith("head.")]
    if num_experts == 0:
        return model, None
    dtype = getattr(torch, dtype_name)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    vectors = {}
    for name in names:
        shape = (num_experts, *params[name].shape)
        vectors[name] = (torch.randn(shape, generator=generator) * 1e-3).to(dtype)  # (K, *S)
    tasks = [f"task{k}" for k in range(num_experts)]
    heads = {t: {"head.weight": torch.randn(10, visual.output_dim) * 0.02, "head.bias": torch.zeros(10)} for t in tasks}
    merged = MergedModel(model, TaskVectors(tasks, vectors), "layer", "clamp", 0.3, heads=heads, batchnorm="base")
    return model, merged


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(args: argparse.Namespace) -> dict:
    import torch

    from adamerge.run.module import MergingModule, adam

    if args.threads:
        torch.set_num_threads(args.threads)
    k = args.one_experts
    model, merged = build(k, args.dtype, args.arch)
    image_size = model.tower.image_size[0] if isinstance(model.tower.image_size, tuple) else model.tower.image_size
    generator = torch.Generator().manual_seed(2)
    batches = [
        {f"task{t}": torch.randn(args.batch_size, 3, image_size, image_size, generator=generator) for t in range(k)}
        for _ in range(args.steps + 1)
    ]
    rss_built = rss_mb()
    times = []
    if args.mode == "adamerging":
        module = MergingModule(merged, optimizer=adam(1e-3))
        module.train()
        optimizer = module.configure_optimizers()
        for batch in batches:
            start = time.perf_counter()
            loss = module.training_step(batch, 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        num_coefficients = merged.coefficients.raw.numel()
    else:  # plain training step of the unmerged model on the same images
        model.train(False)
        model.requires_grad_(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        for batch in batches:
            start = time.perf_counter()
            for inputs in batch.values():
                logits = model(inputs)
                probs = logits.log_softmax(-1)
                (-(probs.exp() * probs).sum(-1).mean()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        num_coefficients = 0
    measured = times[1:]  # first step warms up allocators and kernels
    return {
        "mode": args.mode,
        "experts": k,
        "dtype": args.dtype,
        "batch_per_task": args.batch_size,
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
        "coefficients": num_coefficients,
        "step_s_median": statistics.median(measured),
        "step_s_all": measured,
        "rss_built_mb": rss_built,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=8, help="images per task per step")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="task-vector storage dtypes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--mode", choices=["adamerging", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--one-experts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode:  # child process: one configuration
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    rows = []
    for k in args.experts:
        configs = [("plain", "float32")] + [("adamerging", d) for d in args.dtypes]
        for mode, dtype in configs:
            command = [
                sys.executable, "-m", "benchmarks.step_time_memory", "--mode", mode, "--one-experts", str(k), "--dtype", dtype,
                "--arch", args.arch, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--threads", str(args.threads),
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.stderr.write(done.stderr[-3000:])
                raise SystemExit(f"configuration {mode} K={k} {dtype} failed")
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            sys.stderr.write(
                f"K={k} {mode:10s} {dtype:8s} step {row['step_s_median']:.3f} s  peak RSS {row['peak_rss_mb']:.0f} MB\n"
            )
    table = ["| K | plain fwd+bwd (s) | " + " | ".join(f"adamerging τ {d} (s) | ratio | peak RSS (MB)" for d in args.dtypes)
             + " | plain peak RSS (MB) |"]
    table.append("|" + "---|" * (2 + 3 * len(args.dtypes) + 1))
    for k in args.experts:
        plain = next(r for r in rows if r["experts"] == k and r["mode"] == "plain")
        cells = [str(k), f"{plain['step_s_median']:.2f}"]
        for d in args.dtypes:
            ours = next(r for r in rows if r["experts"] == k and r["mode"] == "adamerging" and r["dtype"] == d)
            ratio = ours["step_s_median"] / plain["step_s_median"]
            cells += [f"{ours['step_s_median']:.2f}", f"{ratio:.3f}", f"{ours['peak_rss_mb']:.0f}"]
        cells.append(f"{plain['peak_rss_mb']:.0f}")
        table.append("| " + " | ".join(cells) + " |")
    print("\n".join(table))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        invocation = " ".join([Path(sys.executable).name, "-m", "benchmarks.step_time_memory", *sys.argv[1:]])
        args.out.write_text(json.dumps({"command": invocation, "rows": rows, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
