"""What every expert source produces, and the options every source reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adamerge.core.task_vectors import TaskVectors
from adamerge.data.image_preprocessing import ImagePreprocessing
from adamerge.task_types import CLASSIFICATION, TaskType

MODALITIES = ("image", "text")


@dataclass
class SourceOptions:
    """Settings an expert source may need beyond the base and expert references.

    Attributes:
        head_pattern: regex of task-specific tensors (never merged); sources that know their heads
            (open_clip zero-shot heads, Hugging Face classifiers, peft ``modules_to_save``) set it.
        batchnorm: BatchNorm statistics policy (``merge`` also merges float buffers).
        dtype: storage dtype of the task vectors.
        base_kwargs: constructor keyword arguments of an architecture spec.
        calib: the calibration folder (open_clip reads each task's class names beside it).
        eval: the labelled evaluation folder, if any.
        trust_pickles: allow expert files that are pickled modules (unpickling runs code from the
            file: only for files you trust, e.g. the task-vectors / AdaMerging checkpoints).
        task_type: the tasks' type; a Hugging Face source builds its auto-class.
    """

    head_pattern: str | None = None
    batchnorm: str = "reestimate"
    dtype: torch.dtype = torch.float32
    base_kwargs: Mapping[str, Any] = field(default_factory=dict)
    calib: Path | None = None
    eval: Path | None = None
    trust_pickles: bool = False
    task_type: TaskType = CLASSIFICATION


@dataclass
class ExpertSet:
    """A base model holding θ_0, the experts' task vectors and their task-specific tensors.

    Attributes:
        model: the base architecture with the pretrained weights loaded; called with one batch of
            inputs (a tensor, or a dict of tensors as keyword arguments) it returns logits (or an
            output with ``.logits``).
        task_vectors: stacked ``τ_k`` of the merged tensors.
        heads: ``{task: {name: tensor}}`` of tensors that are never merged (may be empty).
        sources: references (paths, specs) recorded with results and checkpoints.
        modality: ``image`` (image tensors) or ``text`` (tokenised dicts).
        expert_model: ``task -> nn.Module``: the expert alone (its own weights and head), for
            evaluation and Expert Merging's targets; ``None`` if the source cannot rebuild it.
        export: ``(directory, state, heads) -> {what: file}`` writing the merged model (``state``:
            the full merged state dict in the base model's keys; ``heads``: ``{task: {name:
            tensor}}``) in the source library's own format; ``None``: a plain state dict
            (:func:`adamerge.run.export.write_merged_model`: ``merged.pt`` + ``heads/<task>.pt``).
        image_transform: the preprocessing the experts expect (``None``: ImageNet statistics at the
            requested size).
        image_preprocessing: the image size and normalisation the model's own metadata records
            (:func:`adamerge.data.image_preprocessing.model_metadata`), or ``None``; with
            ``image_transform`` set it only describes that transform.
        tokenizer: the base's tokenizer (text sources).
        num_classes: ``{task: classes}`` where the source knows them (labels are range-checked).
        task_specific: ``{task: {name: tensor}}`` of merged tensors each task keeps from its own
            expert instead (``--task-specific``, :mod:`adamerge.sources.task_specific`).
        task_type: what the tasks' outputs are and how they are scored (:mod:`adamerge.task_types`).
        default_granularity: the ``--granularity`` a learned method takes unless one is given.
    """

    model: nn.Module
    task_vectors: TaskVectors
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    modality: str = "image"
    expert_model: Callable[[str], nn.Module] | None = None
    export: Callable[[Path, Mapping[str, torch.Tensor], Mapping[str, Mapping[str, torch.Tensor]]], dict[str, str]] | None = None
    image_transform: Callable[[Any], torch.Tensor] | None = None
    image_preprocessing: ImagePreprocessing | None = None
    tokenizer: Any = None
    num_classes: dict[str, int] = field(default_factory=dict)
    task_specific: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    task_type: TaskType = CLASSIFICATION
    default_granularity: str = "layer"

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.task_vectors.tasks
