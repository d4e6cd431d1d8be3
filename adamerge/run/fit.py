"""``adamerge fit``: a learned method through the one workflow (:mod:`adamerge.run.workflow`).

The output folder is checked and locked before anything is loaded, and λ-only checkpoints are kept
beside it while the fit runs, so that ``--resume`` continues an interrupted fit exactly
(:mod:`adamerge.run.resume`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from adamerge.errors import AdamergeError
from adamerge.methods import get_method
from adamerge.run.checks import check_accelerator, check_fit_settings, input_paths
from adamerge.run.export import plain_config
from adamerge.run.resume import ResumeState
from adamerge.run.settings import FitSettings
from adamerge.run.surgery import check_surgery_settings
from adamerge.run.workflow import run_workflow
from adamerge.storage.output_folder import OutputFolder


def run_fit(settings: FitSettings) -> dict[str, Any]:
    """Run ``adamerge fit``; returns the metrics written to ``metrics.json``.

    Every option is checked, and the output folder checked and locked, before anything is loaded
    (:func:`adamerge.run.checks.check_fit_settings`, :class:`adamerge.storage.output_folder.OutputFolder`).
    """
    started = time.perf_counter()
    check_fit_settings(settings)
    get_method(settings.method, learned=True)
    if settings.calib is None:
        raise AdamergeError("--calib: a learned method needs a folder of calibration data (one sub-folder per task)")
    check_surgery_settings(settings)
    with OutputFolder(settings.output, settings.overwrite, input_paths(settings)) as output:
        check_accelerator(settings.accelerator, settings.devices, settings.strategy, settings.precision)
        resume = ResumeState(
            output.output, plain_config(dataclasses.asdict(settings)), settings.resume, settings.checkpoint_every, output.writer
        )
        resume.start()
        try:
            metrics = run_workflow(settings, output, resume, started)
        except AdamergeError:
            resume.discard()  # bad input: nothing to resume
            raise
        resume.discard()
    return metrics
