"""The learnable merging coefficients λ: a ``(K, G)`` parameter and its constraint ``g``.

Constraints: ``none`` (aTLAS), ``clamp`` to [0, 1] (AdaMerging: the raw value is
clamped in the forward pass, so a coefficient outside the range receives no gradient, as in the
official code) and ``sigmoid`` (Expert Merging: the raw value is a logit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from adamerge.choices import CONSTRAINTS
from adamerge.core.granularity import CoefficientLayout
from adamerge.errors import AdamergeError


def constrain(raw: torch.Tensor, constraint: str) -> torch.Tensor:
    """Apply the constraint ``g`` to raw coefficients."""
    if constraint == "none":
        return raw
    if constraint == "clamp":
        return raw.clamp(0.0, 1.0)
    if constraint == "sigmoid":
        return torch.sigmoid(raw)
    raise AdamergeError(f"constraint {constraint!r}: expected one of {', '.join(CONSTRAINTS)}")


def unconstrain(values: torch.Tensor, constraint: str) -> torch.Tensor:
    """Raw values whose constrained value is ``values`` (the inverse of :func:`constrain`)."""
    if constraint == "sigmoid":
        if bool(((values <= 0) | (values >= 1)).any()):
            raise AdamergeError("sigmoid coefficients must start strictly inside (0, 1)")
        return torch.logit(values)
    if constraint == "clamp" and bool(((values < 0) | (values > 1)).any()):
        raise AdamergeError("clamped coefficients must start inside [0, 1]")
    constrain(values, constraint)  # validates the name
    return values


class Coefficients(nn.Module):
    """Learnable coefficients, one per (task, group), and their constraint.

    Args:
        tasks: the K task names.
        layout: the compiled granularity (G groups).
        constraint: ``none``, ``clamp`` or ``sigmoid``.
        init: initial (constrained) value: a float for every entry, or a ``(K, G)`` / ``(K,)``
            tensor (a per-task value is broadcast over groups).
        trainable: optional ``(K, G)`` boolean mask; entries marked ``False`` keep their value
            (their gradient is zeroed), e.g. the layers Expert Merging++ does not refine.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        layout: CoefficientLayout,
        constraint: str = "clamp",
        init: float | torch.Tensor = 0.3,
        trainable: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if constraint not in CONSTRAINTS:
            raise AdamergeError(f"constraint {constraint!r}: expected one of {', '.join(CONSTRAINTS)}")
        self.tasks = tuple(tasks)
        self.layout = layout
        self.constraint = constraint
        self.raw = nn.Parameter(torch.empty(len(self.tasks), layout.num_groups))  # (K, G)
        self.set_values(init)
        if trainable is not None:
            if trainable.shape != self.raw.shape:
                raise AdamergeError(f"trainable mask of shape {tuple(trainable.shape)}, expected {tuple(self.raw.shape)}")
            self.register_buffer("trainable", trainable.bool(), persistent=False)
            self.raw.register_hook(lambda grad: grad * self.trainable)  # frozen entries get no gradient

    def forward(self) -> torch.Tensor:
        """Constrained coefficients ``(K, G)``."""
        return constrain(self.raw, self.constraint)

    @torch.no_grad()
    def set_values(self, values: float | torch.Tensor) -> None:
        """Set the constrained values (float, ``(K,)`` or ``(K, G)``)."""
        target = torch.as_tensor(values, dtype=self.raw.dtype, device=self.raw.device)
        if target.dim() == 1:
            target = target[:, None]  # (K, 1)
        try:
            target = target.expand_as(self.raw)  # (K, G)
        except RuntimeError:
            raise AdamergeError(
                f"coefficient values of shape {tuple(target.shape)} do not fit {len(self.tasks)} tasks x {self.layout.num_groups} groups"
            ) from None
        self.raw.copy_(unconstrain(target.clone(), self.constraint))

    def table(self) -> dict[str, dict[str, float]]:
        """``{task: {group: value}}`` of the constrained coefficients, for humans and JSON."""
        values = self().detach().cpu()
        return {task: {group: float(values[k, g]) for g, group in enumerate(self.layout.group_names)} for k, task in enumerate(self.tasks)}
