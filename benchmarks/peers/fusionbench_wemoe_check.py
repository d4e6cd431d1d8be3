#!/usr/bin/env python
"""WEMoE: adamerge's routed layers and router training against FusionBench 0.2.33's ``WeightEnsemblingMoE``.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.peers.fusionbench_wemoe_check --fb-python /tmp/fbvenv/bin/python

FusionBench's venv (``python3 -m venv /tmp/fbvenv && /tmp/fbvenv/bin/pip install fusion-bench==0.2.33
-c .ci/constraints.txt``) runs this same file with ``--fusionbench-side IN OUT``. That side imports
torch, FusionBench and the torch-only ``tiny_mlp_pool`` only. It builds the model as FusionBench's
``CLIPWeightEnsemblingMoEAlgorithm.construct_moe_model`` does (task arithmetic at 0.3 everywhere,
then each of the body's two linear layers upscaled to a ``WeightEnsemblingMoE`` over the
pretrained layer and the experts' layers, ``batch_first``, depth-2 routers starting at 0.3), and
runs FusionBench's own ``WeightEnsemblingMoEAlgorithm.test_time_adaptation`` (Adam lr 1e-4,
entropy, ``use_grad_accumulate``) for a few steps, with only what ties the class to CLIP given:
``compute_logits`` (the body's features, averaged over the tokens, times each task's fixed head)
and the loaders (every step's inputs, fixed in ``IN``); a CPU ``lightning.Fabric``. It saves the
routers' initial and trained weights and the outputs (per input, ``batch_reduce`` off) before
and after.

adamerge's side builds ``wemoe``'s :class:`~adamerge.run.routed_merge.WeightEnsemblingModule` on
the same pool (its routers set to FusionBench's initial weights, which FusionBench draws from
torch's global generator), takes the same steps and compares the routers and the routed outputs,
with the routing per batch while training (FusionBench's ``batch_reduce: true``) and per input
(adamerge's default), and evaluated per input.

FusionBench 0.2.33's ``task_arithmetic_merge`` does not run as shipped: its last sum fails with
``TypeError: Tensor type mismatch ... expected Parameter, got Tensor`` (``state_dict_add``'s strict
check rejects the pretrained model's Parameters plus the task vector's plain tensors, as in
FW-Merging). This side calls ``state_dict_add`` with ``strict=False`` in that module: the same
sums, without the check.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks.peers.tiny_mlp_pool import DIMS, TASKS, TinyClassifier, fusionbench_pool, pool

STEPS, BATCH, TOKENS = 4, 6, 3
INIT, LR = 0.3, 1e-4
LAYERS = ("0", "2")  # the body's linear layers: the routed "MLPs"
REDUCES = (True, False)


def cases(seed: int = 0) -> dict:
    """A seeded base body, its experts, fixed heads, every step's token inputs and a test batch."""
    data, generator = pool(seed, {"alpha": 0.4, "beta": 0.3, "gamma": 0.2})
    steps = [{t: torch.randn(BATCH, TOKENS, DIMS[0], generator=generator, dtype=torch.float64) for t in TASKS} for _ in range(STEPS)]
    test = torch.randn(5, TOKENS, DIMS[0], generator=generator, dtype=torch.float64)
    return data | {"steps": steps, "test": test}


def pooled_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)`` features averaged over the tokens, times a ``(C, D)`` head: ``(B, C)``."""
    return features.mean(dim=1) @ head.T


# ----------------------------------------------------------------------------------------------
# FusionBench's side (run by FusionBench's python; no adamerge import)


def fusionbench_side(inputs: Path, outputs: Path) -> None:
    import copy
    import functools

    import lightning as L
    from fusion_bench.method.task_arithmetic import task_arithmetic
    from fusion_bench.method.task_arithmetic.task_arithmetic import task_arithmetic_merge
    from fusion_bench.method.we_moe.we_moe import WeightEnsemblingMoEAlgorithm
    from fusion_bench.models.we_moe import WeightEnsemblingMoE
    from omegaconf import DictConfig

    task_arithmetic.state_dict_add = functools.partial(task_arithmetic.state_dict_add, strict=False)  # (see the docstring)
    data = torch.load(inputs, weights_only=True)
    modelpool = fusionbench_pool(data)
    results = {}
    for reduce in REDUCES:
        torch.manual_seed(1)  # FusionBench draws the routers from the global generator
        base = modelpool.load_model("_pretrained_")
        experts = [modelpool.load_model(t) for t in TASKS]
        moe = task_arithmetic_merge(copy.deepcopy(base), experts, scaling_factor=INIT).requires_grad_(False)
        for layer in LAYERS:
            moe._modules[layer] = WeightEnsemblingMoE(
                hidden_size=base._modules[layer].in_features, base_model=copy.deepcopy(base._modules[layer]),
                expert_models=[copy.deepcopy(e._modules[layer]) for e in experts], init_lambda=INIT, batch_first=True,
                router_hidden_layers=2, batch_reduce=reduce,
            ).double()  # fmt: skip
        initial = {k: v.detach().clone() for k, v in moe.state_dict().items() if ".gate." in k}

        class TinyWEMoE(WeightEnsemblingMoEAlgorithm):  # the CLIP-specific parts only
            def load_checkpoint(self, model, checkpoint):
                raise NotImplementedError

            def save_checkpoint(self, model, checkpoint):
                raise NotImplementedError

            def construct_moe_model(self):
                raise NotImplementedError

            def get_shuffled_test_loader_iter(self, task):
                return self.loaders[task]

            def compute_logits(self, module, batch, task):
                return pooled_logits(module(batch), data["heads"][task])

        algorithm = TinyWEMoE(DictConfig({"lr": LR, "optimizer": "adam", "max_steps": STEPS, "use_grad_accumulate": True}))
        algorithm._fabric = L.Fabric(accelerator="cpu", devices=1)
        algorithm.modelpool = modelpool
        algorithm.loaders = {t: iter([step[t] for step in data["steps"]]) for t in TASKS}
        for layer in LAYERS:
            moe._modules[layer].batch_reduce = False
        before = moe(data["test"]).detach().clone()
        for layer in LAYERS:
            moe._modules[layer].batch_reduce = reduce
        trained = algorithm.test_time_adaptation(moe)
        trained = getattr(trained, "module", trained)  # the Fabric wrapper
        for layer in LAYERS:
            trained._modules[layer].batch_reduce = False  # FusionBench evaluates per input
        trained.eval()
        with torch.no_grad():
            after = trained(data["test"]).detach().clone()
        final = {k: v.detach().clone() for k, v in trained.state_dict().items() if ".gate." in k}
        results[str(reduce)] = {"initial": initial, "final": final, "before": before, "after": after}
    torch.save(results, outputs)


# ----------------------------------------------------------------------------------------------
# adamerge's side


def adamerge_side(data: dict, reduce: bool, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """adamerge's routers after the same steps, and its routed outputs before and after."""
    from adamerge.core.merged_model import MergedModel
    from adamerge.core.task_vectors import TaskVectors
    from adamerge.methods import get_method
    from adamerge.objectives.task_objectives import Entropy
    from adamerge.run.routed_merge import WeightEnsemblingModule

    method = get_method("wemoe")
    model = TinyClassifier(tokens=True)  # the body over tokens, their mean, a task head
    model.body.load_state_dict(data["base"])
    vectors = {f"body.{n}": torch.stack([data["experts"][t][n] - data["base"][n] for t in TASKS]) for n in data["base"]}
    heads = {t: {"head.weight": data["heads"][t]} for t in TASKS}
    merged = MergedModel(model, TaskVectors(TASKS, vectors), "task", method.constraint, INIT, heads=heads, batchnorm="base")
    module = WeightEnsemblingModule(merged, routed=r"body\.[02]", init=INIT, batch_reduce=reduce, lr=LR, objective=Entropy())
    gates = {
        f"{layer}.gate.{name}": f"{i}.{name}"
        for i, layer in enumerate(LAYERS)
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    }
    module.routing.routers.load_state_dict({ours: initial[theirs] for theirs, ours in gates.items()})
    module.install()
    optimizer = module.configure_optimizers()
    outputs = {}

    def body_outputs() -> torch.Tensor:
        module.routing.config["batch_reduce"] = False
        with torch.no_grad(), merged.capture(["body"]) as captured:  # the routed body, inside the merged model's call
            merged(data["test"], TASKS[0])
        module.routing.config["batch_reduce"] = reduce
        return captured["body"].detach().clone()

    outputs["before"] = body_outputs()
    merged.train()
    for step, batch in enumerate(data["steps"]):
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
    merged.eval()
    outputs["after"] = body_outputs()
    state = module.routing.routers.state_dict()
    outputs["final"] = {theirs: state[ours] for theirs, ours in gates.items()}
    return outputs


def compare(fb_python: str, workdir: Path | None = None) -> dict[str, dict[str, float]]:
    """Per training routing (per batch / per input): the largest difference of the routed
    outputs before and after the steps and of the trained routers, and how far the steps moved
    the routers (that they did something)."""
    from benchmarks.peers.fusionbench_runs import fusionbench_outputs, max_difference

    data = cases()
    theirs = fusionbench_outputs(__file__, fb_python, data, workdir)
    report = {}
    for reduce in REDUCES:
        fb = theirs[str(reduce)]
        ours = adamerge_side(data, reduce, fb["initial"])
        names = list(fb["final"])
        report["per batch" if reduce else "per input"] = {
            "outputs_before": max_difference({"x": ours["before"]}, {"x": fb["before"]}, ["x"])[0],
            "outputs_after": max_difference({"x": ours["after"]}, {"x": fb["after"]}, ["x"])[0],
            "routers": max_difference(ours["final"], fb["final"], names)[0],
            "moved": max_difference(fb["final"], fb["initial"], names)[0],
            "outputs_moved": max_difference({"x": fb["after"]}, {"x": fb["before"]}, ["x"])[0],
        }
    return report


def describe(report: dict) -> Iterator[str]:
    """The report, line by line."""
    for routing, row in report.items():
        yield (
            f"training routing {routing}: max |adamerge − FusionBench| of the routed outputs {row['outputs_before']:.2e} before, "
            f"{row['outputs_after']:.2e} after {STEPS} steps (which moved them by {row['outputs_moved']:.2e}); of the routers "
            f"{row['routers']:.2e} (moved by {row['moved']:.2e})"
        )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.peers.fusionbench_runs import check_main

    return check_main(argv, __doc__, fusionbench_side, compare, describe)


if __name__ == "__main__":
    sys.exit(main())
