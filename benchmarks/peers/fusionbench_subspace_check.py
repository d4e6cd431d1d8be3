#!/usr/bin/env python
"""TSV-M, Iso-C and Iso-CTS: adamerge against FusionBench 0.2.33 on identical random task vectors.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.fusionbench_subspace_check --fb-python /tmp/fbvenv/bin/python

FusionBench's venv (``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install fusion-bench==0.2.33
-c .ci/constraints.txt``) runs this same file with ``--fusionbench-side IN OUT``: that side imports
torch and FusionBench only, reads the task vectors from ``IN``, runs FusionBench's own functions
(``TSVM_utils.compute_and_sum_svd_mem_reduction``, ``iso_utils.iso_c``, ``iso_utils.iso_cts``, each
times its default scale 1.0) and writes the merged task vectors to ``OUT``. This side builds the
seeded task vectors (tall, wide, square and thin matrices, a bias and a convolution kernel, for a
few K), runs adamerge's registered methods (``tsv-m``, ``iso-c``, ``iso-cts`` at their defaults,
whose scales are also 1.0) on them, and prints the largest absolute difference per method, in
float64 (to see definitional differences) and float32 (to see rounding).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

SHAPES = {  # tensor name: shape of one task's vector
    "tall.weight": (64, 48),
    "wide.weight": (48, 64),
    "square.weight": (32, 32),
    "thin.weight": (40, 7),
    "tall.bias": (64,),
    "conv.weight": (4, 3, 3, 3),
}
TASK_COUNTS = (3, 5)
METHODS = ("tsv-m", "iso-c", "iso-cts")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def task_vectors(num_tasks: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded stacked task vectors ``{name: Tensor(K, *shape)}``, low-rank-ish like real ones."""
    generator = torch.Generator().manual_seed(seed + num_tasks)
    out = {}
    for name, shape in SHAPES.items():
        x = torch.randn((num_tasks, *shape), generator=generator, dtype=torch.float64)
        if len(shape) == 2:  # a decaying spectrum, as fine-tuning deltas have
            decay = torch.logspace(0, -2, min(shape), dtype=torch.float64)
            u, _, vh = torch.linalg.svd(x, full_matrices=False)
            x = u @ torch.diag_embed(decay.expand(num_tasks, -1)) @ vh
        out[name] = (0.01 * x).to(dtype)
    return out


# ----------------------------------------------------------------------------------------------
# FusionBench's side (run by FusionBench's python; no adamerge import)


def fusionbench_side(inputs: Path, outputs: Path) -> None:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils import TSVM_utils

    cases = torch.load(inputs, weights_only=True)
    results = {}
    for key, stacked in cases.items():
        per_task = [{name: x[k].clone() for name, x in stacked.items()} for k in range(next(iter(stacked.values())).shape[0])]
        results[f"{key}/tsv-m"] = TSVM_utils.compute_and_sum_svd_mem_reduction(per_task, exclude_keys=[], accelerator="cpu")
        results[f"{key}/iso-c"] = iso_c(per_task, accelerator="cpu")
        results[f"{key}/iso-cts"] = iso_cts(per_task, common_space_fraction=0.8, accelerator="cpu")
    torch.save(results, outputs)


# ----------------------------------------------------------------------------------------------
# adamerge's side


def compare(fb_python: str, workdir: Path | None = None) -> dict[str, dict[str, float]]:
    """``{dtype: {method: max |adamerge − FusionBench|}}`` over every case and tensor.

    Also ``{dtype: {method + " (relative)": that / max |FusionBench|}}``.
    """
    from adamerge.methods import get_method
    from benchmarks.peers.fusionbench_runs import fusionbench_outputs, max_difference

    cases = {f"{dtype}/K={k}": task_vectors(k, DTYPES[dtype]) for dtype in DTYPES for k in TASK_COUNTS}
    theirs = fusionbench_outputs(__file__, fb_python, cases, workdir)
    report: dict[str, dict[str, float]] = {dtype: {} for dtype in DTYPES}
    for key, stacked in cases.items():
        dtype = key.split("/")[0]
        for method in METHODS:
            ours = get_method(method).configured().merge().merged_delta(stacked)
            reference = theirs[f"{key}/{method}"]
            diff, relative_diff = max_difference(ours, reference, stacked)
            report[dtype][method] = max(report[dtype].get(method, 0.0), diff)
            relative = f"{method} (relative)"
            report[dtype][relative] = max(report[dtype].get(relative, 0.0), relative_diff)
    return report


def describe(report: dict) -> Iterator[str]:
    """The report, line by line."""
    for dtype, rows in report.items():
        for method in METHODS:
            yield (f"{dtype:8s} {method:8s} max |adamerge − FusionBench| = {rows[method]:.3e} "
                  f"(relative to max |merged| {rows[method + ' (relative)']:.3e})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.fusionbench_runs import check_main

    return check_main(argv, __doc__, fusionbench_side, compare, describe)


if __name__ == "__main__":
    sys.exit(main())
