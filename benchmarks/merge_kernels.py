#!/usr/bin/env python
"""The merge alone, over the ViT-B/32 tensor shapes: forward ``θ = θ_0 + τᵀλ`` and backward
``∂L/∂λ = τ g`` per tensor, for the library's kernels and a few alternatives (not used by the library).

- ``fp32 lib``: float32 τ, :func:`adamerge.core.merge.combine` (``torch.mv`` + ``add_``) and its autograd backward;
- ``bf16 lib chunk=C``: bfloat16 τ, the library's chunked widening (``_WidenedCombine``) with
  ``adamerge.core.merge.CPU_CHUNK = C`` (the library's default is 65536);
- ``fp32 addmv``: alternative, ``torch.addmv(θ_0, τᵀ, λ)`` (one fused pass instead of ``mv`` + ``add_``);
- ``bf16 gemv``: alternative, ``θ_0 + mv(τᵀ, λ.bf16())`` (the sum over K in one bf16 BLAS gemv, result
  rounded to bf16 before it is added to θ_0) and ``mv(τ, g.bf16())`` backward;
- floors: a streaming read of τ (``sum``) and of θ_0 plus a write of P floats.

Variants run round-robin (one repetition of each, then the next round), so background load hits
all alike; medians are printed. Errors are measured against float64.

    .venv/bin/python -m benchmarks.merge_kernels --experts 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1 << 14, 1 << 16, 1 << 18, 1 << 20])
    args = parser.parse_args()

    import open_clip
    import torch

    import adamerge.core.merge as merge

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = {n: p.detach() for n, p in open_clip.create_model(args.arch, pretrained=None).visual.named_parameters()}
    k = args.experts
    g = torch.Generator().manual_seed(1)
    tv32 = {n: torch.randn((k, *t.shape), generator=g) * 1e-3 for n, t in base.items()}
    tv16 = {n: t.bfloat16() for n, t in tv32.items()}
    grads = {n: torch.randn(t.shape, generator=g) for n, t in base.items()}
    lam = torch.full((k,), 0.3, requires_grad=True)

    def lib(tvs):
        def run():
            total = 0.0
            for n, b in base.items():
                out = merge.combine(b, tvs[n], lam)
                out.backward(grads[n])
                total += float(lam.grad.sum())
                lam.grad = None
            return total
        return run

    def lib_chunk(chunk):
        def run():
            old = merge.CPU_CHUNK
            merge.CPU_CHUNK = chunk
            try:
                return lib(tv16)()
            finally:
                merge.CPU_CHUNK = old
        return run

    def bf16_gemv():
        lam16 = lam.detach().bfloat16()
        for n, b in base.items():
            flat = tv16[n].reshape(k, -1)
            merged = b.reshape(-1) + torch.mv(flat.t(), lam16)  # (P,) float32
            del merged
            torch.mv(flat, grads[n].reshape(-1).bfloat16())  # (K,)

    def fp32_addmv():
        # alternative: one fused addmv (θ_0 read inside the gemv) instead of mv then add_
        for n, b in base.items():
            out = torch.addmv(b.reshape(-1), tv32[n].reshape(k, -1).t(), lam)
            out.backward(grads[n].reshape(-1))
            lam.grad = None

    def floor():
        for n, b in base.items():
            tv16[n].sum()
            torch.add(b, 1.0)

    def floor32():
        for n, b in base.items():
            tv32[n].sum()
            torch.add(b, 1.0)

    variants = {"fp32 lib (fwd+bwd)": lib(tv32)}
    for c in args.chunks:
        variants[f"bf16 lib chunk={c} (fwd+bwd)"] = lib_chunk(c)
    variants["bf16 gemv (fwd+bwd), alternative"] = bf16_gemv
    variants["fp32 addmv (fwd+bwd), alternative"] = fp32_addmv
    variants["floor: read bf16 τ + read θ_0/write P (once)"] = floor
    variants["floor: read fp32 τ + read θ_0/write P (once)"] = floor32

    # split forward and backward of the library paths
    def fwd_only(tvs, chunk=None):
        def run():
            old = merge.CPU_CHUNK
            if chunk:
                merge.CPU_CHUNK = chunk
            try:
                with torch.no_grad():
                    for n, b in base.items():
                        merge.combine(b, tvs[n], lam)
            finally:
                merge.CPU_CHUNK = old
        return run

    variants["fp32 lib fwd only"] = fwd_only(tv32)

    def addmv_fwd_only():
        with torch.no_grad():
            for n, b in base.items():
                torch.addmv(b.reshape(-1), tv32[n].reshape(k, -1).t(), lam)

    variants["fp32 addmv fwd only, alternative"] = addmv_fwd_only
    variants["bf16 lib fwd only (chunk=65536)"] = fwd_only(tv16, 1 << 16)

    times = defaultdict(list)
    for _ in range(args.repeats + 1):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    # accuracy of the merged weights against float64
    with torch.no_grad():
        errs = defaultdict(float)
        l64 = lam.detach().double()
        l16 = lam.detach().bfloat16()
        for n, b in base.items():
            exact = b.double().reshape(-1) + torch.mv(tv16[n].reshape(k, -1).double().t(), l64)
            lib16 = merge.combine(b, tv16[n], lam.detach()).reshape(-1).double()
            alt = (b.reshape(-1) + torch.mv(tv16[n].reshape(k, -1).t(), l16)).double()
            delta = (exact - b.double().reshape(-1)).abs().max().item()
            errs["bf16 lib: max |θ - exact| / max|δ|"] = max(errs["bf16 lib: max |θ - exact| / max|δ|"],
                                                            (lib16 - exact).abs().max().item() / delta)
            errs["bf16 gemv: max |θ - exact| / max|δ|"] = max(errs["bf16 gemv: max |θ - exact| / max|δ|"],
                                                             (alt - exact).abs().max().item() / delta)

    result = {
        "experts": k, "threads": torch.get_num_threads(),
        "bytes_fp32_tv": sum(t.numel() * 4 for t in tv32.values()),
        "median_s": {name: round(statistics.median(v[1:]), 4) for name, v in times.items()},
        "relative_errors": {name: float(f"{v:.3g}") for name, v in errs.items()},
    }
    print("RESULT " + json.dumps(result))
    for name, value in result["median_s"].items():
        print(f"{value:8.3f} s  {name}")
    for name, value in result["relative_errors"].items():
        print(f"{value:8.3g}    {name}")


if __name__ == "__main__":
    main()
