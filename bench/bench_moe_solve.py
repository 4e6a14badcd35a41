"""One MoE layer's GPTQ solves, step by step, on the shapes of the upcycled SmolLM2 Mixtral
(8 experts: gate/up stacked 24576 x 576 against one shared Hessian, as every-token calibration
gives them; 8 down projections 576 x 1536, each its own Hessian), W4A16 g64 with the default
recipe (static activation order, clipping search with clip_damp=1.0). Random weights and
Hessians of real shape: right for timing, not for quality.

  python bench/bench_moe_solve.py               # min over --reps of each step, milliseconds
  python bench/bench_moe_solve.py --keep-heap   # glibc's large blocks kept, as compress() does

The steps: the clipping search of the stacked gate/up, the 8 inverse factors of the down
projections, the torch column sweeps (stacked gate/up; the 8 downs as one batch), and the two
whole calls compress() makes per layer (gptq_quantize_stacked, gptq_quantize_batched).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def hessian(n: int, tokens: int = 4096) -> torch.Tensor:
    x = torch.randn(tokens, n) @ (torch.randn(n, n) / n ** 0.5 + torch.eye(n))
    return x.T @ x / tokens


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep-heap", action="store_true")
    args = ap.parse_args()

    from tritonpress.loop.stream import keep_large_allocations
    from tritonpress.methods.gptq import gptq_quantize_stacked
    from tritonpress.methods.gptq_batched import gptq_quantize_batched
    from tritonpress.methods.gptq_solve import (gptq_sweep, gptq_sweep_batched,
                                                inverse_cholesky)
    from tritonpress.methods.rtn import clip_search, group_qparams, group_index, hessian_blocks
    from tritonpress.schemes import get_scheme

    if args.keep_heap:
        keep_large_allocations()
    torch.manual_seed(0)
    E, H, I = args.experts, args.hidden, args.intermediate
    wargs = dataclasses.replace(get_scheme("W4A16").weights, group_size=64)
    Hg, Hd = hessian(H), [hessian(I) for _ in range(E)]
    gate_up = [torch.randn(I, H, dtype=torch.bfloat16) * 0.02 for _ in range(2 * E)]
    down = [[torch.randn(H, I, dtype=torch.bfloat16) * 0.02] for _ in range(E)]
    W = torch.cat(gate_up).float()
    Wd = torch.stack([d[0] for d in down]).float()

    def factors():
        return torch.stack([inverse_cholesky(h, 0.01)[0] for h in Hd])

    Ud, Ug = factors(), inverse_cholesky(Hg, 0.01)[0]
    sg, zg = group_qparams(W, wargs, torch.bfloat16, group_index(H, wargs))
    gd = group_index(I, wargs)
    sd = torch.stack([group_qparams(w, wargs, torch.bfloat16, gd)[0] for w in Wd])
    opts = dict(actorder="static", clip=True, clip_damp=1.0)
    steps = {
        "clip search, stacked gate/up": lambda: clip_search(
            W, hessian_blocks(Hg, 64), wargs, torch.bfloat16, damp=1.0),
        f"{E} inverse factors, down": factors,
        "sweep, stacked gate/up": lambda: gptq_sweep(
            W.clone(), Ug, wargs, sg, zg, group_index(H, wargs)),
        f"sweep, {E} downs batched": lambda: gptq_sweep_batched(
            Wd.clone(), Ud, wargs, sd.clone(), None, gd.expand(E, -1), dynamic=False,
            scale_dtype=torch.bfloat16, block_size=128),
        "whole: gptq_quantize_stacked (gate/up)": lambda: gptq_quantize_stacked(
            gate_up, Hg, wargs, torch.bfloat16, **opts),
        "whole: gptq_quantize_batched (downs)": lambda: gptq_quantize_batched(
            down, Hd, wargs, torch.bfloat16, **opts),
    }
    print(f"{E} experts, hidden {H}, intermediate {I}; torch threads "
          f"{torch.get_num_threads()}; glibc heap kept: {args.keep_heap}")
    for name, fn in steps.items():
        print(f"{name:42s} {best_ms(fn, args.reps):9.1f} ms", flush=True)


if __name__ == "__main__":
    main()
