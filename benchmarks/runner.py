"""Measured ``adamerge`` processes for the benchmark scripts, run side by side on a few CPU slots.

Every table row is one fresh ``adamerge`` process, so its wall time and peak RSS are its own
(:func:`run`; the processes fork from a server that has done the imports every row needs).
:func:`run_all` runs a list of them on ``workers`` threads, longest first as the caller orders
them, and hands each result back as soon as it is done (so that its export can be deleted at
once).

CPU slots: when ``$ADAMERGE_BENCH_SLOTS`` names a folder of ``slot-*`` files (made by
``suite.py``), each measured process first takes an exclusive lock on one of them. Several scripts
running at once then never start more processes than there are slots, which keeps one
single-threaded process per core and the rows' wall times comparable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import multiprocessing.context
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, TypeVar

SLOTS_ENV = "ADAMERGE_BENCH_SLOTS"
Key = TypeVar("Key")

# What every row imports before its clock starts (the CLI, torch, Lightning: about 9 s on this
# machine). A fork server imports it once; each row is a fresh process forked from it.
PRELOAD = ["adamerge.cli", "adamerge.run.module"]

# A row, run by ``exec`` in the forked process (code, not a function of this file, so that the fork
# server need not import this script under any name): ``adamerge ARGV``, its output to ``LOG``,
# then one ``MEASURE`` line. Peak RSS is VmHWM of this process image (Linux); ``ru_maxrss`` is
# not: Linux carries it over fork and exec, so every row reported its parent's peak (1590 MB
# after an in-process build).
MEASURE = """
import json, os, resource, sys, time, traceback
import numpy as np


def map_the_servers_resident_file_pages():
    # A fork copies the page tables of anonymous memory but not of shared-library and other file
    # mappings: those pages would fault in only when touched, so the row would start about 330 MB
    # below a freshly started process that made the same imports (492 vs 820 MB for the text
    # rows). Map every file page the server has resident, and the row starts at the server's size.
    server, page = os.getppid(), os.sysconf("SC_PAGE_SIZE")
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open(f"/proc/{server}/maps") as maps, open(f"/proc/{server}/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or not fields[5].startswith("/") or not fields[1].startswith("r"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // page * 8)
            present = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64) >> np.uint64(63)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], present.astype(np.int8), [0]])))  # run starts, ends
            for first, stop in zip(edges[::2], edges[1::2]):
                libc.madvise(start + int(first) * page, int(stop - first) * page, 22)  # MADV_POPULATE_READ


try:
    map_the_servers_resident_file_pages()
except OSError:
    pass  # not Linux 5.14+ or no /proc: peak RSS then leaves out the libraries' untouched pages
target = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
sys.stdout.flush(); sys.stderr.flush()
os.dup2(target, 1); os.dup2(target, 2)
from adamerge.cli import main  # imported by the server: no cost here
start = time.perf_counter()
try:
    code = main(ARGV)
except SystemExit as exit_:  # argparse's and the CLI's own errors
    code = exit_.code if isinstance(exit_.code, int) else 1
    if exit_.code is not None and not isinstance(exit_.code, int):
        print(exit_.code, file=sys.stderr)
except BaseException:
    traceback.print_exc()
    code = 1
wall_s = time.perf_counter() - start
try:
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("MEASURE " + json.dumps({"code": code, "wall_s": wall_s, "peak_rss_mb": hwm / 1024}), flush=True)
sys.stderr.flush()
"""


def write_results(out: Path, payload: dict, markdown: str) -> None:
    """``payload`` as JSON to ``out`` and ``markdown`` beside it (``.md``), each written to a
    temporary file and then renamed, so that neither is ever left half-written (adamerge.run.export's
    writers; imported here, so that scripts that only run rows do not import torch)."""
    from adamerge.storage.files import write_json, write_text

    write_json(out, payload)
    write_text(out.with_suffix(".md"), markdown)


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

    The process is forked from a server that has imported :data:`PRELOAD`, so a row does not pay
    the imports again; its clock, as before, starts after them. Its peak RSS is its own: a forked
    process's high-water mark starts at its size at the fork, not at the server's or this script's
    peak, and the row first maps the file pages the server has resident, so it starts at the size
    of a process started from scratch that made the same imports. Exits with the row's output
    tail if it fails.
    """
    with cpu_slot(), tempfile.TemporaryDirectory(prefix="adamerge-row-") as folder:
        log = Path(folder) / "output.log"
        row = {"ARGV": list(argv), "LOG": str(log)}
        process = fork_server().Process(target=exec, args=(MEASURE, row))
        process.start()
        process.join()
        output = log.read_text(errors="replace") if log.exists() else ""
    lines = [line for line in output.splitlines() if line.startswith("MEASURE ")]
    code = json.loads(lines[-1][8:])["code"] if lines else None
    if process.exitcode or code != 0:
        sys.stderr.write(output[-6000:])
        reason = f"exit code {code}" if code is not None else f"measuring process exit code {process.exitcode}"
        raise SystemExit(f"failed: adamerge {' '.join(argv[:4])} ... ({reason})")
    return json.loads(lines[-1][8:])


def fork_server() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose processes fork from one server that imported :data:`PRELOAD`.

    The server only imports, so no OpenMP or other thread pool exists when it forks (forking this
    script instead could copy a pool the expert build started, and hang). It starts on first use
    with this process's environment.
    """
    context = multiprocessing.get_context("forkserver")  # one per process; the server starts on its first Process
    context.set_forkserver_preload(PRELOAD)  # read when the server starts, so setting it again is a no-op
    return context


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
