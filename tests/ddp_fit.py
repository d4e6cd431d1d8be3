"""Fit a tiny merge with Lightning on 1 or 2 CPU processes; used by tests/test_ddp.py.

python tests/ddp_fit.py WORKDIR OUT.json --devices 2 --strategy ddp --batch-size 4 [--method wemoe]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adamerge.core.merged_model import MergedModel  # noqa: E402
from adamerge.data.images import MultiTaskImageDataModule  # noqa: E402
from adamerge.objectives.task_objectives import Entropy  # noqa: E402
from adamerge.run.module import MergingModule  # noqa: E402
from adamerge.run.routed_merge import WeightEnsemblingModule  # noqa: E402
from adamerge.sources import load_file_experts  # noqa: E402
from tests.conftest import HEAD  # noqa: E402


class RecordIgnored(L.Callback):
    """Records what DDP broadcasts and what it ignores."""

    def on_train_start(self, trainer, pl_module):
        ddp = trainer.strategy.model
        self.report = {
            "wrapped": type(ddp).__name__,
            "ignored": sorted(getattr(ddp, "parameters_to_ignore", [])),
            "broadcast_buffers": sorted(getattr(ddp, "named_module_buffers", {}).keys()),
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--method", choices=["adamerging", "wemoe"], default="adamerging")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    experts = {t: args.workdir / f"{t}.pt" for t in ("alpha", "beta")}
    loaded = load_file_experts("tests.tiny:tiny_convnet", args.workdir / "base.pt", experts, HEAD, "base")
    merged = MergedModel(loaded.model, loaded.task_vectors, "layer", "clamp", 0.3, loaded.heads, "base")
    # plain SGD: the coefficients are a linear function of the averaged gradients (Adam's first steps
    # are sign-like and would amplify round-off in near-zero gradients)
    module = MergingModule(merged, optimizer=functools.partial(torch.optim.SGD, lr=2.0))
    if args.method == "wemoe":  # the routers learn (their own Adam), λ stays at task arithmetic
        merged = MergedModel(loaded.model, loaded.task_vectors, "task", "clamp", 0.3, loaded.heads, "base")
        module = WeightEnsemblingModule(merged, lr=1e-2, objective=Entropy())
    routers = lambda: torch.cat([p.detach().flatten() for p in getattr(module, "routing").routers.parameters()]).tolist()  # noqa: E731
    initial = routers() if args.method == "wemoe" else None
    data = MultiTaskImageDataModule(args.workdir / "calib", merged.tasks, batch_size=args.batch_size, image_size=12, shuffle=False)
    recorder = RecordIgnored()
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        payload = {"coefficients": merged.coefficients().detach().tolist(), **recorder.report}
        if args.method == "wemoe":
            payload |= {"routers": routers(), "initial_routers": initial}
        args.out.write_text(json.dumps(payload))


if __name__ == "__main__":
    main()
