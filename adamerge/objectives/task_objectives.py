"""Per-task training objectives for the coefficients.

An objective turns one task's model outputs on one task batch into a scalar; it may also ask for
hidden states (``hidden_modules``: outputs of named sub-modules, ``"<head input>"``: the features
entering the task head) and add a regulariser on the coefficients themselves. Objectives and
granularities are independent choices.

- :class:`Entropy` — AdaMerging: mean prediction entropy on unlabeled data.
- :class:`CrossEntropy` — aTLAS few-shot: cross-entropy on a few labelled shots.
- :class:`PseudoLabel` — aTLAS test-time adaptation: cross-entropy against the model's own
  confident predictions (threshold) on unlabeled data.
- :class:`ExpertAlignment` — Expert Merging: align the merged model's hidden states and logits to
  each expert's (computed once and cached), plus ``γ · mean|λ − λ_init|``.

A new objective is one subclass (with :meth:`Objective.for_run` when it reads the run's settings)
and one line in :data:`adamerge.methods.learned.OBJECTIVES`; a method written outside adamerge
names its own as ``objective="package.module:Class"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from adamerge.core.hooks import HEAD_INPUT
from adamerge.core.model_inputs import Inputs, input_batch_size
from adamerge.errors import AdamergeError
from adamerge.objectives import losses

if TYPE_CHECKING:
    from adamerge.core.merged_model import MergedModel

logger = logging.getLogger(__name__)


@dataclass
class TaskBatch:
    """One task's share of a training step.

    Attributes:
        inputs: model inputs ``(B, ...)``, or a dict of such tensors (a tokenizer's output).
        labels: class indices ``(B,)`` for supervised objectives.
        index: dataset indices ``(B,)`` of the samples (to look up cached expert outputs).
    """

    inputs: Inputs
    labels: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return input_batch_size(self.inputs)

    def rows(self, rows: slice) -> TaskBatch:
        """The batch of the inputs ``rows`` (inputs, labels and indices sliced alike)."""
        take = lambda value: None if value is None else value[rows]  # noqa: E731
        inputs = {k: v[rows] for k, v in self.inputs.items()} if isinstance(self.inputs, Mapping) else self.inputs[rows]
        return TaskBatch(inputs, take(self.labels), take(self.index))


def as_task_batch(item: torch.Tensor | Mapping[str, torch.Tensor] | TaskBatch) -> TaskBatch:
    """A :class:`TaskBatch` from a tensor (inputs only), a collated ``{"inputs", "labels", "index"}``,
    or a dict of input tensors without an ``"inputs"`` key (a tokenizer's output, inputs only)."""
    if isinstance(item, TaskBatch):
        return item
    if isinstance(item, torch.Tensor):
        return TaskBatch(item)
    if isinstance(item, Mapping) and "inputs" in item:
        return TaskBatch(item["inputs"], item.get("labels"), item.get("index"))
    if isinstance(item, Mapping) and item and all(isinstance(v, torch.Tensor) for v in item.values()):
        return TaskBatch(dict(item))
    raise AdamergeError(f"a training batch per task must be a tensor or a dict with 'inputs', got {type(item).__name__}")


@dataclass
class ModelOutputs:
    """Logits of the merged model and the hidden states an objective asked for."""

    logits: torch.Tensor
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class. Subclasses implement :meth:`forward`; the defaults ask for no hidden state,
    no labels, weight every task 1 and add no regulariser."""

    hidden_modules: tuple[str, ...] = ()
    #: Whether it reads labels (``--shots``): a run without labelled calibration data is refused.
    needs_labels: bool = False
    #: Whether it reads each sample's dataset index (cached per-sample targets, e.g. the experts' outputs).
    needs_index: bool = False
    #: Whether it weights each task's loss itself (``--task-weights``); otherwise :class:`TaskWeighted` does.
    weights_tasks: ClassVar[bool] = False

    @classmethod
    def for_run(cls, merged: MergedModel, settings: Any) -> Objective:
        """This objective for a run: the model it trains and the run's settings (default: ``cls()``)."""
        return cls()

    def forward(self, task: str, outputs: ModelOutputs, batch: TaskBatch) -> torch.Tensor:
        raise NotImplementedError

    def regularization(self, coefficients: torch.Tensor) -> torch.Tensor | None:
        """Extra loss on the constrained ``(K, G)`` coefficients (``None``: nothing)."""
        return None


class TaskWeighted(Objective):
    """Any objective with each task's loss multiplied by a weight (``--task-weights``): a task the
    objective neglects can be weighted up; unnamed tasks keep 1.

    Args:
        inner: the objective.
        tasks: task names.
        weights: ``{task: weight}``.
    """

    def __init__(self, inner: Objective, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__()
        unknown = set(weights) - set(tasks)
        if unknown:
            raise AdamergeError(f"task weights for unknown task(s) {sorted(unknown)}; tasks are {list(tasks)}")
        self.inner = inner
        self.weights = {t: float(weights.get(t, 1.0)) for t in tasks}
        self.hidden_modules = inner.hidden_modules
        self.needs_labels = inner.needs_labels
        self.needs_index = inner.needs_index

    def forward(self, task: str, outputs: ModelOutputs, batch: TaskBatch) -> torch.Tensor:
        return self.weights[task] * self.inner(task, outputs, batch)

    def regularization(self, coefficients: torch.Tensor) -> torch.Tensor | None:
        return self.inner.regularization(coefficients)


class Entropy(Objective):
    """AdaMerging: mean Shannon entropy of the task's predictions."""

    def forward(self, task: str, outputs: ModelOutputs, batch: TaskBatch) -> torch.Tensor:
        return losses.entropy(outputs.logits)


class CrossEntropy(Objective):
    """aTLAS few-shot: cross-entropy on labelled shots."""

    needs_labels = True

    def forward(self, task: str, outputs: ModelOutputs, batch: TaskBatch) -> torch.Tensor:
        if batch.labels is None:
            raise AdamergeError(f"cross-entropy needs labelled data for task {task!r} (use --shots N)")
        return nn.functional.cross_entropy(outputs.logits.float(), batch.labels)


class PseudoLabel(Objective):
    """aTLAS test-time adaptation: cross-entropy against confident predictions.

    Args:
        threshold: minimum softmax confidence of a prediction to become a pseudo-label (aTLAS: 0.99
            in its unsupervised setting; lower values trade label noise for more signal).
    """

    def __init__(self, threshold: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= threshold < 1.0:
            raise AdamergeError(f"pseudo-label threshold {threshold}: expected a value in [0, 1)")
        self.threshold = threshold

    @classmethod
    def for_run(cls, merged: MergedModel, settings: Any) -> PseudoLabel:
        return cls(settings.pseudo_label_threshold)

    def forward(self, task: str, outputs: ModelOutputs, batch: TaskBatch) -> torch.Tensor:
        return losses.pseudo_label_cross_entropy(outputs.logits, outputs.logits.detach(), self.threshold)


class ExpertAlignment(Objective):
    """Expert Merging: match each expert's hidden states and logits on its own task's data.

    ``loss_k = β_k [ Σ_layers MSE(h_merged, h_k) + T² · KL(softmax(z_k/T) ‖ softmax(z_merged/T)) ]``
    summed over tasks by the training step, plus ``γ · mean|λ − λ_init|``. The experts' outputs are
    computed once on the calibration data (:meth:`cache_targets`) and looked up by sample index.

    Args:
        init: the initial (constrained) coefficients ``(K, G)`` the regulariser pulls towards.
        tasks: task names, in coefficient order.
        hidden_modules: sub-modules whose outputs are aligned (``HEAD_INPUT``: the head's input).
        temperature: T of the logit distillation (paper: 1).
        gamma: weight of the coefficient regulariser (paper: 5).
        task_weights: β per task (default 1 each).
    """

    needs_index = True
    weights_tasks = True

    def __init__(
        self,
        init: torch.Tensor,
        tasks: Sequence[str],
        hidden_modules: Sequence[str] = (HEAD_INPUT,),
        temperature: float = 1.0,
        gamma: float = 5.0,
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.hidden_modules = tuple(hidden_modules)
        self.temperature = temperature
        self.gamma = gamma
        weights = dict(task_weights or {})
        unknown = set(weights) - set(self.tasks)
        if unknown:
            raise AdamergeError(f"task weights for unknown task(s) {sorted(unknown)}; tasks are {list(self.tasks)}")
        self.task_weights = {t: float(weights.get(t, 1.0)) for t in self.tasks}
        self.register_buffer("init", init.detach().clone(), persistent=False)
        self.targets = nn.ModuleDict()

    @classmethod
    def for_run(cls, merged: MergedModel, settings: Any) -> ExpertAlignment:
        """Aligned modules, T, γ and β from the settings; the regulariser pulls towards the start."""
        return cls(
            merged.coefficients().detach(),
            merged.tasks,
            hidden_modules=settings.align_modules,
            temperature=settings.temperature,
            gamma=settings.gamma,
            task_weights=settings.task_weights,
        )

    @torch.no_grad()
    def cache_targets(self, task: str, logits: torch.Tensor, hidden: Mapping[str, torch.Tensor], spans: torch.Tensor | None = None) -> None:
        """Store an expert's outputs on its whole calibration set.

        Args:
            task: the expert's task.
            logits: one row per example (row ``i`` = dataset index ``i``), or, with ``spans``,
                one row per scored token (example ``i``: rows ``spans[i, 0] : spans[i, 0] + spans[i, 1]``).
            hidden: ``{name: hidden}`` in the same layout (token rows: ``spans[i, 2]``, ``spans[i, 3]``).
            spans: ``(E, 4)`` first row and row count of each example's logits and hidden states
                (``None``: one row per example). Token-level logits stay where they are (host
                memory, or a memory-mapped file) and only a batch's rows move to the device.
        """
        holder = nn.Module()
        if spans is None:
            holder.register_buffer("logits", logits.detach().float(), persistent=False)
        else:
            holder.logits = logits  # not a buffer: never copied to the device whole
            holder.register_buffer("spans", spans.long(), persistent=False)
        for i, name in enumerate(self.hidden_modules):
            if name not in hidden:
                raise AdamergeError(f"expert outputs of {task!r} lack hidden state {name!r}")
            holder.register_buffer(f"hidden_{i}", hidden[name].detach().float(), persistent=False)
        self.targets[task] = holder

    def forward(self, task: str, outputs: ModelOutputs, batch: TaskBatch) -> torch.Tensor:
        if task not in self.targets:
            raise AdamergeError(f"no cached expert outputs for task {task!r}: call cache_targets first")
        if batch.index is None:
            raise AdamergeError("expert alignment needs sample indices in the batch (with_index=True)")
        target = self.targets[task]
        spans = getattr(target, "spans", None)
        if spans is None:
            reference_logits = target.logits[batch.index.to(target.logits.device)]
        else:  # the batch's examples' token rows, in order
            rows = _ragged_rows(spans[:, 0], spans[:, 1], batch.index.tolist())
            reference_logits = target.logits[rows.cpu()].to(outputs.logits.device)
        loss = losses.distillation_kl(outputs.logits, reference_logits, self.temperature)
        for i, name in enumerate(self.hidden_modules):
            merged_hidden = outputs.hidden[name].float()
            reference = getattr(target, f"hidden_{i}")
            if spans is not None:  # (B, T, H) → the real tokens, row-major, as the targets were stored
                mask = batch.inputs["attention_mask"].bool().to(merged_hidden.device)
                merged_hidden = merged_hidden[mask]
                reference = reference[_ragged_rows(spans[:, 2], spans[:, 3], batch.index.tolist())]
            else:
                reference = reference[batch.index.to(reference.device)]
            loss = loss + nn.functional.mse_loss(merged_hidden, reference)
        return self.task_weights[task] * loss

    def regularization(self, coefficients: torch.Tensor) -> torch.Tensor:
        return self.gamma * (coefficients - self.init).abs().mean()


def _ragged_rows(starts: torch.Tensor, counts: torch.Tensor, examples: Sequence[int]) -> torch.Tensor:
    """Rows ``starts[i] : starts[i] + counts[i]`` of every example ``i`` of ``examples``, concatenated in order."""
    return torch.cat([torch.arange(int(starts[i]), int(starts[i] + counts[i]), device=starts.device) for i in examples])


@torch.no_grad()
def collect_outputs(
    run: Callable[[torch.Tensor], torch.Tensor],
    capture: Callable[[Sequence[str]], object],
    hidden_modules: Sequence[str],
    batches: Iterable[torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run batches in order through a model, gathering logits and hidden states.

    Args:
        run: inputs -> logits.
        capture: context-manager factory collecting hidden states (``MergedModel.capture``-like).
        hidden_modules: which hidden states.
        batches: input batches, in dataset order.

    Returns:
        ``(logits (N, C), {name: hidden (N, ...)})``.
    """
    logits, hidden = [], {name: [] for name in hidden_modules}
    for inputs in batches:
        with capture(hidden_modules) as captured:
            logits.append(run(inputs))
        for name in hidden_modules:
            hidden[name].append(captured[name])
    return torch.cat(logits), {name: torch.cat(parts) for name, parts in hidden.items()}
