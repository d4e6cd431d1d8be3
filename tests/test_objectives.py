"""Objectives and losses against naive per-sample references."""

from __future__ import annotations

import math

import pytest
import torch

from adamerge.errors import AdamergeError
from adamerge.methods.importance import chunk_budget, layer_importance
from adamerge.objectives import losses
from adamerge.objectives.task_objectives import Entropy, ExpertAlignment, ModelOutputs, TaskBatch, TaskWeighted


def test_entropy_matches_per_sample_formula():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    expected = 0.0
    for row in logits:
        p = torch.softmax(row, 0)
        expected += -sum(float(pi) * math.log(float(pi)) for pi in p)
    assert float(losses.entropy(logits)) == pytest.approx(expected / 5, rel=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9, 0.999])
def test_pseudo_label_uses_only_confident_predictions(threshold):
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)) * 3
    total = 0.0
    for row in logits:
        p = torch.softmax(row, 0)
        if float(p.max()) >= threshold:
            total += -math.log(float(p[p.argmax()]))
    value = losses.pseudo_label_cross_entropy(logits, logits, threshold)
    assert float(value) == pytest.approx(total / 16, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_kl_matches_definition(temperature):
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(3, 5, generator=generator), torch.randn(3, 5, generator=generator)
    expected = 0.0
    for s, t in zip(student, teacher):
        p, q = torch.softmax(t / temperature, 0), torch.softmax(s / temperature, 0)
        expected += float((p * (p.log() - q.log())).sum())
    value = losses.distillation_kl(student, teacher, temperature)
    assert float(value) == pytest.approx(temperature**2 * expected / 3, rel=1e-5)


def test_expert_alignment_looks_up_cached_targets_by_index_and_regularises():
    init = torch.full((2, 3), 0.1)
    objective = ExpertAlignment(init, ["a", "b"], hidden_modules=["h"], gamma=5.0, task_weights={"b": 2.0})
    generator = torch.Generator().manual_seed(3)
    logits, hidden = torch.randn(6, 4, generator=generator), torch.randn(6, 8, generator=generator)
    objective.cache_targets("b", logits, {"h": hidden})
    index = torch.tensor([4, 1])
    outputs = ModelOutputs(logits[index], {"h": hidden[index]})
    assert float(objective("b", outputs, TaskBatch(torch.zeros(2, 1), index=index))) == pytest.approx(0.0, abs=1e-6)
    shifted = ModelOutputs(logits[index], {"h": hidden[index] + 1.0})
    assert float(objective("b", shifted, TaskBatch(torch.zeros(2, 1), index=index))) == pytest.approx(2.0)  # β·MSE
    assert float(objective.regularization(torch.full((2, 3), 0.3))) == pytest.approx(5.0 * 0.2)


def test_importance_and_chunk_budget_follow_the_formula():
    coefficients = torch.tensor([[0.5, 1.0], [0.5, 0.0]])  # (K=2, L=2)
    tv = [("a", torch.ones(2, 4)), ("b", torch.full((2, 2), 3.0))]
    importance = layer_importance(coefficients, tv)
    # raw a = (0.5 + 0.5) * 1 * 4 = 4 ; raw b = (1.0 * 3 + 0) * 2 = 6
    assert importance == pytest.approx({"a": 0.4, "b": 0.6})
    assert chunk_budget(importance, budget=10, kappa=1.0) == {"a": 4, "b": 6}
    assert chunk_budget(importance, budget=10, kappa=2.0) == {"a": int(10 * 0.16 / 0.52), "b": int(10 * 0.36 / 0.52)}


def test_task_weights_scale_any_objective_and_unknown_tasks_are_refused():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    batch = TaskBatch(torch.zeros(5, 3))
    weighted = TaskWeighted(Entropy(), ["a", "b"], {"b": 2.5})
    plain = Entropy()("b", ModelOutputs(logits), batch)
    torch.testing.assert_close(weighted("b", ModelOutputs(logits), batch), 2.5 * plain)
    torch.testing.assert_close(weighted("a", ModelOutputs(logits), batch), plain)  # unnamed tasks keep 1
    with pytest.raises(AdamergeError, match=r"unknown task\(s\) \['c'\]"):
        TaskWeighted(Entropy(), ["a", "b"], {"c": 1.0})
