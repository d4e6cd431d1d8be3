"""Resuming an interrupted ``adamerge fit``: periodic λ-only checkpoints beside the output.

While a fit runs, ``PARENT/.NAME.resume/`` (``NAME`` the output folder) holds

- ``settings.yaml``: the settings that decide the result (not the output, evaluation, progress
  or worker options);
- ``stage-1.ckpt`` (and ``stage-2.ckpt`` for two-stage methods): a Lightning checkpoint of λ,
  the optimiser and schedule, the loop counters and the data loaders' positions, rewritten
  atomically every ``checkpoint_every`` steps and at the end of each stage. The weights are never
  in it (they come from the expert files), so it is a few KB.

``adamerge fit ... --resume`` with the same settings continues from there and ends with the same
λ as a run that was never interrupted (the loaders replay their shuffled order, see
:mod:`adamerge.data.resumable_loader`). A run that completes removes the folder; a run stopped by an
error in its inputs removes it too; a signal or a crash leaves it, and the error line says so.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from adamerge.errors import AdamergeError
from adamerge.storage.files import write_yaml
from adamerge.storage.output_folder import umask_mode

logger = logging.getLogger(__name__)

#: Settings that may differ between the interrupted run and its resumption.
RESUME_FREE_SETTINGS = frozenset(
    {"output", "overwrite", "resume", "checkpoint_every", "progress_bar", "num_workers", "eval", "eval_experts", "eval_init"}
)
SETTINGS_FILE = "settings.yaml"


def resume_dir(output: str | Path) -> Path:
    """Where the resume state of a fit writing ``output`` lives."""
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.resume"


def last_checkpoint_step(output: str | Path) -> tuple[Path, int] | None:
    """The newest resume checkpoint of ``output`` and its global step, if there is one."""
    folder = resume_dir(output)
    found = sorted(folder.glob("stage-*.ckpt"))
    if not found:
        return None
    try:
        step = int(torch.load(found[-1], map_location="cpu", weights_only=False).get("global_step", 0))
    except Exception:  # a checkpoint cut short by a kill: reported as unreadable at resume
        return None
    return found[-1], step


class ResumeState:
    """The resume folder of one fit.

    Args:
        output: the fit's output folder.
        settings: the fit's settings as plain data (``dataclasses.asdict`` + YAML-safe values).
        resume: continue from the folder (it must exist and hold the same settings).
        checkpoint_every: steps between checkpoints (``0``: only at the end of each stage).
        writer: this process writes and removes the folder (global rank 0); the other ranks only
            take part in Lightning's collective checkpoint saving.
    """

    def __init__(self, output: str | Path, settings: Mapping[str, Any], resume: bool, checkpoint_every: int, writer: bool = True) -> None:
        self.folder = resume_dir(output)
        self.settings = {k: v for k, v in settings.items() if k not in RESUME_FREE_SETTINGS}
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.writer = writer

    def start(self) -> None:
        """Check the folder against the settings (``resume``) or start a new one."""
        if not self.writer:
            return
        if self.resume:
            saved_file = self.folder / SETTINGS_FILE
            if not saved_file.is_file():
                raise AdamergeError(f"--resume: no interrupted fit to continue ({saved_file} does not exist); run without --resume")
            saved = yaml.safe_load(saved_file.read_text()) or {}
            changed = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
            if changed:
                first = changed[0]
                raise AdamergeError(
                    f"--resume: the interrupted fit had other settings ({', '.join(changed)}; e.g. {first}: "
                    f"{saved.get(first)!r} then, {self.settings.get(first)!r} now); run with the same options or without --resume"
                )
            logger.info("resuming the interrupted fit from %s", self.folder)
            return
        if self.folder.exists():
            logger.warning("discarding the resume state of an earlier, interrupted fit (%s); pass --resume to continue one", self.folder)
            self.discard()

    def _prepare(self) -> None:
        """Create the folder with its settings (at the first checkpoint: a run stopped before it
        leaves nothing behind)."""
        if not (self.folder / SETTINGS_FILE).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            write_yaml(self.folder / SETTINGS_FILE, self.settings)

    def checkpoint(self, stage: int) -> Path:
        return self.folder / f"stage-{stage}.ckpt"

    def resume_from(self, stage: int) -> Path | None:
        """The checkpoint to continue stage ``stage`` from (``None``: start it afresh)."""
        path = self.checkpoint(stage)
        if not (self.resume and path.is_file()):
            return None
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise AdamergeError(f"--resume: checkpoint {path} is unreadable ({type(error).__name__}); run without --resume") from None
        return path

    def callback(self, stage: int) -> Any:
        """A Lightning callback writing stage ``stage``'s checkpoint every ``checkpoint_every`` steps."""
        return _PeriodicCheckpoint(self, stage)

    def finish_stage(self, trainer: Any, stage: int) -> None:
        """Write the stage's final checkpoint (a resumed run then skips the finished stage)."""
        self.save(trainer, stage)

    def save(self, trainer: Any, stage: int) -> None:
        """Write stage ``stage``'s checkpoint now (every rank calls it; rank 0 writes)."""
        if self.writer:
            self._prepare()
        save_checkpoint(trainer, self.checkpoint(stage))

    def discard(self) -> None:
        """Remove the folder (a completed fit, or inputs that a resume could not mend)."""
        if self.writer:
            shutil.rmtree(self.folder, ignore_errors=True)


def save_checkpoint(trainer: Any, path: Path) -> None:
    """``trainer.save_checkpoint`` to a temporary file, then rename: a kill mid-write leaves the
    previous checkpoint whole. Every rank calls it; rank 0 writes."""
    tmp = path.with_name(f".{path.name}.tmp")
    trainer.save_checkpoint(tmp)
    if trainer.is_global_zero:
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, path)


class _PeriodicCheckpoint(L.Callback):
    """Saves a resume checkpoint after every ``every``-th training step."""

    def __init__(self, state: ResumeState, stage: int) -> None:
        self.state = state
        self.stage = stage

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        every = self.state.checkpoint_every
        if every > 0 and trainer.global_step % every == 0:
            self.state.save(trainer, self.stage)
