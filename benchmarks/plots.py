#!/usr/bin/env python
"""Figures of the benchmark results (matplotlib, Agg backend; PNG files next to the inputs).

From a results JSON of ``vision_methods.py`` (``vision.json``; ``text.json`` has the same schema)
named ``<name>.json``:

- ``<name>_accuracy.png``: grouped bars, accuracy per task (and the average) for every method;
- ``<name>_coefficients.png``: task × tensor heatmap of the λ a fit learned, read from a fit's
  ``coefficients.json`` (``{task: {tensor or group: λ}}``, columns kept in model order); by
  default ``<name>_coefficients_adamerging.json`` beside the results (what ``vision_methods.py``
  keeps of its layer-wise AdaMerging run);
- ``<name>_fewshot.png``: accuracy vs labelled shots per class, from ``<name>_fewshot.json``
  (``fewshot_curve.py``), with the results' reference rows as horizontal lines.

    python -m benchmarks.plots benchmarks/results/vision.json
    python -m benchmarks.plots benchmarks/results/vision.json --coefficients runs/ada/coefficients.json

Each figure is written only when its input exists (or was given). Malformed inputs raise
:class:`PlotInputError` naming the file and the offending field.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

MAX_TICKS = 40  # at most this many column labels on the heatmap
FEWSHOT_REFERENCES = ("expert (alone)", "task arithmetic", "atlas tta (layer-wise)", "adamerging (layer-wise)")


class PlotInputError(ValueError):
    """An input file is missing, is not JSON, or does not have the expected fields."""


# --------------------------------------------------------------------------- reading and checking


def read_json(path: str | Path) -> Any:
    """The parsed JSON of ``path``; :class:`PlotInputError` naming the file if it is unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PlotInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlotInputError(f"{path}: not a readable JSON file ({error})") from None


def _check_entry(path: Path, where: str, entry: Any, tasks: Sequence[str]) -> dict[str, float]:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("per_task"), Mapping):
        raise PlotInputError(f"{path}: {where} needs a 'per_task' object of accuracies")
    per_task = entry["per_task"]
    values = {}
    for task in [*tasks, "average"]:
        value = per_task.get(task, entry.get("average") if task == "average" else None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise PlotInputError(f"{path}: {where}.per_task[{task!r}] is {value!r}, expected a number")
        values[task] = float(value)
    return values


def _check_tasks(path: Path, payload: Any, kind: str) -> list[str]:
    if not isinstance(payload, Mapping):
        raise PlotInputError(f"{path}: expected a JSON object ({kind}), found {type(payload).__name__}")
    tasks = payload.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise PlotInputError(f"{path}: 'tasks' must be a non-empty list of task names")
    return tasks


def load_results(path: str | Path, flavour: str | None = None) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Tasks and ``{method: {task or 'average': accuracy}}`` of a ``vision_methods.py`` results JSON
    (or of one ``flavour`` of a ``text_methods.py`` JSON, whose methods sit under ``flavours``)."""
    path = Path(path)
    payload = read_json(path)
    tasks = _check_tasks(path, payload, "benchmark results")
    methods = payload.get("methods")
    if flavour is not None:
        flavours = payload.get("flavours")
        if not isinstance(flavours, Mapping) or flavour not in flavours:
            raise PlotInputError(f"{path}: no flavour {flavour!r} under 'flavours'")
        methods = flavours[flavour]
    if not isinstance(methods, Mapping) or not methods:
        raise PlotInputError(f"{path}: 'methods' must be a non-empty object {{method: {{per_task: ...}}}}")
    return tasks, {name: _check_entry(path, f"methods[{name!r}]", entry, tasks) for name, entry in methods.items()}


def load_fewshot(path: str | Path) -> tuple[list[str], dict[int, dict[str, float]], dict[str, dict[str, float]]]:
    """Tasks, ``{shots: accuracies}`` (ascending) and ``{reference: accuracies}`` of a few-shot JSON."""
    path = Path(path)
    payload = read_json(path)
    tasks = _check_tasks(path, payload, "few-shot results")
    shots = payload.get("shots")
    if not isinstance(shots, Mapping) or not shots:
        raise PlotInputError(f"{path}: 'shots' must be a non-empty object {{shots per class: {{per_task: ...}}}}")
    curve = {}
    for key, entry in shots.items():
        try:
            count = int(key)
        except ValueError:
            raise PlotInputError(f"{path}: shots key {key!r} is not an integer") from None
        curve[count] = _check_entry(path, f"shots[{key!r}]", entry, tasks)
    references = payload.get("references", {})
    if not isinstance(references, Mapping):
        raise PlotInputError(f"{path}: 'references' must be an object {{name: {{per_task: ...}}}}")
    refs = {name: _check_entry(path, f"references[{name!r}]", entry, tasks) for name, entry in references.items()}
    return tasks, dict(sorted(curve.items())), refs


def load_coefficients(path: str | Path) -> tuple[list[str], list[str], list[list[float]]]:
    """Tasks, column names (model order, as written) and the λ matrix of a fit's ``coefficients.json``."""
    path = Path(path)
    table = read_json(path)
    if not isinstance(table, Mapping) or not table:
        raise PlotInputError(f"{path}: expected a non-empty object {{task: {{tensor or group: λ}}}}")
    tasks = list(table)
    first = table[tasks[0]]
    if not isinstance(first, Mapping) or not first:
        raise PlotInputError(f"{path}: task {tasks[0]!r} needs a non-empty object {{tensor or group: λ}}")
    columns = list(first)
    rows = []
    for task in tasks:
        values = table[task]
        if not isinstance(values, Mapping) or list(values) != columns:
            raise PlotInputError(f"{path}: task {task!r} must list the same tensors/groups as {tasks[0]!r}, in the same order")
        row = []
        for column, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise PlotInputError(f"{path}: [{task!r}][{column!r}] is {value!r}, expected a number")
            row.append(float(value))
        rows.append(row)
    return tasks, columns, rows


# --------------------------------------------------------------------------- figures


def plot_accuracy(tasks: Sequence[str], methods: Mapping[str, Mapping[str, float]], out: Path, title: str = "") -> Path:
    """Grouped bars: one group per task (and the average), one bar per method (accuracy in %)."""
    groups = [*tasks, "average"]
    names = list(methods)
    width = 0.85 / len(names)
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(min(16.0, max(8.0, len(groups) * (1.0 + 0.08 * len(names)))), 5.0))
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [100 * methods[name][g] for g in groups], width, label=name, color=colours(i % colours.N))
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or "accuracy per task and method")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _save(fig, out)


def short_label(name: str) -> str:
    """A compact column label: ``features.3.conv.1.0.weight`` -> ``f3.conv.1.0.w``."""
    label = name.replace("features.", "f", 1) if name.startswith("features.") else name
    for long, short in ((".weight", ".w"), (".bias", ".b")):
        if label.endswith(long):
            label = label[: -len(long)] + short
    return label


def plot_coefficients(
    tasks: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float]], out: Path, title: str = ""
) -> Path:
    """Heatmap: rows tasks, columns tensors/groups in model order, colour λ; at most ``MAX_TICKS`` labels."""
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.12 * len(columns) + 3)), 1.2 + 0.45 * len(tasks) + 1.6))
    low = min(min(row) for row in values)
    high = max(max(row) for row in values)
    if low < 0 < high:  # signed λ (aTLAS): diverging colours centred on 0
        bound = max(-low, high)
        image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
    else:
        image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    step = max(1, math.ceil(len(columns) / MAX_TICKS))
    ticks = list(range(0, len(columns), step))
    ax.set_xticks(ticks, [short_label(columns[i]) for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel(f"tensor / group in model order ({len(columns)}; every {step}{_ordinal(step)} labelled)" if step > 1
                  else f"tensor / group in model order ({len(columns)})")
    fig.colorbar(image, ax=ax, label="λ", fraction=0.03, pad=0.01)
    ax.set_title(title or "learned coefficients")
    return _save(fig, out)


def _ordinal(n: int) -> str:
    return "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def plot_fewshot(
    tasks: Sequence[str],
    curve: Mapping[int, Mapping[str, float]],
    out: Path,
    references: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "",
) -> Path:
    """Accuracy (%) vs labelled shots per class (log₂ axis): each task thin, the average bold,
    reference averages as dashed horizontal lines."""
    shots = sorted(curve)
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    colours = plt.get_cmap("tab10")
    for i, task in enumerate(tasks):
        ax.plot(shots, [100 * curve[s][task] for s in shots], marker="o", lw=1, ms=3, alpha=0.7,
                color=colours(i % 10), label=task)
    ax.plot(shots, [100 * curve[s]["average"] for s in shots], marker="o", lw=2.5, color="black", label="average")
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (name, values) in enumerate((references or {}).items()):
        ax.axhline(100 * values["average"], color=colours((len(tasks) + i) % 10), lw=1.2, ls=styles[i % len(styles)],
                   label=f"{name}: average")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("labelled shots per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title or "few-shot accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- files in, files out


def fewshot_references(
    results: Mapping[str, Mapping[str, float]], names: Sequence[str] = FEWSHOT_REFERENCES
) -> dict[str, dict[str, float]]:
    """The rows of a results table worth drawing on the few-shot plot (prefix match, in ``names`` order)."""
    chosen = {}
    for wanted in names:
        match = next((name for name in results if name.startswith(wanted)), None)
        if match is not None:
            chosen[match] = dict(results[match])
    return chosen


def default_coefficients(results_path: Path) -> Path | None:
    """``<name>_coefficients_adamerging.json`` beside the results, else a single ``<name>_coefficients*.json``."""
    preferred = results_path.with_name(f"{results_path.stem}_coefficients_adamerging.json")
    if preferred.is_file():
        return preferred
    found = sorted(results_path.parent.glob(f"{results_path.stem}_coefficients*.json"))
    return found[0] if len(found) == 1 else None


def make_plots(
    results: str | Path | None = None,
    coefficients: str | Path | None = None,
    fewshot: str | Path | None = None,
    name: str | None = None,
    out_dir: str | Path | None = None,
    flavour: str | None = None,
) -> list[Path]:
    """Write every figure whose input is there; returns the PNG paths.

    Args:
        results: ``<name>.json`` of ``vision_methods.py``; also the default place and name of the
            other inputs (``<name>_coefficients_adamerging.json``, ``<name>_fewshot.json``).
        coefficients: a fit's ``coefficients.json`` (default: found beside ``results``).
        fewshot: ``fewshot_curve.py``'s JSON (default: ``<name>_fewshot.json`` beside ``results``).
        name: figure prefix (default: the results' stem, else the few-shot JSON's stem without
            ``_fewshot``, else ``coefficients``).
        out_dir: folder of the PNGs (default: the folder of the first input given).
        flavour: for ``text_methods.py`` results: which flavour (``full``, ``lora``); figures are
            named ``<name>_<flavour>_*.png`` and the coefficients default to
            ``<name>_coefficients_adamerging_<flavour>.json``.
    """
    results = Path(results) if results is not None else None
    if results is not None and flavour is not None:
        if coefficients is None:
            candidate = results.with_name(f"{results.stem}_coefficients_adamerging_{flavour}.json")
            coefficients = candidate if candidate.is_file() else None
        name = name or f"{results.stem}_{flavour}"
    if results is not None and flavour is None:
        coefficients = coefficients if coefficients is not None else default_coefficients(results)
        if fewshot is None and results.with_name(f"{results.stem}_fewshot.json").is_file():
            fewshot = results.with_name(f"{results.stem}_fewshot.json")
    coefficients = Path(coefficients) if coefficients is not None else None
    fewshot = Path(fewshot) if fewshot is not None else None
    first = next((p for p in (results, fewshot, coefficients) if p is not None), None)
    if first is None:
        raise PlotInputError("nothing to plot: give a results JSON, --coefficients or --fewshot")
    if name is None:
        name = results.stem if results else (fewshot.stem.removesuffix("_fewshot") if fewshot else "coefficients")
    folder = Path(out_dir) if out_dir is not None else first.parent
    written = []
    table: dict[str, dict[str, float]] = {}
    if results is not None:
        tasks, table = load_results(results, flavour)
        written.append(plot_accuracy(tasks, table, folder / f"{name}_accuracy.png", f"{name}: accuracy per task"))
    if coefficients is not None:
        rows, columns, values = load_coefficients(coefficients)
        label = coefficients.stem.removeprefix(f"{name}_coefficients").strip("_") or coefficients.parent.name
        written.append(plot_coefficients(rows, columns, values, folder / f"{name}_coefficients.png",
                                         f"{name}: learned λ per task and tensor ({label})"))
    if fewshot is not None:
        tasks, curve, references = load_fewshot(fewshot)
        references = references or fewshot_references(table)
        written.append(plot_fewshot(tasks, curve, folder / f"{name}_fewshot.png", references,
                                    f"{name}: aTLAS few-shot, accuracy vs shots per class"))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, help="results JSON of vision_methods.py (<name>.json)")
    parser.add_argument("--coefficients", type=Path, help="a fit's coefficients.json (default: beside the results)")
    parser.add_argument("--fewshot", type=Path, help="fewshot_curve.py's JSON (default: <name>_fewshot.json beside the results)")
    parser.add_argument("--name", help="figure prefix (default: the results' file stem)")
    parser.add_argument("--out-dir", type=Path, help="folder of the PNGs (default: beside the inputs)")
    parser.add_argument("--flavour", help="text_methods.py results: the flavour to plot (full, lora)")
    args = parser.parse_args(argv)
    try:
        written = make_plots(args.results, args.coefficients, args.fewshot, args.name, args.out_dir, args.flavour)
    except PlotInputError as error:
        parser.exit(2, f"error: {error}\n")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
