"""Measured ``adamerge`` processes for the benchmark scripts, run side by side on a few CPU slots.

Every table row is one fresh ``adamerge`` process, so its wall time and peak RSS are its own
(:func:`run`). :func:`run_all` runs a list of them on ``workers`` threads, longest first as the
caller orders them, and hands each result back as soon as it is done (so that its export can be
deleted at once).

CPU slots: when ``$ADAMERGE_BENCH_SLOTS`` names a folder of ``slot-*`` files (made by
``suite.py``), each measured process first takes an exclusive lock on one of them. Several scripts
running at once then never start more processes than there are slots, which keeps one
single-threaded process per core and the rows' wall times comparable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, TypeVar

SLOTS_ENV = "ADAMERGE_BENCH_SLOTS"
Key = TypeVar("Key")

# Peak RSS of this process image: VmHWM (Linux). ru_maxrss is not: Linux carries it over fork and
# exec, so every child reported its parent's peak (1590 MB for every row after an in-process build).
MEASURE = """
import json, resource, sys, time
from adamerge.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
try:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MEASURE " + json.dumps({"code": code, "wall_s": time.perf_counter() - start, "peak_rss_mb": hwm / 1024}))
"""


def make_slots(folder: Path, count: int) -> Path:
    """Create ``count`` slot files in ``folder`` (for ``$ADAMERGE_BENCH_SLOTS``); returns ``folder``."""
    if count < 1:
        raise SystemExit(f"--slots {count}: expected at least 1")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("slot-*"), *folder.glob("queue/*")]:
        stale.unlink()
    for index in range(count):
        (folder / f"slot-{index}").touch()
    return folder


@contextlib.contextmanager
def cpu_slot(poll_s: float = 0.2) -> Iterator[None]:
    """Hold one of the CPU slots of ``$ADAMERGE_BENCH_SLOTS`` for the duration (no-op when unset).

    Waiters are served first come, first served (a ticket file each in ``queue/``): a script whose
    row just ended cannot take the freed slot ahead of another script's row that was waiting.
    """
    folder = os.environ.get(SLOTS_ENV)
    if not folder:
        yield
        return
    paths = sorted(Path(folder).glob("slot-*"))
    if not paths:
        raise SystemExit(f"${SLOTS_ENV}={folder}: no slot-* files there")
    queue = Path(folder) / "queue"
    queue.mkdir(exist_ok=True)
    ticket = queue / f"{time.time_ns():020d}-{os.getpid()}-{threading.get_ident()}"
    ticket.touch()
    handle = None
    try:
        while handle is None:
            if _first_in_line(queue, ticket):
                handle = _try_any_slot(paths)
            if handle is None:
                time.sleep(poll_s)
    finally:
        ticket.unlink(missing_ok=True)
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _first_in_line(queue: Path, ticket: Path) -> bool:
    """Whether ``ticket`` is the oldest ticket of a live process (dead waiters' tickets are dropped)."""
    for other in sorted(queue.iterdir()):
        if other == ticket:
            return True
        try:
            os.kill(int(other.name.split("-")[1]), 0)
        except ProcessLookupError:
            other.unlink(missing_ok=True)  # its process ended without cleaning up
            continue
        except (ValueError, IndexError, PermissionError):
            pass
        return False
    return False


def _try_any_slot(paths: Sequence[Path]) -> IO | None:
    """An open, exclusively locked slot file, or ``None`` if every slot is taken."""
    for path in paths:
        candidate = open(path, "w")  # noqa: SIM115  (held until the slot is released)
        try:
            fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            candidate.close()
            continue
        return candidate
    return None


def run(argv: list[str]) -> dict:
    """``adamerge ARGV`` in a fresh process (inside a CPU slot): ``{"code", "wall_s", "peak_rss_mb"}``.

    Exits with the child's output tail if it fails.
    """
    with cpu_slot():
        done = subprocess.run([sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEASURE ")]
    if done.returncode or not lines or json.loads(lines[-1][8:])["code"] != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
        raise SystemExit(f"failed: adamerge {' '.join(argv[:4])} ...")
    return json.loads(lines[-1][8:])


def run_all(
    jobs: Sequence[tuple[Key, list[str]]],
    workers: int,
    on_done: Callable[[Key, dict], None],
    runner: Callable[[list[str]], dict] = run,
) -> None:
    """Run every ``(key, argv)`` with ``runner`` (:func:`run`) on ``workers`` threads, in the given order.

    ``on_done(key, measured)`` is called in this thread as soon as each job finishes. The first
    failure cancels the jobs not yet started, waits for those running, and exits.
    """
    if workers < 1:
        raise SystemExit(f"--workers {workers}: expected at least 1")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(runner, argv): key for key, argv in jobs}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                key = pending.pop(future)
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                on_done(key, future.result())
