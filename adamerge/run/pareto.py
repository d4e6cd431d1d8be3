"""``adamerge pareto``: an amortized Pareto front of task-wise λ by quadratic surrogates (MAP).

Li et al., "MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic
Approximation", 2024 (arXiv 2406.07529). Task arithmetic ``θ(λ) = θ_0 + Σ_k λ_k τ_k`` with one λ
per task in the box ``[low, high]^K`` (``--bounds``):

1. ``--points`` λ (scrambled Sobol, seeded; plus the task-arithmetic point λ = 0.3) are evaluated
   on every task, the model built once (:class:`~adamerge.core.merged_model.MergedModel`, granularity
   ``task``, constraint ``none``) and only its coefficients set per point. The metric is accuracy
   on ``--eval`` (as ``fit`` / ``merge`` evaluate: classifiers through Lightning's test loop, a
   causal LM by exact match of greedy answers, the merge materialised and generating at every
   point, which is slow) or, without labels, agreement with each task's own expert on its
   ``--calib`` inputs (the safeguard's measure, :func:`adamerge.run.safeguard.agreement_with_experts`:
   the share of inputs, or of a causal LM's scored next-token positions, where the merge predicts
   the expert's class; BatchNorm on batch statistics under the re-estimating policies);
2. per task, a quadratic surrogate is fitted by least squares (:mod:`adamerge.core.pareto`); its R² on
   the points and on about 20 % of them held out of a second fit are reported;
3. the surrogates score many candidate λ; the non-dominated ones are the front;
4. ``--pick`` task weights choose the front point with the best weighted mean prediction; that λ
   is evaluated for real and the merge there exported as ``adamerge merge`` exports it.

The output folder (atomic, :class:`~adamerge.storage.output_folder.OutputFolder`) holds
``points.json``, ``surrogates.json``, ``front.csv`` / ``front.md`` / ``front.png``,
``picked.json``, the merged model at the picked λ (``merged.pt`` + ``heads/`` or the source's own
format, ``coefficients.json`` / ``.tsv``), ``metrics.json`` and ``config.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from adamerge.choices import PARETO_METRICS, REESTIMATING_POLICIES
from adamerge.core.pareto import (
    amortized_front,
    fit_quadratic,
    num_coefficients,
    predict_quadratic,
    quadratic_pairs,
    r_squared,
    sobol_box,
    weighted_pick,
    weighted_scores,
)
from adamerge.errors import AdamergeError
from adamerge.run.checks import check_common_settings, input_paths
from adamerge.run.export import plain_config, write_coefficients, write_merged_model_of
from adamerge.run.module import statistics_loaders_of
from adamerge.run.pareto_plot import plot_front
from adamerge.run.progress import Stages
from adamerge.run.safeguard import agreement_with_experts, expert_predictions, held_out_batches
from adamerge.run.settings import FitSettings, ParetoSettings
from adamerge.run.workflow import evaluation_of, evaluation_trainer, load_run
from adamerge.storage.files import write_json, write_yaml
from adamerge.storage.output_folder import OutputFolder

logger = logging.getLogger(__name__)

#: λ of every task at the reference point (task arithmetic's default, Ilharco et al.)
REFERENCE_LAMBDA = 0.3
#: share of the points held out of a second fit, for the held-out R²
HELD_OUT_SHARE = 0.2

Evaluate = Callable[[torch.Tensor], dict[str, float]]  # λ (K,) -> {task: metric}


def run_pareto(settings: ParetoSettings) -> dict[str, Any]:
    """Run ``adamerge pareto``; returns the metrics written to ``metrics.json``.

    Every option is checked, and the output folder checked and locked, before anything is loaded.
    """
    started = time.perf_counter()
    check_pareto_settings(settings)
    metric = resolved_metric(settings)
    workflow = as_workflow_settings(settings)
    with OutputFolder(settings.output, settings.overwrite, input_paths(settings)) as output:
        stages = Stages(live=settings.progress_bar)
        with stages.stage("loading experts and data"):
            loaded = load_run(workflow)
        experts = loaded.experts
        tasks = list(experts.tasks)
        weights = torch.tensor([float(settings.pick.get(task, 1.0)) for task in tasks], dtype=torch.float64)  # (K,)
        low, high = settings.bounds
        count = settings.points if settings.points is not None else 2 * num_coefficients(len(tasks))
        with output.staging() as staging:
            evaluate = _evaluator(metric, loaded, staging)
            lam = torch.cat([sobol_box(count, low, high, len(tasks), settings.seed), _reference(low, high, len(tasks))])  # (N, K)
            with stages.stage(f"evaluating {lam.shape[0]} points ({metric})", total=lam.shape[0], unit="points") as bar:
                measured = torch.tensor(_measure(evaluate, lam, tasks, bar), dtype=torch.float64)  # (N, K)
            with stages.stage("fitting the surrogates and the front"):
                surrogates = fit_surrogates(lam, measured, settings.ridge, settings.seed, tasks)
                coefficients = torch.tensor([surrogates["tasks"][t]["coefficients"] for t in tasks], dtype=torch.float64).T  # (P, K)
                front_lam, front_values = amortized_front(
                    coefficients, low, high, settings.candidates, settings.front_size, settings.seed, weights[None]
                )
                chosen = weighted_pick(front_values, weights)
            picked_lam = front_lam[chosen]  # (K,)
            with stages.stage("evaluating the picked λ"):
                picked_measured = evaluate(picked_lam)
            picked = {
                "weights": dict(zip(tasks, weights.tolist(), strict=True)),
                "lambda": dict(zip(tasks, picked_lam.tolist(), strict=True)),
                "predicted": _with_mean(dict(zip(tasks, front_values[chosen].tolist(), strict=True))),
                "measured": _with_mean({task: picked_measured[task] for task in tasks}),
                "front_index": chosen,
            }
            logger.info(
                "picked λ %s: predicted %s, measured %s",
                _fmt(picked["lambda"]), _fmt(picked["predicted"]), _fmt(picked["measured"]),
            )  # fmt: skip
            picked["exported"] = exported_point(picked, lam, measured, weights, tasks)
            with stages.stage("writing"):
                metrics = _write(staging, settings, loaded, metric, lam, measured, surrogates, front_lam, front_values, picked)
                metrics["timing_s"] = {"total": time.perf_counter() - started, "stages": dict(stages.seconds)}
                write_json(staging / "metrics.json", metrics)
    logger.info("stage times: %s", stages.summary())
    return metrics


def check_pareto_settings(settings: ParetoSettings) -> None:
    """Every ``adamerge pareto`` option whose value can be checked without loading anything."""
    check_common_settings(settings)
    if settings.metric not in PARETO_METRICS:
        raise AdamergeError(f"--metric {settings.metric!r}: expected one of {', '.join(PARETO_METRICS)}")
    bounds = tuple(settings.bounds)
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds):
        raise AdamergeError(f"--bounds {settings.bounds!r}: expected two finite numbers LOW HIGH")
    if bounds[0] >= bounds[1]:
        raise AdamergeError(f"--bounds {bounds[0]:g} {bounds[1]:g}: expected LOW < HIGH")
    needed = num_coefficients(len(settings.experts))
    if settings.points is not None and (isinstance(settings.points, bool) or settings.points < needed):
        raise AdamergeError(
            f"--points {settings.points}: a quadratic in {len(settings.experts)} task coefficients has {needed} coefficients; "
            f"sample at least that many points (default: {2 * needed})"
        )
    for name, low in (("candidates", 1), ("front_size", 1)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise AdamergeError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {low}")
    if (
        isinstance(settings.ridge, bool)
        or not isinstance(settings.ridge, (int, float))
        or not (math.isfinite(settings.ridge) and settings.ridge >= 0)
    ):
        raise AdamergeError(f"--ridge {settings.ridge!r}: expected a finite number >= 0")
    check_pick(settings.pick, list(settings.experts))
    if settings.metric == "accuracy" and settings.eval is None:
        raise AdamergeError("--metric accuracy: pass --eval DIR of labelled data (or --metric agreement with --calib)")
    if resolved_metric(settings) == "agreement" and settings.calib is None:
        chosen = "--metric agreement" if settings.metric == "agreement" else "--metric auto (no --eval: agreement)"
        raise AdamergeError(f"{chosen}: pass --calib DIR (each task's unlabeled inputs, compared with its expert), or --eval for accuracy")
    if settings.surgery_steps:
        raise AdamergeError("--surgery-steps: adamerge pareto exports plain task arithmetic merges; run surgery with fit or merge")
    if settings.options:
        raise AdamergeError("--options: adamerge pareto merges by task arithmetic with its own λ per point; it takes no method options")


def check_pick(pick: Mapping[str, Any], tasks: list[str]) -> None:
    """``--pick``: known tasks and finite weights > 0."""
    if not isinstance(pick, Mapping):
        raise AdamergeError(f"--pick {pick!r}: expected a mapping of task weights, e.g. {{{tasks[0]}: 2}}")
    unknown = sorted(set(pick) - set(tasks))
    if unknown:
        raise AdamergeError(f"--pick: {', '.join(unknown)} is not a task of --experts ({', '.join(tasks)})")
    for task, weight in pick.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise AdamergeError(f"--pick {task}: {weight!r}: expected a finite weight > 0")


def resolved_metric(settings: ParetoSettings) -> str:
    """``--metric auto``: ``accuracy`` with ``--eval``, else ``agreement``."""
    if settings.metric != "auto":
        return settings.metric
    return "accuracy" if settings.eval is not None else "agreement"


def as_workflow_settings(settings: ParetoSettings) -> FitSettings:
    """The workflow's settings of task arithmetic at one frozen λ per task (set per point)."""
    shared = {f.name for f in dataclasses.fields(ParetoSettings)} & {f.name for f in dataclasses.fields(FitSettings)}
    values = {name: getattr(settings, name) for name in shared}
    fixed = {"method": "task-arithmetic", "granularity": "task", "eval_experts": False, "eval_init": False, "holdout": 0.0}
    return FitSettings(**(values | fixed | {"options": {}, "progress_bar": False}))


def _reference(low: float, high: float, num_tasks: int) -> torch.Tensor:
    """``(1, K)``: the task-arithmetic point λ = 0.3 on the box's diagonal (clipped into the box)."""
    return torch.full((1, num_tasks), min(max(REFERENCE_LAMBDA, low), high), dtype=torch.float64)


def _evaluator(metric: str, loaded: Any, staging: Path) -> Evaluate:
    """``λ (K,) -> {task: metric}`` of the loaded merge, its coefficients set to λ each call."""
    merged, module, data, experts = loaded.merged, loaded.module, loaded.data, loaded.experts

    def at(lam: torch.Tensor) -> None:
        merged.coefficients.set_values(lam.to(torch.float32))  # (K,): one λ per task

    if metric == "accuracy":
        evaluation = evaluation_of(loaded.settings, experts, data)
        tester = evaluation_trainer(loaded.settings, staging)

        def accuracy(lam: torch.Tensor) -> dict[str, float]:
            at(lam)
            scores = evaluation.merge(tester, module)[0]
            missing = [task for task in experts.tasks if task not in scores]
            if missing:
                raise AdamergeError(
                    f"--metric accuracy: --eval gives no accuracy for {', '.join(missing)} (a causal LM's records need "
                    "prompt/answer pairs; perplexity is not a metric here); use --metric agreement with --calib"
                )
            return scores

        return accuracy
    if experts.expert_model is None:
        raise AdamergeError("--metric agreement: this expert source cannot rebuild the experts alone; pass --eval for accuracy")
    inputs = held_out_batches(statistics_loaders_of(data))  # every calibration input, in file order
    device = module.device
    targets = expert_predictions(inputs, experts.expert_model, device, experts.task_type)

    def agreement(lam: torch.Tensor) -> dict[str, float]:
        at(lam)
        return agreement_with_experts(merged, inputs, targets, device, experts.task_type)

    return agreement


def _measure(evaluate: Evaluate, lam: torch.Tensor, tasks: list[str], bar: Any) -> list[list[float]]:
    """``(N, K)`` metrics of the points ``lam`` (one log line per point, the bar advanced)."""
    rows = []
    for index, point in enumerate(lam):
        scores = evaluate(point)
        rows.append([scores[task] for task in tasks])
        logger.info(
            "point %d/%d, λ %s: %s",
            index + 1, lam.shape[0], _fmt(dict(zip(tasks, point.tolist(), strict=True))), _fmt(_with_mean(dict(zip(tasks, rows[-1], strict=True)))),
        )  # fmt: skip
        bar.advance()
    return rows


def fit_surrogates(lam: torch.Tensor, measured: torch.Tensor, ridge: float, seed: int, tasks: list[str]) -> dict[str, Any]:
    """Each task's quadratic surrogate on all points, its R² there, and the held-out R² of a fit
    on the other points (``None`` where too few remain to determine a quadratic).

    Args:
        lam: ``(N, K)`` evaluated points.
        measured: ``(N, K)`` their metrics, one column per task.
        ridge: penalty on the non-constant coefficients.
        seed: seed of the held-out split.
        tasks: the K task names.
    """
    n, k = lam.shape
    coefficients = fit_quadratic(lam, measured, ridge)  # (P, K)
    fitted = predict_quadratic(coefficients, lam)  # (N, K)
    held = max(1, round(HELD_OUT_SHARE * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    test, train = order[:held], order[held:]
    enough = train.numel() >= num_coefficients(k)
    if enough:
        partial = fit_quadratic(lam[train], measured[train], ridge)  # (P, K)
        predicted_test = predict_quadratic(partial, lam[test])  # (H, K)
    else:
        logger.warning("held-out R²: %d points leave %d to fit %d coefficients; not reported", n, train.numel(), num_coefficients(k))
    names = ["1", *(f"λ[{t}]" for t in tasks), *(f"λ[{tasks[i]}]·λ[{tasks[j]}]" for i, j in quadratic_pairs(k))]
    per_task = {}
    for index, task in enumerate(tasks):
        per_task[task] = {
            "coefficients": coefficients[:, index].tolist(),
            "r2": r_squared(measured[:, index], fitted[:, index]),
            "held_out_r2": r_squared(measured[test, index], predicted_test[:, index]) if enough else None,
        }
        logger.info(
            "surrogate of %s: R² %.4f on the %d points, held-out R² %s",
            task, per_task[task]["r2"], n, f"{per_task[task]['held_out_r2']:.4f}" if enough else "-",
        )  # fmt: skip
    return {"features": names, "ridge": ridge, "points": n, "held_out_points": sorted(test.tolist()) if enough else [], "tasks": per_task}


def exported_point(
    picked: dict[str, Any], lam: torch.Tensor, measured: torch.Tensor, weights: torch.Tensor, tasks: list[str]
) -> dict[str, Any]:
    """The λ to export: the front's pick, unless a sampled point measured better under the same
    weights (the surrogates were wrong there), in which case that point, with a warning.

    Args:
        picked: the front's pick, measured (``"lambda"``, ``"measured"``).
        lam: ``(N, K)`` the sampled points (the reference included).
        measured: ``(N, K)`` their measured metrics.
        weights: ``(K,)`` the pick's task weights.
        tasks: the K task names.
    """
    scores = weighted_scores(measured, weights)  # (N,) weighted mean per sampled point
    best = weighted_pick(measured, weights)

    def score(values: Mapping[str, float]) -> float:
        return float(weighted_scores(torch.tensor([[values[t] for t in tasks]], dtype=torch.float64), weights)[0])

    picked_score = score(picked["measured"])
    if float(scores[best]) <= picked_score:
        return {"source": "front pick", "lambda": picked["lambda"], "weighted_measured": picked_score}
    logger.warning(
        "the front's pick measures %.4g (weighted mean; predicted %.4g), below sampled point %d at %.4g: exporting that "
        "point (the surrogates are off there: see the held-out R² in surrogates.json; narrower --bounds or more --points help)",
        picked_score, score(picked["predicted"]), best, float(scores[best]),
    )  # fmt: skip
    return {
        "source": "sampled point",
        "index": best,
        "lambda": dict(zip(tasks, lam[best].tolist(), strict=True)),
        "measured": _with_mean(dict(zip(tasks, measured[best].tolist(), strict=True))),
        "weighted_measured": float(scores[best]),
    }


def _write(
    staging: Path,
    settings: ParetoSettings,
    loaded: Any,
    metric: str,
    lam: torch.Tensor,
    measured: torch.Tensor,
    surrogates: dict[str, Any],
    front_lam: torch.Tensor,
    front_values: torch.Tensor,
    picked: dict[str, Any],
) -> dict[str, Any]:
    """Every output file but ``metrics.json``; returns the metrics."""
    merged, module, data, experts = loaded.merged, loaded.module, loaded.data, loaded.experts
    tasks = list(experts.tasks)
    reference = lam.shape[0] - 1
    held = set(surrogates["held_out_points"])
    points = [
        {
            "kind": "reference" if i == reference else "sobol",
            "lambda": dict(zip(tasks, lam[i].tolist(), strict=True)),
            "metric": _with_mean(dict(zip(tasks, measured[i].tolist(), strict=True))),
            "held_out": i in held,
        }
        for i in range(lam.shape[0])
    ]
    write_json(staging / "points.json", {"metric": metric, "tasks": tasks, "bounds": list(settings.bounds), "points": points})
    write_json(staging / "surrogates.json", surrogates)
    _write_front(staging, tasks, front_lam, front_values)
    write_json(staging / "picked.json", picked)
    files = {
        "points": "points.json",
        "surrogates": "surrogates.json",
        "front": "front.csv",
        "front_table": "front.md",
        "picked": "picked.json",
    }
    picked_values = torch.tensor([[picked["predicted"][t] for t in tasks], [picked["measured"][t] for t in tasks]])  # (2, K)
    if plot_front(staging / "front.png", tasks, front_values, measured, picked_values, metric):
        files["front_plot"] = "front.png"
    merged.coefficients.set_values(torch.tensor(list(picked["exported"]["lambda"].values()), dtype=torch.float32))
    if merged.batchnorm in REESTIMATING_POLICIES and data is not None:
        module.reestimate_batchnorm(statistics_loaders_of(data))  # exported statistics belong to the exported λ
    write_coefficients(staging, merged)
    files |= write_merged_model_of(staging, merged, experts.export)
    write_yaml(staging / "config.yaml", plain_config(dataclasses.asdict(settings)))
    return {
        "tasks": tasks,
        "method": "pareto (MAP, task arithmetic)",
        "metric": metric,
        "batchnorm": merged.batchnorm,
        "points": lam.shape[0],
        "r2": {t: surrogates["tasks"][t]["r2"] for t in tasks},
        "held_out_r2": {t: surrogates["tasks"][t]["held_out_r2"] for t in tasks},
        "front_size": front_lam.shape[0],
        "picked": picked,
        "reference": points[reference],
        "files": files,
    }


def _write_front(staging: Path, tasks: list[str], front_lam: torch.Tensor, front_values: torch.Tensor) -> None:
    """``front.csv`` and ``front.md``: λ per task, predicted metric per task and their mean."""
    header = [*(f"lambda_{t}" for t in tasks), *(f"predicted_{t}" for t in tasks), "predicted_mean"]
    rows = [[*lam.tolist(), *values.tolist(), float(values.mean())] for lam, values in zip(front_lam, front_values, strict=True)]
    with open(staging / "front.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[f"{v:.6f}" for v in row] for row in rows])
    lines = ["| " + " | ".join([*(f"λ {t}" for t in tasks), *(f"{t} (predicted)" for t in tasks), "mean (predicted)"]) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += [
        "| " + " | ".join([*(f"{v:.3f}" for v in row[: len(tasks)]), *(f"{100 * v:.1f}" for v in row[len(tasks) :])]) + " |" for row in rows
    ]
    (staging / "front.md").write_text("\n".join(lines) + "\n")


def _with_mean(values: dict[str, float]) -> dict[str, float]:
    return values | {"mean": sum(values.values()) / len(values)}


def _fmt(values: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4f}" for k, v in values.items()) + "}"
