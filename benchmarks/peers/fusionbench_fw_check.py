#!/usr/bin/env python
"""FW-Merging (hard): adamerge's steps against FusionBench 0.2.33's ``FrankWolfeHardAlgorithm.run``.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.fusionbench_fw_check --fb-python /tmp/fbvenv/bin/python

FusionBench's venv (``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install fusion-bench==0.2.33
-c .ci/constraints.txt``) runs this same file with ``--fusionbench-side IN OUT``. That side imports
torch, FusionBench and the torch-only ``tiny_mlp_pool`` only and runs ``FrankWolfeHardAlgorithm.run`` itself (task arithmetic as
its merge function, ``loss_fn: entropy``, step size 0.1, scaling factor 0.3), at task and at layer
granularity, on a seeded float64 MLP body and its experts. Only what ties the class to CLIP is
given here: a model pool, ``compute_logits`` (the body's features times each task's fixed head, the
role of CLIP's zero-shot heads) and the loaders (the inputs of every iteration, fixed in ``IN``,
one at a time as FusionBench draws them); ``Module.cuda`` is the identity (FusionBench calls it on
this CPU-only machine); the hyperparameter log and the zero-shot head set-up are skipped.

FusionBench 0.2.33's ``fw_hard`` does not run as shipped: its first Frank–Wolfe step fails in
``task_arithmetic_merge`` with ``TypeError: Tensor type mismatch for key ... expected Parameter, got
Tensor`` (``state_dict_add``'s strict check rejects the merged model's Parameters plus the chosen
checkpoint's plain tensors). This side calls ``state_dict_add`` with ``strict=False`` in that module:
the same sums, without the check.

This side runs the ``fw-merging`` method's :class:`~adamerge.run.frank_wolfe.FrankWolfeModule` from
task arithmetic at λ = 0.3, each step's batch per task being the inputs FusionBench sees in that
iteration, and prints the largest difference of the merged weights, and whether both chose the
same checkpoint at every step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.peers.tiny_mlp_pool import DIMS, TASKS, fusionbench_pool, head_logits, merged_body, merged_model, pool

ITERATIONS, DATASET_SIZE = 6, 10
STEP_SIZE, SCALING = 0.1, 0.3
GRANULARITIES = ("task", "layer")


def cases(seed: int = 0) -> dict:
    """A seeded base body, its experts (one nearly unchanged: a checkpoint of little use), fixed
    per-task heads and every iteration's inputs."""
    data, generator = pool(seed, {"alpha": 0.4, "beta": 0.3, "gamma": 0.02})
    inputs = [{t: torch.randn(DATASET_SIZE, DIMS[0], generator=generator, dtype=torch.float64) for t in TASKS} for _ in range(ITERATIONS)]
    return data | {"inputs": inputs}


# ----------------------------------------------------------------------------------------------
# FusionBench's side (run by FusionBench's python; no adamerge import)


def fusionbench_side(inputs: Path, outputs: Path) -> None:
    import functools

    from fusion_bench.method.fw_merging import fw_hard
    from fusion_bench.method.fw_merging.fw_hard import FrankWolfeHardAlgorithm

    torch.nn.Module.cuda = lambda self, *args, **kwargs: self  # a CPU-only machine (see the docstring)
    fw_hard.state_dict_add = functools.partial(fw_hard.state_dict_add, strict=False)  # its type check fails (see the docstring)
    data = torch.load(inputs, weights_only=True)
    tasks = list(data["experts"])

    class TinyFrankWolfe(FrankWolfeHardAlgorithm):  # the CLIP-specific parts only
        def on_frank_wolfe_iteration_start(self):
            pass

        def log_hyperparams(self, *args, **kwargs):
            pass

        def compute_logits(self, module, images, task):
            return head_logits(data, module, images, task)

        def get_shuffled_loader_iter(self, task):
            return self.loaders[task]

    results = {}
    for granularity in GRANULARITIES:
        algorithm = TinyFrankWolfe(
            merge_fn="task_arithmetic", step_size=STEP_SIZE, max_iters=len(data["inputs"]), dataset_size=DATASET_SIZE,
            granularity=granularity, loss_fn="entropy", scaling_factor=SCALING,
        )  # fmt: skip
        algorithm.loaders = {
            t: iter([(step[t][i : i + 1], None) for step in data["inputs"] for i in range(DATASET_SIZE)]) for t in tasks
        }  # one input at a time, in FusionBench's order: task by task within an iteration
        merged = algorithm.run(fusionbench_pool(data))
        results[granularity] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    torch.save(results, outputs)


# ----------------------------------------------------------------------------------------------
# adamerge's side


def adamerge_side(data: dict, granularity: str) -> dict[str, torch.Tensor]:
    """The merged body after the same iterations, by the ``fw-merging`` method's module."""
    from adamerge.methods import get_method
    from adamerge.objectives.task_objectives import Entropy
    from adamerge.run.frank_wolfe import FrankWolfeModule

    method = get_method("fw-merging")
    merged = merged_model(data, granularity, method.constraint, method.init)
    module = FrankWolfeModule(merged, objective=Entropy(), step_size=method.step_size, scaling_factor=method.scaling_factor)
    for step, batch in enumerate(data["inputs"]):
        module.training_step(batch, step)
    return merged_body(merged)


def compare(fb_python: str, workdir: Path | None = None) -> dict[str, dict[str, float]]:
    """Per granularity: the largest difference of the merged weights, relative to their size, and
    how far the steps moved the merge from task arithmetic at 0.3 (that they did something)."""
    from benchmarks.peers.fusionbench_runs import fusionbench_outputs, max_difference

    data = cases()
    theirs = fusionbench_outputs(__file__, fb_python, data, workdir)
    names = list(data["base"])
    start = {n: data["base"][n] + SCALING * sum(data["experts"][t][n] - data["base"][n] for t in TASKS) for n in names}
    report = {}
    for granularity in GRANULARITIES:
        ours = adamerge_side(data, granularity)
        absolute, relative = max_difference(ours, theirs[granularity], names)
        report[granularity] = {"merged": absolute, "relative": relative, "moved": max_difference(theirs[granularity], start, names)[0]}
    return report


def describe(report: dict) -> Iterator[str]:
    """The report, line by line."""
    for granularity, row in report.items():
        yield (
            f"{granularity} granularity: max |adamerge − FusionBench| of the merged weights {row['merged']:.3e} "
            f"({row['relative']:.1e} of their size; the steps moved the merge by up to {row['moved']:.3e})"
        )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.fusionbench_runs import check_main

    return check_main(argv, __doc__, fusionbench_side, compare, describe)


if __name__ == "__main__":
    sys.exit(main())
