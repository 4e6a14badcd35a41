"""Quantization kernels against their torch references and against the copy bandwidth.

    python bench/bench_quant_kernels.py                  # CUDA: 8192x8192 and 4096x14336 bf16
    python bench/bench_quant_kernels.py --shapes 1024x4096
    python bench/bench_quant_kernels.py --formats new   # issue 29: fp8 block, fp4 quant+pack

Prints, per kernel and shape: Triton median ms (triton.testing.do_bench), GB/s of the bytes it
must move (inputs read once, outputs written once), that rate as a fraction of a plain
device-to-device copy measured in the same run, the torch reference's ms as the baseline,
and whether the kernel's output equals the CPU reference bit for bit on a slice of rows.
Without a GPU it says so and runs a tiny version in the Triton interpreter (a smoke test:
those timings mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the kernels' import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tritonpress.kernels import fp4, fp8_block  # noqa: E402
from tritonpress.kernels import quant as Q  # noqa: E402
from tritonpress.schemes import PRESETS, QuantArgs  # noqa: E402

FP8_CH = QuantArgs(8, "float", True, "channel")
INT8_CH = QuantArgs(8, "int", True, "channel")
INT4_G128 = QuantArgs(4, "int", True, "group", 128)
INT4_G128_ASYM = QuantArgs(4, "int", False, "group", 128)
FP8_TOK = QuantArgs(8, "float", True, "token", dynamic=True)
INT8_TOK = QuantArgs(8, "int", True, "token", dynamic=True)
NVFP4, MXFP4 = PRESETS["NVFP4"].weights, PRESETS["MXFP4"].weights
CHECK_ROWS = 64  # rows compared against the CPU reference (rows are independent)


def bench_ms(fn) -> float:
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median")
    return common.cpu_ms(fn, reps=3)


def copy_gbps(device) -> float:
    """Device-to-device copy rate, bytes read + written per second."""
    n = (1 << 30) if CUDA else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / ms / 1e6


def cases(rows: int, cols: int, device, formats: str = "core"):
    """(name, triton fn, torch fn, bytes moved, checker) for one shape; formats 'new': the
    quantizers of issue 29's formats instead."""
    if formats == "new":
        return new_cases(rows, cols, device)
    n = rows * cols
    w = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    q4 = torch.randint(-8, 8, (rows, cols), device=device, dtype=torch.int8)
    packed = Q.pack_int4_ref(q4)
    words = packed.numel() * 4
    g = cols // 128
    out = []

    def add(name, fast, ref, nbytes, check):
        out.append((name, fast, ref, nbytes, check))

    def weight_check(args, fn=Q.quantize_weight, ref=Q.quantize_weight_ref):
        return lambda: _same(fn(w[:CHECK_ROWS], args), ref(w[:CHECK_ROWS].cpu(), args))

    add("fp8 per-channel", lambda: Q.quantize_weight(w, FP8_CH),
        lambda: Q.quantize_weight_ref(w, FP8_CH), 3 * n + 2 * rows, weight_check(FP8_CH))
    add("int8 per-channel", lambda: Q.quantize_weight(w, INT8_CH),
        lambda: Q.quantize_weight_ref(w, INT8_CH), 3 * n + 2 * rows, weight_check(INT8_CH))
    add("int4 g128 sym", lambda: Q.quantize_weight(w, INT4_G128),
        lambda: Q.quantize_weight_ref(w, INT4_G128), 3 * n + 2 * rows * g,
        weight_check(INT4_G128))
    add("int4 g128 asym", lambda: Q.quantize_weight(w, INT4_G128_ASYM),
        lambda: Q.quantize_weight_ref(w, INT4_G128_ASYM), 3 * n + 3 * rows * g,
        weight_check(INT4_G128_ASYM))
    add("int4 g128 asym+pack", lambda: Q.quantize_pack_int4(w, INT4_G128_ASYM),
        lambda: Q.quantize_pack_int4_ref(w, INT4_G128_ASYM), 2 * n + words + 3 * rows * g,
        weight_check(INT4_G128_ASYM, Q.quantize_pack_int4, Q.quantize_pack_int4_ref))
    for name, args in (("fp8 per-token", FP8_TOK), ("int8 per-token", INT8_TOK)):
        add(name, lambda a=args: Q.quantize_per_token(w, a),
            lambda a=args: Q.quantize_per_token_ref(w, a), 3 * n + 4 * rows,
            lambda a=args: _same(Q.quantize_per_token(w[:CHECK_ROWS], a),
                                 Q.quantize_per_token_ref(w[:CHECK_ROWS].cpu(), a)))
    add("pack int4", lambda: Q.pack_int4(q4), lambda: Q.pack_int4_ref(q4), n + words,
        lambda: _same((Q.pack_int4(q4[:CHECK_ROWS]),), (Q.pack_int4_ref(q4[:CHECK_ROWS].cpu()),)))
    add("unpack int4", lambda: Q.unpack_int4(packed, cols),
        lambda: Q.unpack_int4_ref(packed, cols), words + n,
        lambda: _same((Q.unpack_int4(packed[:CHECK_ROWS], cols),), (q4[:CHECK_ROWS].cpu(),)))
    add("fp8 round", lambda: Q.fp8_round(w), lambda: Q.fp8_round_ref(w), 6 * n,
        lambda: _same((Q.fp8_round(w[:CHECK_ROWS]),), (Q.fp8_round_ref(w[:CHECK_ROWS].cpu()),)))
    return out


def new_cases(rows: int, cols: int, device):
    """Issue 29's formats: bf16 in, fp8 / packed fp4 bytes and scales out."""
    n = rows * cols
    w = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
    out = []

    def add(name, fast, ref, nbytes, check):
        out.append((name, fast, ref, nbytes, check))

    blocks = -(-rows // 128) * -(-cols // 128)
    add("fp8 block 128x128", lambda: fp8_block.quantize_fp8_block(w),
        lambda: fp8_block.quantize_fp8_block_ref(w), 3 * n + 4 * blocks,
        lambda: _same(fp8_block.quantize_fp8_block(w[:CHECK_ROWS]),
                      fp8_block.quantize_fp8_block_ref(w[:CHECK_ROWS].cpu())))
    add("fp8 token-group 128", lambda: fp8_block.quantize_fp8_groups(w),
        lambda: fp8_block.quantize_fp8_groups_ref(w), 3 * n + 4 * (n // 128),
        lambda: _same(fp8_block.quantize_fp8_groups(w[:CHECK_ROWS]),
                      fp8_block.quantize_fp8_groups_ref(w[:CHECK_ROWS].cpu())))
    gs1 = torch.ones(1, device=device)
    for name, args in (("nvfp4 quant+pack", NVFP4), ("mxfp4 quant+pack", MXFP4)):
        gsc = None if args.is_mx else gs1
        add(name, lambda a=args, g=gsc: fp4.quantize_fp4(w, a, g),
            lambda a=args, g=gsc: fp4.quantize_fp4_ref(w, a, g),
            2 * n + n // 2 + n // args.group_size,
            lambda a=args, g=gsc: _same(
                fp4.quantize_fp4(w[:CHECK_ROWS], a, g),
                fp4.quantize_fp4_ref(w[:CHECK_ROWS].cpu(), a, None if g is None else g.cpu())))
    return out


def _same(got, want) -> bool:
    for a, b in zip(got, want):
        if a is None or b is None:
            if a is not b:
                return False
            continue
        a, b = a.cpu(), b.cpu()
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        if a.dtype != b.dtype or not torch.equal(a, b):
            return False
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", choices=("core", "new"), default="core",
                   help="core: the int/fp8 quantizers (default); new: issue 29's formats")
    p.add_argument("--shapes", default=None, help="comma list of ROWSxCOLS (default: "
                   "8192x8192,4096x14336 on a GPU, 48x256 in the interpreter)")
    a = p.parse_args()
    if CUDA:
        device = "cuda"
        os.environ.setdefault("TRITONPRESS_BACKEND", "auto")
        shapes = a.shapes or "8192x8192,4096x14336"
        major, minor = torch.cuda.get_device_capability()
        print(f"device: {torch.cuda.get_device_name()} (sm{major}{minor})")
    else:
        device = "cpu"
        os.environ["TRITONPRESS_BACKEND"] = "triton"
        shapes = a.shapes or "48x256"
        print("no CUDA GPU: tiny shapes in the Triton interpreter, a smoke test only; "
              "its timings say nothing about GPU speed")
    copy = copy_gbps(device)
    print(f"device copy: {copy:.0f} GB/s (bytes read + written)")
    print(f"{'kernel':<22}{'shape':>12}{'ms':>9}{'GB/s':>8}{'of copy':>9}"
          f"{'torch ms':>10}{'speedup':>9}{'exact':>7}")
    for shape in shapes.split(","):
        rows, cols = map(int, shape.lower().split("x"))
        for name, fast, ref, nbytes, check in cases(rows, cols, device, a.formats):
            exact = check()
            ms = bench_ms(fast)
            ref_ms = bench_ms(ref)
            gbps = nbytes / ms / 1e6
            print(f"{name:<22}{shape:>12}{ms:>9.3f}{gbps:>8.0f}{gbps / copy:>9.0%}"
                  f"{ref_ms:>10.3f}{ref_ms / ms:>8.1f}x{'yes' if exact else 'NO':>7}")
            if CUDA:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
