"""Writing results into the (temporary) output folder: JSON / YAML / TSV files, the merged
model as plain state dicts, the Representation Surgery adapters. The folder itself is handled by
:mod:`adamerge.storage.output_folder`."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from adamerge.core.merged_model import MergedModel
from adamerge.core.surgery import RepresentationSurgery
from adamerge.errors import AdamergeError
from adamerge.storage.checkpoints import save_state_dict
from adamerge.storage.files import write_json
from adamerge.storage.output_folder import inside

logger = logging.getLogger(__name__)


def write_coefficients(directory: Path, merged: MergedModel) -> None:
    """``coefficients.json`` (``{task: {group: λ}}``) and ``coefficients.tsv`` (task × group)."""
    table = merged.coefficients.table()
    write_json(directory / "coefficients.json", table)
    groups = merged.layout.group_names
    path = directory / "coefficients.tsv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["task", *groups])
        for task, values in table.items():
            writer.writerow([task, *(f"{values[g]:.6f}" for g in groups)])


MergedModelWriter = Callable[[Path, Mapping[str, torch.Tensor], Mapping[str, Mapping[str, torch.Tensor]]], dict[str, str]]


def write_merged_model(
    directory: Path, state: Mapping[str, torch.Tensor], heads: Mapping[str, Mapping[str, torch.Tensor]]
) -> dict[str, str]:
    """The merged weights in the base architecture's own state-dict keys.

    ``merged.pt`` is a complete state dict (with the base's head tensors); ``heads/<task>.pt``
    holds each task's head tensors (and, under ``--batchnorm per-task``, its BatchNorm running
    statistics). Plain PyTorch loads them, no adamerge needed::

        model = torchvision.models.mobilenet_v2(num_classes=10)
        model.load_state_dict(torch.load("merged.pt") | torch.load("heads/mnist.pt"))
    """
    files = {"merged": save_state_dict(state, directory / "merged.pt").name}
    for task, head in heads.items():
        save_state_dict({k: v.detach() for k, v in head.items()}, inside(directory, "heads", f"{task}.pt"))
        files[f"head/{task}"] = f"heads/{task}.pt"
    return files


def check_finite_export(state: Mapping[str, torch.Tensor], heads: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Refuse to write a merged model holding NaN or Inf, naming the first such tensor.

    Raises:
        AdamergeError: a floating tensor of ``state`` or of a task's ``heads`` is not finite.
    """
    parts = [("the merged model", state)] + [(f"task {task!r}", head) for task, head in heads.items()]
    for owner, tensors in parts:
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise AdamergeError(
                    f"refusing to write non-finite weights: tensor {name!r} of {owner} holds {bad} NaN/Inf "
                    "value(s) (diverged coefficients? lower --lr, or bound λ with --constraint clamp)"
                )


def write_merged_model_of(directory: Path, merged: MergedModel, writer: MergedModelWriter | None = None) -> dict[str, str]:
    """Write a :class:`MergedModel` at its current coefficients with ``writer`` (an expert source's
    own format) or :func:`write_merged_model`; per-task BatchNorm statistics travel with the heads."""
    was_training = merged.training
    merged.eval()
    tasks = merged.tasks if (merged.heads.names or merged.kept.names or merged.statistics.names) else ()
    heads = {task: merged.task_tensors(task) for task in tasks}
    merged.train(was_training)
    return export_merged(directory, merged.merged_state_dict(), heads, writer)


def export_merged(
    directory: Path,
    state: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    writer: MergedModelWriter | None = None,
) -> dict[str, str]:
    """Write merged weights with ``writer`` (an expert source's own format) or
    :func:`write_merged_model`, after refusing non-finite values (:func:`check_finite_export`)."""
    check_finite_export(state, heads)
    return (writer or write_merged_model)(directory, state, heads)


def write_surgery(directory: Path, surgery: RepresentationSurgery) -> dict[str, str]:
    """``surgery/<task>.pt``: each task's Representation Surgery adapter as a plain state dict
    ``{"down.weight": (r, D), "up.weight": (D, r)}``; without adamerge, the features entering the
    task's head become ``features - up(relu(down(features)))``.

    Raises:
        AdamergeError: an adapter holds NaN or Inf (nothing is written then).
    """
    states = {task: surgery.task_state_dict(task) for task in surgery.tasks}
    for task, state in states.items():
        if not all(bool(torch.isfinite(tensor).all()) for tensor in state.values()):
            raise AdamergeError(f"refusing to write non-finite representation surgery weights of task {task!r}: lower --surgery-lr")
    files = {}
    for task, state in states.items():
        save_state_dict(state, inside(directory, "surgery", f"{task}.pt"))
        files[f"surgery/{task}"] = f"surgery/{task}.pt"
    return files


def format_table(rows: Mapping[str, Mapping[str, float]], tasks: list[str]) -> str:
    """A Markdown table: one row per method, one column per task plus the average (percent)."""
    header = ["method", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in rows.items():
        cells = [f"{100 * values[t]:.1f}" if t in values else "-" for t in [*tasks, "average"]]
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def plain_config(value: Any) -> Any:
    """Settings as YAML-safe plain data (paths as strings, tuples as lists)."""
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    return str(value) if isinstance(value, Path) else value
