"""Exceptions raised for bad user input.

Every error adamerge raises for a user mistake is an :class:`AdamergeError`; its message names
the file, tensor or argument at fault and what was expected, so the command line can print it
without a traceback.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable


class AdamergeError(ValueError):
    """Base class of adamerge's user-facing errors."""


class CheckpointError(AdamergeError):
    """A weights file is missing, unreadable, not a state dict, or holds NaN/Inf."""


class IncompatibleExpertError(AdamergeError):
    """An expert's tensor names or shapes differ from the base model's."""


class ArchitectureError(AdamergeError):
    """An architecture spec cannot be resolved to a model."""


class DataError(AdamergeError):
    """A data folder is missing, empty, or holds nothing usable."""


class OutputExistsError(AdamergeError):
    """The output folder exists and overwriting was not asked for."""


class Terminated(BaseException):
    """The process received a termination signal (SIGTERM, SIGHUP); raised from the signal handler
    so that every ``finally`` and cleanup runs (a ``BaseException``: not caught as an error)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name}")


def check_options(owner: str, options: Iterable[str], valid: Iterable[str], given_as: str = "--options") -> None:
    """Refuse option names that are not among ``valid``, in one line listing the valid ones.

    Args:
        owner: what the options configure (a method's name).
        options: the names given.
        valid: the names ``owner`` takes.
        given_as: how the user gave them (``--options``, or keyword arguments).
    """
    valid = sorted(valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise AdamergeError(f"{given_as} {unknown}: not options of {owner!r}; valid: {valid}")
