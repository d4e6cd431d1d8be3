#!/usr/bin/env python
"""Side-by-side step time and peak RSS: adamerge vs a plain fwd+bwd vs FusionBench's AdaMerging.

For every K (number of experts) this runs, each in a fresh process and each after waiting for the
machine to be quiet (1-minute load average below ``--quiet-load``):

1. ``step_time_memory.py --mode plain``: plain forward+backward of the K × batch images through the
   open_clip ViT-B-32 image tower (the same child configuration ``step_time_memory.py`` runs);
2. ``step_time_memory.py --mode adamerging --dtype D`` for every task-vector dtype D;
3. FusionBench's ``CLIPLayerWiseAdaMergingAlgorithm`` through the peers' probe
   (``fusionbench_adamerging_probe.py --size b32 --reference``), in FusionBench's own venv.

Runs of different libraries alternate per K so that background load hits both alike. Every run is
wrapped in ``/usr/bin/time -v`` (peak RSS of the whole process) and the 1-minute load average is
sampled every 5 s while it runs (that figure includes the benchmark's own process, i.e. ~1.0 on a
quiet machine).

Outputs (under ``--out-dir``):

- ``step_time_memory.json``: adamerge and plain rows, same layout as ``step_time_memory.py --out``
  (plus ``load`` and ``time_v_peak_rss_mb`` per row);
- ``fusionbench_probe.json``: the probe's ``RESULT`` line per K plus ``/usr/bin/time -v`` peak RSS;
- ``step_time_memory.md``: the combined table.

    .venv/bin/python -m benchmarks.compare_fusionbench --experts 1 2 4 8 --threads 1 \\
        --fb-python ../fbvenv/bin/python \\
        --fb-probe ../shared/peers/fusionbench_adamerging_probe.py --fb-workdir /tmp/fbprobe

``--fb-python`` (FusionBench's venv) and ``--fb-probe`` are needed unless ``--no-fusionbench`` or
``--report-only``; ``--fb-workdir`` defaults to a fresh temporary folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEP_MODULE = "benchmarks.step_time_memory"  # run with -m from the repository root
NOTES_MARKER = "<!-- everything below this line is kept when compare_fusionbench.py rewrites the file -->"


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_quiet(threshold: float, max_wait: float, poll: float) -> dict:
    """Poll the 1-minute load average until it is below ``threshold`` (at most ``max_wait`` s)."""
    start = time.monotonic()
    seen = [load1()]
    while seen[-1] >= threshold and time.monotonic() - start < max_wait:
        time.sleep(poll)
        seen.append(load1())
    waited = time.monotonic() - start
    quiet = seen[-1] < threshold
    log(f"  load {seen[-1]:.2f} after waiting {waited:.0f} s" + ("" if quiet else f" (never below {threshold})"))
    return {"load_at_start": seen[-1], "waited_s": round(waited, 1), "quiet": quiet}


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every ``period`` seconds while a run is in progress."""

    def __init__(self, period: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.samples: list[float] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.period):
            self.samples.append(load1())

    def stop(self) -> dict:
        self._done.set()
        self.join()
        s = self.samples or [load1()]
        return {"during_min": min(s), "during_mean": round(sum(s) / len(s), 2), "during_max": max(s)}


def run_timed(command: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[str, str, int, float]:
    """Run ``command`` under ``/usr/bin/time -v``; returns stdout, stderr, return code, peak RSS (MiB)."""
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env, cwd=cwd)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    peak = int(match.group(1)) / 1024 if match else float("nan")
    return done.stdout, done.stderr, done.returncode, peak


def result_line(stdout: str) -> dict | None:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):]) if lines else None


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def ours(args: argparse.Namespace, mode: str, k: int, dtype: str) -> dict:
    command = [
        sys.executable, "-m", STEP_MODULE, "--mode", mode, "--one-experts", str(k), "--dtype", dtype,
        "--arch", args.arch, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
        "--threads", str(args.threads),
    ]
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    load = wait_quiet(args.quiet_load, args.max_wait, args.poll)
    sampler = LoadSampler()
    sampler.start()
    started = time.time()
    stdout, stderr, code, peak = run_timed(command, env=env, cwd=str(REPO))
    load |= sampler.stop()
    row = result_line(stdout)
    if code or row is None:
        log(stderr[-3000:])
        raise SystemExit(f"adamerge configuration {mode} K={k} {dtype} failed")
    row |= {"time_v_peak_rss_mb": round(peak, 1), "load": load, "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds")}
    log(f"K={k} {mode:10s} {dtype:8s} step {row['step_s_median']:.3f} s {row['step_s_all']}  "
        f"peak RSS {row['peak_rss_mb']:.0f} MB  load {load['during_mean']}")
    return row


def fusionbench(args: argparse.Namespace, k: int) -> dict:
    command = [
        args.fb_python, args.fb_probe, "--size", "b32", "--num-experts", str(k), "--steps", str(args.fb_steps),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--reference",
        "--workdir", args.fb_workdir,
    ]
    load = wait_quiet(args.quiet_load, args.max_wait, args.poll)
    sampler = LoadSampler()
    sampler.start()
    started = time.time()
    stdout, stderr, code, peak = run_timed(command, cwd=args.fb_workdir)
    load |= sampler.stop()
    res = result_line(stdout)
    if code or res is None or res.get("error"):
        log(stderr[-3000:])
        raise SystemExit(f"FusionBench probe N={k} failed")
    row = {
        "num_experts": k,
        "command": " ".join(["/usr/bin/time", "-v", *command]),
        "result": res,
        "time_v_peak_rss_mb": round(peak, 1),
        "load": load,
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
    }
    ref = res["reference"]["median_excl_first_s"]
    log(f"K={k} fusionbench step {res['median_step_excl_first_s']} s {res['step_times_s']}  ref {ref} s  "
        f"peak RSS {res['peak_rss_mb(ru_maxrss)']:.0f} MB (time -v {peak:.0f})  load {load['during_mean']}")
    return row


def ours_table(rows: list[dict], experts: list[int], dtypes: list[str]) -> list[str]:
    """Same table ``step_time_memory.py`` prints."""
    table = ["| K | plain fwd+bwd (s) | " + " | ".join(f"adamerging τ {d} (s) | ratio | peak RSS (MB)" for d in dtypes)
             + " | plain peak RSS (MB) |"]
    table.append("|" + "---|" * (2 + 3 * len(dtypes) + 1))
    for k in experts:
        plain = next(r for r in rows if r["experts"] == k and r["mode"] == "plain")
        cells = [str(k), f"{plain['step_s_median']:.2f}"]
        for d in dtypes:
            row = next(r for r in rows if r["experts"] == k and r["mode"] == "adamerging" and r["dtype"] == d)
            cells += [f"{row['step_s_median']:.2f}", f"{row['step_s_median'] / plain['step_s_median']:.3f}",
                      f"{row['peak_rss_mb']:.0f}"]
        cells.append(f"{plain['peak_rss_mb']:.0f}")
        table.append("| " + " | ".join(cells) + " |")
    return table


def gb(mb: float) -> str:
    return f"{mb / 1024:.2f} GiB"


def markdown(args: argparse.Namespace, rows: list[dict], fb_rows: list[dict], commands: dict, date: str) -> str:
    starts = sorted(r["started"] for r in [*rows, *fb_rows])
    if starts:
        date = f"{starts[0]} to {starts[-1]} (run start times)"
    out = [
        "# Step time and peak RSS: adamerge vs plain fwd+bwd vs FusionBench",
        "",
        f"Date: {date}. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
        f"`--threads {args.threads}` (torch.set_num_threads) for every run; one fresh process per cell.",
        f"Model: ViT-B/32 image tower, random weights (open_clip `{args.arch}` for adamerge and the plain "
        "reference; HF `CLIPVisionModel` of the same shapes for FusionBench). Batch "
        f"{args.batch_size} images per task per step, K tasks per step. Layer-wise coefficients.",
        f"adamerge: median of {args.steps} steps after 1 warm-up; FusionBench: median of steps 2..{args.fb_steps} "
        "(its probe's `median_step_excl_first_s`); FusionBench's ratio is to its own plain fwd+bwd reference "
        "(HF tower, same images per step, measured in the same process after the run).",
        "Peak RSS: adamerge `ru_maxrss` of the child; FusionBench `ru_maxrss` taken before its reference "
        "phase (the `/usr/bin/time -v` figure, which also covers the reference phase, is in the JSON).",
        "",
        "| K | plain fwd+bwd (s) | adamerge fp32 τ: s (ratio) | peak RSS | adamerge bf16 τ: s (ratio) | peak RSS "
        "| FusionBench: s (ratio to its plain ref, ref s) | FB peak RSS | load during runs (1-min avg, incl. own process) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in args.experts:
        plain = next(r for r in rows if r["experts"] == k and r["mode"] == "plain")
        cells = [str(k), f"{plain['step_s_median']:.2f}"]
        loads = [plain["load"]["during_mean"]]
        for d in ("float32", "bfloat16"):
            row = next((r for r in rows if r["experts"] == k and r["mode"] == "adamerging" and r["dtype"] == d), None)
            if row is None:
                cells += ["–", "–"]
                continue
            cells += [f"{row['step_s_median']:.2f} ({row['step_s_median'] / plain['step_s_median']:.3f}×)",
                      gb(row["peak_rss_mb"])]
            loads.append(row["load"]["during_mean"])
        fb = next((r for r in fb_rows if r["num_experts"] == k), None)
        if fb is None:
            cells += ["–", "–"]
        else:
            res = fb["result"]
            step, ref = res["median_step_excl_first_s"], res["reference"]["median_excl_first_s"]
            cells += [f"{step:.2f} ({step / ref:.3f}×, ref {ref:.2f})", gb(res["peak_rss_mb(ru_maxrss)"])]
            loads.append(fb["load"]["during_mean"])
        cells.append(" / ".join(f"{x:.2f}" for x in loads))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Load: per cell, the mean 1-minute load average sampled every 5 s during the run, in the order "
            "plain / fp32 / bf16 / FusionBench; the benchmark process itself contributes ~1.0, so values near 1 "
            "mean nothing else was running. Each run started only once the load was below "
            f"{args.quiet_load} (waiting at most {args.max_wait:.0f} s).", "", "Commands:", "", "```bash"]
    out += [commands["driver"], "", "# each adamerge / plain cell is this child (what step_time_memory.py runs):",
            commands["ours_example"], "", "# each FusionBench cell:", commands["fb_example"], "```", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="adamerge/plain measured steps (after 1 warm-up)")
    parser.add_argument("--fb-steps", type=int, default=4, help="FusionBench max_steps (first one dropped)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--fb-python", default=None, help="python of FusionBench's venv (needed unless --no-fusionbench)")
    parser.add_argument("--fb-probe", default=None, help="fusionbench_adamerging_probe.py (needed unless --no-fusionbench)")
    parser.add_argument("--fb-workdir", default=None, help="the probe's working folder (default: a fresh temporary one)")
    parser.add_argument("--no-fusionbench", action="store_true")
    parser.add_argument("--quiet-load", type=float, default=1.3)
    parser.add_argument("--max-wait", type=float, default=600.0)
    parser.add_argument("--poll", type=float, default=20.0)
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite step_time_memory.md from the JSON files in --out-dir")
    parser.add_argument("--update", action="store_true",
                        help="keep the rows of other K already in --out-dir (re-measure only --experts)")
    args = parser.parse_args()
    if not (args.report_only or args.no_fusionbench):
        missing = [flag for flag, value in (("--fb-python", args.fb_python), ("--fb-probe", args.fb_probe)) if not value]
        if missing:
            parser.error(f"the FusionBench runs need {' and '.join(missing)} (or --no-fusionbench)")
        # absolute: the probe runs in --fb-workdir (a bare --fb-python name is looked up on PATH)
        args.fb_python = os.path.abspath(args.fb_python) if os.sep in args.fb_python else args.fb_python
        args.fb_probe = os.path.abspath(args.fb_probe)
        if args.fb_workdir is None:
            args.fb_workdir = tempfile.mkdtemp(prefix="fbprobe-")
        args.fb_workdir = os.path.abspath(args.fb_workdir)
        os.makedirs(args.fb_workdir, exist_ok=True)

    date = dt.datetime.now().astimezone().isoformat(timespec="minutes")
    rows: list[dict] = []
    fb_rows: list[dict] = []
    args.kept_experts = []
    args.history = []  # driver invocations that measured the rows kept in --out-dir
    if args.report_only:
        args.update, args.experts = True, []
    if args.update:
        ours_file, fb_file = args.out_dir / "step_time_memory.json", args.out_dir / "fusionbench_probe.json"
        if ours_file.exists():
            old = json.loads(ours_file.read_text())
            rows = [r for r in old["rows"] if r["experts"] not in args.experts]
            args.history = old.get("commands", [old["command"]] if "command" in old else [])
        if fb_file.exists():
            fb_rows = [r for r in json.loads(fb_file.read_text())["runs"] if r["num_experts"] not in args.experts]
        args.kept_experts = sorted({r["experts"] for r in rows})
        log(f"kept earlier rows for K = {args.kept_experts}")
    if args.report_only:
        write(args, rows, fb_rows, date)
        return
    args.history.append(" ".join([sys.executable, "-m", "benchmarks.compare_fusionbench", *sys.argv[1:]]))
    for i, k in enumerate(args.experts):
        # alternate which library goes first so that a slow drift in background load is shared
        plan = [("plain", "float32")] + [("adamerging", d) for d in args.dtypes]
        runs = [lambda m=m, d=d: rows.append(ours(args, m, k, d)) for m, d in plan]
        if not args.no_fusionbench:
            fb_run = lambda: fb_rows.append(fusionbench(args, k))  # noqa: E731
            runs = runs + [fb_run] if i % 2 == 0 else [fb_run] + runs
        for run in runs:
            run()
        write(args, rows, fb_rows, date)  # partial results survive an interruption
    print("\n".join(ours_table(rows, args.experts, args.dtypes)))


def fusionbench_paths(args: argparse.Namespace, fb_rows: list[dict]) -> tuple[str, str, str]:
    """``--fb-python``, ``--fb-probe``, ``--fb-workdir``; those not given (``--report-only``) as the last recorded run had them."""
    recorded = fb_rows[-1]["command"].split() if fb_rows else []  # /usr/bin/time -v PYTHON PROBE ... --workdir DIR
    if len(recorded) > 3 and "--workdir" in recorded[:-1]:
        known = recorded[2], recorded[3], recorded[recorded.index("--workdir") + 1]
    else:
        known = "FB_PYTHON", "FB_PROBE", "FB_WORKDIR"
    return args.fb_python or known[0], args.fb_probe or known[1], args.fb_workdir or known[2]


def write(args: argparse.Namespace, rows: list[dict], fb_rows: list[dict], date: str) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    done_k = sorted({r["experts"] for r in rows})
    all_k = sorted(set(args.experts) | set(args.kept_experts))
    ours_example = (f"{sys.executable} -m {STEP_MODULE} --mode adamerging --one-experts 8 "
                    f"--dtype float32 --arch {args.arch} --batch-size {args.batch_size} --steps {args.steps} "
                    f"--threads {args.threads}")
    fb_python, fb_probe, fb_workdir = fusionbench_paths(args, fb_rows)
    fb_example = (f"cd {fb_workdir} && /usr/bin/time -v {fb_python} {fb_probe} --size b32 --num-experts 8 "
                  f"--steps {args.fb_steps} --batch-size {args.batch_size} --threads {args.threads} --reference "
                  f"--workdir {fb_workdir}")
    commands = {"driver": "\n".join(args.history), "ours_example": ours_example, "fb_example": fb_example}
    table = ours_table(rows, [k for k in all_k if k in done_k and all(
        any(r["experts"] == k and r["mode"] == "adamerging" and r["dtype"] == d for r in rows) for d in args.dtypes)],
        args.dtypes)
    (args.out_dir / "step_time_memory.json").write_text(json.dumps(
        {"commands": args.history, "date": date, "rows": rows, "table": table}, indent=2) + "\n")
    # (with --update, "commands" lists every measuring invocation, "date" the last; each row has its "started")
    if fb_rows:
        (args.out_dir / "fusionbench_probe.json").write_text(json.dumps(
            {"date": date, "fusion_bench_version": fb_rows[0]["result"].get("fusion_bench_version"),
             "runs": fb_rows}, indent=2) + "\n")
    finished = argparse.Namespace(**{**vars(args), "experts": [k for k in all_k if any(
        r["experts"] == k and r["mode"] == "plain" for r in rows)]})
    md_file = args.out_dir / "step_time_memory.md"
    notes = ""
    if md_file.exists() and NOTES_MARKER in md_file.read_text():  # hand-written analysis survives a re-run
        notes = md_file.read_text().split(NOTES_MARKER, 1)[1]
    md_file.write_text(markdown(finished, rows, fb_rows, commands, date) + ("\n" + NOTES_MARKER + notes if notes else ""))


if __name__ == "__main__":
    main()
