"""Learned-coefficient methods as configurations of the one parametrisation (DESIGN §1, §3).

A method fixes the defaults of the constraint ``g``, the initial λ, the objective and the
optimiser; the granularity is chosen independently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from adamerge.errors import AdamergeError
from adamerge.objectives import Entropy


@dataclass(frozen=True)
class MethodSpec:
    """Defaults of one learned-coefficient method.

    Attributes:
        name: command-line name.
        constraint: ``clamp``, ``sigmoid`` or ``none``.
        init: initial (constrained) λ.
        lr: Adam learning rate.
        loss: factory of the per-task objective on logits.
        paper: reference.
    """

    name: str
    constraint: str
    init: float
    lr: float
    loss: Callable[[], nn.Module]
    paper: str


METHODS = {
    "adamerging": MethodSpec(
        name="adamerging",
        constraint="clamp",
        init=0.3,
        lr=1e-3,
        loss=Entropy,
        paper="Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
    ),
}


def resolve_method(
    name: str, init: float | None = None, constraint: str | None = None, lr: float | None = None
) -> MethodSpec:
    """The method's defaults with the given overrides applied."""
    if name not in METHODS:
        raise AdamergeError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    overrides = {k: v for k, v in {"init": init, "constraint": constraint, "lr": lr}.items() if v is not None}
    return replace(METHODS[name], **overrides)
