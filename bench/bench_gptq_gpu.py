"""GPTQ on one GPU: our fused kernels against fp32 addmm, our torch path and llm-compressor.

    python bench/bench_gptq_gpu.py                        # CUDA, about 3 minutes
    python bench/bench_gptq_gpu.py --skip-e2e --out out/bench_gptq
    python bench/bench_gptq_gpu.py --llmc-python .venv-llmc/bin/python
    python bench/bench_gptq_gpu.py --precision-study      # trailing-GEMM precision only

(a) Hessian X^T X, in-features 4096 and 14336, 16384 bf16 tokens: our upper-triangle
    tensor-core kernel vs llm-compressor's fp32 addmm and cuBLAS bf16 mm with fp32 output.
(b) GPTQ solve of one layer (4096x4096, 14336x4096, 4096x14336; int4 g128 and int8 channel;
    Hessian from 8192 correlated tokens, block 128, dampening 0.01; qparams fixed before the
    sweep and shared by every row of the table): ours (dampening + inverse factor + fused
    sweep, trailing GEMM in tf32x3, and tf32 / ieee for comparison), gptq.py's loop with the
    fused block kernel, gptq.py's torch path, llm-compressor 0.14 `quantize_weight` (in this
    process if importable, else in --llmc-python). Loss = half sum (w-q)^2/U_ii^2 (GPTQ's
    own); out_err = tr(E H E^T) / tr(W H W^T) with the undampened H (comparable across tools).
(c) End to end: a 2-layer random Llama with Llama-3-8B shapes, 64 x 2048 tokens, GPTQ W4A16
    and W8A8: our pipeline vs llm-compressor `oneshot` (bench/llmc_oneshot.py).
Prints tables and writes results.json to --out. Without a GPU: tiny shapes in the Triton
interpreter (checks that everything runs; the timings mean nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the kernels' import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tritonpress.schemes import QuantArgs  # noqa: E402

if "--llmc-worker" not in sys.argv:  # llm-compressor's venv may have no Triton (CPU torch)
    from tritonpress.methods.gptq_solve import (inverse_hessian_factor,  # noqa: E402
                                                solve_in_order)
    from tritonpress.kernels.hessian import xtx_accumulate_triton  # noqa: E402
    from tritonpress.kernels.quant import weight_qparams_ref  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
INT4_G128 = QuantArgs(4, "int", True, "group", 128)
INT8_CH = QuantArgs(8, "int", True, "channel")
SCHEMES = {"int4_g128": INT4_G128, "int8_chan": INT8_CH}
DAMP = 0.01


def table(title, header, rows):
    print(f"\n{title}")
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(n) for h, n in zip(header, w)))
    for r in rows:
        print("  ".join(str(c).rjust(n) for c, n in zip(r, w)))


# ----------------------------------------------------------------------------- (a) Hessian

def bench_hessian(features, tokens):
    rows = []
    for n in features:
        x = torch.randn(tokens, n, device=DEV).to(torch.bfloat16)
        H = torch.zeros(n, n, device=DEV)
        ours, _ = common.timed(lambda: xtx_accumulate_triton(H, x))

        def llmc_way():  # accumulate_hessian in llm-compressor: fp32 copy, sqrt(2), matmul
            xs = math.sqrt(2) * x.to(torch.float32)
            return H.addmm_(xs.t(), xs)
        addmm, _ = common.timed(llmc_way)
        bf16mm = None
        if CUDA:
            bf16mm, _ = common.timed(lambda: torch.mm(x.t(), x, out_dtype=torch.float32))
        # accuracy against an fp64 product (on a slice of columns for memory)
        k = min(n, 1024)
        H1 = xtx_accumulate_triton(torch.zeros(n, n, device=DEV), x)[:, :k]
        ref = x.double().t() @ x[:, :k].double()
        rel = float((H1.double() - ref).abs().max() / ref.abs().max())
        flops = tokens * n * n  # the full X^T X, 2 flops per multiply-add, halved by symmetry
        rows.append(dict(features=n, tokens=tokens, ours_ms=ours, fp32_addmm_ms=addmm,
                         bf16_mm_fp32out_ms=bf16mm, speedup_vs_addmm=addmm / ours,
                         ours_tflops=2 * flops / ours / 1e9, max_rel_err_vs_fp64=rel))
        del x, H, H1, ref
        if CUDA:
            torch.cuda.empty_cache()
    table("(a) Hessian H += X^T X (bf16 X, fp32 H)",
          ["in", "tokens", "ours ms", "fp32 addmm ms", "bf16 mm ms", "speedup", "TFLOP/s*",
           "rel err"],
          [[r["features"], r["tokens"], common.fmt(r["ours_ms"]),
            common.fmt(r["fp32_addmm_ms"]), common.fmt(r["bf16_mm_fp32out_ms"]),
            f"{r['speedup_vs_addmm']:.1f}x", common.fmt(r["ours_tflops"]),
            f"{r['max_rel_err_vs_fp64']:.1e}"] for r in rows])
    print("  * dense-equivalent (2 * tokens * in^2 / time); the kernel does half of it")
    return rows


# ----------------------------------------------------------------------------- (b) solve

def make_problem(rows, cols, tokens, seed=0):
    """bf16 weight ~ N(0, 0.02) and H = 2/n X^T X of correlated tokens with outlier channels."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    W = (torch.randn(rows, cols, generator=g, device=DEV) * 0.02).to(torch.bfloat16)
    mix = (torch.randn(cols, cols, generator=g, device=DEV) / cols ** 0.5).to(torch.bfloat16)
    X = torch.randn(tokens, cols, generator=g, device=DEV).to(torch.bfloat16)
    X = (X @ mix + 0.5 * torch.randn(tokens, cols, generator=g, device=DEV)).to(torch.bfloat16)
    X[:, :cols // 512 + 1] *= 20
    H = xtx_accumulate_triton(torch.zeros(cols, cols, device=DEV), X, alpha=2.0 / tokens)
    return W, H


def out_err(W, Q, H):
    E = W.float() - Q.float()
    return float(((E @ H) * E).sum() / ((W.float() @ H) * W.float()).sum())


def ours_gptq(W, H, args, scale, zp, precision):
    """The whole per-layer solve: dead columns, dampening, inverse factor, fused sweep."""
    W = W.float().clone()
    dead = H.diagonal() == 0
    if bool(dead.any()):
        H[dead, dead] = 1
        W[:, dead] = 0
    H.diagonal().add_(DAMP * H.diagonal().mean())
    U, info = inverse_hessian_factor(H)
    if U is None:
        raise RuntimeError("Hessian not positive definite in the benchmark problem")
    kw = {} if not CUDA else dict(precision=precision)
    # the Triton kernels (in the interpreter on a CPU)
    return solve_in_order(W, U, args, scale, zp, triton=True, scale_dtype=torch.bfloat16, **kw)


def bench_solve(shapes, tokens, llmc_python, reps=3,
                precisions=("tf32x3", "tf32", "bf16x3", "ieee")):
    from tritonpress.methods.gptq import gptq_quantize
    results, problems = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_gptq_"))
    try:
        import llmcompressor  # noqa: F401
        llmc_here = True
    except ImportError:
        llmc_here = False
    for rows_, cols in shapes:
        W, H = make_problem(rows_, cols, tokens)
        for sname, args in SCHEMES.items():
            scale, zp = weight_qparams_ref(W, args, torch.bfloat16)
            r = dict(shape=f"{rows_}x{cols}", scheme=sname)
            ref_Q = None
            for p in precisions:
                ms, (Q, _, _, losses) = common.timed(
                    lambda H_: ours_gptq(W, H_, args, scale, zp, p), reps=reps, setup=H.clone)
                r[f"ours_{p}_ms"], r[f"ours_{p}_loss"] = ms, float(losses.sum())
                r[f"ours_{p}_out_err"] = out_err(W, Q, H)
                if ref_Q is None:
                    ref_Q = Q
                else:
                    r[f"ours_{p}_differ"] = float((Q != ref_Q).float().mean())
                if not CUDA:
                    break
            # gptq.py as the library runs it (its Hinv route; on CUDA the fused solve), and
            # its torch path
            for label, backend in (("gptqpy", "auto"), ("gptqpy_torch", "torch")):
                if label == "gptqpy" and not CUDA:
                    continue
                os.environ["TRITONPRESS_BACKEND"] = backend
                try:
                    ms, (qw, Q2, info) = common.timed(
                        lambda: gptq_quantize(W, H, args, torch.bfloat16, block_size=128,
                                              damp=DAMP),
                        reps=reps if backend == "auto" else 1, warmup=int(backend == "auto"))
                finally:
                    os.environ.pop("TRITONPRESS_BACKEND", None)
                r[f"{label}_ms"], r[f"{label}_loss"] = ms, info["loss"]
                r[f"{label}_out_err"] = info["output_rel_err"]
            if llmc_here:
                r.update(llmc_solve(W, H, args, scale, zp, reps))
            elif llmc_python and Path(llmc_python).exists():
                f = tmp / f"problem{len(problems)}.pt"
                torch.save(dict(W=W.cpu(), H=H.cpu(), scale=scale.cpu(),
                                zp=None if zp is None else zp.cpu(), args=args.__dict__,
                                reps=reps), f)
                problems.append(f)
            else:
                r["llmc_note"] = "llm-compressor not importable and no --llmc-python"
            results.append(r)
            print(json.dumps(r), flush=True)
        del W, H
        if CUDA:
            torch.cuda.empty_cache()
    if problems:  # one process of llm-compressor's venv for all problems (imports are slow)
        p = subprocess.run([llmc_python, __file__, "--llmc-worker", *map(str, problems)],
                           capture_output=True, text=True, timeout=900)
        got = [json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")]
        for r, g in zip(results, got):
            r.update(g)
        if p.returncode or len(got) < len(problems):
            results[len(got)]["llmc_note"] = f"worker failed: {p.stderr[-800:]}"
        for f in problems:
            f.unlink()
    p0 = precisions[0]
    table("(b) GPTQ solve per layer, ms (loss = GPTQ loss; out_err = tr(EHE^T)/tr(WHW^T))",
          ["shape", "scheme", f"ours {p0}", "ours tf32", "ours bf16x3", "ours ieee",
           "gptq.py", "gptq.py torch", "llmc", "speedup vs llmc", "loss ours", "loss llmc",
           "loss llmc fp32 s", "out_err ours", "out_err llmc", "differ tf32", "differ bf16x3"],
          [[r["shape"], r["scheme"], common.fmt(r[f"ours_{p0}_ms"]),
            common.fmt(r.get("ours_tf32_ms")), common.fmt(r.get("ours_bf16x3_ms")),
            common.fmt(r.get("ours_ieee_ms")), common.fmt(r.get("gptqpy_ms")),
            common.fmt(r["gptqpy_torch_ms"]), common.fmt(r.get("llmc_ms")),
            (f"{r['llmc_ms'] / r[f'ours_{p0}_ms']:.1f}x" if r.get("llmc_ms") else "-"),
            common.fmt(r[f"ours_{p0}_loss"], 5), common.fmt(r.get("llmc_loss"), 5),
            common.fmt(r.get("llmc_loss_fp32_scales"), 5),
            common.fmt(r[f"ours_{p0}_out_err"], 4), common.fmt(r.get("llmc_out_err"), 4),
            common.fmt(r.get("ours_tf32_differ"), 2), common.fmt(r.get("ours_bf16x3_differ"), 2)]
           for r in results])
    print("  ours = dampening + one-Cholesky inverse factor + fused solve (kernels/gptq_sweep.py);"
          " gptq.py = gptq_quantize as the pipeline calls it")
    return results


def llmc_solve(W, H, args, scale, zp, reps):
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    qa = QuantizationArgs(num_bits=args.num_bits, type=args.type, symmetric=args.symmetric,
                          strategy=args.strategy, group_size=args.group_size)
    z = (torch.zeros_like(scale) if zp is None else zp).to(torch.int8)[None]
    setup = lambda: (W.float()[None].clone(), H[None].clone())  # noqa: E731
    # Scales in the weight's dtype, as its observers give them: fake_quantize then dequantizes
    # in bf16, which costs int8 accuracy. Also run once with fp32 scales, the same values.
    s = scale.to(W.dtype)[None]
    ms, (Q, losses, fallback) = common.timed(
        lambda a: quantize_weight(a[0], a[1], s, z, None, qa, blocksize=128, percdamp=DAMP),
        reps=reps, setup=setup)
    _, (Q32, losses32, _) = common.timed(
        lambda a: quantize_weight(a[0], a[1], scale.float()[None], z, None, qa, blocksize=128,
                                  percdamp=DAMP), reps=1, warmup=0, setup=setup)
    return {"llmc_ms": ms, "llmc_loss": float(losses.sum()), "llmc_out_err": out_err(W, Q[0], H),
            "llmc_loss_fp32_scales": float(losses32.sum()),
            "llmc_out_err_fp32_scales": out_err(W, Q32[0], H),
            "llmc_rtn_fallback": bool(fallback.any())}


def llmc_worker(paths):
    """Runs in llm-compressor's venv: one JSON line per problem file."""
    global DEV
    import llmcompressor
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    for path in paths:
        d = torch.load(path)
        r = llmc_solve(d["W"].to(DEV), d["H"].to(DEV), QuantArgs(**d["args"]),
                       d["scale"].to(DEV), None if d["zp"] is None else d["zp"].to(DEV),
                       d["reps"])
        r["llmc_version"] = getattr(llmcompressor, "__version__", "?")
        print(json.dumps(r), flush=True)


# ----------------------------------------------------------------------------- precision

def precision_study(rows=512, cols=1024, tokens=4096):
    """What the trailing GEMM's operand rounding does to GPTQ: the same solve with the
    W[:, right] -= Err @ U[block, right] operands rounded as tf32 / bf16 / tf32x3 round them
    (emulated in fp32, so it runs on CPU too), against exact fp32."""
    dev = DEV
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(tokens, cols, generator=g, device=dev) @ (
        torch.randn(cols, cols, generator=g, device=dev) / cols ** 0.5)
    X += 0.3 * torch.randn(tokens, cols, generator=g, device=dev)
    X[:, :8] *= 20
    H = 2 * X.t() @ X / tokens
    H.diagonal().add_(DAMP * H.diagonal().mean())
    U, _ = inverse_hessian_factor(H)
    W = torch.randn(rows, cols, generator=g, device=dev) * 0.02
    out = []
    for sname, args in SCHEMES.items():
        scale, zp = weight_qparams_ref(W, args, torch.bfloat16)
        base = None
        for p in ("ieee", "tf32x3", "bf16x3", "tf32", "bf16"):
            Q, _, _, losses = solve_in_order(W, U, args, scale, zp, triton=False, block_size=128,
                                             outer=512,
                                             precision=p)
            if base is None:
                base = (Q, float(losses.sum()))
            out.append(dict(scheme=sname, precision=p, loss=float(losses.sum()),
                            loss_rel_diff=(float(losses.sum()) - base[1]) / base[1],
                            values_differ=float((Q != base[0]).float().mean())))
    table(f"Trailing-GEMM precision (emulated), {rows}x{cols}, vs exact fp32",
          ["scheme", "precision", "loss", "loss rel diff", "values differ"],
          [[r["scheme"], r["precision"], common.fmt(r["loss"], 6), f"{r['loss_rel_diff']:+.1e}",
            f"{r['values_differ']:.1e}"] for r in out])
    return out


# ----------------------------------------------------------------------------- (c) e2e

def bench_e2e(llmc_python, samples=64, seq_len=2048, batch=4, small=False):
    """Our pipeline vs llm-compressor oneshot on a 2-layer random Llama-3-8B-shaped model."""
    from tritonpress.methods.gptq import GPTQ
    from tritonpress.models import random_llama
    from tritonpress.loop.sequential import compress_sequential
    from tritonpress.schemes import get_scheme

    shape = dict(hidden=256, intermediate=512, heads=4, kv_heads=2) if small else {}
    vocab = 1000 if small else 32000
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=g)
    rows = []
    for scheme_name, recipe in (("W4A16", "gptq-w4a16"), ("W8A8", "gptq-w8a8")):
        r = dict(scheme=scheme_name, layers=2)
        # the first run includes Triton compiles and autotuning (cached on disk afterwards)
        for run in ("ours_s", "ours_warm_s") if scheme_name == "W4A16" else ("ours_s",):
            model = random_llama(**shape, layers=2, vocab=vocab, device=DEV)
            batches = [{"input_ids": ids[i:i + batch]} for i in range(0, samples, batch)]
            common.reset_peak_memory()
            common.sync()
            t = time.perf_counter()
            compress_sequential(model, batches, get_scheme(scheme_name),
                                GPTQ(), device=DEV, offload=False,
                                progress=False)
            common.sync()
            r[run] = time.perf_counter() - t
            r["ours_peak_gib"] = common.peak_gib()
            del model
            if CUDA:
                torch.cuda.empty_cache()
        r.update(run_llmc_oneshot(model_factory=lambda: random_llama(
            **shape, layers=2, vocab=vocab, device="cpu"), ids=ids, recipe=recipe,
            llmc_python=llmc_python))
        rows.append(r)
        print(json.dumps(r), flush=True)
    table(f"(c) end to end, 2-layer Llama, {samples} x {seq_len} tokens, seconds",
          ["scheme", "ours s", "ours warm s", "ours peak GiB", "llmc s", "speedup"],
          [[r["scheme"], common.fmt(r["ours_s"]), common.fmt(r.get("ours_warm_s")),
            common.fmt(r["ours_peak_gib"]), common.fmt(r.get("llmc_s")),
            (f"{r['llmc_s'] / r['ours_s']:.1f}x" if r.get("llmc_s") else "-")] for r in rows])
    return rows


def run_llmc_oneshot(model_factory, ids, recipe, llmc_python):
    """LEAD: finish/replace with the shared llm-compressor driver if it changes. Saves the
    same random model (bf16) and token ids, runs bench/llmc_oneshot.py in llm-compressor's
    venv and reads its wall time (oneshot only, model load excluded)."""
    if not llmc_python or not Path(llmc_python).exists():
        return {"llmc_note": "no --llmc-python"}
    with tempfile.TemporaryDirectory(prefix="bench_gptq_e2e_") as d:
        model = model_factory()
        common.save_with_tokenizer(model, f"{d}/model")
        del model
        torch.save(ids, f"{d}/calib.pt")
        p = subprocess.run([llmc_python, str(common.LLMC_ONESHOT), *common.llmc_oneshot_args(
                            f"{d}/model", f"{d}/calib.pt", recipe, group_size=128)],
                           capture_output=True, text=True, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"llmc_note": f"oneshot failed: {p.stderr[-800:]}"}
    return {"llmc_s": json.loads(lines[-1])["seconds"]}


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_gptq_gpu"))
    ap.add_argument("--llmc-python", default=common.llmc_venv_python(),
                    help="python of a venv with llmcompressor 0.14 (when not importable here)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="run (c) on CPU too (tiny model)")
    ap.add_argument("--precision-study", action="store_true")
    ap.add_argument("--llmc-worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llmc_worker:
        return llmc_worker(a.llmc_worker)

    out = {"device": torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)",
           "torch": torch.__version__}
    if a.precision_study:
        out["precision"] = precision_study() if CUDA else precision_study(256, 768, 2048)
    else:
        if not CUDA:
            print("No GPU: tiny shapes in the Triton interpreter; timings mean nothing.")
        t0 = time.perf_counter()
        if CUDA:
            out["hessian"] = bench_hessian([4096, 14336], 16384)
            out["solve"] = bench_solve([(4096, 4096), (14336, 4096), (4096, 14336)], 8192,
                                       a.llmc_python)
        else:
            out["hessian"] = bench_hessian([200, 384], 512)
            out["solve"] = bench_solve([(64, 256), (96, 256), (64, 384)], 1024, a.llmc_python,
                                       reps=1)
        if (CUDA and not a.skip_e2e) or a.e2e:
            out["e2e"] = bench_e2e(a.llmc_python, **({} if CUDA else dict(
                samples=4, seq_len=64, batch=2, small=True)))
        out["seconds"] = time.perf_counter() - t0
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / "results.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
