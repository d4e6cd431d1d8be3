"""Row-sparse gradients of merged embedding tables: the training step's λ-gradient equals the dense
one, on a real (tiny) transformers BERT whose experts change every tensor, embeddings included."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from adamerge.core.granularity import ChunkWise, TaskWise, TensorWise
from adamerge.core.merged_model import MergedModel
from adamerge.core.row_sparse import coefficient_gradient, row_sparse_tables
from adamerge.core.task_vectors import TaskVectors
from adamerge.objectives import losses
from adamerge.run.module import MergingModule

TASKS = ("a", "b", "c")
TABLES = {
    "bert.embeddings.word_embeddings.weight",
    "bert.embeddings.position_embeddings.weight",
    "bert.embeddings.token_type_embeddings.weight",
}


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=12, num_labels=3, pad_token_id=0,
    )
    return BertForSequenceClassification(config).eval()


def merged_bert(granularity) -> MergedModel:
    base = tiny_bert(0)
    base_state = base.state_dict()
    states = {}
    for k, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(10 + k)
        states[task] = {
            name: t + 0.1 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
            for name, t in base_state.items()
        }
    heads = {task: {n: t for n, t in state.items() if n.startswith("classifier.")} for task, state in states.items()}
    body = [n for n, t in base_state.items() if t.is_floating_point() and not n.startswith("classifier.")]
    task_vectors = TaskVectors.from_states(base_state, states, body)
    return MergedModel(base, task_vectors, granularity, "none", 0.3, heads=heads, batchnorm="base")


def batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 50, (4, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, 6:], attention_mask[0, 6:] = 0, 0  # padding: the padding row gets no gradient
    input_ids[1, 2] = input_ids[2, 5]  # a row read twice
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("granularity", [TaskWise(), TensorWise(), ChunkWise(3)], ids=["task", "layer", "chunk3"])
def test_training_step_gradient_equals_the_dense_backward(granularity):
    merged = merged_bert(granularity)
    module = MergingModule(merged)
    assert module._row_sparse == TABLES
    torch.manual_seed(1)
    merged.coefficients.set_values(0.5 * torch.rand(len(TASKS), merged.layout.num_groups))
    inputs = {task: batch(k) for k, task in enumerate(TASKS)}
    seen = {}
    original = coefficient_gradient

    def spy(grad, task_vectors, chunks):
        seen[tuple(grad.shape)] = grad.layout
        return original(grad, task_vectors, chunks)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("adamerge.core.row_sparse.coefficient_gradient", spy)
        module.training_step(inputs, 0).backward()
    assert seen[(50, 16)] == torch.sparse_coo  # the vocabulary table's gradient held only the rows read
    step_grad = merged.coefficients.raw.grad.clone()
    assert all(not m.sparse for m in merged.model.modules() if isinstance(m, nn.Embedding))  # restored
    merged.coefficients.raw.grad = None
    sum(losses.entropy(merged(x, task)) for task, x in inputs.items()).backward()  # dense ∂L/∂E
    torch.testing.assert_close(step_grad, merged.coefficients.raw.grad, rtol=1e-5, atol=1e-7)


def test_dense_tables_on_request_give_the_same_gradient():
    merged = merged_bert(TensorWise())
    inputs = {task: batch(k) for k, task in enumerate(TASKS)}
    grads = []
    for sparse_tables in (True, False):
        module = MergingModule(merged, sparse_tables=sparse_tables)
        assert module._row_sparse == (TABLES if sparse_tables else frozenset())
        module.training_step(inputs, 0).backward()
        grads.append(merged.coefficients.raw.grad.clone())
        merged.coefficients.raw.grad = None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunks", [1, 4, 7])
def test_coefficient_gradient_equals_the_dense_contraction_per_chunk(chunks):
    generator = torch.Generator().manual_seed(0)
    task_vectors = torch.randn(3, 10, 6, generator=generator)  # (K, V, D); 60 entries, chunks cut rows
    rows = torch.tensor([[7, 2, 7, 0]])  # uncoalesced: row 7 twice
    values = torch.randn(4, 6, generator=generator)
    grad = torch.sparse_coo_tensor(rows, values, (10, 6), check_invariants=True)
    dense = grad.to_dense().reshape(-1)  # (60,)
    bounds = [round(i * 60 / chunks) for i in range(chunks + 1)]
    expected = torch.stack(
        [(task_vectors.reshape(3, -1)[:, a:b] * dense[a:b]).sum(1) for a, b in zip(bounds[:-1], bounds[1:])], dim=1
    )  # (K, C)
    torch.testing.assert_close(coefficient_gradient(grad, task_vectors, chunks), expected, rtol=1e-5, atol=1e-6)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm_embed = nn.Embedding(10, 4, max_norm=1.0)
        self.plain = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.embed.weight  # tied


def test_tied_renormalised_and_partitioned_tables_keep_dense_gradients():
    model = TiedLM()
    shared = frozenset({"embed.weight", "out.weight"})
    tables = {name: torch.zeros(2, 10, 4) for name in ("embed.weight", "norm_embed.weight", "plain.weight")}
    assert row_sparse_tables(model, tables, shared, frozenset()) == {"plain.weight"}
    assert row_sparse_tables(model, tables, shared, frozenset({"plain.weight"})) == frozenset()
