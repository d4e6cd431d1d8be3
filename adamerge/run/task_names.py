"""Task names: the ``NAME`` of ``--experts NAME=REF``.

A task name becomes a file or folder name of the output (``heads/<task>.pt``, ``tasks/<task>/``)
and a folder name of the inputs (``CALIB/<task>/``, ``EVAL/<task>/``), so it must name one plain
entry of a folder on every common file system: no separators, no ``.`` / ``..``, nothing hidden,
and two names must not differ only by case (macOS and Windows file systems would merge them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from adamerge.errors import AdamergeError

MAX_TASK_NAME_LENGTH = 64
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
TASK_NAME_RULE = f"1-{MAX_TASK_NAME_LENGTH} characters from A-Z a-z 0-9 _ . + -, starting with a letter or digit"


def check_task_name(name: str) -> None:
    """Refuse a name that is not a safe single path component.

    Raises:
        AdamergeError: the name is empty, too long, or holds a character outside the rule.
    """
    if not isinstance(name, str) or not name:
        raise AdamergeError(f"--experts: task name {name!r} is empty; expected {TASK_NAME_RULE}")
    if len(name) > MAX_TASK_NAME_LENGTH:
        raise AdamergeError(f"--experts: task name {name[:20]!r}... has {len(name)} characters; expected {TASK_NAME_RULE}")
    if not TASK_NAME_PATTERN.fullmatch(name):
        raise AdamergeError(f"--experts: task name {name!r} is not a plain file name; expected {TASK_NAME_RULE}")


def check_task_names(names: Iterable[str]) -> None:
    """Check every name and refuse repeats, also those that differ only by case."""
    seen: dict[str, str] = {}
    for name in names:
        check_task_name(name)
        folded = name.casefold()
        if folded in seen:
            same = "is given twice" if seen[folded] == name else f"and {seen[folded]!r} differ only by case"
            raise AdamergeError(f"--experts: task name {name!r} {same} (each task needs its own file names)")
        seen[folded] = name
