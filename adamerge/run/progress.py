"""What a run shows on the console: one line per stage with its elapsed time, a live bar while the
coefficients train, and none of the third-party tips and warnings that say nothing about the run.

:class:`Stages` times the stages of a run (``with stages.stage("fitting", total=500) as step:``)
and logs ``fitting: 500 steps in 61.2 s`` (``writing: 0.4 s``) when each ends; the fitting stage shows a live tqdm bar
(with the loss) on an interactive terminal, through :class:`StepBar`, in place of Lightning's
per-epoch bars. :func:`quiet_third_party` silences Lightning's advertisement tip, its notes on
the logging interval, eval-mode modules and data-loader workers, which do not apply to a merge,
and torch's ``LeafSpec`` deprecation, which Lightning triggers and only Lightning can fix.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L

logger = logging.getLogger(__name__)

#: warnings raised by Lightning or torch that concern neither the user's data nor the merge
_IGNORED_WARNINGS = (
    ".*does not have many workers.*",  # the calibration data is small and read once per step
    ".*GPU available but not used.*",  # --accelerator is the user's choice
    ".*module\\(s\\) in eval mode.*",  # the frozen base is in eval mode on purpose
    ".*is smaller than the logging interval.*",  # adamerge logs per step, not per epoch
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",  # inside Lightning's own pytree helper
)
_IGNORED_LOG_PREFIXES = (
    "💡 Tip:",
    "`weights_only` was not set",
    "`Trainer.fit` stopped",
    "GPU available:",
    "TPU available:",
    "HPU available:",
)


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_IGNORED_LOG_PREFIXES)


_NOISE_FILTER = _DropLightningNoise()


def quiet_third_party() -> None:
    """Silence the third-party warnings and log lines listed above (idempotent)."""
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in (
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        target = logging.getLogger(name)
        if _NOISE_FILTER not in target.filters:
            target.addFilter(_NOISE_FILTER)
    for handler in logging.getLogger().handlers + logging.getLogger("lightning.pytorch").handlers:
        if _NOISE_FILTER not in handler.filters:
            handler.addFilter(_NOISE_FILTER)


class Stages:
    """Times the stages of one run and logs each when it ends.

    Args:
        live: show a live bar for stages with a ``total`` (only on an interactive terminal).
    """

    def __init__(self, live: bool = True) -> None:
        self.live = live and sys.stderr.isatty()
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "steps") -> Iterator[StepBar | None]:
        """Time the block as stage ``name``; yields a :class:`StepBar` when ``total`` is given."""
        began = time.perf_counter()
        bar = StepBar(name, total, unit, self.live) if total is not None else None
        try:
            yield bar
        finally:
            if bar is not None:
                bar.close()
            elapsed = time.perf_counter() - began
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        done = f"{bar.count} {unit} in " if bar is not None else ""
        logger.info("%s: %s%.1f s", name, done, elapsed)

    def summary(self) -> str:
        """``loading 3.1 s · fitting 61.2 s · ... · total 70.0 s``."""
        total = time.perf_counter() - self.started
        parts = [f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items()]
        return " · ".join(parts + [f"total {total:.1f} s"])


class StepBar(L.Callback):
    """A Lightning callback advancing one live bar per training step (loss in the postfix).

    Without an interactive terminal (a log file, a pipe) a line is logged every tenth of the steps
    instead (``fitting: step 50/500, loss 0.8312, 61 s``), so that a long stage is never silent.
    """

    def __init__(self, name: str, total: int | None, unit: str, live: bool) -> None:
        self.name = name
        self.total = total
        self.count = 0
        self.every = max(1, (total or 0) // 10)
        self.started = time.perf_counter()
        self._bar: Any = None
        if live:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=name, unit=unit.rstrip("s") or unit, dynamic_ncols=True, leave=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count = trainer.global_step  # a resumed run starts where it stopped
        if self._bar is not None:
            self._bar.n = self.count
            self._bar.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.count = trainer.global_step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self._bar is not None:
            self._bar.n = self.count
            if loss is not None:
                self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            self._bar.refresh()
        elif self.total and self.count % self.every == 0 and self.count < self.total:
            logger.info(
                "%s: step %d/%d%s, %.0f s",
                self.name,
                self.count,
                self.total,
                f", loss {float(loss):.4f}" if loss is not None else "",
                time.perf_counter() - self.started,
            )

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` more (work outside a Lightning loop, e.g. experts built one by one)."""
        self.count += steps
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
