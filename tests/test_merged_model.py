"""MergedModel behaviour a user relies on."""

from __future__ import annotations

import pytest
import torch

from adamerge.core.granularity import ChunkWise, GroupWise, TaskWise, TensorWise
from adamerge.core.merged_model import MergedModel
from adamerge.core.task_vectors import TaskVectors
from adamerge.errors import AdamergeError
from adamerge.objectives import losses
from adamerge.run.module import MergingModule
from adamerge.sources import load_file_experts
from tests.conftest import HEAD
from tests.tiny import tiny_convnet, tiny_mlp

GRANULARITIES = [
    TaskWise(),
    TensorWise(),
    GroupWise([r"^(\d+)\."]),
    ChunkWise(3),
    ChunkWise(4, "random", seed=1),
]


def mlp_merge(granularity=TensorWise(), constraint="none", init=0.3, dtype=torch.float32, num_tasks=3):
    torch.manual_seed(0)
    base = tiny_mlp()
    experts = [tiny_mlp().state_dict() for _ in range(num_tasks)]
    names = [n for n, _ in base.named_parameters()]
    tv = TaskVectors.from_states(base.state_dict(), {f"t{k}": s for k, s in enumerate(experts)}, names, dtype)
    return base, experts, MergedModel(base, tv, granularity, constraint, init, batchnorm="base")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_one_hot_reproduces_each_expert_and_zero_the_base(granularity):
    base, experts, merged = mlp_merge(granularity)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    x = torch.randn(5, 12)
    for k, state in enumerate(experts):
        merged.coefficients.set_values(torch.nn.functional.one_hot(torch.tensor(k), 3).float())
        reference = tiny_mlp()
        reference.load_state_dict(state)
        torch.testing.assert_close(merged(x), reference(x), rtol=1e-5, atol=1e-5)
    merged.coefficients.set_values(0.0)
    reference = tiny_mlp()
    reference.load_state_dict(base_state)
    torch.testing.assert_close(merged(x), reference(x))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_functional_forward_equals_merge_and_unload(granularity):
    _, _, merged = mlp_merge(granularity)
    merged.coefficients.set_values(torch.rand(3, merged.layout.num_groups))
    x = torch.randn(4, 12)
    plain = merged.merge_and_unload()
    assert not isinstance(plain, MergedModel)
    torch.testing.assert_close(plain(x), merged(x))


def test_gradients_reach_only_the_coefficients():
    base, _, merged = mlp_merge()
    merged(torch.randn(4, 12)).square().sum().backward()
    assert merged.coefficients.raw.grad is not None and merged.coefficients.raw.grad.abs().sum() > 0
    assert [n for n, p in merged.named_parameters() if p.requires_grad] == ["coefficients.raw"]
    assert all(p.grad is None for p in base.parameters())
    assert all(not b.requires_grad for b in merged.buffers())


def test_task_vectors_are_not_saved_in_state_dict():
    _, _, merged = mlp_merge()
    keys = merged.state_dict().keys()
    assert not any(k.startswith("task_vectors.") for k in keys)
    assert "coefficients.raw" in keys


def test_bfloat16_storage_is_close_to_float32():
    _, _, exact = mlp_merge(dtype=torch.float32)
    _, _, low = mlp_merge(dtype=torch.bfloat16)
    x = torch.randn(8, 12)
    torch.testing.assert_close(low(x), exact(x), rtol=2e-2, atol=2e-2)
    assert low.task_vectors.tv_0.dtype == torch.bfloat16


@pytest.mark.parametrize("constraint,expected", [("clamp", [0.0, 1.0, 0.5]), ("none", [-0.5, 1.5, 0.5])])
def test_constraints_apply_in_forward(constraint, expected):
    _, _, merged = mlp_merge(TaskWise(), constraint=constraint)
    with torch.no_grad():
        merged.coefficients.raw.copy_(torch.tensor([[-0.5], [1.5], [0.5]]))
    torch.testing.assert_close(merged.coefficients()[:, 0], torch.tensor(expected))


def test_sigmoid_init_round_trips():
    _, _, merged = mlp_merge(constraint="sigmoid", init=0.1)
    torch.testing.assert_close(merged.coefficients(), torch.full_like(merged.coefficients(), 0.1))


def test_training_step_gradient_equals_naive_joint_backward(tiny_setup):
    """Merge once, per-task backward into leaves, one backward into λ == autograd on the summed loss."""
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD, "base")
    merged = MergedModel(experts.model, experts.task_vectors, "layer", "clamp", 0.3, experts.heads, "base")
    module = MergingModule(merged)
    generator = torch.Generator().manual_seed(0)
    batch = {t: torch.randn(4, 3, 12, 12, generator=generator) for t in merged.tasks}

    module.training_step(batch, 0).backward()
    fused = merged.coefficients.raw.grad.clone()
    merged.coefficients.raw.grad = None

    naive = sum(losses.entropy(merged(x, task)) for task, x in batch.items())
    naive.backward()
    torch.testing.assert_close(fused, merged.coefficients.raw.grad, rtol=1e-5, atol=1e-7)


def test_batchnorm_reestimation_uses_merged_weights(tiny_setup):
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    merged = MergedModel(experts.model, experts.task_vectors, "layer", heads=experts.heads)
    x = torch.randn(64, 3, 12, 12)
    seen = merged.reestimate_batchnorm([("alpha", x[:32]), ("beta", x[32:])])
    assert seen == 64
    # the first BatchNorm sees the first convolution's output with merged weights
    conv = merged.merge_and_unload("alpha")[0]
    features = conv(x)  # (N, C, H, W)
    torch.testing.assert_close(merged.model[1].running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_heads_are_required_and_unknown_tasks_refused(tiny_setup):
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD)
    merged = MergedModel(experts.model, experts.task_vectors, heads=experts.heads)
    x = torch.randn(2, 3, 12, 12)
    assert merged(x, "alpha").shape == (2, 3) and merged(x, "beta").shape == (2, 4)
    with pytest.raises(AdamergeError, match="pass task="):
        merged(x)
    with pytest.raises(AdamergeError, match="unknown task 'gamma'"):
        merged(x, "gamma")


def test_merge_and_unload_resizes_heads(tiny_setup):
    experts = load_file_experts("tests.tiny:tiny_convnet", tiny_setup.base, tiny_setup.experts, HEAD, "base")
    merged = MergedModel(experts.model, experts.task_vectors, heads=experts.heads, batchnorm="base")
    plain = merged.merge_and_unload("beta")
    assert plain[8].out_features == 4
    x = torch.randn(3, 3, 12, 12)
    torch.testing.assert_close(plain(x), merged(x, "beta"))
    fresh = tiny_convnet(num_classes=4)
    fresh.load_state_dict(merged.merged_state_dict("beta"))
    torch.testing.assert_close(fresh.eval()(x), merged(x, "beta"))


@pytest.mark.parametrize("partition", ["contiguous", "random"])
def test_chunks_split_each_tensor_into_disjoint_covering_parts(partition):
    base, experts, merged = mlp_merge(ChunkWise(3, partition, seed=5), num_tasks=1)
    name = "0.weight"  # (16, 12): 192 entries in 3 chunks of 64
    first = merged.layout.group_of(name)
    delta = experts[0][name] - base.state_dict()[name]
    owners = torch.full(delta.shape, -1)
    for c in range(3):
        values = torch.zeros(1, merged.layout.num_groups)
        values[0, first + c] = 1.0
        merged.coefficients.set_values(values)
        changed = merged.merged_tensors()[name] - base.state_dict()[name]
        part = changed != 0
        assert int(part.sum()) == 64
        torch.testing.assert_close(changed[part], delta[part])  # the chunk gets the full expert
        assert bool((owners[part] == -1).all())  # disjoint
        owners[part] = c
    assert bool((owners >= 0).all())  # covering
    contiguous = torch.equal(owners.flatten(), torch.arange(3).repeat_interleave(64))
    assert contiguous == (partition == "contiguous")


def test_frozen_coefficients_keep_their_value():
    torch.manual_seed(0)
    base = tiny_mlp()
    names = [n for n, _ in base.named_parameters()]
    tv = TaskVectors.from_states(base.state_dict(), {"a": tiny_mlp().state_dict()}, names)
    trainable = torch.tensor([[True, False, True, False]])
    merged = MergedModel(base, tv, "layer", "none", 0.3, batchnorm="base", trainable=trainable)
    optimizer = torch.optim.SGD(merged.parameters(), lr=1.0)
    merged(torch.randn(4, 12)).square().sum().backward()
    optimizer.step()
    values = merged.coefficients()[0].detach()
    assert values[1] == pytest.approx(0.3) and values[3] == pytest.approx(0.3)
    assert values[0] != pytest.approx(0.3) and values[2] != pytest.approx(0.3)


@pytest.mark.parametrize("storage", [torch.float64, torch.float32])
def test_float64_weights_subtract_in_float64(storage):
    base = {"w": torch.full((4,), 3.0, dtype=torch.float64)}
    expert = {"w": base["w"] + torch.tensor([1e-9, -2e-9, 0.0, 5e-10], dtype=torch.float64)}
    tv = TaskVectors.from_states(base, {"a": expert}, ["w"], storage)
    expected = (expert["w"] - base["w"]).to(storage)  # float32 subtraction would give exact zeros
    assert torch.equal(tv["w"][0], expected) and expected.abs().sum() > 0
    half = {"w": base["w"].to(torch.bfloat16)}
    from_half = TaskVectors.from_states(base, {"a": half}, ["w"], storage)  # bf16 expert of a float64 base
    assert torch.equal(from_half["w"][0], (half["w"].double() - base["w"]).to(storage))
