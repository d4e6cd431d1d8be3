"""Small architectures built in the tests (importable as ``tests.tiny:NAME``)."""

from __future__ import annotations

from torch import nn


def tiny_convnet(num_classes: int = 10, width: int = 8) -> nn.Module:
    """Conv-BN-ReLU x2, global pooling and a linear head ``head`` (a few thousand parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def tiny_mlp(in_features: int = 12, hidden: int = 16, num_classes: int = 4) -> nn.Module:
    """Two-layer perceptron without normalisation layers."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
