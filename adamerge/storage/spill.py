"""Rows of one width appended in order, in memory up to a byte budget and on disk past it.

Expert Merging on a causal LM caches every expert's next-token logits at every scored token of its
calibration prompts: ``tokens × vocabulary`` floats per task, gigabytes for a real vocabulary.
:class:`SpillingRows` keeps them in memory while they fit a budget; past it, it moves what it holds
to a temporary file and appends there, and :meth:`SpillingRows.finish` reads the file back
memory-mapped, so the operating system pages rows in as batches index them instead of the process
holding them all. The file is unlinked as soon as it is created (on Linux), so nothing is left
behind whatever stops the run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import IO

import torch

logger = logging.getLogger(__name__)

_PROC_FD = Path("/proc/self/fd")


class SpillingRows:
    """Append ``(n, width)`` float32 rows; :meth:`finish` returns them all as one ``(N, width)`` tensor.

    Args:
        budget_bytes: bytes kept in memory; the rows that would go past it (and all after them)
            go to a temporary file.
        directory: where the temporary file is created (default: the system's temporary folder).
        name: what the rows are, for the log line when they spill.
    """

    def __init__(self, budget_bytes: int, directory: str | Path | None = None, name: str = "rows") -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self.directory = directory
        self.name = name
        self.rows = 0
        self.width: int | None = None
        self._chunks: list[torch.Tensor] = []
        self._file: IO[bytes] | None = None
        self._path: str | None = None

    @property
    def on_disk(self) -> bool:
        """Whether the rows went to the temporary file."""
        return self._file is not None

    @property
    def nbytes(self) -> int:
        return self.rows * (self.width or 0) * 4

    def append(self, rows: torch.Tensor) -> int:
        """Append ``rows`` ``(n, width)``; returns the index of its first row."""
        rows = rows.detach().to(device="cpu", dtype=torch.float32).contiguous()  # (n, width)
        if rows.dim() != 2 or (self.width is not None and rows.shape[1] != self.width):
            raise ValueError(f"{self.name}: rows of shape {tuple(rows.shape)}, expected (n, {self.width})")
        self.width = rows.shape[1]
        start = self.rows
        if not self.on_disk and self.nbytes + rows.numel() * 4 > self.budget_bytes:
            self._open()
        if self.on_disk:
            self._file.write(memoryview(rows.numpy()).cast("B"))
        else:
            self._chunks.append(rows)
        self.rows += rows.shape[0]
        return start

    def finish(self) -> torch.Tensor:
        """All rows ``(N, width)``: in memory, or the temporary file memory-mapped (read-only use)."""
        width = self.width or 0
        if not self.on_disk:
            return torch.cat(self._chunks) if self._chunks else torch.zeros(0, width)
        self._file.flush()
        path = str(_PROC_FD / str(self._file.fileno())) if self._path is None else self._path
        rows = torch.from_file(path, shared=False, size=self.rows * width, dtype=torch.float32).view(self.rows, width)
        self._file.close()
        if self._path is not None:
            os.unlink(self._path)
        return rows

    def _open(self) -> None:
        if _PROC_FD.is_dir():  # unlinked at once: the mapping reads it through /proc/self/fd
            self._file = tempfile.TemporaryFile(prefix="adamerge-", dir=self.directory)
        else:
            handle, self._path = tempfile.mkstemp(prefix="adamerge-", dir=self.directory)
            self._file = os.fdopen(handle, "w+b")
        logger.info(
            "%s past %.2f GiB: kept in a temporary file and read back memory-mapped",
            self.name, self.budget_bytes / 2**30,
        )  # fmt: skip
        for chunk in self._chunks:
            self._file.write(memoryview(chunk.numpy()).cast("B"))
        self._chunks.clear()
