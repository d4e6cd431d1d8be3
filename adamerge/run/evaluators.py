"""How a run scores the experts alone and its merges on ``--eval`` data, by task type.

- :class:`ScoredEvaluation`: top-1 accuracy over the task type's scored positions of labelled
  examples (a classifier's one position per example), the merge through Lightning's test loop;
- :class:`GeneratedEvaluation`: for a task type that generates (language modelling), exact match
  of greedy answers to prompts and perplexity of plain texts, on the merge materialised once
  (:mod:`adamerge.run.generation_eval`).

Both give ``{task: fraction, "average": mean}`` accuracies (exact match is a language model's
accuracy) plus extra per-task figures (``{"perplexity": {...}}``) that ``metrics.json`` records
beside them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from adamerge.data.generation import GenerationRecords, read_generation_eval
from adamerge.run.evaluation import accuracy, with_average
from adamerge.run.expert_targets import module_forward
from adamerge.run.generation_eval import score_generation
from adamerge.run.module import MergingModule
from adamerge.sources.base import ExpertSet

logger = logging.getLogger(__name__)

Scores = tuple[dict[str, float], dict[str, dict[str, float]]]  # (accuracy with average, {figure: {task: value}})


class ScoredEvaluation:
    """Accuracy over scored positions of labelled examples (the DataModule's evaluation loaders)."""

    def __init__(self, data: L.LightningDataModule) -> None:
        self.data = data

    def experts(self, experts: ExpertSet) -> Scores:
        """Each expert alone (its own weights, statistics and head) on its own task."""
        loaders = dict(zip(self.data.tasks, self.data.evaluation_loaders(), strict=True))
        per_task = {
            task: accuracy(module_forward(experts.expert_model(task).eval()), loaders[task], experts.task_type) for task in experts.tasks
        }
        return with_average(per_task), {}

    def merge(self, trainer: L.Trainer, module: MergingModule) -> Scores:
        """The merge at its current λ, through ``trainer``'s test loop."""
        trainer.test(module, datamodule=self.data, verbose=False)
        return dict(module.results["test"]), {}


class GeneratedEvaluation:
    """Exact match of greedy answers and perplexity of texts, per task.

    Args:
        records: ``{task: GenerationRecords}``.
        tokenizer: the base's tokenizer (its chat template renders chat prompts).
        batch_size: prompts or texts per forward.
        max_length: prompt and text tokens kept (the last ones of a prompt, the first of a text).
    """

    def __init__(self, records: Mapping[str, GenerationRecords], tokenizer: Any, batch_size: int, max_length: int) -> None:
        self.records = dict(records)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def read(cls, root: Path, experts: ExpertSet, batch_size: int, max_length: int) -> GeneratedEvaluation:
        """Every task's records from ``root`` (bad records fail here, before any training)."""
        return cls({task: read_generation_eval(Path(root), task) for task in experts.tasks}, experts.tokenizer, batch_size, max_length)

    def _scores(self, model_of: Callable[[str], nn.Module]) -> Scores:
        exact, perplexity = {}, {}
        for task, records in self.records.items():
            scores = score_generation(model_of(task), self.tokenizer, records, batch_size=self.batch_size, max_length=self.max_length)
            if scores.exact_match is not None:
                exact[task] = round(scores.exact_match, 6)
            if scores.perplexity is not None:
                perplexity[task] = round(scores.perplexity, 4)
        return (with_average(exact) if exact else {}), ({"perplexity": perplexity} if perplexity else {})

    def experts(self, experts: ExpertSet) -> Scores:
        """Each expert alone on its own task."""
        return self._scores(lambda task: experts.expert_model(task).eval())

    def merge(self, trainer: L.Trainer, module: MergingModule) -> Scores:
        """The merge at its current λ, materialised once (once per task with per-task tensors)."""
        merged = module.merged
        shared = None if merged.heads.names or merged.kept.names else merged.merge_and_unload()
        return self._scores(lambda task: shared if shared is not None else merged.merge_and_unload(task))
