"""Task types: the scored positions of classification and token-level tasks, and a token-level
(language-modelling) merge trained and evaluated through the same module as a classifier's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import ModelOutputs, TaskBatch
from adamerge.run.evaluation import accuracy
from adamerge.run.module import MergingModule
from adamerge.task_types import CLASSIFICATION, IGNORE_INDEX, TokenLevel

VOCAB, WIDTH = 11, 6


class TinyLM(nn.Module):
    """A causal "language model" small enough to check by hand: embedding, one mixing layer, LM head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.tanh(self.mix(self.embed(input_ids)))  # (B, T, W)
        return self.lm_head(hidden)  # (B, T, V)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two right-padded sequences: lengths 5 and 3 of 5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return {"input_ids": ids * mask, "attention_mask": mask}


def naive_next_token(logits: torch.Tensor, inputs: dict) -> tuple[list[torch.Tensor], list[int]]:
    """Position t of sequence b is scored when tokens t and t+1 are both real; its target is token t+1."""
    rows, targets = [], []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if inputs["attention_mask"][b, t] and inputs["attention_mask"][b, t + 1]:
                rows.append(logits[b, t])
                targets.append(int(inputs["input_ids"][b, t + 1]))
    return rows, targets


def test_classification_positions_are_the_logits():
    logits, labels = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    positions, targets = CLASSIFICATION.scored(logits, torch.randn(4, 8), labels)
    assert positions is logits and targets is labels
    with pytest.raises(AdamergeError, match="token-level"):
        CLASSIFICATION.scored(torch.randn(2, 5, 3), None)


def test_next_token_positions_skip_padding_and_the_last_token():
    inputs = batch()
    logits = torch.randn(2, 5, VOCAB)
    positions, targets = TokenLevel(next_token=True).scored(logits, inputs)
    rows, expected = naive_next_token(logits, inputs)
    assert positions.shape == (len(rows), VOCAB) == (6, VOCAB)  # 4 + 2 scored positions
    assert torch.equal(positions, torch.stack(rows)) and targets.tolist() == expected


def test_token_labels_ignore_index_and_padding():
    inputs = batch(1)
    logits = torch.randn(2, 5, 4)
    labels = torch.tensor([[0, 1, IGNORE_INDEX, 3, 2], [1, IGNORE_INDEX, 0, 2, 2]])
    positions, targets = TokenLevel().scored(logits, inputs, labels)
    keep = [(0, 0), (0, 1), (0, 3), (0, 4), (1, 0), (1, 2)]  # real tokens with a label
    assert torch.equal(positions, torch.stack([logits[b, t] for b, t in keep]))
    assert targets.tolist() == [int(labels[b, t]) for b, t in keep]
    with pytest.raises(AdamergeError, match="input_ids"):
        TokenLevel(next_token=True).scored(logits, torch.zeros(2, 5))


def lm_merge(init: float = 0.3) -> tuple[MergedModel, dict[str, dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    base = TinyLM()
    experts = {}
    for k in range(2):
        expert = TinyLM()
        expert.load_state_dict({n: t + 0.3 * torch.randn_like(t) for n, t in base.state_dict().items()})
        experts[f"t{k}"] = expert.state_dict()
    names = [n for n, _ in base.named_parameters()]
    tv = TaskVectors.from_states(base.state_dict(), experts, names)
    return MergedModel(base, tv, "layer", "clamp", init, batchnorm="base"), experts  # one shared LM head: no per-task heads


def test_language_model_step_gradient_is_the_token_entropys():
    merged, _ = lm_merge()
    module = MergingModule(merged, task_type=TokenLevel(next_token=True))
    inputs = {task: batch(seed) for seed, task in enumerate(merged.tasks)}
    module.training_step(inputs, 0).backward()
    grad = merged.coefficients.raw.grad.clone()

    merged.coefficients.raw.grad = None
    total = 0.0
    for task, task_inputs in inputs.items():  # naive: per-token entropy of the real positions, averaged
        rows, _ = naive_next_token(merged(task_inputs, task), task_inputs)
        probabilities = torch.stack(rows).softmax(-1)
        total = total + (-(probabilities * probabilities.log()).sum(-1)).mean()
    total.backward()
    torch.testing.assert_close(grad, merged.coefficients.raw.grad)


def test_language_model_accuracy_counts_real_tokens_only():
    merged, experts = lm_merge()
    module = MergingModule(merged, task_type=TokenLevel(next_token=True))
    inputs = batch(3)
    labels = inputs["input_ids"]  # unused by next-token scoring beyond the inputs themselves
    module._eval_merged = merged.merged_tensors()
    module._common_eval_step((inputs, labels), 0)
    rows, targets = naive_next_token(merged(inputs, "t0"), inputs)
    expected = (torch.stack(rows).argmax(-1) == torch.tensor(targets)).float().mean().item()
    assert module.accuracy["t0"].compute().item() == pytest.approx(expected)
    forward = lambda x: merged(x, "t0")  # noqa: E731
    assert accuracy(forward, [(inputs, None)], TokenLevel(next_token=True)) == pytest.approx(expected)


def test_objectives_see_positions_and_their_targets():
    merged, _ = lm_merge()
    seen = {}

    class Record(nn.Module):
        hidden_modules = ()

        def forward(self, task: str, outputs: ModelOutputs, task_batch: TaskBatch) -> torch.Tensor:
            seen[task] = (outputs.logits.shape, task_batch.labels)
            return outputs.logits.mean()

        def regularization(self, coefficients):
            return None

    module = MergingModule(merged, objective=Record(), task_type=TokenLevel(next_token=True))
    module.training_step({"t0": batch(0)}, 0)
    shape, labels = seen["t0"]
    assert shape == (6, VOCAB) and labels.tolist() == naive_next_token(torch.zeros(2, 5, VOCAB), batch(0))[1]


def test_the_hugging_face_source_builds_the_task_types_auto_class():
    import transformers

    from adamerge.sources.transformers_files import task_auto_class

    assert task_auto_class(CLASSIFICATION) is transformers.AutoModelForSequenceClassification
    assert task_auto_class(TokenLevel(next_token=True)) is transformers.AutoModelForCausalLM
    assert task_auto_class(TokenLevel()) is transformers.AutoModelForTokenClassification
