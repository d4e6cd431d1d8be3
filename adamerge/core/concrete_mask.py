"""A Concrete (relaxed Bernoulli) mask over the entries of the task vectors, shared by the experts.

Concrete AdaMerging (Tang et al.) learns one logit ``ℓ`` per entry of every merged tensor; the
merged weights are ``θ = θ_0 + m̃ ⊙ Σ_k λ_k τ_k`` with ``m̃ = m / mean(m)`` per tensor (the mean
rescaling keeps the merge's scale, as DARE's ``1 / p`` does). While learning, ``m`` is a
reparametrised sample of the Concrete distribution of temperature ``T``,

    m = σ((ℓ + log u − log(1 − u)) / T),   u ~ U(0, 1),

the sample ``torch.distributions.RelaxedBernoulli(logits=ℓ, temperature=T).rsample()`` draws
(the same uniforms, probability clamps and clipped sigmoid, so that a seeded run draws what FusionBench's
``MaskModel.sample_mask`` draws). For inference the mask is fixed: its expectation ``σ(ℓ)``
(:meth:`ConcreteMask.expected`), or hard, ``1[σ(ℓ) ≥ ½]`` (:meth:`ConcreteMask.hard`), each
rescaled by its mean as above.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from adamerge.errors import AdamergeError


class ConcreteMask(nn.Module):
    """One mask logit per entry of each named tensor.

    Args:
        shapes: ``{tensor name: shape}`` of the masked tensors (one task vector's shape each).
        initial_logits: every logit's start (0: keep probability ½).
        temperature: the Concrete temperature ``T`` of :meth:`sample`.
        dtype: the logits' dtype (the base weights', not a low-precision storage dtype of τ).
    """

    def __init__(
        self,
        shapes: Mapping[str, torch.Size | tuple[int, ...]],
        initial_logits: float = 0.0,
        temperature: float = 0.5,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise AdamergeError(f"Concrete mask temperature {temperature}: expected a positive number")
        self.names = tuple(shapes)
        self.temperature = float(temperature)
        self.logits = nn.ParameterList(
            nn.Parameter(torch.full(tuple(shape), float(initial_logits), dtype=dtype)) for shape in shapes.values()
        )

    def named_logits(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(tensor name, logits)`` pairs, in the order of ``shapes``."""
        return zip(self.names, self.logits, strict=True)

    def sample(self) -> dict[str, torch.Tensor]:
        """A rescaled relaxed-Bernoulli sample ``{name: m / mean(m)}``, differentiable in the logits.

        Draws ``torch.rand`` of each tensor's shape in order from the global generator of the
        logits' device.
        """
        masks = {}
        for name, logits in self.named_logits():
            tiny, eps = torch.finfo(logits.dtype).tiny, torch.finfo(logits.dtype).eps
            probs = torch.sigmoid(logits).clamp(eps, 1 - eps)  # (*S), torch's clamp_probs
            uniforms = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device).clamp(eps, 1 - eps)  # (*S)
            noisy = (uniforms.log() - (-uniforms).log1p() + probs.log() - (-probs).log1p()) / self.temperature  # (*S)
            soft = torch.sigmoid(noisy).clamp(tiny, 1 - eps)  # (*S), torch's clipped sigmoid
            masks[name] = soft / soft.mean()
        return masks

    @torch.no_grad()
    def hard(self) -> dict[str, torch.Tensor]:
        """The inference mask ``{name: b / mean(b)}`` with ``b = 1[σ(ℓ) ≥ ½]`` (a tensor whose every
        entry is dropped gets zeros)."""
        masks = {}
        for name, logits in self.named_logits():
            kept = (logits >= 0).to(logits.dtype)  # (*S)
            share = kept.mean()
            masks[name] = kept / share if bool(share > 0) else kept
        return masks

    @torch.no_grad()
    def expected(self) -> dict[str, torch.Tensor]:
        """The mask's mean ``{name: p / mean(p)}`` with ``p = σ(ℓ)``, each entry's keep probability
        (all ones, the unmasked merge, while the logits are equal)."""
        masks = {}
        for name, logits in self.named_logits():
            probs = torch.sigmoid(logits)  # (*S)
            masks[name] = probs / probs.mean()
        return masks

    @torch.no_grad()
    def kept_share(self) -> float:
        """The share of entries the hard mask keeps, over every masked tensor."""
        kept = sum(int((logits >= 0).sum()) for logits in self.logits)
        total = sum(logits.numel() for logits in self.logits)
        return kept / max(total, 1)
