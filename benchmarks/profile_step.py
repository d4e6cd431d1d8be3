#!/usr/bin/env python
"""Where the time and memory of one layer-wise AdaMerging step go (CPU), phase by phase.

Same model and task vectors as ``step_time_memory.py`` (its ``build``). One adamerge step is the
library's own :meth:`MergingModule.training_step` taken apart into its phases (the same calls, in
the same order):

- ``merge_fwd``: ``θ(λ) = merged.merged_tensors()`` (one gemv per tensor over the task vectors);
- ``task_fwd`` / ``task_bwd``: per task, the forward through the detached leaves θ' with the
  task's head and the entropy loss, then ``backward(inputs=θ')``;
- ``merge_bwd``: backward of :class:`PrecomputedGradient` (``∂L/∂θ'`` handed to θ(λ), one gemv per
  tensor into λ);
- ``opt``: Adam on λ and ``zero_grad``.

The plain reference is ``step_time_memory.py``'s plain step taken apart the same way
(``task_fwd``/``task_bwd`` through the unmerged tower, ``opt`` = its SGD(lr=0) step + zero_grad).

Per phase: wall time (median over the measured steps), minor page faults (first touches of fresh
memory, which the kernel zero-fills) and RSS after the phase. ``--mode both`` runs plain and then
adamerge steps alternately in the same process (background load hits both alike; same allocator),
so use ``--mode adamerging`` alone for peak RSS.

    .venv/bin/python -m benchmarks.profile_step --experts 8 --dtype float32 --threads 1
    .venv/bin/python -m benchmarks.profile_step --experts 8 --dtype float32 --micro
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections import defaultdict

from benchmarks.step_time_memory import build, rss_mb


class Phases:
    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.faults: dict[str, list[int]] = defaultdict(list)
        self.rss: dict[str, list[float]] = defaultdict(list)
        self._current: dict[str, float] = defaultdict(float)
        self._current_faults: dict[str, int] = defaultdict(int)

    def run(self, name: str, fn):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out = fn()
        self._current[name] += time.perf_counter() - t0
        self._current_faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        self.rss[name].append(rss_mb())
        return out

    def end_step(self, keep: bool) -> None:
        if keep:
            for name, value in self._current.items():
                self.times[name].append(value)
                self.faults[name].append(self._current_faults[name])
        self._current.clear()
        self._current_faults.clear()

    def summary(self) -> dict:
        rows = {}
        for name, values in self.times.items():
            rows[name] = {
                "s": round(statistics.median(values), 4),
                "minor_faults": int(statistics.median(self.faults[name])),
                "fault_mb": round(statistics.median(self.faults[name]) * 4096 / 2**20, 1),
                "rss_after_mb_max": round(max(self.rss[name]), 1),
            }
        rows["total"] = {"s": round(sum(r["s"] for r in rows.values()), 4)}
        return rows


def adamerging_steps(merged, batches, warmup: int, phases: Phases):
    """One adamerge step per iteration (a generator, so that steps can be interleaved)."""
    import torch

    from adamerge.core.merge import PrecomputedGradient
    from adamerge.objectives.task_objectives import as_task_batch
    from adamerge.run.module import MergingModule, adam

    module = MergingModule(merged, optimizer=adam(1e-3))
    module.train()
    optimizer = module.configure_optimizers()
    for step, batch in enumerate(batches):
        merged.model.requires_grad_(False)  # (the interleaved plain step turns them on)
        merged_t = phases.run("merge_fwd", merged.merged_tensors)
        leaves = phases.run("detach", lambda: {n: t.detach().requires_grad_() for n, t in merged_t.items()})
        total = torch.zeros(())
        for task, item in batch.items():
            tb = as_task_batch(item)
            loss = phases.run("task_fwd", lambda: module.objective(task, module._outputs(tb, task, leaves), tb))
            phases.run("task_bwd", lambda: loss.backward(inputs=list(leaves.values())))
            total += loss.detach()
        used = [n for n, leaf in leaves.items() if leaf.grad is not None]
        grads = tuple(leaves[n].grad for n in used)

        def merge_bwd():
            PrecomputedGradient.apply(total, grads, *(merged_t[n] for n in used)).backward()

        phases.run("merge_bwd", merge_bwd)
        merged_t = leaves = grads = loss = None  # this step's tensors freed before the next

        def opt():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        phases.run("opt", opt)
        phases.end_step(keep=step >= warmup)
        yield


def plain_steps(model, batches, warmup: int, phases: Phases):
    """One plain training step per iteration (a generator)."""
    import torch

    model.train(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for step, batch in enumerate(batches):
        model.requires_grad_(True)
        for inputs in batch.values():
            def fwd():
                probs = model(inputs).log_softmax(-1)
                return -(probs.exp() * probs).sum(-1).mean()

            loss = phases.run("task_fwd", fwd)
            phases.run("task_bwd", loss.backward)
        phases.run("sgd_step", optimizer.step)
        phases.run("zero_grad", lambda: optimizer.zero_grad(set_to_none=True))
        model.requires_grad_(False)
        phases.end_step(keep=step >= warmup)
        yield


def micro(merged, repeats: int) -> dict:
    """The merge alone: forward gemv pass and backward gemv pass over all tensors, plus a pure
    streaming read of the task vectors (``sum``) and a fresh-memory first touch of P floats, as floors."""
    import torch

    from adamerge.core.merge import PrecomputedGradient

    tv_bytes = sum(v.numel() * v.element_size() for _, v in merged.task_vectors.items())
    p = merged.task_vectors.numel()
    out = {"task_vector_bytes": tv_bytes, "entries_per_task": p}

    def timed(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times), 4)

    lam = merged.coefficients().detach()
    with torch.no_grad():
        out["merge_fwd_nograd_s"] = timed(lambda: merged.merged_tensors(lam))
    grads = {n: torch.randn_like(t) for n, t in merged.base_tensors().items() if n in merged.task_vectors.names}

    def fwd_bwd():
        m = merged.merged_tensors()
        PrecomputedGradient.apply(torch.zeros(()), tuple(grads[n] for n in m), *m.values()).backward()
        merged.coefficients.raw.grad = None

    out["merge_fwd_plus_bwd_s"] = timed(fwd_bwd)
    out["stream_read_tv_sum_s"] = timed(lambda: [v.sum() for _, v in merged.task_vectors.items()])
    out["first_touch_P_floats_s"] = timed(lambda: torch.empty(p).fill_(1.0))
    out["rewrite_P_floats_warm_s"] = timed(lambda: [g.fill_(1.0) for g in grads.values()])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["adamerging", "plain", "both"], default="both")
    parser.add_argument("--micro", action="store_true", help="only time the merge itself (no model forward)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model, merged = build(args.experts, args.dtype, args.arch)
    result = {"experts": args.experts, "dtype": args.dtype, "threads": torch.get_num_threads(),
              "rss_built_mb": round(rss_mb(), 1)}
    if args.micro:
        result["micro"] = micro(merged, repeats=args.steps + args.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return
    size = model.tower.image_size
    size = size[0] if isinstance(size, tuple) else size
    generator = torch.Generator().manual_seed(2)
    batches = [
        {f"task{t}": torch.randn(args.batch_size, 3, size, size, generator=generator) for t in range(args.experts)}
        for _ in range(args.steps + args.warmup)
    ]
    runners = {}
    if args.mode in ("plain", "both"):
        phases = Phases()
        runners["plain"] = (phases, plain_steps(model, batches, args.warmup, phases))
    if args.mode in ("adamerging", "both"):
        phases = Phases()
        runners["adamerging"] = (phases, adamerging_steps(merged, batches, args.warmup, phases))
    order = list(runners)
    for step in range(len(batches)):
        # interleaved: plain and adamerge steps alternate (and alternate which goes first), so that
        # background load and allocator state hit both alike
        for name in order if step % 2 == 0 else order[::-1]:
            next(runners[name][1])
    for name, (phases, _) in runners.items():
        result[name] = phases.summary()
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(result), flush=True)
    for mode in ("plain", "adamerging"):
        if mode in result:
            print(f"{mode}:")
            for name, row in result[mode].items():
                print(f"  {name:10s} {row['s']:8.3f} s  " + (
                    f"faults {row['fault_mb']:7.1f} MB  rss after {row['rss_after_mb_max']:7.0f} MB" if "fault_mb" in row else ""))


if __name__ == "__main__":
    main()
