#!/usr/bin/env python
"""Representation Surgery: adamerge's adapters and training against FusionBench 0.2.33's.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.fusionbench_surgery_check --fb-python /tmp/fbvenv/bin/python

FusionBench's venv (``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install fusion-bench==0.2.33
-c .ci/constraints.txt``) runs this same file with ``--fusionbench-side IN OUT``: that side imports
torch and FusionBench only, reads seeded merged and expert features, the adapters' initial
weights and the batches of every step from ``IN``, and trains ``SurgeryModelWrapper``'s adapters
the way ``CLIPLayerWiseAdaMergingSurgeryAlgorithm.run`` does (its ``compute_surgery_features`` on
the merged features, ``F.l1_loss`` to the expert's, one Adam step per task, lr 1e-3, betas (0.9,
0.999)); it writes the trained weights to ``OUT``. This side trains
:class:`adamerge.core.surgery.RepresentationSurgery` from the same start on the same features
and batches (:func:`adamerge.run.surgery.train_surgery`, one Adam step on the sum over tasks:
the tasks' parameters are disjoint, so the two are the same steps) and prints the largest
difference of the weights, and of the surgery features on every input.

FusionBench 0.2.33's ``surgerymodelwrapper`` imports ``CLIPVisionTransformer`` from transformers
for a type annotation; transformers 5 no longer has it, so FusionBench's side gives that name a
placeholder class before importing (nothing else is changed).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

TASKS = ("alpha", "beta.2", "gamma")  # a dotted name: FusionBench rewrites it for its module names
SIZES = {"alpha": 37, "beta.2": 16, "gamma": 5}  # inputs per task (a last batch shorter than the rest)
DIM, RANK, STEPS, BATCH = 24, 4, 30, 8


def cases(seed: int = 0) -> dict:
    """Seeded features with a systematic bias per task, initial weights, and every step's batches."""
    from adamerge.core.surgery import RepresentationSurgery
    from adamerge.run.surgery import surgery_batches

    generator = torch.Generator().manual_seed(seed)
    features = {}
    for task, size in SIZES.items():
        expert = torch.randn(size, DIM, generator=generator)
        bias = torch.randn(DIM, generator=generator)
        features[task] = {"merged": expert + 0.5 * bias + 0.1 * torch.randn(size, DIM, generator=generator), "expert": expert}
    start = RepresentationSurgery(TASKS, DIM, RANK, seed=seed)
    initial = {task: start.task_state_dict(task) for task in TASKS}
    batches = surgery_batches(SIZES, BATCH, seed)
    steps = [next(batches) for _ in range(STEPS)]
    return {"features": features, "initial": initial, "steps": steps, "dim": DIM, "rank": RANK}


# ----------------------------------------------------------------------------------------------
# FusionBench's side (run by FusionBench's python; no adamerge import)


def fusionbench_side(inputs: Path, outputs: Path) -> None:
    import torch.nn.functional as F
    import transformers.models.clip.modeling_clip as modeling_clip

    if not hasattr(modeling_clip, "CLIPVisionTransformer"):  # an annotation-only import (see the docstring)
        modeling_clip.CLIPVisionTransformer = type("CLIPVisionTransformer", (torch.nn.Module,), {})
    from fusion_bench.models.surgery.surgerymodelwrapper import SurgeryModelWrapper, regularize_name

    data = torch.load(inputs, weights_only=True)
    tasks = list(data["initial"])
    wrapper = SurgeryModelWrapper(torch.nn.Identity(), tasks, projection_dim=data["dim"], hidden_dim=data["rank"])
    with torch.no_grad():
        for task, state in data["initial"].items():
            name = regularize_name(task)
            getattr(wrapper, f"feature_mapping_to_head_down_proj_{name}").weight.copy_(state["down.weight"])
            getattr(wrapper, f"feature_mapping_to_head_up_proj_{name}").weight.copy_(state["up.weight"])
    optimizer = torch.optim.Adam(wrapper.collect_trainable_params(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    for picks in data["steps"]:
        for task in tasks:  # FusionBench's order: one loss, backward and Adam step per task
            rows = picks[task]
            surgery, _, _ = wrapper.compute_surgery_features(data["features"][task]["merged"][rows], task)
            loss = F.l1_loss(surgery, data["features"][task]["expert"][rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    results = {}
    with torch.no_grad():
        for task in tasks:
            name = regularize_name(task)
            results[task] = {
                "down.weight": getattr(wrapper, f"feature_mapping_to_head_down_proj_{name}").weight.detach().clone(),
                "up.weight": getattr(wrapper, f"feature_mapping_to_head_up_proj_{name}").weight.detach().clone(),
                "features": wrapper.compute_surgery_features(data["features"][task]["merged"], task)[0],
            }
    torch.save(results, outputs)


# ----------------------------------------------------------------------------------------------
# adamerge's side


def compare(fb_python: str, workdir: Path | None = None) -> dict[str, float]:
    """``{"weights": max |adamerge − FusionBench|, "features": the same for the surgery features,
    "moved": max |trained − initial| (that training did something)}`` over every task."""
    from adamerge.core.surgery import RepresentationSurgery
    from adamerge.run.surgery import TaskFeatures, train_surgery
    from benchmarks.peers.fusionbench_runs import fusionbench_outputs

    data = cases()
    theirs = fusionbench_outputs(__file__, fb_python, data, workdir)
    ours = RepresentationSurgery(TASKS, DIM, RANK, seed=0)
    for task in TASKS:
        ours.adapter(task).load_state_dict(data["initial"][task])
    features = {task: TaskFeatures(f["merged"], f["expert"]) for task, f in data["features"].items()}
    train_surgery(ours, features, STEPS, BATCH, lr=1e-3, seed=0)
    report = {"weights": 0.0, "features": 0.0, "moved": 0.0}
    with torch.no_grad():
        for task in TASKS:
            state = ours.task_state_dict(task)
            for name in ("down.weight", "up.weight"):
                report["weights"] = max(report["weights"], float((state[name] - theirs[task][name]).abs().max()))
                report["moved"] = max(report["moved"], float((state[name] - data["initial"][task][name]).abs().max()))
            surgery = ours(features[task].merged, task)
            report["features"] = max(report["features"], float((surgery - theirs[task]["features"]).abs().max()))
    return report


def describe(report: dict) -> Iterator[str]:
    """The report, line by line."""
    yield (f"max |adamerge − FusionBench|: adapter weights {report['weights']:.3e}, surgery features {report['features']:.3e} "
          f"(training moved the weights by up to {report['moved']:.3e})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.fusionbench_runs import check_main

    return check_main(argv, __doc__, fusionbench_side, compare, describe)


if __name__ == "__main__":
    sys.exit(main())
