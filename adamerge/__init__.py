"""adamerge: test-time adaptive model merging.

Task vectors ``τ_k = θ_k − θ_0`` of fine-tuned experts are held as frozen buffers; merging
coefficients λ are learned on unlabeled (or few-shot) data; the merged weights
``θ_0 + Σ_k g(λ_k) ⊙ τ_k`` are recomputed inside ``forward`` so gradients reach λ only.

The package reads top-down (each layer imports only the ones below it; CI checks it):

- :mod:`adamerge.cli` — the ``adamerge`` command; :mod:`adamerge.demo` — the benchmarks' assets;
- :mod:`adamerge.run` — the one workflow of ``fit`` and ``merge``, its settings and parts;
- :mod:`adamerge.methods` — methods as objects and their registry;
- :mod:`adamerge.sources`, :mod:`adamerge.objectives`, :mod:`adamerge.rewrite` — expert sources,
  training objectives, task-vector rewrites and static merges;
- :mod:`adamerge.data`, :mod:`adamerge.task_types` — calibration / evaluation data, what a task's
  output is and how it is scored;
- :mod:`adamerge.core` — task vectors, granularities, coefficients, the merge, ``MergedModel``;
- :mod:`adamerge.storage` — atomic files, state-dict files, the output folder.

The names below are imported on first use (PEP 562), so that ``import adamerge.errors`` or the
command line's ``--help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdamergeError": "adamerge.errors",
    "Coefficients": "adamerge.core.coefficients",
    "GroupWise": "adamerge.core.granularity",
    "MergedModel": "adamerge.core.merged_model",
    "MergingModule": "adamerge.run.module",
    "TaskVectors": "adamerge.core.task_vectors",
    "TaskWise": "adamerge.core.granularity",
    "TensorWise": "adamerge.core.granularity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'adamerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
