#!/usr/bin/env python3
"""Compile every Triton kernel of tritonpress for NVIDIA GPUs, on a machine without one.

    python tests/compile_kernels.py [--arch 80,89,90] [--all] [--only NAME] [--json OUT]

The public launchers run on small CPU tensors while the process pretends to be a GPU of the
target arch (tensors report is_cuda, torch.cuda reports the capability), so every launcher
takes its GPU branch and every autotuner prunes its configs as it would on that GPU. Each
launch is captured instead of run, once per config the autotuner would try, bound with
Triton's own argument specializer and compiled by triton.compile through ptxas (shipped in
the triton wheel) to a cubin. A row fails when it does not compile, needs more shared memory
than the arch has, or spills more registers than SPILL_BOUND allows.

Default: one representative config per kernel and arch (the largest tiles the autotuner can
pick there); --all (or TRITONPRESS_SLOW_TESTS=1): every variant and config. Exit status 1 when
any row fails. Run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles real kernels: run it without TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tp-aot-"))  # cold: ptxas runs
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from tritonpress.kernels import (awq_search, fp4, fp4_triton, fp8_block,  # noqa: E402
                                 gemm_fp4, gemm_fp8_block, gemm_w4a8, gemm_w4a16, gemm_w8a8,
                                 gptq_sweep, hessian, primitives, quant, quant_triton, sparse24)
from tritonpress.kernels.dispatch import SMEM_BYTES  # noqa: E402
from tritonpress.methods.gptq_solve import solve_in_order  # noqa: E402
from tritonpress.schemes import PRESETS  # noqa: E402

MODULES = (primitives, quant_triton, hessian, gptq_sweep, awq_search, sparse24, gemm_w4a16,
           gemm_w8a8, fp8_block, fp4_triton, gemm_fp8_block, gemm_fp4, gemm_w4a8)
# sm_100 (Blackwell): triton 3.9.0's wheel ships ptxas-blackwell, so it compiles here too
ARCHS = (80, 89, 90, 100)
# Register spills accepted per kernel (bytes of spill stores + loads per thread), where a
# measured trade says a spilling config is worth keeping. Everything else must be clean.
SPILL_BOUND: dict[str, int] = {}


def launches():
    """(label, lowest sm the project runs it on, thunk calling the public launcher)."""
    bf16, f16, f32, i8, fp8 = (torch.bfloat16, torch.float16, torch.float32, torch.int8,
                               torch.float8_e4m3fn)
    rn = lambda *s, dt=bf16: torch.randn(*s).to(dt)  # noqa: E731
    hinv = lambda n: torch.triu(torch.rand(n, n) + n * torch.eye(n))  # noqa: E731
    w4s, w4a = PRESETS["W4A16"].weights, PRESETS["W4A16_ASYM"].weights
    i8c, f8c = PRESETS["W8A8_INT8"].weights, PRESETS["W8A8_FP8"].weights
    i8t, f8t = PRESETS["W8A8_INT8"].input_activations, PRESETS["W8A8_FP8"].input_activations
    sym = lambda wa: "sym" if wa.symmetric else "asym"  # noqa: E731
    L = []

    def add(label, fn, sm=80):
        L.append((label, sm, fn))

    q = quant
    for hid in (576, 4096, 28672):
        for act in (i8t, f8t):
            add(f"per_token {act.type}8 x bf16[16,{hid}]",
                lambda hid=hid, act=act: q.quantize_per_token(rn(16, hid), act))
    for wa in (w4s, w4a):
        add(f"pack_int4 g128 {sym(wa)} w bf16[512,4096]",
            lambda wa=wa: q.quantize_pack_int4(rn(512, 4096), wa))
    for wa in (i8c, f8c):
        add(f"weight {wa.type}8 channel w bf16[512,4096]",
            lambda wa=wa: q.quantize_weight(rn(512, 4096), wa))
    for dt in (bf16, f32):
        add(f"fp8_round {dt}", lambda dt=dt: q.fp8_round(rn(4096, dt=dt)))
    add("pack_int4 int8[512,4096]",
        lambda: q.pack_int4(torch.randint(-8, 8, (512, 4096), dtype=i8)))
    add("unpack_int4 int32[512,512]", lambda: q.unpack_int4(
        torch.randint(0, 2**31 - 1, (512, 512), dtype=torch.int32), 4096))

    for dt, mask in ((bf16, True), (bf16, False), (f16, True), (f32, True)):
        add(f"xtx x {dt} mask={mask}", lambda dt=dt, mask=mask: hessian.xtx_accumulate(
            torch.zeros(1024, 1024), rn(2, 256, 1024, dt=dt),
            torch.ones(2, 256, dtype=torch.int64) if mask else None))

    rows, cols = 256, 1024

    def solve(wa, static):
        sc = zp = None
        if static:
            ng = cols // (wa.group_size or cols)
            sc = torch.rand(rows, ng) + 0.1
            zp = None if wa.symmetric else torch.zeros(rows, ng)
        return solve_in_order(rn(rows, cols), hinv(cols), wa, sc, zp, triton=True,
                              scale_dtype=bf16)
    for lbl, wa, st in (("W4A16 g128 sym static", w4s, True), ("W4A16 g128 asym static", w4a, True),
                        ("W4A16 g128 sym dynamic", w4s, False), ("int8 channel", i8c, True),
                        ("fp8 channel", f8c, True)):
        add(f"solve_in_order {lbl} W[{rows},{cols}]", lambda wa=wa, st=st: solve(wa, st))
    for wa in (w4s, w4a):
        add(f"sweep_block W4A16 {sym(wa)} [256,128]",
            lambda wa=wa: gptq_sweep.sweep_block_triton(
                torch.randn(256, 128), hinv(128), torch.rand(256, 128),
                None if wa.symmetric else torch.zeros(256, 128), wa))
    for wa in (w4s, w4a, i8c, f8c):     # an MoE layer's 8 experts in one launch
        add(f"sweep_block batched {wa.type}{wa.num_bits} {sym(wa)} [8,256,128]",
            lambda wa=wa: gptq_sweep.sweep_block_triton_batched(
                torch.randn(8, 256, 128), hinv(128).expand(8, -1, -1), torch.rand(8, 256, 128),
                None if wa.symmetric else torch.zeros(8, 256, 128), wa))

    for dt, gs, s in ((bf16, 128, True), (bf16, 128, False), (bf16, 64, True), (bf16, 32, True),
                      (f16, 128, True), (f32, 128, True)):
        wa = w4s.__class__(**{**w4s.__dict__, "group_size": gs, "symmetric": s})
        add(f"awq x,w {dt} g{gs} {sym(wa)}", lambda dt=dt, wa=wa: awq_search.awq_grid_errors(
            rn(512, 1024, dt=dt), rn(768, 1024, dt=dt), torch.rand(20, 1024) + 0.5, wa, bf16))

    for qnt in (False, True):
        add(f"prune24 block fp32[256,128] fp8={qnt}", lambda qnt=qnt: sparse24.prune24_block(
            torch.randn(256, 128), hinv(128), torch.rand(256, 1) + 0.1 if qnt else None))
    add("prune24 block fp32[256,128] fp8=True fixed mask", lambda: sparse24.prune24_block(
        torch.randn(256, 128), hinv(128), torch.rand(256, 1) + 0.1,
        sparse24.keep_2_of_4(torch.rand(256, 128))))

    w4 = gemm_w4a16

    def wna16(m_rows, symmetric, dt=bf16, n=1024, k=1024):
        qw = torch.randint(-8, 8, (n, k), dtype=i8)
        zp = None if symmetric else torch.randint(-8, 8, (n, k // 128), dtype=i8)
        w = w4.pack_wna16(qw, torch.rand(n, k // 128).to(dt), zp, 4)
        return w4.wna16_gemm(rn(m_rows, k, dt=dt), w)
    for m_rows in (1, 512):
        for s in (True, False):
            add(f"wna16 x bf16[{m_rows},1024] W4 g128 {'sym' if s else 'asym'}",
                lambda m_rows=m_rows, s=s: wna16(m_rows, s))
        add(f"wna16 x fp16[{m_rows},1024] W4 g128 sym", lambda m_rows=m_rows: wna16(m_rows, True, f16))

    w8 = gemm_w8a8
    sa, sb = torch.rand(512, 1), torch.rand(1024)
    add("int8_gemm int8 M=512 N=K=1024", lambda: w8.int8_gemm(rn(512, 1024, dt=i8), sa,
                                                               rn(1024, 1024, dt=i8), sb))
    add("fp8_gemm fp8e4nv M=512 N=K=1024", lambda: w8.fp8_gemm(rn(512, 1024, dt=fp8), sa,
                                                                rn(1024, 1024, dt=fp8), sb), 89)
    for dt in (bf16, f16):
        add(f"w8a16 x {dt} w fp8 bytes M=512",
            lambda dt=dt: w8.w8a16_gemm(rn(512, 1024, dt=dt), rn(1024, 1024, dt=fp8), sb))
        add(f"w8a16 x {dt} w int8 M=512",
            lambda dt=dt: w8.w8a16_gemm(rn(512, 1024, dt=dt), rn(1024, 1024, dt=i8), sb))

    # the formats of issue 29: FP8 block, NVFP4 / MXFP4, W4A8 / W4AFP8
    for sd in (f32, bf16):
        add(f"fp8_block quantize w bf16[512,4096] scale {sd}",
            lambda sd=sd: fp8_block.quantize_fp8_block(rn(512, 4096), (128, 128), sd))
    nv, mx = PRESETS["NVFP4"].weights, PRESETS["MXFP4"].weights
    for wa in (nv, mx):
        for dt in (bf16, f32):
            add(f"fp4 quantize g{wa.group_size} w {dt}[512,4096]",
                lambda wa=wa, dt=dt: fp4.quantize_fp4(rn(512, 4096, dt=dt), wa,
                                                      torch.ones(1)))
    fb, f4, wa8 = gemm_fp8_block, gemm_fp4, gemm_w4a8
    sw8 = torch.rand(8, 8)
    for m_rows in (16, 512):
        add(f"fp8_block_gemm fp8 M={m_rows} N=K=1024", lambda m_rows=m_rows: fb.fp8_block_gemm(
            rn(m_rows, 1024, dt=fp8), torch.rand(m_rows, 8), rn(1024, 1024, dt=fp8), sw8), 89)
        for dt in (bf16, f16):
            add(f"fp8_block_a16 x {dt}[{m_rows},1024]", lambda m_rows=m_rows, dt=dt:
                fb.fp8_block_a16_gemm(rn(m_rows, 1024, dt=dt), rn(1024, 1024, dt=fp8), sw8))

    def fp4w(wa, rows=1024, k=1024):
        sc = torch.randint(100, 130, (rows, k // wa.group_size), dtype=torch.uint8)
        return (torch.randint(0, 256, (rows, k // 2), dtype=torch.uint8),
                sc if wa.is_mx else sc.view(fp8), None if wa.is_mx else torch.ones(1))
    for wa in (nv, mx):
        for m_rows in (16, 512):
            for dt in (bf16, f16):
                add(f"fp4_a16 g{wa.group_size} x {dt}[{m_rows},1024]",
                    lambda wa=wa, m_rows=m_rows, dt=dt: f4.fp4_a16_gemm(
                        rn(m_rows, 1024, dt=dt), *fp4w(wa), wa))
            add(f"fp4_w4a4 g{wa.group_size} M={m_rows}", lambda wa=wa, m_rows=m_rows:
                f4.fp4_w4a4_gemm(*fp4w(wa, m_rows), *fp4w(wa), wa))
        add(f"fp4_w4a4 dot_scaled g32 M={512}", lambda: f4.fp4_w4a4_gemm(
            *fp4w(mx, 512), *fp4w(mx), mx, dot_scaled=True), 100)

    def int4w(symmetric, group=128, n=1024, k=1024):
        qw = torch.randint(-8, 8, (n, k), dtype=i8)
        zp = None if symmetric else torch.randint(-8, 8, (n, k // group), dtype=i8)
        return gemm_w4a16.pack_wna16(qw, torch.rand(n, k // group).to(bf16), zp, 4)
    for m_rows in (16, 512):
        for s in (True, False):
            add(f"w4a8 int8 M={m_rows} g128 {'sym' if s else 'asym'}",
                lambda m_rows=m_rows, s=s: wa8.w4a8_gemm(rn(m_rows, 1024, dt=i8),
                                                         torch.rand(m_rows), int4w(s)))
        add(f"w4afp8 fp8 M={m_rows} g128 sym", lambda m_rows=m_rows: wa8.w4a8_gemm(
            rn(m_rows, 1024, dt=fp8), torch.rand(m_rows), int4w(True)), 89)
    return L


@contextlib.contextmanager
def pretend_gpu(arch: int, calls: list):
    """Record launches instead of running them, as on a GPU of compute capability `arch`."""
    saved = (JITFunction.run, Autotuner.run, torch.cuda.is_available,
             torch.cuda.get_device_capability)

    def jit_run(fn, *args, grid=None, warmup=False, **kw):
        calls.append((fn, args, kw, ", ".join(f"{k}={v}" for k, v in kw.items()
                                              if k in ("num_warps", "num_stages")) or "launcher"))

    def tuned_run(tuner, *args, grid=None, warmup=False, **kw):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        for c in tuner.prune_configs(kw):   # what this autotuner would benchmark on `arch`
            calls.append((tuner.fn, args, {**kw, **c.all_kwargs()}, ", ".join(
                [f"{k}={v}" for k, v in c.kwargs.items()] +
                [f"warps={c.num_warps}", f"stages={c.num_stages}"])))
    JITFunction.run, Autotuner.run = jit_run, tuned_run
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_capability = lambda device=None: divmod(arch, 10)
    torch.Tensor.is_cuda = property(lambda t: True)
    try:
        yield
    finally:
        (JITFunction.run, Autotuner.run, torch.cuda.is_available,
         torch.cuda.get_device_capability) = saved
        del torch.Tensor.is_cuda


def bind(fn, target, args, kw):
    """signature, constexprs, attrs and options exactly as JITFunction.run derives them."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **{"debug": False, **kw})
    options, sig, consts, attrs = fn._pack_args(backend, {"debug": False, **kw}, bound, spec, opts)
    return sig, consts, attrs, options


def compile_one(fn, arch, args, kw):
    target = GPUTarget("cuda", arch, 32)
    sig, consts, attrs, options = bind(fn, target, args, kw)
    knobs.nvidia.dump_ptxas_log = True
    out = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                               options=options.__dict__)
        log = out.getvalue()
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
        spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        row = dict(ok=True, error=None, regs=max(regs) if regs else None, spill=spill,
                   shared=k.metadata.shared)
    except Exception as e:  # noqa: BLE001 -- a failed compile is a result
        row = dict(ok=False, error=f"{type(e).__name__}: {e}".strip().splitlines()[0][:300],
                   regs=None, spill=None, shared=None)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def problems(name, arch, row):
    """Why this row fails the check (empty when it passes)."""
    if not row["ok"]:
        return [row["error"]]
    out = []
    if row["shared"] > SMEM_BYTES[(arch // 10, arch % 10)]:
        out.append(f"needs {row['shared']} B shared memory, sm_{arch} has "
                   f"{SMEM_BYTES[(arch // 10, arch % 10)]}")
    if row["spill"] > SPILL_BOUND.get(name, 0):
        out.append(f"spills {row['spill']} B/thread (bound {SPILL_BOUND.get(name, 0)})")
    return out


def tile_volume(kw):
    blocks = [v for k, v in kw.items() if k.startswith("B") and isinstance(v, int)]
    return math.prod(blocks) * kw.get("num_stages", 1), kw.get("num_warps", 4)


def kernels_defined():
    return {f"{m.__name__.rsplit('.', 1)[-1]}.{k}": v for m in MODULES
            for k, v in vars(m).items() if isinstance(v, JITFunction) and v.__module__ == m.__name__}


def inlined(launched):
    """JIT helpers reachable from the launched kernels (compiled into them)."""
    seen, todo = set(), list(launched)
    while todo:
        fn = todo.pop()
        for name in set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", fn.src)):
            dep = fn.fn.__globals__.get(name)
            if isinstance(dep, JITFunction) and dep not in seen and dep not in launched:
                seen.add(dep)
                todo.append(dep)
    return seen


def oversized():
    """Launches the check must reject (--selftest): a tile too big for shared memory, and a
    tf32x3 tile that spills."""
    big = dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=4)
    a, s = torch.randint(-9, 9, (512, 1024), dtype=torch.int8), torch.rand(512, 1)
    c, b = torch.randn(256, 1024), torch.randn(256, 256)
    return [("int8_gemm 256x256x256 4 stages", 80, lambda: gemm_w8a8.int8_gemm(
                a, s, a, s.reshape(-1)[:512], config=big)),
            ("trailing tf32x3 128x256x32 8 warps", 80, lambda: gptq_sweep._trailing_kernel[(1, 1)](
                c, c, b, 256, 1024, 256, c.stride(0), c.stride(0), b.stride(0),
                PRECISION="tf32x3", BM=128, BN=256, BK=32, num_warps=8, num_stages=3))]


def run(archs=ARCHS, everything=False, only="", to_launch=None, log=print):
    """Compile; returns (rows, failures, kernels never launched)."""
    jobs = []                    # (name, label, arch, cfg, fn, args, kw)
    for label, sm, thunk in to_launch or launches():
        for arch in archs:
            if arch < sm:
                continue
            calls = []
            with pretend_gpu(arch, calls):
                thunk()
            for fn, args, kw, cfg in calls:
                name = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
                jobs.append((name, label, arch, cfg, fn, args, kw))
    launched = {j[4] for j in jobs}
    missing = [] if to_launch else sorted(k for k, f in kernels_defined().items()
                                          if f not in launched and f not in inlined(launched))
    if only:
        jobs = [j for j in jobs if only in j[0] or only in j[1]]
    if not everything:           # the largest tiles each kernel can get on each arch
        best = {}
        for j in jobs:
            key = (j[0], j[2])
            if key not in best or tile_volume(j[6]) > tile_volume(best[key][6]):
                best[key] = j
        jobs = list(best.values())
    rows, failures, seen = [], [], set()
    for name, label, arch, cfg, fn, args, kw in jobs:
        key = (name, arch, repr(bind(fn, GPUTarget("cuda", arch, 32), args, kw)))  # + warps
        if key in seen:          # the same specialization as an earlier launch
            continue
        seen.add(key)
        row = dict(kernel=name, variant=label, config=cfg, arch=f"sm_{arch}",
                   triton=triton.__version__, **compile_one(fn, arch, args, kw))
        row["problems"] = problems(name, arch, row)
        rows.append(row)
        if row["problems"]:
            failures.append(row)
        log(f"{'FAIL' if row['problems'] else 'ok  '} sm_{arch} {name:32s} regs={row['regs']} "
            f"spill={row['spill']} smem={row['shared']} {row['seconds']:5.1f}s | {label} | {cfg}"
            + "".join(f"\n     {p}" for p in row["problems"]))
    return rows, failures, missing


def summary(rows) -> str:
    """Markdown: per kernel, compiles / max registers / max shared KB / spill bytes per arch."""
    archs = sorted({r["arch"] for r in rows})
    lines = ["| kernel | " + " | ".join(f"{a}: n, regs, smem KB, spill" for a in archs) + " |",
             "|---|" + "---|" * len(archs)]
    for k in sorted({r["kernel"] for r in rows}):
        cells = []
        for a in archs:
            rs = [r for r in rows if r["kernel"] == k and r["arch"] == a and r["ok"]]
            cells.append(f"{len(rs)}, {max(r['regs'] or 0 for r in rs)}, "
                         f"{max(r['shared'] for r in rs) / 1024:.0f}, {sum(r['spill'] for r in rs)}"
                         if rs else "-")
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)))
    ap.add_argument("--all", action="store_true",
                    default=os.environ.get("TRITONPRESS_SLOW_TESTS") == "1")
    ap.add_argument("--only", default="", help="substring of kernel or variant names")
    ap.add_argument("--json", default=None)
    ap.add_argument("--selftest", action="store_true",
                    help="compile only launches that must fail (exit status 1 expected)")
    opt = ap.parse_args()
    t0 = time.perf_counter()
    rows, failures, missing = run([int(a) for a in opt.arch.split(",")], opt.all, opt.only,
                                  oversized() if opt.selftest else None,
                                  log=lambda s: print(s, flush=True))
    if opt.json:
        with open(opt.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, rows=rows,
                           not_launched=missing), f, indent=1)
    print("\n" + summary(rows))
    print(f"\ntriton {triton.__version__}: {len(rows)} compiles, {len(failures)} failing, "
          f"{time.perf_counter() - t0:.0f} s; kernels never launched: {missing or 'none'}")
    sys.exit(1 if failures or missing else 0)


if __name__ == "__main__":
    main()
