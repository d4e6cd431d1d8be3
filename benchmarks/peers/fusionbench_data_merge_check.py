#!/usr/bin/env python
"""Fisher merging and RegMean: adamerge against FusionBench 0.2.33 on identical seeded MLPs and inputs.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.fusionbench_data_merge_check --fb-python /tmp/fbvenv/bin/python

FusionBench's venv (``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install fusion-bench==0.2.33
-c .ci/constraints.txt``) runs this same file with ``--fusionbench-side IN OUT``: that side imports
torch and FusionBench only, rebuilds the experts (a three-layer MLP classifier, ``fc1``, ``fc2``
merged and ``head`` per task) from ``IN``, and runs FusionBench's own end-to-end functions,
statistics included: ``fisher_merging.fisher_merging`` (its defaults: ``normalize_fisher_weight``,
``minimal_fisher_weight=1e-6``, equal scaling coefficients) and ``regmean.regmean_merging``, each
over a minimal stand-in for the Hugging Face ``Trainer`` they read batches from. This side runs
adamerge's statistics (``fisher_diagonals``, ``layer_input_grams``) and rewrites (the registered
``fisher`` and ``regmean`` methods' ``FisherMerge`` / ``RegMeanMerge``) on the same experts and
inputs, and prints the largest absolute difference of the merged weights per case.

Definitional differences, each shown by its own case:

- **Fisher, batching.** FusionBench squares the gradient of a whole batch's summed
  ``Σ_c sqrt(p̂_c) log p_c``, adamerge each example's (the paper's per-example Fisher). They agree
  at batch size 1 (``fisher/bs=1``) and differ at FusionBench's batch size 4 (``fisher/bs=4``,
  cross terms between examples).
- **RegMean, α in float32.** FusionBench builds the off-diagonal mask from ``torch.ones(n)`` (float32),
  so α = 0.9 becomes 0.89999998 even for float64 Grams: ``regmean/α=0.9`` differs by about 1e-8
  relative in float64; ``regmean/α=0.75`` (exact in float32), and adamerge at α = float32(0.9)
  against FusionBench at 0.9 (``regmean/α=float32(0.9)``), agree to float64 rounding.
- Not exercised (the inputs have no padding): adamerge's Grams leave padding tokens out, FusionBench's
  include them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

IN, HIDDEN, OUT, CLASSES = 8, 16, 12, 3
EXAMPLES = 12
TASK_COUNTS = (2, 3)
DTYPES = {"float64": torch.float64, "float32": torch.float32}
MERGED = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class MLP(nn.Module):
    """``fc1 → tanh → fc2 → tanh → head``; returns ``.logits`` as a Hugging Face model does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT), nn.Linear(OUT, CLASSES)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


def case(num_tasks: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """A seeded base, ``num_tasks`` experts (base + noise, own heads) and each task's inputs."""
    generator = torch.Generator().manual_seed(seed + num_tasks)
    torch.manual_seed(seed + num_tasks)
    base = {n: t.to(dtype) for n, t in MLP().state_dict().items()}
    experts = [{n: t + 0.3 * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(dtype) for n, t in base.items()}
               for _ in range(num_tasks)]  # fmt: skip
    inputs = [torch.randn(EXAMPLES, IN, generator=generator, dtype=torch.float64).to(dtype) for _ in range(num_tasks)]
    return {"base": base, "experts": experts, "inputs": inputs}


def model_of(state: dict, dtype: torch.dtype) -> MLP:
    model = MLP().to(dtype)
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# FusionBench's side (run by FusionBench's python; no adamerge import)


class _Trainer:
    """What FusionBench's ``fisher_merging`` / ``regmean_merging`` read of a Hugging Face Trainer."""

    def __init__(self, inputs: torch.Tensor, batch_size: int) -> None:
        self.inputs, self._train_batch_size = inputs, batch_size

    def get_train_dataloader(self) -> list[dict[str, torch.Tensor]]:
        return [{"x": self.inputs[i : i + self._train_batch_size]} for i in range(0, len(self.inputs), self._train_batch_size)]

    def _prepare_inputs(self, inputs: dict) -> dict:
        return inputs


def fusionbench_side(inputs: Path, outputs: Path) -> None:
    from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging
    from fusion_bench.method.regmean.regmean import regmean_merging

    cases = torch.load(inputs, weights_only=True)
    results = {}
    for key, item in cases.items():
        dtype = item["base"]["fc1.weight"].dtype
        num_tasks = len(item["experts"])
        for batch_size in (1, 4):
            models = [model_of(state, dtype) for state in item["experts"]]
            merged = fisher_merging(models, [_Trainer(x, batch_size) for x in item["inputs"]], ["head.*"], [EXAMPLES] * num_tasks)
            results[f"{key}/fisher/bs={batch_size}"] = {n: t.detach() for n, t in merged.items()}
        for alpha in (0.9, 0.75):
            models = [model_of(state, dtype) for state in item["experts"]]
            merged = regmean_merging(models, [_Trainer(x, 4) for x in item["inputs"]], ["head.*"], [EXAMPLES] * num_tasks,
                                     reduce_non_diagonal_ratio=alpha)  # fmt: skip
            results[f"{key}/regmean/α={alpha}"] = {n: t.detach() for n, t in merged.items()}
    torch.save(results, outputs)


# ----------------------------------------------------------------------------------------------
# adamerge's side


def adamerge_merges(item: dict) -> dict[str, dict[str, torch.Tensor]]:
    """``{variant: merged state of MERGED}`` from adamerge's statistics and registered methods."""
    from adamerge.methods import get_method
    from adamerge.run.calibration_statistics import fisher_diagonals, layer_input_grams
    from adamerge.task_types import CLASSIFICATION

    dtype = item["base"]["fc1.weight"].dtype
    base, experts = item["base"], item["experts"]
    tv = {n: torch.stack([e[n] - base[n] for e in experts]) for n in MERGED}
    models = [model_of(state, dtype) for state in experts]
    batches = [[x[i : i + 4] for i in range(0, len(x), 4)] for x in item["inputs"]]
    out = {}
    fisher = get_method("fisher").configured().merge()
    fishers = [fisher_diagonals(m, b, MERGED, CLASSIFICATION, fisher.labels) for m, b in zip(models, batches)]
    delta = fisher.rewrite(tv, fishers)
    out["fisher"] = {n: base[n] + delta[n].sum(0) for n in MERGED}
    grams = [layer_input_grams(m, b, MERGED) for m, b in zip(models, batches)]
    for label, alpha in (("0.9", 0.9), ("0.75", 0.75), ("float32(0.9)", float(torch.tensor(0.9, dtype=torch.float32)))):
        delta = get_method("regmean").configured(alpha=alpha).merge().rewrite(tv, grams)
        out[f"regmean/α={label}"] = {n: base[n] + delta[n].sum(0) for n in MERGED}
    return out


def compare(fb_python: str, workdir: Path | None = None) -> dict[str, float]:
    """``{dtype/variant: max |adamerge − FusionBench|}`` over the task counts and merged tensors, with
    ``" (relative)"`` rows (that over max |merged|); ``fisher`` / ``regmean`` (and their relative
    rows) are the float64 cases that must agree: Fisher at batch size 1, RegMean at α = 0.75."""
    from benchmarks.peers.fusionbench_runs import fusionbench_outputs, max_difference

    cases = {f"{dtype}/K={k}": case(k, DTYPES[dtype]) for dtype in DTYPES for k in TASK_COUNTS}
    theirs = fusionbench_outputs(__file__, fb_python, cases, workdir)
    pairs = {"fisher/bs=1": "fisher", "fisher/bs=4": "fisher", "regmean/α=0.9": "regmean/α=0.9",
             "regmean/α=0.75": "regmean/α=0.75", "regmean/α=float32(0.9)": "regmean/α=float32(0.9)"}
    report: dict[str, float] = {}
    for key, item in cases.items():
        dtype = key.split("/")[0]
        ours = adamerge_merges(item)
        for variant, mine in pairs.items():
            reference = theirs[f"{key}/{variant.replace('float32(0.9)', '0.9')}"]
            diff, relative_diff = max_difference(ours[mine], reference, MERGED)
            row = f"{dtype}/{variant}"
            report[row] = max(report.get(row, 0.0), diff)
            report[f"{row} (relative)"] = max(report.get(f"{row} (relative)", 0.0), relative_diff)
    report["fisher (relative)"] = report["float64/fisher/bs=1 (relative)"]
    report["regmean (relative)"] = report["float64/regmean/α=0.75 (relative)"]
    return report


def describe(report: dict) -> Iterator[str]:
    """The report, line by line."""
    for row, value in report.items():
        if not row.endswith("(relative)") and "/" in row:
            yield (f"{row:32s} max |adamerge − FusionBench| = {value:.3e} (relative to max |merged| {report[row + ' (relative)']:.3e})")


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.fusionbench_runs import check_main

    return check_main(argv, __doc__, fusionbench_side, compare, describe)


if __name__ == "__main__":
    sys.exit(main())
