"""What the FusionBench checks share on adamerge's side: running a check file's FusionBench side
in FusionBench's own venv, and the largest difference of two merges."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch


def fusionbench_outputs(script: str, fb_python: str, cases: dict, workdir: Path | None = None) -> dict:
    """``script --fusionbench-side IN OUT`` run by FusionBench's ``fb_python`` on ``cases``
    (saved to ``IN``); what it saved to ``OUT``."""
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        inputs, outputs = Path(folder) / "inputs.pt", Path(folder) / "outputs.pt"
        torch.save(cases, inputs)
        completed = subprocess.run(
            [fb_python, str(Path(script).resolve()), "--fusionbench-side", str(inputs), str(outputs)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if completed.returncode != 0:
            raise RuntimeError(f"FusionBench side failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
        return torch.load(outputs, weights_only=True)


def max_difference(ours: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], names: Iterable[str]) -> tuple[float, float]:
    """``(max |ours − reference|, that / max |reference|)`` over the tensors ``names``, in float64."""
    names = list(names)
    diff = max(float((ours[n].double() - reference[n].double()).abs().max()) for n in names)
    size = max(float(reference[n].double().abs().max()) for n in names)
    return diff, diff / size
