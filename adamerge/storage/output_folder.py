"""The output folder of a run: checked and locked before anything is loaded, built under a
temporary name, renamed into place when complete.

- **Checked first**: an existing output is refused unless ``overwrite``; an output that is the
  current folder, one of its parents, or a folder holding the run's inputs is refused whatever
  ``overwrite`` says (replacing it would delete them); the parent folder is created and a file is
  written there before any model is loaded, so an unwritable location fails in seconds.
- **Locked**: ``PARENT/.NAME.lock`` is held (``flock``) for the whole run, so a second run on the
  same output stops at once instead of after its training. The kernel drops the lock when the
  process dies, however it dies.
- **Atomic**: the files are written to ``PARENT/.NAME.XXXX`` and renamed to ``NAME`` at the end;
  an error or a signal removes the temporary folder, and the old output (with ``overwrite``) stays
  until the new one is complete.
- **Storage errors** (a full disk, a read-only file system) while the run writes are one line.
- **Permissions** follow the user's umask, as files written by any other tool do (temporary
  files and folders are created private, 0600 / 0700, and are opened up when written).
- **Contained**: :func:`inside` refuses a relative path that would leave the folder.

Only the process of global rank 0 locks and renames; the other ranks of a distributed run write
nothing.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from adamerge.errors import AdamergeError, OutputExistsError

logger = logging.getLogger(__name__)

#: ``errno`` values that mean "this location cannot take the files", reported in one line.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def umask_mode(mode: int) -> int:
    """``mode`` with the process's umask applied (what ``open`` / ``mkdir`` would create)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def is_global_zero() -> bool:
    """Whether this process is rank 0 of its run (a distributed launcher sets ``RANK`` /
    ``LOCAL_RANK`` / ``NODE_RANK`` for the others)."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def inside(root: Path, *parts: str) -> Path:
    """``root / parts`` after checking that it stays inside ``root`` (no ``..``, no absolute part).

    Raises:
        AdamergeError: the path would leave ``root``.
    """
    path = Path(root).joinpath(*parts)
    base = Path(os.path.abspath(root))
    target = Path(os.path.abspath(path))
    if target == base or base not in target.parents:
        raise AdamergeError(f"refusing to write {'/'.join(parts)!r}: it is not a path inside the output folder {root}")
    return path


def storage_error_message(error: OSError, where: Path) -> str | None:
    """One line for an ``OSError`` caused by the storage (full disk, read-only, permissions), or
    ``None`` for any other error."""
    reason = STORAGE_ERRNOS.get(error.errno or -1)
    if reason is None:
        return None
    target = error.filename or where
    free = ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(Path(where).parent if not Path(where).exists() else where).free:,} bytes free)"
    return f"cannot write {target}: {reason}{free}; nothing was written to the output"


@contextlib.contextmanager
def storage_errors(where: Path) -> Iterator[None]:
    """Turn a full disk, a read-only file system or a permission error into one
    :class:`AdamergeError` line. torch's own writer reports a full disk as a bare
    ``RuntimeError`` (``iostream error``, ``file write failed``): the free space then tells."""
    try:
        yield
    except OSError as error:
        message = storage_error_message(error, where)
        if message is None:
            raise
        raise AdamergeError(message) from None
    except RuntimeError as error:
        text = str(error).strip()
        free = shutil.disk_usage(Path(where).parent).free
        if free > 64 * 2**20 or not ("write" in text.lower() or "iostream" in text.lower()):
            raise
        raise AdamergeError(
            f"cannot write {where}: the device holding it is full or failing ({free:,} bytes free; "
            f"torch said: {text.splitlines()[0]}); nothing was written to the output"
        ) from None


class OutputFolder:
    """The output folder of one run (see the module docstring).

    Use it as a context manager around the whole run: entering checks and locks, leaving unlocks;
    :meth:`staging` yields the temporary folder to write into.

    Args:
        output: the folder to write.
        overwrite: replace an existing folder.
        inputs: paths the run reads (base, experts, data folders): the output may not hold them.
        option: the option that named the output, for messages.
    """

    def __init__(self, output: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (), option: str = "--output") -> None:
        self.output = Path(os.path.abspath(output))
        self.overwrite = overwrite
        self.inputs = [Path(os.path.abspath(p)) for p in inputs]
        self.option = option
        self.writer = is_global_zero()
        self._lock: int | None = None

    @property
    def parent(self) -> Path:
        return self.output.parent

    @property
    def lock_path(self) -> Path:
        return self.parent / f".{self.output.name}.lock"

    def check(self) -> None:
        """Refuse an output that exists (without ``overwrite``), is not a folder, or holds the
        current folder or an input."""
        if self.output.parent == self.output:
            raise AdamergeError(f"{self.option} {self.output}: the root folder cannot be an output")
        cwd = Path(os.path.abspath(os.getcwd()))
        if self.output == cwd or self.output in cwd.parents:
            raise AdamergeError(
                f"{self.option} {self.output}: this is the current folder or one of its parents; "
                "name a new folder (replacing it would delete what it holds)"
            )
        for path in self.inputs:
            if self.output == path or self.output in path.parents:
                raise AdamergeError(f"{self.option} {self.output} holds the input {path}; name another folder")
        if self.output.exists() and not self.output.is_dir():
            raise OutputExistsError(f"{self.option} {self.output} exists and is not a folder")
        if self.output.exists() and not self.overwrite:
            raise OutputExistsError(f"output folder {self.output} exists; pass --overwrite to replace it")

    def __enter__(self) -> OutputFolder:
        self.check()
        if self.writer:
            self._claim()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _claim(self) -> None:
        import fcntl

        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            handle = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, umask_mode(0o666))
        except OSError as error:
            message = storage_error_message(error, self.parent) or f"cannot create {error.filename or self.parent}: {error.strerror}"
            raise AdamergeError(f"{self.option} {self.output}: {message}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(handle)
            raise AdamergeError(
                f"{self.option} {self.output} is being written by another adamerge run (pid {holder}, lock "
                f"{self.lock_path}); wait for it or choose another folder"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
        self._lock = handle

    def release(self) -> None:
        """Drop the lock (and its file)."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self._lock)
            self._lock = None

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A temporary folder beside the output; renamed to it when the block ends without error.

        On an exception (or a signal turned into one) the temporary folder is removed and the
        output is left as it was; storage errors on the way (the export's files, the resume
        checkpoints written meanwhile) become one line (:func:`storage_errors`). Ranks other than
        0 get a temporary folder that is always removed.
        """
        self.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.output.name}.", dir=self.parent))
        os.chmod(staging, umask_mode(0o777))
        try:
            with storage_errors(self.output):
                yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not self.writer:
            shutil.rmtree(staging, ignore_errors=True)
            return
        try:
            self._replace(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("wrote %s", self.output)

    def _replace(self, staging: Path) -> None:
        if not self.output.exists():
            os.replace(staging, self.output)
            return
        self.check()
        retired = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
        os.replace(self.output, retired)
        os.replace(staging, self.output)
        shutil.rmtree(retired, ignore_errors=True)
