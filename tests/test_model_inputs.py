"""Channels-last execution of convolutional models on the CPU (adamerge.core.model_inputs)."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from torch import nn

from adamerge.core import model_inputs
from adamerge.core.model_inputs import call_functional, call_module, channels_last_tensors, uses_channels_last


def _mobilenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.35).eval()
    with torch.no_grad():  # statistics away from their (0, 1) defaults, so BatchNorm does something
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("size", [32, 64])
def test_conv_model_on_cpu_runs_channels_last_with_the_same_logits_and_gradients(size: int) -> None:
    # eval mode, as a fit runs the model (its BatchNorm layers use running statistics)
    model, reference = _mobilenet(), _mobilenet()  # identical copies
    torch.manual_seed(1)
    images = torch.randn(6, 3, size, size)  # (B, C, H, W)
    weight = model.features[0][0].weight.detach().clone().mul_(1.5).requires_grad_(True)  # (O, C, k, k)
    naive_weight = weight.detach().clone().requires_grad_(True)
    assert uses_channels_last(model, images)  # depthwise convolutions: channels-last with gradients too

    logits = call_functional(model, {"features.0.0.weight": weight}, images)  # (B, 7)
    # the naive reference: torch's functional call in the default layout
    expected = torch.func.functional_call(reference, {"features.0.0.weight": naive_weight}, (images,))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)  # float32 rounding only

    logits.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(weight.grad, naive_weight.grad, rtol=1e-4, atol=1e-5)
    assert weight.is_contiguous() and model.features[0][0].weight.is_contiguous()  # caller's layout untouched


def test_call_module_matches_a_plain_call() -> None:
    model = _mobilenet()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(call_module(model, images), model(images), rtol=1e-4, atol=1e-5)


def _dense() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())


def _grouped() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, groups=6), nn.Flatten())  # depthwise


@pytest.mark.parametrize(
    ("inputs", "model", "grad", "expected"),
    [
        (torch.randn(2, 3, 16, 16), _dense(), False, True),  # evaluation of any conv model
        (torch.randn(2, 3, 16, 16), _dense(), True, False),  # training, dense convs (ResNet-like)
        (torch.randn(2, 3, 16, 16), _grouped(), True, True),  # training, depthwise convs (MobileNet-like)
        (torch.randn(2, 3, 16, 16), _grouped(), False, True),
        (torch.randn(2, 3, 16, 16), nn.Sequential(nn.Flatten(), nn.Linear(768, 2)), False, False),  # no convolution
        (torch.randn(2, 48), nn.Sequential(nn.Linear(48, 2)), False, False),  # not an image batch
        (torch.randint(0, 9, (2, 3, 4, 4)), _dense(), False, False),  # not floats
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, _dense(), False, False),  # text
    ],
)
def test_uses_channels_last_picks_the_faster_layout(inputs, model, grad, expected) -> None:
    with torch.set_grad_enabled(grad):
        assert uses_channels_last(model, inputs) is expected


def test_channels_last_tensors_converts_4d_weights_and_leaves_the_rest() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    given = {"0.weight": torch.randn(4, 3, 3, 3), "0.bias": torch.randn(4)}
    out = channels_last_tensors(model, given)
    assert set(out) == {"0.weight", "0.bias", "2.weight"}  # the module's own 4-d weight joins
    assert out["0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert out["2.weight"].is_contiguous(memory_format=torch.channels_last)
    assert out["0.bias"] is given["0.bias"]
    assert given["0.weight"].is_contiguous()  # the caller's dict and tensors are not changed
    torch.testing.assert_close(out["0.weight"], given["0.weight"], rtol=0, atol=0)


def test_channels_last_can_be_switched_off(monkeypatch) -> None:
    model, images = _grouped(), torch.randn(2, 3, 8, 8)
    assert uses_channels_last(model, images)
    monkeypatch.setattr(model_inputs, "CHANNELS_LAST_ON_CPU", False)
    assert not uses_channels_last(model, images)
    with torch.no_grad():
        assert not uses_channels_last(model, images)


def test_channels_last_benchmark_measures_both_layouts_and_restores_the_switch(tmp_path) -> None:
    from tests.conftest import load_benchmark

    bench = load_benchmark("channels_last")
    args = argparse.Namespace(experts=2, image_size=32, batch=2, eval_batch=4, repeats=2)
    policy = model_inputs.uses_channels_last
    result = bench.measure("mobilenet_v2", args)
    assert model_inputs.uses_channels_last is policy  # restored after forcing each layout
    assert result["evaluation"]["adamerge_uses"] == result["fit step"]["adamerge_uses"] == "channels-last"
    for mode in ("evaluation", "fit step"):
        entry = result[mode]
        assert all(len(runs) == 2 for runs in entry["runs_s"].values())
        assert entry["default_s"] > 0 and entry["channels_last_s"] > 0
        # the same numbers up to float rounding: logits, and the gradient to λ of both tasks
        assert entry["max_abs_difference"] <= 1e-4 * max(1.0, entry["max_abs_reference"])
