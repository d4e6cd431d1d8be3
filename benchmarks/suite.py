#!/usr/bin/env python
"""The whole benchmark suite in one command: experts, every method, the few-shot curve, the plots.

Phases (each a fresh process, timed; the experts are built by the first phase that needs them,
or reused from their caches):

1. ``vision``: ``vision_methods.py`` (builds the MobileNetV2 experts, then every method).
2. ``fewshot``: ``fewshot_curve.py`` (aTLAS few-shot at 1, 2, 4, 8, 16 shots per class).
3. ``text-experts``: ``python -m adamerge.demo.text`` (the MiniLM experts, both flavours).
4. ``text``: ``text_methods.py``, the full and LoRA flavours side by side (one core each),
   then joined.
5. ``plots``: ``plots.py`` for vision and both text flavours.

    python benchmarks/suite.py                          # results in benchmarks/results/
    python benchmarks/suite.py --quick --out-dir /tmp/suite-quick
    python benchmarks/suite.py --cache-root /tmp/fresh  # experts built from scratch, timed

Writes ``suite.json`` / ``suite.md`` (wall time of each phase, the machine's load, the total)
beside the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def python_env(threads: int | None = None) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def timed(name: str, commands: list[list[str]], phases: dict, threads: int | None = None) -> None:
    """Run ``commands`` side by side (one process each), record their wall time under ``name``."""
    sys.stderr.write(f"[suite] {name}: {' & '.join(' '.join(c[1:3]) for c in commands)}\n")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    processes = [subprocess.Popen(command, env=python_env(threads), cwd=REPO) for command in commands]
    codes = [process.wait() for process in processes]
    wall = time.perf_counter() - started
    phases[name] = {"wall_s": round(wall, 1), "load_before": round(load, 2), "commands": [" ".join(c) for c in commands]}
    sys.stderr.write(f"[suite] {name}: {wall:.0f} s\n")
    if any(codes):
        raise SystemExit(f"[suite] {name} failed (exit codes {codes})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick modes of every phase (minutes)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results", help="results folder (default benchmarks/results)")
    parser.add_argument("--cache-root", type=Path, default=None,
                        help="build the experts in <cache-root>/demo-vision and demo-text (default: the usual caches)")
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
    phases: dict[str, dict] = {}
    started = time.perf_counter()
    if "vision" not in args.skip:
        timed("vision", [[py, "benchmarks/vision_methods.py", *quick, *vision_cache, "--out", str(out / "vision.json")]], phases)
    if "fewshot" not in args.skip:
        timed("fewshot", [[py, "benchmarks/fewshot_curve.py", *quick, *vision_cache, "--reference", str(out / "vision.json"),
                           "--out", str(out / "vision_fewshot.json")]], phases)  # fmt: skip
    if "text-experts" not in args.skip:
        timed("text-experts", [[py, "-m", "adamerge.demo.text", *quick, *text_cache]], phases)
    if "text" not in args.skip:
        parts = [out / f".text_{flavour}.json" for flavour in ("full", "lora")]
        timed("text", [[py, "benchmarks/text_methods.py", *quick, *text_cache, "--flavours", flavour, "--out", str(part)]
                       for flavour, part in zip(("full", "lora"), parts)], phases, threads=1)  # fmt: skip
        subprocess.run([py, "benchmarks/text_methods.py", "--join", *map(str, parts), "--out", str(out / "text.json")],
                       env=python_env(), cwd=REPO, check=True)  # fmt: skip
        for flavour, part in zip(("full", "lora"), parts):
            coefficients = part.with_name(f"{part.stem}_coefficients_adamerging_{flavour}.json")
            if coefficients.is_file():  # the name plots.py looks for beside text.json
                coefficients.replace(out / f"text_coefficients_adamerging_{flavour}.json")
            for leftover in (part, part.with_suffix(".md")):
                leftover.unlink(missing_ok=True)
    if "plots" not in args.skip:
        timed("plots", [[py, "benchmarks/plots.py", str(out / "vision.json")]], phases)
        for flavour in ("full", "lora"):
            timed(f"plots-text-{flavour}", [[py, "benchmarks/plots.py", str(out / "text.json"), "--flavour", flavour,
                                             "--name", f"text_{flavour}"]], phases)  # fmt: skip
    total = time.perf_counter() - started
    payload = {
        "command": " ".join([Path(py).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "phases": phases,
        "total_s": round(total, 1),
    }
    name = "suite_quick" if args.quick else "suite"
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"Command: `{payload['command']}` on {payload['machine']['cpus']} CPUs", "",
             "| phase | wall (s) | load before |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['wall_s']:.0f} | {v['load_before']:.2f} |" for k, v in phases.items()]
    lines.append(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) | |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
