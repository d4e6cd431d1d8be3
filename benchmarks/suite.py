#!/usr/bin/env python
"""The whole benchmark suite in one command: experts, every method, the few-shot curve, the plots.

Every measured process (an expert, a table row, a few-shot run) runs with one thread
(``OMP_NUM_THREADS=1``) and first takes one of ``--slots`` CPU slots (default: one per core), so
the machine runs one single-threaded process per core and no core waits while work remains:

1. ``text-experts``: ``python -m adamerge.demo.text --workers SLOTS`` trains the 12 MiniLM experts
   (both flavours), one process per core;
2. two lanes side by side, their rows sharing the slots:
   - ``vision`` lane: ``vision_methods.py`` (builds the MobileNetV2 experts, then every method),
     then ``fewshot_curve.py`` (aTLAS few-shot at 1, 2, 4, 8, 16 shots per class);
   - ``text`` lane: ``text_methods.py`` (every method on the full fine-tunes and on the LoRA
     adapters).
   Each script queues its rows on as many workers as there are slots, longest first, so the text
   rows take both cores once the vision lane is done;
3. ``plots.py`` draws the figures.

    python -m benchmarks.suite                          # results in benchmarks/results/
    python -m benchmarks.suite --quick --out-dir /tmp/suite-quick
    python -m benchmarks.suite --cache-root /tmp/fresh  # experts built from scratch, timed

Writes ``suite.json`` / ``suite.md`` (wall time of each step and lane, the machine's load, one
thread's matmul speed at the start and the end, the total) beside the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.runner import SLOTS_ENV, make_slots, write_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def python_env(threads: int | None = None, slots: Path | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if slots is not None:
        env[SLOTS_ENV] = str(slots)
    return env


# One thread's float32 matrix-product throughput (GFLOP/s) on a MiniLM feed-forward-sized product:
# a reference that tells a slower machine from slower code when two suite runs are compared
SPEED_PROBE = """
import time, torch
torch.set_num_threads(1)
a, b = torch.randn(768, 384), torch.randn(384, 1536)  # (tokens, hidden) @ (hidden, 4 * hidden)
for _ in range(5):
    a @ b
count, start = 0, time.perf_counter()
while time.perf_counter() - start < 3.0:
    a @ b
    count += 1
print(2 * 768 * 384 * 1536 * count / (time.perf_counter() - start) / 1e9)
"""


def machine_speed(env: dict[str, str]) -> float:
    """One thread's matmul GFLOP/s now (:data:`SPEED_PROBE`, about 5 s)."""
    done = subprocess.run([sys.executable, "-c", SPEED_PROBE], env=env, capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def timed(name: str, command: list[str], steps: dict, env: dict[str, str]) -> None:
    """Run ``command``, record its wall time under ``name``."""
    sys.stderr.write(f"[suite] {name}: {' '.join(command[1:4])}\n")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    code = subprocess.run(command, env=env, cwd=REPO).returncode
    wall = time.perf_counter() - started
    steps[name] = {"wall_s": round(wall, 1), "load_before": round(load, 2), "command": " ".join(command)}
    sys.stderr.write(f"[suite] {name}: {wall:.0f} s\n")
    if code:
        raise SystemExit(f"[suite] {name} failed (exit code {code})")


def run_lanes(lanes: dict[str, list[tuple[str, list[str]]]], steps: dict, env: dict[str, str]) -> dict[str, float]:
    """Run each lane's steps in order, the lanes side by side; returns each lane's wall time."""
    walls: dict[str, float] = {}

    def lane(name: str) -> None:
        started = time.perf_counter()
        for step, command in lanes[name]:
            timed(step, command, steps, env)
        walls[name] = round(time.perf_counter() - started, 1)

    with ThreadPoolExecutor(max_workers=max(1, len(lanes))) as pool:
        for future in [pool.submit(lane, name) for name in lanes]:
            future.result()  # the first failure exits (the other lane finishes its current step)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick modes of every phase (minutes)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="results folder (default benchmarks/results)")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="build the experts in <cache-root>/demo-vision and demo-text (default: the usual caches)")
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1,
                        help="single-threaded processes at once (default: one per core)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["vision", "fewshot", "text-experts", "text", "plots"])
    args = parser.parse_args()
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    quick = ["--quick"] if args.quick else []
    vision_cache, text_cache = [], []
    if args.cache_root is not None:
        suffix = "-quick" if args.quick else ""
        vision_cache = ["--cache-dir", str(args.cache_root / f"demo-vision{suffix}")]
        text_cache = ["--cache-dir", str(args.cache_root / f"demo-text{suffix}")]
    slots = make_slots(Path(tempfile.mkdtemp(prefix="adamerge-slots-")), args.slots)
    env = python_env(threads=1, slots=slots)
    workers = ["--workers", str(args.slots)]
    steps: dict[str, dict] = {}
    speed = {"start": machine_speed(env)}
    started = time.perf_counter()
    if "text-experts" not in args.skip:  # alone on the machine: one training process per slot
        timed("text-experts", [py, "-m", "adamerge.demo.text", *quick, *text_cache, "--threads", "1", *workers], steps, env)
    lanes: dict[str, list[tuple[str, list[str]]]] = {"vision": [], "text": []}
    if "vision" not in args.skip:
        lanes["vision"].append(("vision", [py, "-m", "benchmarks.vision_methods", *quick, *vision_cache, *workers,
                                           "--out", str(out / "vision.json")]))  # fmt: skip
    if "fewshot" not in args.skip:
        lanes["vision"].append(("fewshot", [py, "-m", "benchmarks.fewshot_curve", *quick, *vision_cache, *workers,
                                            "--reference", str(out / "vision.json"),
                                            "--out", str(out / "vision_fewshot.json")]))  # fmt: skip
    if "text" not in args.skip:
        lanes["text"].append(("text", [py, "-m", "benchmarks.text_methods", *quick, *text_cache, *workers,
                                       "--out", str(out / "text.json")]))  # fmt: skip
    lanes = {name: lane for name, lane in lanes.items() if lane}
    lane_walls = run_lanes(lanes, steps, env)
    if "plots" not in args.skip:
        timed("plots", [py, "-m", "benchmarks.plots", str(out / "vision.json")], steps, env)
        for flavour in ("full", "lora"):
            timed(f"plots-text-{flavour}", [py, "-m", "benchmarks.plots", str(out / "text.json"), "--flavour", flavour,
                                            "--name", f"text_{flavour}"], steps, env)  # fmt: skip
    shutil.rmtree(slots, ignore_errors=True)
    total = time.perf_counter() - started
    speed["end"] = machine_speed(env)
    payload = {
        "command": " ".join([Path(py).name, "-m", "benchmarks.suite", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "matmul_gflops_1_thread": speed},
        "slots": args.slots,
        "lanes": {name: {"steps": [step for step, _ in lanes[name]], "wall_s": wall} for name, wall in lane_walls.items()},
        "phases": steps,
        "total_s": round(total, 1),
    }
    name = "suite_quick" if args.quick else "suite"
    lines = [f"Command: `{payload['command']}` on {payload['machine']['cpus']} CPUs, at most {args.slots} "
             "single-threaded processes at a time; the vision and text lanes run side by side. "
             f"One thread's matmul speed: {speed['start']} GFLOP/s at the start, {speed['end']} at the end "
             "(`SPEED_PROBE` in suite.py)", "",
             "| lane | step | wall (s) | load before |", "|---|---|---|---|"]  # fmt: skip
    if "text-experts" in steps:
        lines.append(f"| - | text-experts | {steps['text-experts']['wall_s']:.0f} | {steps['text-experts']['load_before']:.2f} |")
    for lane_name, lane in lanes.items():
        lines += [f"| {lane_name} | {step} | {steps[step]['wall_s']:.0f} | {steps[step]['load_before']:.2f} |" for step, _ in lane]
        lines.append(f"| {lane_name} | *lane total* | {lane_walls[lane_name]:.0f} | |")
    lines += [f"| - | {k} | {v['wall_s']:.0f} | {v['load_before']:.2f} |" for k, v in steps.items() if k.startswith("plots")]
    lines.append(f"| **total** | | **{total:.0f}** ({total / 60:.1f} min) | |")
    write_results(out / f"{name}.json", payload, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
