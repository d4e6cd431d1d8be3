#!/usr/bin/env python
"""Re-test exported vision merges on fresh rows: a check that choosing a setting on the test split
did not tune it to those 500 images.

The vision benchmark's splits (``splits.json`` of the demo cache) use the first rows of each task's
seeded permutation: test, calibration, fine-tuning. The rows after them were never read by the
experts, the fits or the table. This script takes ``--rows`` of them per task, then tests the
experts alone and each exported merge on them. Each merge is loaded as a user would: a plain
torchvision ``mobilenet_v2`` with ``merged.pt`` and ``heads/<task>.pt``, no adamerge. The test
split is scored again the same way, so the table shows both splits side by side. The test-split
scores also check the export: they must equal the fit's ``metrics.json``.

    python -m benchmarks.fresh_rows --cache-dir /tmp/suite-fresh5/demo-vision \\
        --runs chunk64=runs/c64 chunk128=runs/c128 --out benchmarks/results/vision_fresh_rows.json

A task whose data set has no rows left (USPS: 2,007 rows, all in the splits) is left out of the
fresh-row columns, and the normalized accuracy of both splits is then taken over the same tasks.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torchvision

from adamerge.datasets.vision import load_vision_task
from adamerge.demo.vision import DEFAULT_TASKS, accuracy, load_expert, sha256_array, to_input_tensor
from adamerge.errors import AdamergeError
from benchmarks.runner import write_results

logger = logging.getLogger("fresh_rows")


def split_rows(split: Mapping, count: int) -> dict[str, np.ndarray]:
    """A task's test rows and up to ``count`` rows that no part of its split holds.

    Args:
        split: one task's ``splits.json`` record (``rows``, ``seed``, ``parts`` with ``perm_range``
            and ``sha256``).
        count: fresh rows wanted.

    Returns:
        ``{"test": rows, "fresh": rows}``, int64 row indices; ``fresh`` are the permutation's
        entries after its last part (possibly none).

    Raises:
        AdamergeError: if regenerating the permutation does not give the recorded parts back.
    """
    perm = np.random.default_rng(split["seed"]).permutation(split["rows"])  # (rows,)
    parts = {}
    for name, part in split["parts"].items():
        start, stop = part["perm_range"]
        parts[name] = perm[start:stop].astype(np.int64)
        if sha256_array(parts[name].astype("<i8")) != part["sha256"]:
            raise AdamergeError(f"split part {name!r}: the regenerated rows do not match the recorded sha256")
    end = max(part["perm_range"][1] for part in split["parts"].values())
    return {"test": parts["test"], "fresh": perm[end : end + count].astype(np.int64)}


def load_merge(run: Path, task: str, num_classes: int) -> torch.nn.Module:
    """A plain torchvision MobileNetV2 with an exported merge and the task's head (eval mode)."""
    files = [run / "merged.pt", run / "heads" / f"{task}.pt"]
    for path in files:
        if not path.is_file():
            raise AdamergeError(f"{path}: not found (expected an `adamerge fit` output folder)")
    model = torchvision.models.mobilenet_v2(num_classes=num_classes)
    state = {}
    for path in files:
        try:
            state |= torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise AdamergeError(f"{path}: not a readable state dict ({error})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise AdamergeError(f"{run}: merged.pt + heads/{task}.pt do not load into mobilenet_v2({num_classes} classes): {error}") from None
    return model.eval()


def normalized(per_task: Mapping[str, float], experts: Mapping[str, float], tasks: list[str]) -> float:
    """Mean over ``tasks`` of merged ÷ expert accuracy."""
    return sum(per_task[t] / experts[t] for t in tasks) / len(tasks)


def main() -> None:
    try:
        run()
    except AdamergeError as error:
        raise SystemExit(f"fresh_rows: {error}") from None


def run() -> None:
    """Parse the command line, score every model on both splits, write the JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, required=True, help="the vision demo cache of the experts")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rows", type=int, default=1000, help="fresh rows per task (default 1000)")
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR", help="exported fits to test")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    runs = {}
    for item in args.runs:
        name, sep, folder = item.partition("=")
        if not sep or not name:
            parser.error(f"--runs {item!r}: expected NAME=DIR")
        runs[name] = Path(folder)
    manifest = json.loads((args.cache_dir / "manifest.json").read_text())["tasks"]
    splits = json.loads((args.cache_dir / "splits.json").read_text())
    tasks = [t for t in DEFAULT_TASKS if t in manifest] + sorted(set(manifest) - set(DEFAULT_TASKS))

    scores: dict[str, dict[str, dict[str, float]]] = {"test": {}, "fresh": {}}  # split -> model -> task
    fresh_counts = {}
    for task in tasks:
        arrays = load_vision_task(task, args.data_root)
        image_size = manifest[task]["fingerprint"]["settings"]["image_size"]
        rows = split_rows(splits[task], args.rows)
        fresh_counts[task] = len(rows["fresh"])
        num_classes = len(arrays.classes)
        models = {"expert (alone)": load_expert(args.cache_dir / "experts" / f"{task}.pth", num_classes)}
        models |= {name: load_merge(folder, task, num_classes) for name, folder in runs.items()}
        for split_name, indices in rows.items():
            if len(indices) == 0:
                continue
            inputs = to_input_tensor(arrays.images[indices], image_size)  # (N, 3, S, S)
            labels = torch.from_numpy(arrays.labels[indices])  # (N,)
            for name, model in models.items():
                scores[split_name].setdefault(name, {})[task] = accuracy(model, inputs, labels)
        if abs(scores["test"]["expert (alone)"][task] - manifest[task]["accuracy"]) > 1e-9:
            raise SystemExit(f"{task}: the expert scores {scores['test']['expert (alone)'][task]} on its test rows, "
                             f"the manifest says {manifest[task]['accuracy']}")
        logger.info("%s: %d test rows, %d fresh rows", task, len(rows["test"]), len(rows["fresh"]))

    shared = [t for t in tasks if fresh_counts[t] > 0]
    if not shared:
        raise SystemExit("no task has rows left outside its split")
    for name, folder in runs.items():  # the plain-torchvision scores must be the fit's own
        reported = json.loads((folder / "metrics.json").read_text())["accuracy"]
        key = list(reported)[-1]  # the final merge (after the experts, the start, a ++ run's stage one)
        for task in tasks:
            if abs(reported[key][task] - scores["test"][name][task]) > 1e-9:
                raise SystemExit(f"{folder}: {task} test accuracy {scores['test'][name][task]} != metrics.json's {reported[key][task]}")
    results = {}
    for name in ["expert (alone)", *runs]:
        results[name] = {
            split_name: {
                "per_task": scores[split_name][name],
                "normalized_shared_tasks": normalized(scores[split_name][name], scores[split_name]["expert (alone)"], shared),
            }
            for split_name in ("test", "fresh")
        }
        if name in runs:
            results[name]["test"]["normalized_all_tasks"] = normalized(
                scores["test"][name], scores["test"]["expert (alone)"], tasks
            )
    payload = {
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.fresh_rows", *sys.argv[1:]]),  # run names may hold spaces
        "tasks": tasks,
        "shared_tasks": shared,
        "fresh_rows": fresh_counts,
        "runs": {name: str(folder) for name, folder in runs.items()},
        "results": results,
    }
    lines = [
        f"Command: `{payload['command']}`",
        "",
        f"Fresh rows per task: {', '.join(f'{t} {n}' for t, n in fresh_counts.items())}. "
        f"Normalized over the tasks with fresh rows ({', '.join(shared)}); `all` is over every task.",
        "",
        "| model | " + " | ".join(f"{t} test / fresh" for t in tasks) + " | normalized test / fresh | normalized test, all |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for name, entry in results.items():
        cells = []
        for task in tasks:
            fresh = entry["fresh"]["per_task"].get(task)
            cells.append(f"{100 * entry['test']['per_task'][task]:.1f} / " + ("-" if fresh is None else f"{100 * fresh:.1f}"))
        test, fresh = (100 * entry[split_name]["normalized_shared_tasks"] for split_name in ("test", "fresh"))
        every = 100 * entry["test"].get("normalized_all_tasks", 1.0)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {test:.1f} / {fresh:.1f} | {every:.1f} |")
    markdown = "\n".join(lines) + "\n"
    write_results(args.out, payload, markdown)
    sys.stdout.write(markdown)


if __name__ == "__main__":
    main()
