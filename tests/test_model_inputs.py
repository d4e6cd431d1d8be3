"""Channels-last execution of convolutional models on the CPU (adamerge.model_inputs)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from adamerge.model_inputs import call_functional, call_module, channels_last_tensors, uses_channels_last


def _mobilenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(num_classes=7, width_mult=0.35).eval()
    with torch.no_grad():  # statistics away from their (0, 1) defaults, so BatchNorm does something
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.1, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("train", [False, True])
def test_conv_model_on_cpu_runs_channels_last_with_the_same_logits_and_gradients(train: bool) -> None:
    model, reference = _mobilenet().train(train), _mobilenet().train(train)  # identical copies
    torch.manual_seed(1)
    images = torch.randn(6, 3, 32, 32)  # (B, C, H, W)
    weight = model.features[0][0].weight.detach().clone().mul_(1.5).requires_grad_(True)  # (O, C, k, k)
    naive_weight = weight.detach().clone().requires_grad_(True)
    assert uses_channels_last(model, images)

    torch.manual_seed(2)  # the same dropout draws in both calls (training mode)
    logits = call_functional(model, {"features.0.0.weight": weight}, images)  # (B, 7)
    torch.manual_seed(2)  # the naive reference: torch's functional call in the default layout
    expected = torch.func.functional_call(reference, {"features.0.0.weight": naive_weight}, (images,))
    # float32 rounding only (batch statistics of 6 images amplify it in training mode)
    tolerance = {"rtol": 1e-3, "atol": 2e-4} if train else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(logits, expected, **tolerance)

    logits.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(weight.grad, naive_weight.grad, rtol=1e-3, atol=1e-3)
    assert weight.is_contiguous() and model.features[0][0].weight.is_contiguous()  # caller's layout untouched


def test_call_module_matches_a_plain_call() -> None:
    model = _mobilenet()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(call_module(model, images), model(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "model", "expected"),
    [
        (torch.randn(2, 3, 16, 16), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), True),
        (torch.randn(2, 3, 16, 16), nn.Sequential(nn.Flatten(), nn.Linear(768, 2)), False),  # no convolution
        (torch.randn(2, 48), nn.Sequential(nn.Linear(48, 2)), False),  # not an image batch
        (torch.randint(0, 9, (2, 3, 4, 4)), nn.Sequential(nn.Conv2d(3, 4, 3)), False),  # not floats
        ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, nn.Sequential(nn.Conv2d(3, 4, 3)), False),  # text
    ],
)
def test_uses_channels_last_only_for_float_image_batches_into_conv_models(inputs, model, expected) -> None:
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
