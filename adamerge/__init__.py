"""adamerge: test-time adaptive model merging.

Task vectors ``τ_k = θ_k − θ_0`` of fine-tuned experts are held as frozen buffers; merging
coefficients λ are learned on unlabeled (or few-shot) data; the merged weights
``θ_0 + Σ_k g(λ_k) ⊙ τ_k`` are recomputed inside ``forward`` so gradients reach λ only.
"""

from adamerge.coefficients import Coefficients
from adamerge.errors import AdamergeError
from adamerge.granularity import GroupWise, TaskWise, TensorWise
from adamerge.merged_model import MergedModel
from adamerge.module import MergingModule
from adamerge.task_vectors import TaskVectors

__version__ = "0.1.0"

__all__ = [
    "AdamergeError",
    "Coefficients",
    "GroupWise",
    "MergedModel",
    "MergingModule",
    "TaskVectors",
    "TaskWise",
    "TensorWise",
]
