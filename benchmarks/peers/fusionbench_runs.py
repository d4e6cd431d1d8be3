"""What the FusionBench checks share on adamerge's side: their command line, running a check
file's FusionBench side in FusionBench's own venv, and the largest difference of two merges."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]  # on FusionBench's side too, for this module's check_main
DEFAULT_FB_PYTHON = "/tmp/fbvenv/bin/python"


def fusionbench_outputs(script: str, fb_python: str, cases: dict, workdir: Path | None = None) -> dict:
    """``script --fusionbench-side IN OUT`` run by FusionBench's ``fb_python`` on ``cases``
    (saved to ``IN``); what it saved to ``OUT``."""
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        inputs, outputs = Path(folder) / "inputs.pt", Path(folder) / "outputs.pt"
        torch.save(cases, inputs)
        completed = subprocess.run(
            [fb_python, str(Path(script).resolve()), "--fusionbench-side", str(inputs), str(outputs)],
            capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(REPO)},
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


def check_main(
    argv: list[str] | None,
    doc: str,
    fusionbench_side: Callable[[Path, Path], None],
    compare: Callable[[str], dict],
    describe: Callable[[dict], Iterable[str]],
) -> int:
    """A check file's command line: ``--fusionbench-side IN OUT`` (hidden) runs its FusionBench
    side; otherwise ``compare(--fb-python)``, its report described line by line, then one
    ``RESULT <json>`` line."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--fb-python", default=DEFAULT_FB_PYTHON, help="python of FusionBench 0.2.33's venv")
    parser.add_argument("--fusionbench-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fusionbench_side:
        fusionbench_side(Path(args.fusionbench_side[0]), Path(args.fusionbench_side[1]))
        return 0
    report = compare(args.fb_python)
    for line in describe(report):
        print(line)
    print("RESULT " + json.dumps(report, ensure_ascii=False))
    return 0
