"""Functional losses for learning merging coefficients; :mod:`adamerge.objectives.task_objectives` wraps them as
per-task ``nn.Module`` objectives."""

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


def pseudo_label_cross_entropy(logits: torch.Tensor, reference: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy of ``logits`` against the confident argmax of ``reference`` (aTLAS TTA).

    Args:
        logits: ``(B, C)`` predictions being trained.
        reference: ``(B, C)`` predictions giving the pseudo-labels (detached by the caller).
        threshold: minimum softmax confidence of a pseudo-label.

    Returns:
        Mean cross-entropy over the confident samples (sum over all samples / B, so a batch with no
        confident sample gives 0 and steps stay comparable).
    """
    probs = torch.softmax(reference.float(), dim=-1)  # (B, C)
    confidence, labels = probs.max(dim=-1)  # (B,), (B,)
    mask = (confidence >= threshold).float()  # (B,)
    per_sample = nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # (B,)
    return (per_sample * mask).sum() / logits.shape[0]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch.

    Args:
        student_logits: ``(B, C)`` of the merged model.
        teacher_logits: ``(B, C)`` of the expert.
        temperature: T.
    """
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, C)
    return temperature**2 * nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
