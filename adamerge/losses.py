"""Objectives for learning merging coefficients (functional core plus ``nn.Module`` twins)."""

from __future__ import annotations

import torch
from torch import nn


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax predictions, AdaMerging's test-time objective.

    Args:
        logits: ``(B, C)``.

    Returns:
        Scalar ``mean_b −Σ_c p_bc log p_bc``.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, C)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


class EntropyLoss(nn.Module):
    """Module twin of :func:`entropy`."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return entropy(logits)
