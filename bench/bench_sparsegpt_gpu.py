"""SparseGPT 2:4 (+ fp8) against llm-compressor: one layer, and a 2-layer model end to end.

    python bench/bench_sparsegpt_gpu.py OUT_DIR             # CUDA, under 3 minutes
    python bench/bench_sparsegpt_gpu.py OUT_DIR --cpu       # reduced shapes (smoke test)
    python bench/bench_sparsegpt_gpu.py OUT_DIR --quality   # SmolLM2-135M: the variants vs
                                                            # magnitude 2:4 (KL, ppl held out)

1. One layer, 4096x4096 and 14336x4096, Hessian from 8192 correlated tokens: ours
   (`sparsegpt_24`, joint fp8, Cholesky included; and the float-only 2:4 sweep) against
   llm-compressor's `sparsify_weight` (eager column loop), median of 3 after a warm-up, with
   each one's layer loss tr((W - Wq) H (W - Wq)^T). Target: >= 20x.
2. End to end: a Llama with Llama-3-8B layer shapes, 2 decoder layers, vocab 32000, 64 x 2048
   random tokens, bf16, model on the CPU and layers onloaded to the GPU: ours (the sequential
   pipeline with `sparsegpt_method`, cold = first run with Triton compile/autotune, warm = a
   second run) against llm-compressor `oneshot` SparseGPT(2:4) then FP8_DYNAMIC
   (bench/llmc_oneshot.py). Target: >= 5x (its anchor: 22.86 s on an H200).
llm-compressor runs in this interpreter when importable, else in .venv-llmc (`make llmc-env`)
when present; otherwise its rows say so and the anchor numbers (H200) are printed instead.
Writes sparsegpt_bench.json and sparsegpt_bench.md into OUT_DIR.
"""
from __future__ import annotations

import argparse
import copy
import json
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

ANCHOR_LAYER_MS = {(4096, 4096): 1421, (14336, 4096): 1104}   # llmc sparsify_weight, H200
ANCHOR_E2E_S = 22.86                                          # llmc oneshot, H200
LLMC_MODULES = ("llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify",   # 0.14
                "llmcompressor.modifiers.obcq.sgpt_sparsify")                # older


# ----------------------------------------------------------------------------- helpers

def correlated_hessian(n, tokens, device, seed=0):
    """2/T X^T X of correlated tokens with uneven channel scales (activation-like)."""
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(n, n, device=device, generator=g) / n ** 0.5
    chan = 0.2 + 3 * torch.rand(n, device=device, generator=g)
    X = (torch.randn(tokens, n, device=device, generator=g) @ mix) * chan
    return 2 * X.T @ X / tokens


def table(headers, rows) -> str:
    """A right-aligned markdown table of _fmt cells."""
    return common.md_table(headers, [[_fmt(c) for c in r] for r in rows], right=True)


def _fmt(c):
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:.0f}"
    return str(c)


# ----------------------------------------------------------------------------- llm-compressor

def _llmc_layer_main(inp, outp):
    """Inside llm-compressor's interpreter: time sparsify_weight on the saved W, H."""
    import importlib
    import inspect
    d = torch.load(inp)
    fn = None
    for mod in LLMC_MODULES:
        try:
            fn = importlib.import_module(mod).sparsify_weight
            break
        except Exception:
            continue
    if fn is None:
        raise SystemExit("llm-compressor has no sparsify_weight at " + " or ".join(LLMC_MODULES))
    device = d["device"]
    lin = torch.nn.Linear(d["W"].shape[1], d["W"].shape[0], bias=False,
                          dtype=d["W"].dtype, device=device)
    lin.weight.data.copy_(d["W"].to(device))
    H = d["H"].to(device)
    opts = dict(sparsity=0.5, prune_n=2, prune_m=4, block_size=128, dampening_frac=0.01,
                preserve_sparsity_mask=False)
    names = inspect.signature(fn).parameters
    opts = {k: v for k, v in opts.items() if k in names}
    # it takes its Hessian out of the dict and factorizes it in place: a fresh copy per run
    ms, out = common.timed(lambda: fn(lin, {lin: H.clone()}, **opts), reps=d["reps"],
                           device=device)
    Wq = out[1] if isinstance(out, tuple) else out
    torch.save({"ms": ms, "W": Wq.cpu(), "signature": str(inspect.signature(fn))}, outp)


def llmc_layer(W, H, reps, py):
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"W": W.cpu(), "H": H.cpu(), "reps": reps, "device": str(W.device)}, inp)
        r = subprocess.run([py, __file__, "--llmc-layer", str(inp), str(outp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"llm-compressor layer run failed: {r.stderr.strip()[-400:]}"
        d = torch.load(outp)
        return d, None


def llmc_oneshot(model, ids, py, tmp):
    """Save the model + calibration ids; time llm-compressor's oneshot in its interpreter."""
    mdir = Path(tmp) / "model"
    common.save_with_tokenizer(model, mdir)   # llmc_oneshot loads one; ids are given directly
    torch.save(ids, Path(tmp) / "calib.pt")
    r = subprocess.run([py, str(common.LLMC_ONESHOT), *common.llmc_oneshot_args(
                        mdir, Path(tmp) / "calib.pt", "sparsegpt-fp8")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return None, f"llm-compressor oneshot failed: {r.stderr.strip()[-400:]}"
    line = [x for x in r.stdout.splitlines() if x.startswith("{")][-1]
    return json.loads(line)["seconds"], None


# ----------------------------------------------------------------------------- 1. one layer

def bench_layers(shapes, tokens, device, py, reps):
    from tritonpress.kernels.hessian import output_error
    from tritonpress.methods.sparsegpt_solve import (inverse_hessian_cholesky, sparsegpt_24,
                                                     sparsegpt_sweep)

    def hessian_loss(W, Wq, H):
        return float(output_error(W.float() - Wq.float(), H.float(), dim=None))
    rows, results = [], []
    for out, n in shapes:
        torch.manual_seed(0)
        H = correlated_hessian(n, tokens, device)
        W = (torch.randn(out, n, device=device) * 0.02).bfloat16()
        ms_joint, (qw, _) = common.timed(lambda: sparsegpt_24(W, H), reps=reps, device=device)

        def float_only():            # columns in order, as llm-compressor's sweep
            inv = inverse_hessian_cholesky(H, actorder=None)
            return sparsegpt_sweep(W.float().masked_fill(inv.dead, 0.0), inv.U)[0]
        ms_float, Wf = common.timed(float_only, reps=reps, device=device)
        loss_joint = hessian_loss(W, qw.dequantize(), H)
        loss_float = hessian_loss(W, Wf, H)
        r = {"shape": f"{out}x{n}", "tokens": tokens, "ours_joint_fp8_ms": ms_joint,
             "ours_float_24_ms": ms_float, "loss_ours_joint_fp8": loss_joint,
             "loss_ours_float_24": loss_float, "llmc_ms": None, "loss_llmc_float_24": None,
             "speedup": None, "note": None}
        if py is None:
            r["note"] = (f"llm-compressor not importable; anchor (H200): "
                         f"{ANCHOR_LAYER_MS.get((out, n), '-')} ms")
        else:
            d, err = llmc_layer(W, H, reps, py)
            if err:
                r["note"] = err
            else:
                r.update(llmc_ms=d["ms"], speedup=d["ms"] / ms_joint,
                         loss_llmc_float_24=hessian_loss(W, d["W"].to(device), H))
        results.append(r)
        rows.append([r["shape"], ms_joint, ms_float, r["llmc_ms"], r["speedup"], loss_float,
                     r["loss_llmc_float_24"], loss_joint])
        del H, W
    headers = ["out x in", "ours joint fp8 ms", "ours float 2:4 ms", "llmc ms", "speedup",
               "loss ours 2:4", "loss llmc 2:4", "loss ours 2:4+fp8"]
    notes = [f"{r['shape']}: {r['note']}" for r in results if r["note"]]
    return results, "\n".join([table(headers, rows)] + notes)


# ----------------------------------------------------------------------------- 2. end to end

def ours_end_to_end(model, batches, device):
    """What compress() runs for W8A8_FP8_24 (api._run_method -> the sequential pipeline with
    sparsegpt_method), without evaluation or saving. LEAD: swap in compress(...) here once it
    accepts pre-tokenized batches, so the timing covers the public entry point."""
    from tritonpress.loop.sequential import compress_sequential
    from tritonpress.methods.sparsegpt import sparsegpt_method
    from tritonpress.schemes import get_scheme
    return compress_sequential(model, batches, get_scheme("W8A8_FP8_24"), sparsegpt_method,
                               device=device, offload=False, progress=False)


def bench_e2e(cfg, samples, seq_len, device, py):
    from tritonpress.models import random_llama
    base = random_llama(cfg["hidden"], cfg["intermediate"], cfg["heads"], cfg["kv_heads"],
                        cfg["layers"], cfg["vocab"], dtype=torch.bfloat16, device="cpu",
                        max_positions=max(seq_len, 2048))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab"], (samples, seq_len), generator=g)
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(8)]
    res = {"config": cfg, "samples": samples, "seq_len": seq_len}
    for run in ("cold", "warm"):
        model = copy.deepcopy(base)
        common.reset_peak_memory(device)
        common.sync(device)
        t0 = time.perf_counter()
        out = ours_end_to_end(model, batches, device)
        common.sync(device)
        res[f"ours_{run}_s"] = time.perf_counter() - t0
        res["ours_peak_gib"] = common.peak_gib(device)
        assert all(q.is_24_sparse() for q in out.qweights.values())
        del model, out
    res["llmc_s"] = res["note"] = None
    if py is None:
        res["note"] = f"llm-compressor not importable; anchor (H200): {ANCHOR_E2E_S} s"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res["llmc_s"], res["note"] = llmc_oneshot(base, ids, py, tmp)
    res["speedup_warm"] = res["llmc_s"] / res["ours_warm_s"] if res["llmc_s"] else None
    rows = [["ours (cold: compile + autotune)", res["ours_cold_s"], res["ours_peak_gib"]],
            ["ours (warm)", res["ours_warm_s"], res["ours_peak_gib"]],
            ["llm-compressor oneshot SparseGPT 2:4 + FP8_DYNAMIC", res["llmc_s"], None]]
    txt = table(["run", "seconds", "peak GPU GiB"], rows)
    if res["speedup_warm"]:
        txt += f"\nspeedup (warm): {res['speedup_warm']:.1f}x"
    if res["note"]:
        txt += f"\n{res['note']}"
    return res, txt


# ----------------------------------------------------------------------------- 3. quality

def bench_quality(device, calib_samples, seq_len, eval_windows_n, which):
    """SmolLM2-135M: SparseGPT 2:4 + fp8 variants vs magnitude 2:4 + fp8, held-out KL / ppl."""
    from functools import partial

    from tritonpress import data

    from tritonpress import quality as evaluate

    from tritonpress import models
    from tritonpress.loop.sequential import compress_sequential
    from tritonpress.methods.sparsegpt import magnitude_linears, sparsegpt_method
    from tritonpress.schemes import get_scheme

    scheme = get_scheme("W8A8_FP8_24")
    model0, tok = models.load_model("smollm2-135m", device=device)
    windows = data.eval_windows(tok, "canterbury+code", eval_windows_n, seq_len)
    batches = data.calibration_batches(tok, "canterbury", calib_samples, seq_len, seed=0)
    ref = evaluate.reference(model0, windows)
    rows, results = [], []
    variants = {"dense": ("dense bf16", None),
                "magnitude": ("magnitude 2:4 + fp8", "magnitude"),
                "joint": ("SparseGPT joint (2 x amax original), default",
                          partial(sparsegpt_method, mode="joint")),
                "joint-plain": ("SparseGPT joint (amax original)",
                                partial(sparsegpt_method, mode="joint", headroom=1.0)),
                "joint-sparse": ("SparseGPT joint (amax of a float sweep)",
                                 partial(sparsegpt_method, mode="joint", scale_from="sparse",
                                         headroom=1.0)),
                "ptq": ("SparseGPT prune then quantize",
                        partial(sparsegpt_method, mode="prune_then_quantize"))}
    variants = [variants[v] for v in which]
    for name, fn in variants:
        model = copy.deepcopy(model0)
        t0 = time.perf_counter()
        if fn == "magnitude":
            magnitude_linears({n: m for n, m in model.named_modules()
                               if isinstance(m, torch.nn.Linear) and n != "lm_head"}, scheme)
        elif fn is not None:
            compress_sequential(model, batches, scheme, fn, device=device, progress=False)
        secs = time.perf_counter() - t0
        q = evaluate.evaluate(model, windows, ref=ref, act_args=scheme.input_activations,
                              ignore=scheme.ignore, progress=False) if fn else \
            evaluate.evaluate(model, windows, ref=ref, progress=False)
        results.append({"variant": name, "kl": q["kl"], "ppl": q["ppl"], "seconds": secs})
        rows.append([name, q["kl"], q["ppl"], secs])
        print(rows[-1], flush=True)
        del model
    txt = table(["SmolLM2-135M, W8A8_FP8_24", "KL", "ppl", "compress s"], rows)
    txt += (f"\n(calibration: canterbury {calib_samples} x {seq_len}; held-out canterbury+code "
            f"{eval_windows_n} x {seq_len}; fp8 per-token activations simulated)")
    return results, txt


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="folder for sparsegpt_bench.json / .md")
    ap.add_argument("--cpu", action="store_true", help="reduced shapes on the CPU")
    ap.add_argument("--quality", action="store_true", help="SmolLM2 quality table only")
    ap.add_argument("--calib-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--variants", default="dense,magnitude,joint,joint-plain,joint-sparse,ptq",
                    help="--quality: which of dense, magnitude, joint, joint-plain, "
                         "joint-sparse, ptq")
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--llmc-layer", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llmc_layer:
        return _llmc_layer_main(*a.llmc_layer)
    if not a.out:
        ap.error("OUT_DIR is required")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not a.cpu
    device = "cuda" if cuda else "cpu"
    report, md = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                  "torch": torch.__version__}, []

    if a.quality:
        samples = a.calib_samples or (128 if cuda else 32)
        report["quality"], txt = bench_quality(device, samples, a.seq_len, a.eval_windows,
                                               a.variants.split(","))
        md.append(txt)
    else:
        py = None if a.skip_llmc else common.find_llmc_python()
        report["llmc_python"] = py
        if cuda:
            shapes, tokens, reps = [(4096, 4096), (14336, 4096)], 8192, 3
            cfg = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=2,
                       vocab=32000)
            samples, seq_len = 64, 2048
        else:
            shapes, tokens, reps = [(256, 256), (896, 256)], 1024, 1
            cfg = dict(hidden=256, intermediate=896, heads=4, kv_heads=2, layers=2, vocab=1024)
            samples, seq_len = 8, 128
        report["layers"], txt = bench_layers(shapes, tokens, device, py, reps)
        md += ["## One layer (SparseGPT 2:4)", txt]
        print(txt, flush=True)
        report["e2e"], txt = bench_e2e(cfg, samples, seq_len, device, py)
        md += ["## End to end (2 decoder layers)", txt]
    text = f"device: {report['device']}\n\n" + "\n\n".join(md) + "\n"
    print(text)
    (out / ("sparsegpt_quality" if a.quality else "sparsegpt_bench")).with_suffix(".md") \
        .write_text(text)
    (out / ("sparsegpt_quality" if a.quality else "sparsegpt_bench")).with_suffix(".json") \
        .write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
