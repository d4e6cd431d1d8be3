"""Atomic text files: written beside their final path, then renamed (never half-written)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from adamerge.storage.output_folder import umask_mode

__all__ = ["write_json", "write_text", "write_yaml"]


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, payload: Any) -> None:
    """Write YAML atomically (temporary file, then rename)."""
    write_text(path, yaml.safe_dump(payload, sort_keys=False))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (a temporary file beside ``path``, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        tmp = Path(handle.name)
        try:
            handle.write(text)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.chmod(tmp, umask_mode(0o666))  # temporary files are created 0600
    os.replace(tmp, path)
