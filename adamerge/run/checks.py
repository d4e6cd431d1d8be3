"""Checks a run makes before it loads anything heavy, so that a bad option costs one line and
no minutes: option values, the accelerator, the evaluation folders' classes against the heads.

Each check raises :class:`adamerge.errors.AdamergeError` naming the option and what was expected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from adamerge.choices import BATCHNORM_POLICIES, CONSTRAINTS, TASK_VECTOR_DTYPES
from adamerge.core.granularity import parse_granularity
from adamerge.core.model_inputs import as_logits
from adamerge.errors import AdamergeError, DataError
from adamerge.run.task_names import check_task_names

logger = logging.getLogger(__name__)


def _at_least(settings: Any, name: str, low: float, optional: bool = False) -> None:
    value = getattr(settings, name, None)
    if value is None and optional:
        return
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise AdamergeError(f"{option} {value!r}: expected a number >= {low:g}")


def _finite(settings: Any, name: str, positive: bool = False) -> None:
    value = getattr(settings, name, None)
    if value is None:
        return
    option = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise AdamergeError(f"{option} {value!r}: expected a finite number{' > 0' if positive else ''}")


def _choice(settings: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(settings, name, None)
    if value is not None and value not in choices:
        raise AdamergeError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(choices)}")


def _channel_values(settings: Any, name: str) -> None:
    """``--image-mean`` / ``--image-std``: three finite numbers (standard deviations > 0), or unset."""
    values = getattr(settings, name, None)
    if values is None:
        return
    option = "--" + name.replace("_", "-")
    numbers = list(values) if isinstance(values, (list, tuple)) else None
    if (
        numbers is None
        or len(numbers) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
        or (name == "image_std" and min(numbers) <= 0)
    ):
        expected = "three numbers > 0" if name == "image_std" else "three finite numbers"
        raise AdamergeError(f"{option} {values!r}: expected {expected}, one per RGB channel (e.g. {option} 0.5 0.5 0.5)")


def check_common_settings(settings: Any) -> None:
    """The options ``fit`` and ``merge`` share."""
    if not settings.experts:
        raise AdamergeError("--experts: no expert given; expected NAME=REF [NAME=REF ...]")
    check_task_names(settings.experts)
    for name in ("batch_size", "eval_batch_size", "max_length"):
        _at_least(settings, name, 1)
    _at_least(settings, "image_size", 1, optional=True)
    _at_least(settings, "surgery_steps", 0)
    _at_least(settings, "surgery_rank", 1)
    _finite(settings, "surgery_lr", positive=True)
    for name in ("image_mean", "image_std"):
        _channel_values(settings, name)
    _choice(settings, "batchnorm", BATCHNORM_POLICIES)
    if not isinstance(settings.base_kwargs, dict):
        raise AdamergeError(f"--base-kwargs {settings.base_kwargs!r}: expected a mapping, e.g. {{num_classes: 10}}")


def check_fit_settings(settings: Any) -> None:
    """Every ``adamerge fit`` option whose value can be checked without loading anything."""
    check_common_settings(settings)
    _choice(settings, "task_vector_dtype", TASK_VECTOR_DTYPES)
    _choice(settings, "constraint", CONSTRAINTS)
    if settings.granularity is not None:
        parse_granularity(settings.granularity)
    _at_least(settings, "steps", 1)
    _at_least(settings, "num_workers", 0)
    _at_least(settings, "checkpoint_every", 0)
    for name in ("calib_limit", "shots", "chunk_budget"):
        _at_least(settings, name, 1, optional=True)
    for name in ("init", "chunk_kappa", "gamma"):
        _finite(settings, name)
    for name in ("lr", "temperature"):
        _finite(settings, name, positive=True)
    holdout = settings.holdout
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise AdamergeError(f"--holdout {holdout!r}: expected a share of the calibration inputs, 0 <= holdout < 1 (0: no safeguard)")
    threshold = settings.pseudo_label_threshold
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise AdamergeError(f"--pseudo-label-threshold {threshold!r}: expected a probability in [0, 1]")
    unknown = sorted(set(settings.task_weights) - set(settings.experts))
    if unknown:
        raise AdamergeError(f"--task-weights: {', '.join(unknown)} is not a task of --experts ({', '.join(settings.experts)})")
    for task, weight in settings.task_weights.items():
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise AdamergeError(f"--task-weights {task}: {weight!r}: expected a finite number >= 0")


def input_paths(settings: Any) -> list[Path]:
    """The files and folders a run reads (the output may not hold them)."""
    paths = [_reference_path(settings.base), *(_reference_path(r) for r in settings.experts.values())]
    return paths + [Path(p) for p in (settings.calib, settings.eval) if p is not None]


def _reference_path(reference: str) -> Path:
    """The file or folder of ``ARCH@FILE``, ``hf:DIR``, ``peft:DIR`` or a plain path."""
    if "@" in reference:
        return Path(reference.rpartition("@")[2])
    for prefix in ("hf:", "peft:"):
        if reference.startswith(prefix):
            return Path(reference[len(prefix) :])
    return Path(reference)


def check_accelerator(accelerator: str, devices: Any, strategy: str, precision: str = "32-true") -> None:
    """Refuse an accelerator / devices / strategy / precision that Lightning cannot set up on this
    machine (e.g. ``--accelerator gpu`` without a GPU, ``--precision 16-mixed`` on a CPU), before
    any model is loaded."""
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        if precision == "16-mixed" and trainer.accelerator.__class__.__name__ == "CPUAccelerator":
            raise ValueError("float16 autocast needs a CUDA GPU; on a CPU use --precision bf16-mixed")
    except Exception as error:  # Lightning raises MisconfigurationException, ValueError, RuntimeError
        text = str(error).strip().splitlines()
        raise AdamergeError(
            f"--accelerator {accelerator} --devices {devices} --strategy {strategy} --precision {precision}: "
            f"{text[0] if text else type(error).__name__}"
        ) from None
    finally:
        quiet.setLevel(level)


def check_eval_classes(data: Any, forward: Callable[[str, Any], Any]) -> None:
    """Refuse evaluation folders whose class count differs from what the task's head predicts
    (a missing or extra ``<class>`` folder would shift every label against the head).

    Args:
        data: a DataModule with ``class_counts()`` and ``evaluation`` datasets (image data).
        forward: ``(task, inputs) -> logits`` of the merged model.
    """
    if not hasattr(data, "class_counts"):
        return
    counts = data.class_counts()
    for task, classes in counts.items():
        dataset = data.evaluation[task]
        first = dataset[0][0]
        if not isinstance(first, torch.Tensor) or not hasattr(dataset, "classes"):
            continue  # text: labels are range-checked against the head when read
        inputs = first.unsqueeze(0)  # (1, 3, S, S)
        with torch.no_grad():
            predicted = as_logits(forward(task, inputs)).shape[-1]
        if predicted != classes:
            names = ", ".join(dataset.classes[:6]) + (", ..." if classes > 6 else "")
            raise DataError(
                f"--eval {Path(data.eval_dir) / task}: {classes} class folder(s) ({names}), but task {task!r}'s head "
                f"predicts {predicted} classes; expected one folder per class, in the head's order (sorted names)"
            )
