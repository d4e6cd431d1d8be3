#!/usr/bin/env python
"""Concrete AdaMerging: adamerge's two stages against FusionBench 0.2.33's own code.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.fusionbench_concrete_check --fb-python /tmp/fbvenv/bin/python

FusionBench's venv (``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install fusion-bench==0.2.33
-c .ci/constraints.txt``) runs this same file with ``--fusionbench-side IN OUT``. That side
imports torch, Lightning, FusionBench and the torch-only ``tiny_mlp_pool`` only and runs FusionBench's
``ConcreteLayerWiseAdaMergingForCLIP`` methods themselves: ``setup_models`` (its ``MaskModel``
and ``LayerWiseMergedModel``), ``train_mask`` (stage one) and ``run_adamerging`` (stage two),
then ``merge_and_unload``. Only what ties the class to CLIP is given here: a model pool holding
a seeded float64 MLP body and its experts, ``compute_logits`` (the body's features times each
task's fixed head, the role of CLIP's zero-shot heads) and the test loaders (the batches of
every step, fixed in ``IN``). Stage two gets the hard mask of FusionBench's trained logits
(``1[ℓ ≥ 0]``, rescaled by its mean), where FusionBench's ``run`` would sample one.

This side runs adamerge's :class:`~adamerge.run.concrete_mask.ConcreteMaskModule` (a step's batch
is the inner batch then the outer batch, which it splits in halves) and the
``concrete-adamerging`` method's stage two (:meth:`ConcreteMaskedMethod.next_stage` and a plain
:class:`~adamerge.run.module.MergingModule`), seeded as FusionBench's side is (the mask samples
are the only random draws of either), and prints the largest differences of the mask logits
after stage one, of λ after stage two and of the merged weights.

The one definitional difference: FusionBench's ``entropy_loss`` adds ``1e-8`` inside the log,
adamerge's entropy does not, which moves the gradients in their eighth digit. Adam normalises
each step, so a mask logit whose gradient is that small can step either way: the report counts
the logits whose sign (the hard mask) differs.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.peers.tiny_mlp_pool import DIMS, TASKS, fusionbench_pool, head_logits, merged_body, merged_model, pool

MASK_STEPS, ADAMERGING_STEPS, BATCH = 12, 10, 6
INIT, INNER_LR, MASK_LR, ADAMERGING_LR, TEMPERATURE = 0.3, 1.0, 1e-3, 1e-3, 0.5
SEED = 0


def cases(seed: int = SEED) -> dict:
    """A seeded base body, its experts, fixed per-task heads and every step's batches."""
    data, generator = pool(seed, dict.fromkeys(TASKS, 0.3))

    def batches(count: int) -> list[dict[str, torch.Tensor]]:
        return [{task: torch.randn(BATCH, DIMS[0], generator=generator, dtype=torch.float64) for task in TASKS} for _ in range(count)]

    return data | {"mask_batches": batches(2 * MASK_STEPS), "batches": batches(ADAMERGING_STEPS)}


# ----------------------------------------------------------------------------------------------
# FusionBench's side (run by FusionBench's python; no adamerge import)


def fusionbench_side(inputs: Path, outputs: Path) -> None:
    import lightning as L
    from fusion_bench.method.concrete_subspace.clip_concrete_adamerging import ConcreteLayerWiseAdaMergingForCLIP
    from omegaconf import DictConfig

    data = torch.load(inputs, weights_only=True)
    tasks = list(data["experts"])

    class TinyConcrete(ConcreteLayerWiseAdaMergingForCLIP):  # the CLIP-specific parts only
        def compute_logits(self, module, images, task):
            return head_logits(data, module, images, task)

        def get_shuffled_test_loader_iter(self, task):
            return self.loaders[task]

    config = {
        "optimizer": "adam", "lr": MASK_LR, "base_lr": INNER_LR, "adamerging_lr": ADAMERGING_LR, "scaling_factor": INIT,
        "max_steps": MASK_STEPS, "max_adamerging_steps": ADAMERGING_STEPS, "save_interval": 10**9, "initial_logits": 0.0,
        "temperature": TEMPERATURE, "eval_mask_type": "continuous", "clamp_weights": False, "tie_weights": True,
        "strict": False, "merge_dtype": None,
    }  # fmt: skip
    algorithm = TinyConcrete.__new__(TinyConcrete)  # no Hydra program: the attributes its methods read
    algorithm.config = DictConfig(config)
    algorithm.modelpool = fusionbench_pool(data)
    algorithm._profiler = None
    algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
    module, mask_model = algorithm.setup_models()
    torch.manual_seed(SEED)  # the mask samples are the only random draws from here on
    algorithm.loaders = {task: iter([(step[task],) for step in data["mask_batches"]]) for task in tasks}
    algorithm.train_mask(module=module, mask_model=mask_model)
    logits = {name: p.detach().clone() for name, p in mask_model.named_parameters()}
    with torch.no_grad():
        mask = {name: (p >= 0).to(p.dtype) for name, p in logits.items()}
        mask = {name: m / m.mean() for name, m in mask.items()}
    algorithm.loaders = {task: iter([(step[task],) for step in data["batches"]]) for task in tasks}
    module = algorithm.run_adamerging(module, mask=mask)
    with torch.no_grad():
        weights = module.merge_weight.detach().clone()
        merged = {k: v.detach().clone() for k, v in module.merge_and_unload(mask).state_dict().items()}
    torch.save({"logits": logits, "lambda": weights, "merged": merged}, outputs)


# ----------------------------------------------------------------------------------------------
# adamerge's side


def adamerge_side(data: dict, fusionbench_order: bool = False) -> dict:
    """The mask logits after stage one, λ after stage two and the merged body, as FusionBench's side reports them.

    Args:
        data: :func:`cases`.
        fusionbench_order: take each inner gradient where FusionBench's ``train_mask`` takes it
            (at the previous step's inner λ; see ``ConcreteMaskModule.inner_gradient_point``).
    """
    import dataclasses
    from types import SimpleNamespace

    from adamerge.methods import get_method
    from adamerge.objectives.task_objectives import Entropy
    from adamerge.run.concrete_mask import ConcreteMaskModule
    from adamerge.run.module import MergingModule

    merged = merged_model(data, "layer", "none", INIT)
    method = dataclasses.replace(get_method("concrete-adamerging"), eval_mask="hard")  # FusionBench's side: the hard mask
    module_class = _fusionbench_order_class() if fusionbench_order else ConcreteMaskModule
    stage_one = module_class(merged, objective=Entropy(), mask_lr=MASK_LR, inner_lr=INNER_LR, temperature=TEMPERATURE)
    optimizer = stage_one.configure_optimizers()
    torch.manual_seed(SEED)
    for step in range(MASK_STEPS):
        inner, outer = data["mask_batches"][2 * step], data["mask_batches"][2 * step + 1]
        optimizer.zero_grad()
        stage_one.training_step({t: torch.cat([inner[t], outer[t]]) for t in TASKS}, step).backward()
        optimizer.step()
    logits = {name.removeprefix("body."): p.detach().clone() for name, p in stage_one.mask.named_logits()}
    settings = SimpleNamespace(granularity="layer", seed=SEED)
    refined = method.next_stage(stage_one.merged, settings, stage_one)
    stage_two = MergingModule(refined, objective=Entropy(), optimizer=method.optimizer_factory())
    optimizer = stage_two.configure_optimizers()
    for step, batch in enumerate(data["batches"]):
        optimizer.zero_grad()
        stage_two.training_step(batch, step).backward()
        optimizer.step()
    return {"logits": logits, "lambda": refined.coefficients().detach(), "merged": merged_body(refined)}


def _fusionbench_order_class():
    from adamerge.run.concrete_mask import ConcreteMaskModule

    class FusionBenchOrder(ConcreteMaskModule):
        """The inner gradient at the previous step's inner λ (the start on the first step)."""

        def inner_gradient_point(self) -> torch.Tensor:
            return self.merged.coefficients.raw.detach().clone()

    return FusionBenchOrder


def compare(fb_python: str, workdir: Path | None = None) -> dict[str, dict[str, float]]:
    """Per ordering of adamerge's inner step (``paper``: the gradient at λ's start, adamerge's
    default; ``fusionbench``: FusionBench's): the largest differences of the mask logits, λ and
    the merged weights, the share of mask logits whose sign differs, and how far stage one moved
    the logits (that it did something)."""
    from benchmarks.peers.fusionbench_runs import fusionbench_outputs, max_difference

    data = cases()
    theirs = fusionbench_outputs(__file__, fb_python, data, workdir)
    names = list(data["base"])
    report = {}
    for order in ("paper", "fusionbench"):
        ours = adamerge_side(data, fusionbench_order=order == "fusionbench")
        flipped = sum(int(((ours["logits"][n] >= 0) != (theirs["logits"][n] >= 0)).sum()) for n in names)
        total = sum(ours["logits"][n].numel() for n in names)
        report[order] = {
            "logits": max_difference(ours["logits"], theirs["logits"], names)[0],
            "moved": max(float(theirs["logits"][n].abs().max()) for n in names),
            "flipped": flipped / total,
            "lambda": float((ours["lambda"] - theirs["lambda"]).abs().max()),
            "merged": max_difference(ours["merged"], theirs["merged"], names)[0],
        }
    return report


def describe(report: dict) -> Iterator[str]:
    """The report, line by line."""
    for order, row in report.items():
        yield (
            f"inner gradient in the {order} order: max |adamerge − FusionBench|: mask logits {row['logits']:.3e} "
            f"(stage one moved them by up to {row['moved']:.3e}; {100 * row['flipped']:.2f} % of hard-mask entries differ), "
            f"λ {row['lambda']:.3e}, merged weights {row['merged']:.3e}"
        )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.fusionbench_runs import check_main

    return check_main(argv, __doc__, fusionbench_side, compare, describe)


if __name__ == "__main__":
    sys.exit(main())
