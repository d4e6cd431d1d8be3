"""The fused merge against a naive reference, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from adamerge.core.granularity import TaskWise, TensorWise
from adamerge.core.merge import CPU_CHUNK, PrecomputedGradient, combine, merge_tensors


def naive_combine(base: torch.Tensor, tv: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    out = base.clone()
    for k in range(tv.shape[0]):
        out = out + lam[k] * tv[k].to(base.dtype)
    return out


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2, 2), (CPU_CHUNK + 17,)])
@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_combine_matches_naive_value_and_gradient(shape, num_tasks, dtype):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator)
    tv = (torch.randn((num_tasks, *shape), generator=generator) * 0.1).to(dtype)
    weights = torch.randn(shape, generator=generator)
    lam = torch.rand(num_tasks, generator=generator).requires_grad_()
    lam_ref = lam.detach().clone().requires_grad_()

    merged = combine(base, tv, lam)
    reference = naive_combine(base, tv, lam_ref)
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    (merged * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(lam.grad, lam_ref.grad, rtol=1e-4, atol=1e-4)
    assert merged.dtype == base.dtype and merged.shape == base.shape


def test_combine_leaves_inputs_untouched():
    base, tv = torch.randn(6), torch.randn(2, 6)
    base_copy, tv_copy = base.clone(), tv.clone()
    combine(base, tv, torch.tensor([0.5, 0.25]))
    assert torch.equal(base, base_copy) and torch.equal(tv, tv_copy)


@pytest.mark.parametrize("granularity", [TaskWise(), TensorWise()])
def test_merge_tensors_uses_each_tensors_group(granularity):
    generator = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(3, generator=generator), "b": torch.randn(2, 2, generator=generator)}
    tv = {n: torch.randn(2, *t.shape, generator=generator) for n, t in base.items()}
    layout = granularity.compile(list(tv))
    lam = torch.rand(2, layout.num_groups, generator=generator)
    merged = merge_tensors(base, tv.items(), lam, layout)
    for name in base:
        expected = naive_combine(base[name], tv[name], lam[:, layout.group_of(name)])
        torch.testing.assert_close(merged[name], expected)


def test_precomputed_gradient_hands_over_gradients_and_scales():
    x = torch.randn(4, requires_grad=True)
    y = x * 2
    grad = torch.arange(4.0)
    value = PrecomputedGradient.apply(torch.tensor(3.0), (grad,), y)
    assert float(value.detach()) == 3.0
    (0.5 * value).backward()
    torch.testing.assert_close(x.grad, 2 * 0.5 * grad)
