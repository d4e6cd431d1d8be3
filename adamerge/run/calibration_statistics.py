"""Each expert's statistics on its own calibration data, for the data-informed merges.

Expert k alone (``experts.expert_model(task)``, its own head) runs on task k's unlabeled
calibration inputs (``data.target_loaders()``: unshuffled, ``--eval-batch-size`` batches, texts
ordered by length) and yields the statistic its :class:`~adamerge.rewrite.calibrated.CalibratedRewrite`
names:

- ``"fisher"`` (:func:`fisher_diagonals`): the diagonal Fisher of every merged parameter, from
  per-example gradients (forward hooks are not needed: ``torch.autograd.grad`` of each example's
  log-likelihood);
- ``"gram"`` (:func:`layer_input_grams`): ``XᵀX`` of the inputs of every merged linear layer
  (forward pre-hooks), over real tokens only for text.

Everything runs on the CPU, one expert in memory at a time; the statistics of all experts are kept
(float32, the size of the merged tensors for Fisher, one ``(in, in)`` Gram per linear layer for RegMean).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from adamerge.core.model_inputs import Inputs, call_module
from adamerge.errors import AdamergeError
from adamerge.objectives.task_objectives import as_task_batch
from adamerge.rewrite.calibrated import CalibratedRewrite
from adamerge.rewrite.regmean import LayerInputs
from adamerge.sources import ExpertSet
from adamerge.task_types import LOGITS_TO_KEEP, TaskType

logger = logging.getLogger(__name__)


def expert_statistics(rewrite: CalibratedRewrite, experts: ExpertSet, data: L.LightningDataModule) -> list[Any]:
    """One statistic per expert, in task order: ``rewrite.statistic`` of expert k on task k's data.

    Raises:
        AdamergeError: the source cannot rebuild each expert alone, or the statistic is unknown.
    """
    if experts.expert_model is None:
        raise AdamergeError(f"{type(rewrite).__name__} needs each expert alone, which this expert source cannot rebuild")
    if rewrite.statistic not in ("fisher", "gram"):
        raise AdamergeError(f"unknown calibration statistic {rewrite.statistic!r} of {type(rewrite).__name__}")
    loaders = data.target_loaders()
    names = experts.task_vectors.names
    statistics = []
    for k, task in enumerate(experts.tasks):
        started = time.perf_counter()
        model = experts.expert_model(task).eval()
        batches = (as_task_batch(item).inputs for item in loaders[task])
        if rewrite.statistic == "fisher":
            generator = torch.Generator().manual_seed(int(getattr(rewrite, "seed", 0)) + k)
            statistics.append(fisher_diagonals(model, batches, names, experts.task_type, rewrite.labels, generator))
        else:
            statistics.append(layer_input_grams(model, batches, names))
        logger.info("%s statistics of expert %s: %d tensor(s) in %.1f s", rewrite.statistic, task, len(statistics[-1]),
                    time.perf_counter() - started)  # fmt: skip
        del model
    return statistics


def examples(inputs: Inputs) -> Iterator[Inputs]:
    """The batch ``inputs`` one example at a time, each a batch of one (a tensor or a dict of
    tensors; ``logits_to_keep``, positions shared by the batch's rows, stays whole)."""
    if isinstance(inputs, torch.Tensor):
        for row in range(inputs.shape[0]):
            yield inputs[row : row + 1]
        return
    size = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]
    for row in range(size):
        yield {k: v[row : row + 1] if isinstance(v, torch.Tensor) and k != LOGITS_TO_KEEP else v for k, v in inputs.items()}


def example_score(log_probs: torch.Tensor, labels: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The scalar whose gradient one example's Fisher squares, from its ``(N, C)`` log-probabilities
    at its N scored positions (summed over them: one example's log-likelihood).

    Args:
        log_probs: ``(N, C)``.
        labels: ``"sqrt-weighted"`` (``Σ_c sqrt(p̂_c) log p_c``, ``p̂`` detached), ``"argmax"``
            (``log p`` of the predicted class) or ``"sample"`` (``log p`` of a class drawn from ``p``).
        generator: the RNG of ``"sample"``.
    """
    if labels == "sqrt-weighted":
        return (log_probs.detach().exp().sqrt() * log_probs).sum()
    if labels == "argmax":
        chosen = log_probs.detach().argmax(dim=-1, keepdim=True)  # (N, 1)
    elif labels == "sample":
        chosen = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)  # (N, 1)
    else:
        raise AdamergeError(f"unknown Fisher labels {labels!r}")
    return log_probs.gather(-1, chosen).sum()


def fisher_diagonals(
    model: nn.Module,
    batches: Iterable[Inputs],
    names: Sequence[str],
    task_type: TaskType,
    labels: str = "sqrt-weighted",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher ``F = (1/N) Σ_i g_i ⊙ g_i`` of the parameters ``names`` of ``model``.

    ``g_i`` is the gradient of example i's :func:`example_score` over its scored positions
    (``task_type.scored``: one per classifier example; every real next-token position of a causal
    LM's text, or the response position under ``--positions response``), its labels the model's own
    (no ground truth is read). ``labels="expected"`` is the paper's exact expectation
    ``Σ_c p_c (∇ log p_c)²`` (one backward per class; classification only). An example runs as a
    batch of one (eval mode: no batch statistics), so N forward and backward passes per expert
    (``C·N`` backward for ``"expected"``), memory one example's activations plus a float32 copy of
    the merged tensors. Names that are not parameters of ``model`` (buffers) get no Fisher.

    Returns:
        ``{name: F (*shape)}`` in float32 (float64 for a float64 model).

    Raises:
        AdamergeError: no example, or ``"expected"`` for a task type that is not classification.
    """
    if labels == "expected" and task_type.name != "classification":
        raise AdamergeError(
            f"Fisher labels 'expected' take one backward pass per class: classification only, these are {task_type.name} "
            "models (use labels sqrt-weighted, argmax or sample)"
        )
    params = dict(model.named_parameters())
    wanted = [n for n in names if n in params and params[n].is_floating_point()]
    flags = {name: param.requires_grad for name, param in params.items()}  # restored at the end
    for param in model.parameters():
        param.requires_grad_(False)
    tensors = [params[n].requires_grad_(True) for n in wanted]
    sums = [torch.zeros(t.shape, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]  # float32 or wider
    count = 0
    with torch.enable_grad():
        for inputs in batches:
            for one in examples(inputs):
                count += 1
                one = task_type.model_inputs(one)  # a causal LM's logits at the scored positions only
                scored, _ = task_type.scored(call_module(model, one), one)  # (N, C)
                if scored.shape[0] == 0:  # nothing scored (a one-token text): a zero gradient
                    continue
                log_probs = torch.log_softmax(scored.to(torch.promote_types(scored.dtype, torch.float32)), dim=-1)  # (N, C)
                if labels == "expected":
                    probs = log_probs.detach().exp()[0]  # (C,)
                    for c in range(log_probs.shape[-1]):
                        grads = torch.autograd.grad(log_probs[0, c], tensors, retain_graph=c + 1 < log_probs.shape[-1], allow_unused=True)
                        _accumulate(sums, grads, float(probs[c]))
                else:
                    grads = torch.autograd.grad(example_score(log_probs, labels, generator), tensors, allow_unused=True)
                    _accumulate(sums, grads)
    for name, flag in flags.items():
        params[name].requires_grad_(flag)
    if count == 0:
        raise AdamergeError("Fisher merging: an expert's calibration data has no example")
    return {name: total / count for name, total in zip(wanted, sums)}


def _accumulate(sums: list[torch.Tensor], grads: Sequence[torch.Tensor | None], weight: float = 1.0) -> None:
    """``sums[j] += weight · grads[j]²`` (a parameter the score does not reach adds 0)."""
    for total, grad in zip(sums, grads):
        if grad is not None:
            total.add_(grad.detach().to(total.dtype).square(), alpha=weight)


def linear_layers(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Module, int]]:
    """``{weight name: (module, input dim)}`` of the merged linear layers of ``model``.

    ``nn.Linear`` (weight ``(out, in)``, input dim 1) and transformers' GPT-2 ``Conv1D`` (weight
    ``(in, out)``, input dim 0). A weight shared with another module (a tied LM head) is left out:
    RegMean would solve it for one of its uses only.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    wanted, layers, tied = set(names), {}, []
    for module_name, module in model.named_modules():
        weight_name = f"{module_name}.weight" if module_name else "weight"
        weight = getattr(module, "weight", None)
        if weight_name not in wanted or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if isinstance(module, nn.Linear):
            input_dim = 1
        elif type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
            input_dim = 0
        else:
            continue
        if uses[id(weight)] > 1:
            tied.append(weight_name)
            continue
        layers[weight_name] = (module, input_dim)
    if tied:
        logger.info("RegMean: tied weight(s) %s are averaged", tied)
    return layers


def layer_input_grams(model: nn.Module, batches: Iterable[Inputs], names: Sequence[str]) -> dict[str, LayerInputs]:
    """``XᵀX`` ``(in, in)`` (float32, float64 for a float64 model) of the inputs of each merged linear layer of ``model``.

    The rows of ``X`` are every input vector the layer sees: one per example for a classifier's
    pooled features, one per **real** token for text (``attention_mask``; padding is left out), one
    per token for a vision transformer. Cost: one forward pass per batch and ``rows · in²`` per
    layer; memory one ``(in, in)`` float32 Gram per layer.

    Returns:
        ``{weight name: LayerInputs}`` (a layer that saw no input has a zero Gram and 0 rows).
    """
    layers = linear_layers(model, names)
    grams = {name: torch.zeros(module.weight.shape[input_dim], module.weight.shape[input_dim],
                               dtype=torch.promote_types(module.weight.dtype, torch.float32))
             for name, (module, input_dim) in layers.items()}  # fmt: skip
    rows = dict.fromkeys(layers, 0)
    mask: list[torch.Tensor | None] = [None]  # the current batch's (B, T) real tokens

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()  # (..., in)
            real = mask[0]
            x = x[real] if real is not None and x.dim() >= 3 and x.shape[:2] == real.shape else x.reshape(-1, x.shape[-1])
            x = x.to(grams[name].dtype)  # (n, in)
            grams[name].addmm_(x.T, x)
            rows[name] += x.shape[0]

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, (module, _) in layers.items()]
    try:
        with torch.no_grad():
            for inputs in batches:
                attention = inputs.get("attention_mask") if isinstance(inputs, dict) else None
                mask[0] = attention.bool() if isinstance(attention, torch.Tensor) else None
                call_module(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    unseen = [name for name in layers if rows[name] == 0]
    if unseen:  # e.g. MultiheadAttention's out_proj, whose weight is used without calling the module
        logger.warning("RegMean: %d linear layer(s) never called on the calibration data are averaged, e.g. %s", len(unseen), unseen[:3])
    return {name: LayerInputs(grams[name], rows[name], layers[name][1]) for name in layers}
