"""GEMM benchmark: tritonpress's kernels against the baselines users have, in one run.

    python bench/bench_gemm.py out/bench_gemm          # GPU: the full table, < 3 minutes
    python bench/bench_gemm.py out/bench_gemm --cpu    # reduced: tiny shapes, references only
    python bench/bench_gemm.py out/bench_gemm --formats new   # issue 29's formats, < 3 min

Per N x K in {8192x8192, 14336x4096, 4096x14336} and M in {1, 16, 64, 256, 1024, 4096}:
  bf16        cuBLAS x @ w.t()
  scaled_mm   torch._scaled_mm, e4m3 rowwise scales, bf16 out (and with use_fast_accum)
  int_mm(+ep) torch._int_mm raw, and followed by the scale epilogue in eager torch
  ours        W4A16 (int4, group 128), INT8 and FP8 (fused scale epilogue), 2:4 FP8 through
              cuSPARSELt with the default algorithm and with the one its search picks.
Activations come already quantized to the 8-bit GEMMs (baselines too); the 'e2e' columns add
our per-token activation quantization. Times are medians over CUDA-graph replays of calls that
rotate through several weight/input copies (more bytes than L2 holds), so neither launch
overhead nor a warm L2 flatters the small-M numbers. Every kernel is checked against its
torch reference before it is timed. Targets (from the issue) are checked at the end.

--formats new: the formats of issue 29 against the same baselines (bf16 cuBLAS, scaled_mm
per-channel fp8, our W4A16): FP8 block (kernel alone, and e2e with the token-group fp8
quantization), NVFP4A16 / MXFP4A16, NVFP4 / MXFP4 W4A4 e2e (emulated below sm100; MXFP4 through
tl.dot_scaled on sm100), W4A8 (int8, kernel alone and e2e) and W4AFP8 (sm89+).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402
from tritonpress.kernels import gemm  # noqa: E402
from tritonpress.kernels.quant import quantize_per_token_ref, quantize_weight_ref  # noqa: E402
from tritonpress.schemes import PRESETS, QuantArgs  # noqa: E402

SHAPES = [(8192, 8192), (14336, 4096), (4096, 14336)]
MS = [1, 16, 64, 256, 1024, 4096]
CPU_SHAPES = [(256, 512), (384, 256)]
CPU_MS = [1, 16, 64]
INT4 = QuantArgs(4, "int", True, "group", 128)
INT8, INT8_ACT = PRESETS["W8A8_INT8"].weights, PRESETS["W8A8_INT8"].input_activations
FP8, FP8_ACT = PRESETS["W8A8_FP8"].weights, PRESETS["W8A8_FP8"].input_activations
ROTATE = 4            # weight copies: >= 4 x 29 MB of int4 exceeds an H100/H200's 50 MB L2

COLUMNS = ["bf16", "scaled_mm", "scaled_mm_fast", "int_mm", "int_mm+ep", "w4a16", "int8",
           "int8 e2e", "fp8", "fp8 e2e", "2:4 fp8", "2:4 fp8 searched"]
NEW_COLUMNS = ["bf16", "scaled_mm", "w4a16", "fp8 block", "fp8 block e2e", "nvfp4a16",
               "mxfp4a16", "nvfp4 e2e", "mxfp4 e2e", "w4a8", "w4a8 e2e", "w4afp8"]
NVFP4, NVFP4_ACT = PRESETS["NVFP4"].weights, PRESETS["NVFP4"].input_activations
MXFP4, MXFP4_ACT = PRESETS["MXFP4"].weights, PRESETS["MXFP4"].input_activations
FP8_BLOCK, FP8_GROUP_ACT = PRESETS["FP8_BLOCK"].weights, PRESETS["FP8_BLOCK"].input_activations


def _per_token(x, args):
    from tritonpress.kernels import quant
    return getattr(quant, "quantize_per_token", quantize_per_token_ref)(x, args)


def _weights(n, k, device):
    """One set of every format, made from the same random bf16 weight."""
    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    q4, s4, _ = quantize_weight_ref(w, INT4, torch.bfloat16)
    q8, s8, _ = quantize_weight_ref(w, INT8, torch.float32)
    f8, sf8, _ = quantize_weight_ref(w, FP8, torch.float32)
    q24, s24, _ = quantize_weight_ref(common.prune24(w.float()), FP8, torch.float32)
    return dict(
        bf16=w, w4=gemm.prepare(q4, s4, None, INT4),
        i8=gemm.prepare(q8, s8, None, INT8, INT8_ACT), f8=gemm.prepare(f8, sf8, None, FP8, FP8_ACT),
        f24=gemm.prepare(q24, s24, None, FP8, FP8_ACT, sparse24=True))


def _weights_new(n, k, device):
    """Issue 29's formats, all from the same random bf16 weight."""
    from tritonpress.kernels import fp4, fp8_block
    w = (torch.randn(n, k, device=device) * 0.02).to(torch.bfloat16)
    q4, s4, _ = quantize_weight_ref(w, INT4, torch.bfloat16)
    f8, sf8, _ = quantize_weight_ref(w, FP8, torch.float32)
    fb, sfb = fp8_block.quantize_fp8_block(w)
    out = dict(bf16=w, w4=gemm.prepare(q4, s4, None, INT4),
               f8=gemm.prepare(f8, sf8, None, FP8, FP8_ACT),
               fb=gemm.prepare(fb, sfb, None, FP8_BLOCK, FP8_GROUP_ACT),
               w4a8=gemm.prepare(q4, s4, None, INT4, INT8_ACT),
               w4afp8=gemm.prepare(q4, s4, None, INT4, FP8_ACT))
    for key, wa, act in (("nv", NVFP4, None), ("mx", MXFP4, None), ("nv44", NVFP4, NVFP4_ACT),
                         ("mx44", MXFP4, MXFP4_ACT)):
        p, sc, g = fp4.quantize_fp4(w, wa)
        # a static activation global scale as calibration would give for |x| <= 5
        out[key] = gemm.prepare(p, sc, None, wa, act, global_scale=g,
                                input_global_scale=torch.tensor([448 * 6 / 5.0], device=device))
    return out


def _inputs_new(m, k, device):
    from tritonpress.kernels import fp8_block
    I = _inputs(m, k, device)
    I["xb"], I["sb"] = fp8_block.quantize_fp8_groups(I["x"])
    return I


def _impls_new():
    from tritonpress.kernels.gemm_fp8_block import fp8_block_gemm
    from tritonpress.kernels.gemm_w4a16 import wna16_gemm
    from tritonpress.kernels.gemm_w4a8 import w4a8_gemm
    bf = torch.bfloat16
    lin = (lambda key: lambda W, I: gemm.linear(I["x"], W[key]))  # noqa: E731
    return {
        "bf16": lambda W, I: I["x"] @ W["bf16"].t(),
        "scaled_mm": lambda W, I: torch._scaled_mm(
            I["xf"], W["f8"].q.t(), I["sf"], W["f8"].scale[None, :], out_dtype=bf),
        "w4a16": lambda W, I: wna16_gemm(I["x"], W["w4"].wna16),
        "fp8 block": lambda W, I: fp8_block_gemm(I["xb"], I["sb"], W["fb"].q, W["fb"].scale, bf),
        "fp8 block e2e": lin("fb"),
        "nvfp4a16": lin("nv"), "mxfp4a16": lin("mx"),
        "nvfp4 e2e": lin("nv44"), "mxfp4 e2e": lin("mx44"),
        "w4a8": lambda W, I: w4a8_gemm(I["xi"], I["si"], W["w4a8"].wna16, bf),
        "w4a8 e2e": lin("w4a8"),
        "w4afp8": lambda W, I: w4a8_gemm(I["xf"], I["sf"], W["w4afp8"].wna16, bf),
    }


NEW_KEYS = {"w4a16": "w4", "fp8 block": "fb", "fp8 block e2e": "fb", "nvfp4a16": "nv",
            "mxfp4a16": "mx", "nvfp4 e2e": "nv44", "mxfp4 e2e": "mx44", "w4a8": "w4a8",
            "w4a8 e2e": "w4a8", "w4afp8": "w4afp8"}


def _reference_new(name, W, I):
    """gemm_ref quantizes the activations exactly as the kernels' callers do."""
    if name in ("bf16", "scaled_mm"):
        return _reference(name, W, I)
    return gemm.gemm_ref(I["x"], W[NEW_KEYS[name]]).float()


def _inputs(m, k, device):
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    xi, si = quantize_per_token_ref(x, INT8_ACT)
    xf, sf = quantize_per_token_ref(x, FP8_ACT)
    return dict(x=x, xi=xi, si=si, xf=xf, sf=sf)


def _impls(cslt_ok):
    """name -> fn(weights, inputs) -> output; missing baselines raise and print as '-'."""
    from tritonpress.kernels.gemm_sparse24 import sparse24_fp8_gemm
    from tritonpress.kernels.gemm_w4a16 import wna16_gemm
    from tritonpress.kernels.gemm_w8a8 import fp8_gemm, int8_gemm
    bf = torch.bfloat16

    def int_mm_ep(W, I):
        acc = torch._int_mm(I["xi"], W["i8"].q.t())
        return (acc.float() * I["si"] * W["i8"].scale[None, :]).to(bf)

    def sparse(alg):
        def f(W, I):
            if not cslt_ok:
                raise RuntimeError("no cuSPARSELt")
            if W["f24"].sparse is None:
                W["f24"].sparse = gemm.compress_24(W["f24"].q, W["f24"].scale)
            a = 0 if alg == "default" else I.get("alg", 0)
            return sparse24_fp8_gemm(I["xf"], I["sf"], W["f24"].sparse, bf, alg_id=a)
        return f

    return {
        "bf16": lambda W, I: I["x"] @ W["bf16"].t(),
        "scaled_mm": lambda W, I: torch._scaled_mm(
            I["xf"], W["f8"].q.t(), I["sf"], W["f8"].scale[None, :], out_dtype=bf),
        "scaled_mm_fast": lambda W, I: torch._scaled_mm(
            I["xf"], W["f8"].q.t(), I["sf"], W["f8"].scale[None, :], out_dtype=bf,
            use_fast_accum=True),
        "int_mm": lambda W, I: torch._int_mm(I["xi"], W["i8"].q.t()),
        "int_mm+ep": int_mm_ep,
        "w4a16": lambda W, I: wna16_gemm(I["x"], W["w4"].wna16),
        "int8": lambda W, I: int8_gemm(I["xi"], I["si"], W["i8"].q, W["i8"].scale, bf),
        "int8 e2e": lambda W, I: gemm.linear(I["x"], W["i8"]),
        "fp8": lambda W, I: fp8_gemm(I["xf"], I["sf"], W["f8"].q, W["f8"].scale, bf),
        "fp8 e2e": lambda W, I: gemm.linear(I["x"], W["f8"]),
        "2:4 fp8": sparse("default"),
        "2:4 fp8 searched": sparse("searched"),
    }


def _reference(name, W, I):
    """What each implementation must compute (fp32, dequantize-then-matmul)."""
    if name == "bf16":
        return I["x"].float() @ W["bf16"].float().t()
    if name == "int_mm":
        return I["xi"].float() @ W["i8"].q.float().t()
    if name == "w4a16":
        return gemm.gemm_ref(I["x"].float(), W["w4"])
    key = {"int": "i8"}.get(name[:3], "f24" if name.startswith("2:4") else "f8")
    xq, sx = (I["xi"], I["si"]) if key == "i8" else (I["xf"], I["sf"])
    return gemm.scaled_mm_ref(xq, sx, W[key].q, W[key].scale, torch.float32)


def _search_alg(W, I):
    """cuSPARSELt's own algorithm search for this problem (torch keeps two spellings)."""
    from tritonpress.kernels.gemm_sparse24 import _pad_rows
    sw = W["f24"].sparse
    args = (sw.compressed, _pad_rows(I["xf"]).t())
    kw = dict(alpha=sw.scale, out_dtype=torch.bfloat16, transpose_result=True)
    try:
        alg = torch._cslt_sparse_mm_search(*args, **kw)
    except (AttributeError, RuntimeError):
        alg = torch._C._cusparselt.mm_search(*args, None, sw.scale, torch.bfloat16, True)
    return int(alg[0] if isinstance(alg, (tuple, list)) else alg)


def run(out_dir: str, cpu: bool, formats: str = "core"):
    device = "cpu" if cpu else "cuda"
    if cpu:
        os.environ["TRITONPRESS_GEMM_BACKEND"] = "torch"
    shapes, ms = (CPU_SHAPES, CPU_MS) if cpu else (SHAPES, MS)
    new = formats == "new"
    cslt_ok = not cpu and gemm.cslt_available() and torch.cuda.get_device_capability() >= (9, 0)
    make_w, make_i, reference = (_weights_new, _inputs_new, _reference_new) if new else \
        (_weights, _inputs, _reference)
    impls = _impls_new() if new else _impls(cslt_ok)
    if cpu:   # references only: what each implementation is checked against
        impls = {name: (lambda W, I, n=name: reference(n, W, I)) for name in
                 (NEW_COLUMNS if new else ("bf16", "int_mm", "w4a16", "int8", "fp8", "2:4 fp8"))
                 if name != "scaled_mm"}
    records, t_start = [], time.time()
    for n, k in shapes:
        sets_w = [make_w(n, k, device) for _ in range(1 if cpu else ROTATE)]
        for m in ms:
            sets_i = [make_i(m, k, device) for _ in range(len(sets_w))]
            row = {}
            for name, fn in impls.items():
                try:
                    if name == "2:4 fp8 searched":
                        for W, I in zip(sets_w, sets_i):
                            fn(W, I)             # compress first
                            I["alg"] = _search_alg(W, I)
                    out = fn(sets_w[0], sets_i[0])           # compiles and autotunes
                    ref = reference(name, sets_w[0], sets_i[0])
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    if not cpu and err > 2e-2:
                        raise AssertionError(f"{name} wrong: relative error {err:.2e}")
                    for W, I in zip(sets_w, sets_i):
                        fn(W, I)
                    sets = list(zip(sets_w, sets_i))
                    # median ms per call, cycling through the rotating sets
                    ms_ = common.cpu_ms(fn, sets, reps=5) if cpu else common.graph_ms(fn, sets, 10)
                    row[name] = ms_
                    records.append(dict(n=n, k=k, m=m, impl=name, ms=ms_, rel_err=err,
                                        tflops=2 * m * n * k / ms_ / 1e9))
                except Exception as e:  # a baseline this torch/GPU lacks, e.g. _int_mm M<=16
                    row[name] = None
                    records.append(dict(n=n, k=k, m=m, impl=name, ms=None,
                                        error=f"{type(e).__name__}: {e}"[:200]))
            _print_row(n, k, m, row, first=(m == ms[0]), new=new)
    summary = _targets(records) if not cpu and not new else []
    info = dict(common.env_info(not cpu), seconds=round(time.time() - t_start, 1),
                mode="cpu-reference" if cpu else "gpu", formats=formats)
    common.add_versions(info)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_gemm_new.json" if new else "bench_gemm.json")
    with open(path, "w") as f:
        json.dump(dict(info=info, results=records, targets=summary), f, indent=1)
    print(f"\n{info['device']}: {info['seconds']} s; wrote {path}")


SPEEDUPS = (("w4a16", "bf16"), ("int8", "int_mm+ep"), ("fp8", "scaled_mm"),
            ("2:4 fp8 searched", "scaled_mm"))
NEW_SPEEDUPS = (("fp8 block", "scaled_mm"), ("nvfp4a16", "w4a16"), ("mxfp4a16", "w4a16"),
                ("nvfp4 e2e", "bf16"), ("mxfp4 e2e", "bf16"), ("w4a8", "w4a16"),
                ("w4afp8", "w4a16"))


def _print_row(n, k, m, row, first, new=False):
    cols = [c for c in (NEW_COLUMNS if new else COLUMNS) if c in row]
    pairs = NEW_SPEEDUPS if new else SPEEDUPS
    if first:
        print(f"\nN x K = {n} x {k}   (ms per call; speedups: "
              + ", ".join(f"{a}/{b}" for a, b in pairs) + ")")
        print(f"{'M':>5} " + " ".join(f"{c:>10.10s}" for c in cols) + "   speedups")
    cell = (lambda v: f"{v:10.4f}" if v is not None else f"{'-':>10}")
    sp = []
    for ours, base in pairs:
        if row.get(ours) and row.get(base):
            sp.append(f"{row[base] / row[ours]:.2f}x")
        else:
            sp.append("-")
    print(f"{m:>5} " + " ".join(cell(row[c]) for c in cols) + "   " + " ".join(sp))


TARGETS = [   # (ours, baseline, M filter, minimum speedup)
    ("w4a16", "bf16", lambda m: m == 1, 3.0),
    ("w4a16", "bf16", lambda m: m == 16, 2.5),
    ("fp8", "scaled_mm", lambda m: m >= 1024, 0.9),
    ("int8", "int_mm+ep", lambda m: m >= 64, 1.2),
]


def _targets(records):
    t = {(r["n"], r["k"], r["m"], r["impl"]): r["ms"] for r in records}
    out = []
    print("\nTargets")
    for ours, base, when, need in TARGETS:
        for (n, k, m, impl), ms_ in sorted(t.items()):
            if impl != ours or not when(m) or not ms_ or not t.get((n, k, m, base)):
                continue
            s = t[(n, k, m, base)] / ms_
            out.append(dict(ours=ours, baseline=base, n=n, k=k, m=m, speedup=s, target=need,
                            met=s >= need))
            print(f"  {ours:6s} vs {base:10s} {n}x{k} M={m:<5} {s:5.2f}x  (>= {need}x) "
                  f"{'met' if s >= need else 'MISSED'}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder for bench_gemm.json")
    p.add_argument("--cpu", action="store_true", help="reduced reference-only run (no GPU)")
    p.add_argument("--formats", choices=("core", "new"), default="core",
                   help="core: W4A16/INT8/FP8/2:4 (default); new: issue 29's formats")
    a = p.parse_args()
    run(a.out_dir, a.cpu or not torch.cuda.is_available(), a.formats)


if __name__ == "__main__":
    main()
