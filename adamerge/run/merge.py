"""``adamerge merge``: a static merge (no training) through ``adamerge fit``'s workflow.

A static method (:class:`~adamerge.methods.StaticMethod`) rewrites the task vectors and fixes λ;
the :class:`~adamerge.core.merged_model.MergedModel`, the BatchNorm policy (statistics re-estimated on
``--calib`` data when given), the Representation Surgery (``--surgery-steps``, on ``--calib``),
the evaluation (``--eval``, each task with its own head) and the export are the learned merges' own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from adamerge.methods import get_method
from adamerge.run.checks import check_common_settings, input_paths
from adamerge.run.settings import FitSettings, MergeSettings
from adamerge.run.surgery import check_surgery_settings
from adamerge.run.workflow import run_workflow
from adamerge.storage.output_folder import OutputFolder

logger = logging.getLogger(__name__)


def run_merge(settings: MergeSettings) -> dict[str, Any]:
    """Run ``adamerge merge``; returns the metrics written to ``metrics.json``.

    The same workflow as ``adamerge fit`` (:func:`adamerge.run.workflow.run_workflow`) with a method that
    has no training stage: the merged model is ``θ_0 + Σ_k λ_k τ'_k`` at the method's fixed λ on
    its rewritten task vectors. Options and the output folder are checked (and the folder locked)
    before anything is loaded. Under a re-estimating BatchNorm policy a model with BatchNorm
    layers needs ``--calib``, with or without ``--eval``: statistics are never kept from the base
    silently.
    """
    started = time.perf_counter()
    check_common_settings(settings)
    method = get_method(settings.method, learned=False)
    workflow = as_workflow_settings(settings)
    method.configured(workflow)  # bad --options fail before the output folder is touched
    check_surgery_settings(settings)  # --surgery-steps needs --calib, and per-task heads
    with OutputFolder(settings.output, settings.overwrite, input_paths(settings)) as output:
        return run_workflow(workflow, output, None, started)


def as_workflow_settings(settings: MergeSettings) -> FitSettings:
    """The workflow's settings of a static merge: one frozen λ per task, nothing trained or held out."""
    shared = {f.name for f in dataclasses.fields(MergeSettings)} & {f.name for f in dataclasses.fields(FitSettings)}
    values = {name: getattr(settings, name) for name in shared}
    return FitSettings(**values, granularity="task", eval_experts=False, eval_init=False, holdout=0.0, progress_bar=False)
