#!/usr/bin/env python
"""Channels-last against the default layout for convolutional merges on the CPU.

adamerge runs a convolutional model channels-last on the CPU where that is faster
(``adamerge.core.model_inputs.uses_channels_last``: every forward without gradients, and training steps
of models with grouped convolutions). This script measures both layouts in both modes, whatever
that policy picks, on the vision benchmark's shapes:
a torchvision model (random weights) merged from ``--experts`` random task vectors by a
:class:`~adamerge.core.merged_model.MergedModel` (layer-wise λ, per-task heads), at ``--image-size``:

- ``evaluation``: the merged model's forward on ``--eval-batch`` images, no gradient;
- ``fit step``: forward and backward to λ of ``--batch`` images per task, every task in turn,
  as one learned step of ``adamerge fit``.

Each mode alternates the two layouts for ``--repeats`` rounds (so that a drift of the host's speed
hits both) and reports the median. It also reports the largest difference of the logits and of the
λ gradient between the layouts (float rounding only).

    OMP_NUM_THREADS=1 python -m benchmarks.channels_last --out benchmarks/results/channels_last.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

from adamerge.core import model_inputs
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import TaskVectors
from benchmarks.runner import write_results


def build(arch: str, experts: int, classes: int) -> MergedModel:
    """``arch`` with random weights and ``experts`` random task vectors (1e-3 scale), layer-wise λ."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes).eval()
    head = "fc." if hasattr(model, "fc") else "classifier."  # the torchvision head's module
    names = [n for n, _ in model.named_parameters() if not n.startswith(head)]
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    vectors = {n: torch.randn((experts, *params[n].shape), generator=generator) * 1e-3 for n in names}  # (K, *S)
    tasks = [f"task{k}" for k in range(experts)]
    heads = {t: {n: p.detach() + 1e-2 * torch.randn(p.shape, generator=generator) for n, p in params.items() if n.startswith(head)} for t in tasks}
    return MergedModel(model, TaskVectors(tasks, vectors), "layer", "clamp", 0.3, heads=heads, batchnorm="base")


def evaluation(merged: MergedModel, images: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds of one no-grad forward of the merged model (merged once), and its logits."""
    with torch.no_grad():
        tensors = merged.merged_tensors()
        started = time.perf_counter()
        logits = merged(images, merged.tasks[0], merged=tensors)  # (B, C)
    return time.perf_counter() - started, logits


def fit_step(merged: MergedModel, images: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Seconds of one step's forward and backward to λ over every task's images, and λ's gradient."""
    raw = merged.coefficients.raw
    raw.grad = None
    started = time.perf_counter()
    tensors = merged.merged_tensors()  # one merge per step, as the dense training step
    loss = sum(merged(batch, task, merged=tensors).logsumexp(dim=-1).mean() for task, batch in images.items())
    loss.backward()
    return time.perf_counter() - started, raw.grad.detach().clone()


def measure(arch: str, args: argparse.Namespace) -> dict:
    merged = build(arch, args.experts, 10)
    generator = torch.Generator().manual_seed(2)
    size = args.image_size
    eval_images = torch.randn(args.eval_batch, 3, size, size, generator=generator)  # (B, 3, S, S)
    step_images = {t: torch.randn(args.batch, 3, size, size, generator=generator) for t in merged.tasks}
    times: dict[str, dict[str, list[float]]] = {"evaluation": {"default": [], "channels-last": []}, "fit step": {"default": [], "channels-last": []}}
    outputs: dict[str, dict[str, torch.Tensor]] = {"evaluation": {}, "fit step": {}}
    policy = model_inputs.uses_channels_last  # the library's choice, reported beside the timings
    picks = {}
    with torch.no_grad():
        picks["evaluation"] = policy(merged.model, eval_images)
    picks["fit step"] = policy(merged.model, step_images[merged.tasks[0]])
    try:
        for round_ in range(args.repeats + 1):  # round 0 warms up and is not counted
            for layout in (("default", "channels-last") if round_ % 2 else ("channels-last", "default")):
                # force the layout in both modes, whatever the policy would pick
                model_inputs.uses_channels_last = lambda module, inputs, on=layout == "channels-last": on
                for mode, run in (("evaluation", lambda: evaluation(merged, eval_images)), ("fit step", lambda: fit_step(merged, step_images))):
                    seconds, value = run()
                    outputs[mode][layout] = value
                    if round_:
                        times[mode][layout].append(seconds)
    finally:
        model_inputs.uses_channels_last = policy
    result = {}
    for mode, by_layout in times.items():
        default, last = statistics.median(by_layout["default"]), statistics.median(by_layout["channels-last"])
        reference = outputs[mode]["default"]
        difference = (outputs[mode]["channels-last"] - reference).abs().max().item()
        result[mode] = {
            "default_s": round(default, 4), "channels_last_s": round(last, 4), "speed_up": round(default / last, 3),
            "adamerge_uses": "channels-last" if picks[mode] else "default",
            "max_abs_difference": difference, "max_abs_reference": reference.abs().max().item(),
            "runs_s": {k: [round(v, 4) for v in vs] for k, vs in by_layout.items()},
        }  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["mobilenet_v2", "efficientnet_b0", "resnet18", "vgg11_bn"])
    parser.add_argument("--experts", type=int, default=5, help="task vectors (default 5, the vision benchmark's)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per task per fit step (default 16)")
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    payload = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.channels_last", *sys.argv[1:]]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": {arch: measure(arch, args) for arch in args.archs},
    }
    lines = [
        f"Command: `{payload['command']}` (torch {payload['torch']}, {payload['threads']} thread(s)); "
        f"{args.experts} random task vectors, layer-wise λ, {args.image_size} px; medians of {args.repeats} alternating rounds",
        "",
        "| model | mode | default layout (s) | channels-last (s) | speed-up | adamerge uses | max abs difference (of max abs value) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch, modes in payload["results"].items():
        for mode, entry in modes.items():
            what = f"{args.eval_batch} images" if mode == "evaluation" else f"{args.batch} images × {args.experts} tasks, to λ"
            lines.append(
                f"| {arch} | {mode} ({what}) | {entry['default_s']:.3f} | {entry['channels_last_s']:.3f} | "
                f"{entry['speed_up']:.2f}× | {entry['adamerge_uses']} | {entry['max_abs_difference']:.1e} (of {entry['max_abs_reference']:.2g}) |"
            )
    markdown = "\n".join(lines) + "\n"
    write_results(args.out, payload, markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
