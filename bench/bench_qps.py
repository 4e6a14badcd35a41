"""QPS benchmark: which scheme serves a Llama-3-8B decoder layer's linears fastest, per batch.

    python bench/bench_qps.py out/qps                 # GPU: 13 batch sizes, about a minute
    python bench/bench_qps.py out/qps --cpu           # reduced: tiny shapes, torch references

The claims under test: W4A16 for low QPS (few tokens per forward: weight bytes are the
cost), W8A8 for high QPS and offline serving (many tokens: tensor-core math is the cost),
FP8 on Hopper, 2:4 + FP8 faster still. One decoder layer of Llama-3-8B has these linears
(hidden 4096, intermediate 14336, 32 heads, 8 kv heads of 128), fused as vLLM runs them:

    qkv 6144 x 4096,  o 4096 x 4096,  gate_up 28672 x 4096,  down 4096 x 14336

(--separate: q, k, v, o, gate, up, down as seven GEMMs). For each batch of M tokens (M = 1
is one decode step of one sequence; 4096 is a prefill chunk or a big decode batch) we time
the layer's linears, one after another, per scheme:

  bf16        cuBLAS (F.linear), the baseline
  W4A16       int4 weights, group 128, bf16 activations  } through tritonpress.kernels.gemm,
  W8A8-INT8   int8 channel weights, int8 per-token acts   } activation quantization included,
  W8A8-FP8    fp8 channel weights, fp8 per-token acts     } whichever kernel its dispatch
  2:4-FP8     the same, 2:4 sparse (cuSPARSELt on sm90)   } table picks (recorded per row)
  FP8 _scaled_mm   torch's cuBLASLt fp8 GEMM on the same fp8 values (a vendor yardstick)

Times are medians of CUDA-graph replays cycling through two copies of the layer's weights
(more bytes than L2 holds, as in a real model where 32 layers take turns). Reported: ms per
layer, tokens/s of the 32 layers' linears (M / (32 x ms)), speedup over bf16, the kernel
each scheme ran, and crossovers found from the data: the M from which W8A8 stays faster
than W4A16, and where each scheme stops (or starts) beating bf16. Every scheme is checked
against its torch reference on the GPU before it is timed. Linears only: attention,
norms, activations and the LM head are the same for every scheme and are left out.

Writes qps.json and qps.png (tokens/s and speedup against M, crossovers marked) into the
folder given. --cpu (automatic without a GPU): tiny layer, M up to 256, torch references
(dequantize, fp32 matmul): this checks the benchmark runs; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common, plots  # noqa: E402
from tritonpress.kernels import gemm  # noqa: E402
from tritonpress.kernels.quant import quantize_weight_ref  # noqa: E402
from tritonpress.schemes import PRESETS, QuantArgs  # noqa: E402

LLAMA3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128)
TINY = dict(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64)
LAYERS = 32   # Llama-3-8B's decoder layers: tokens/s of the whole linear stack
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
CPU_MS = [1, 4, 16, 64, 256]
SCHEMES = ["bf16", "W4A16", "W8A8-INT8", "W8A8-FP8", "2:4-FP8"]
YARDSTICKS = ["FP8 _scaled_mm"]
ROTATE = 2    # weight copies: one W4A16 layer is ~110 MB, an H100/H200's L2 is 50 MB

INT4 = QuantArgs(4, "int", True, "group", 128)
INT8, INT8_ACT = PRESETS["W8A8_INT8"].weights, PRESETS["W8A8_INT8"].input_activations
FP8, FP8_ACT = PRESETS["W8A8_FP8"].weights, PRESETS["W8A8_FP8"].input_activations

# (winner, loser): the crossovers reported, in the plot's order
CROSSOVERS = [("W8A8-INT8", "W4A16"), ("W8A8-FP8", "W4A16"), ("2:4-FP8", "W4A16"),
              ("bf16", "W4A16"), ("2:4-FP8", "W8A8-FP8"), ("W8A8-FP8", "bf16"),
              ("W8A8-INT8", "bf16")]
PLOTTED = {("W8A8-INT8", "W4A16"), ("W8A8-FP8", "W4A16"), ("bf16", "W4A16")}


# ----------------------------------------------------------------------------- the layer

def layer_shapes(cfg: dict, separate: bool = False) -> list[tuple[str, int, int]]:
    """(name, out_features N, in_features K) of one decoder layer's linears, in call order."""
    h, i = cfg["hidden"], cfg["intermediate"]
    q, kv = cfg["heads"] * cfg["head_dim"], cfg["kv_heads"] * cfg["head_dim"]
    if separate:
        return [("q", q, h), ("k", kv, h), ("v", kv, h), ("o", h, q),
                ("gate", i, h), ("up", i, h), ("down", h, i)]
    return [("qkv", q + 2 * kv, h), ("o", h, q), ("gate_up", 2 * i, h), ("down", h, i)]


def make_layer(shapes, device, seed: int) -> dict[str, list]:
    """scheme -> the layer's weights in that scheme's kernel layout, all from the same bf16
    weights (N(0, 0.02), like a trained layer's scale)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    layer = {s: [] for s in SCHEMES + YARDSTICKS}
    for _, n, k in shapes:
        w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        q4, s4, _ = quantize_weight_ref(w, INT4, torch.bfloat16)
        q8, s8, _ = quantize_weight_ref(w, INT8, torch.float32)
        f8, sf8, _ = quantize_weight_ref(w, FP8, torch.float32)
        f24, sf24, _ = quantize_weight_ref(common.prune24(w.float()), FP8, torch.float32)
        layer["bf16"].append(w)
        layer["W4A16"].append(gemm.prepare(q4, s4, None, INT4))
        layer["W8A8-INT8"].append(gemm.prepare(q8, s8, None, INT8, INT8_ACT))
        fp8 = gemm.prepare(f8, sf8, None, FP8, FP8_ACT)
        layer["W8A8-FP8"].append(fp8)
        layer["2:4-FP8"].append(gemm.prepare(f24, sf24, None, FP8, FP8_ACT, sparse24=True))
        layer["FP8 _scaled_mm"].append(fp8)
        del q4, q8, f8, f24
    return layer


def _scaled_mm(x, w):
    """torch._scaled_mm (cuBLASLt, rowwise scales) with our per-token fp8 quantization."""
    xq, sx = gemm.quantize_activations(x, w)
    return torch._scaled_mm(xq, w.q.t(), sx, w.scale[None, :], out_dtype=x.dtype)


def forward(scheme: str, weights: list, xs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """The layer's linears in order; each reads an input of its width (real inputs would
    come from attention and the MLP's activation: same shapes, same cost for every scheme)."""
    if scheme == "bf16":
        return [F.linear(xs[w.shape[1]], w) for w in weights]
    if scheme == "FP8 _scaled_mm":
        return [_scaled_mm(xs[w.in_features], w) for w in weights]
    return [gemm.linear(xs[w.in_features], w) for w in weights]


def reference(scheme: str, weights: list, xs) -> list[torch.Tensor]:
    """What each scheme must compute, in fp32: the bf16 product, or the scheme's torch
    reference (dequantize, same activation quantization, fp32 matmul)."""
    if scheme == "bf16":
        return [xs[w.shape[1]].float() @ w.float().t() for w in weights]
    return [gemm.gemm_ref(xs[w.in_features], w).float() for w in weights]


def rel_err(outs, refs) -> float:
    return max(((o.float() - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
               for o, r in zip(outs, refs))


def kernels_used(scheme: str, weights: list, xs) -> list[str]:
    if scheme in ("bf16", "FP8 _scaled_mm"):
        return ["cublas"]
    return sorted({gemm.choose_kernel(w, xs[w.in_features]) for w in weights})


# ----------------------------------------------------------------------------- timing

def measure_order(ms: list[int]) -> list[int]:
    """Coarse to fine (1, 4096, 64, ...), so a run cut short by its budget still spans M."""
    order, seen = [], set()
    step = len(ms)
    while step >= 1:
        for j in range(0, len(ms), step):
            if ms[j] not in seen:
                order.append(ms[j])
                seen.add(ms[j])
        if ms[-1] not in seen:
            order.append(ms[-1])
            seen.add(ms[-1])
        step //= 2
    return order


# ----------------------------------------------------------------------------- analysis

def crossover(rows: dict, winner: str, loser: str, ms: list[int]) -> dict:
    """The batch size from which `winner` is faster than `loser` at every larger measured M.

    m: the first measured M of that run; m_interp: where the log speed ratio crosses zero,
    interpolated linearly in log2 M between the two measured M around it (None when the
    winner is ahead already at the smallest M or never gets ahead)."""
    pts = [(m, rows[m].get(loser), rows[m].get(winner)) for m in ms if m in rows]
    pts = [(m, tl, tw) for m, tl, tw in pts if tl and tw]
    out = dict(winner=winner, loser=loser, m=None, m_interp=None, status="not measured")
    if not pts:
        return out
    ahead = [tw < tl for _, tl, tw in pts]
    if not ahead[-1]:
        out["status"] = "never ahead" if not any(ahead) else "ahead only below the largest M"
        return out
    last_behind = max((j for j, a in enumerate(ahead) if not a), default=None)
    if last_behind is None:
        out.update(m=pts[0][0], status="ahead at every measured M")
        return out
    (m0, tl0, tw0), (m1, tl1, tw1) = pts[last_behind], pts[last_behind + 1]
    r0, r1 = math.log(tl0 / tw0), math.log(tl1 / tw1)          # r0 <= 0 < r1
    t = -r0 / (r1 - r0)
    m_star = 2 ** (math.log2(m0) + t * (math.log2(m1) - math.log2(m0)))
    out.update(m=m1, m_interp=round(m_star, 1), between=[m0, m1], status="crosses")
    return out


# ----------------------------------------------------------------------------- run

def run(out_dir: str, cpu: bool, separate: bool = False, ms: list[int] | None = None,
        budget_s: float | None = None, check_m: int = 16) -> dict:
    t_start = time.time()
    device = "cpu" if cpu else "cuda"
    if cpu:
        os.environ["TRITONPRESS_GEMM_BACKEND"] = "torch"
    cfg = TINY if cpu else LLAMA3_8B
    ms = sorted(ms or (CPU_MS if cpu else MS))
    shapes = layer_shapes(cfg, separate)
    schemes = SCHEMES + ([] if cpu else YARDSTICKS)
    n_sets = 1 if cpu else ROTATE
    copies = [(j,) for j in range(n_sets)]   # timed call k runs fn(k % n_sets): the next copy
    sets = [make_layer(shapes, device, seed) for seed in range(n_sets)]
    widths = sorted({k for _, _, k in shapes})
    gen = torch.Generator(device=device).manual_seed(1234)

    def inputs(m):
        return {k: torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
                for k in widths}

    # correctness first: every scheme against its torch reference (and against bf16, which
    # shows the quantization error each scheme adds to this layer)
    checks = {}
    xs = inputs(min(check_m, ms[-1]))
    exact = [r for r in reference("bf16", sets[0]["bf16"], xs)]
    for s in schemes:
        try:
            outs = forward(s, sets[0][s], xs)
            checks[s] = dict(rel_err_vs_ref=rel_err(outs, reference(s, sets[0][s], xs)),
                             rel_err_vs_bf16=rel_err(outs, exact))
            if not cpu and checks[s]["rel_err_vs_ref"] > 2e-2:
                raise AssertionError(f"{s} differs from its reference by "
                                     f"{checks[s]['rel_err_vs_ref']:.2e}")
        except Exception as e:   # a scheme this GPU cannot run: reported, not timed
            checks[s] = dict(error=f"{type(e).__name__}: {e}"[:300])
    runnable = [s for s in schemes if "error" not in checks[s]]

    info = dict(common.env_info(not cpu, date=True),
                mode="cpu-reference" if cpu else "gpu", layer="tiny" if cpu else "llama-3-8b",
                config=cfg, shapes=[dict(name=nm, n=n, k=k) for nm, n, k in shapes],
                fused=not separate, layers_for_tokens_per_s=LAYERS,
                cslt=(not cpu and gemm.cslt_available()))
    common.add_versions(info)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "qps.json")
    records, rows, skipped, stopped = [], {}, [], False
    # `timeout` ends us: keep what we have
    previous = signal.signal(signal.SIGTERM, common.raise_stopped)
    try:
        for m in measure_order(ms):
            if stopped or (budget_s is not None and time.time() - t_start > budget_s):
                skipped.append(m)
                continue
            xs_sets = [inputs(m) for _ in range(n_sets)]
            row, recs = {}, []
            for s in runnable:
                def fn(j, s=s):
                    return forward(s, sets[j][s], xs_sets[j])
                try:
                    for j in range(n_sets):          # compile, autotune, first-use allocations
                        fn(j)
                    t = common.cpu_ms(fn, copies) if cpu else common.graph_ms(fn, copies, 20)
                    row[s] = t
                    recs.append(dict(scheme=s, m=m, ms=t,
                                     kernels=kernels_used(s, sets[0][s], xs_sets[0])))
                except Exception as e:
                    row[s] = None
                    recs.append(dict(scheme=s, m=m, ms=None,
                                     error=f"{type(e).__name__}: {e}"[:300]))
            rows[m] = row
            records += recs
            print(f"  M={m:<5} " + "  ".join(f"{s} {row[s]:.4f}" if row.get(s) else f"{s} -"
                                             for s in runnable), flush=True)
            # after every M, so a run killed later still leaves its numbers
            result = assemble(info, ms, schemes, checks, records, rows, skipped, t_start, path)
            if not cpu:
                del xs_sets
                torch.cuda.empty_cache()
    except common.Stopped:
        print("  stopped (SIGTERM): reporting what was measured", flush=True)
        skipped += [m for m in ms if m not in rows and m not in skipped]
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = assemble(info, ms, schemes, checks, records, rows, skipped, t_start, path)
    print_tables(result)
    png = plot(result, os.path.join(out_dir, "qps.png"))
    print(f"\n{info['device']}: {result['info']['seconds']} s; wrote {path}"
          + (f" and {png}" if png else " (no plot: matplotlib is not installed)"))
    return result


def assemble(info, ms, schemes, checks, records, rows, skipped, t_start, path) -> dict:
    """The result from the rows measured so far: derived columns, crossovers; written to path."""
    recs = []
    for r in records:
        base = rows[r["m"]].get("bf16")
        recs.append(dict(r, tokens_per_s=r["m"] / (LAYERS * r["ms"] / 1e3) if r["ms"] else None,
                         speedup=base / r["ms"] if r["ms"] and base else None))
    recs.sort(key=lambda r: (r["m"], schemes.index(r["scheme"])))
    measured = [m for m in ms if m in rows]
    crossovers = [crossover(rows, w, l, measured) for w, l in CROSSOVERS]
    fastest = {m: min((t, s) for s, t in rows[m].items() if t and s in SCHEMES)[1]
               for m in measured if any(rows[m].get(s) for s in SCHEMES)}
    info = dict(info, seconds=round(time.time() - t_start, 1), skipped_m=sorted(skipped))
    result = dict(info=info, ms=measured, schemes=schemes, checks=checks, results=recs,
                  crossovers=crossovers, fastest=fastest)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return result


def series(result: dict, key: str) -> dict[str, list]:
    by = {(r["scheme"], r["m"]): r.get(key) for r in result["results"]}
    return {s: [by.get((s, m)) for m in result["ms"]] for s in result["schemes"]}


def plot(result: dict, path: str):
    info = result["info"]
    marks = [dict(label=f"{c['winner']} overtakes {c['loser']}", m=c["m_interp"] or c["m"],
                  scheme=c["winner"]) for c in result["crossovers"]
             if (c["winner"], c["loser"]) in PLOTTED and c["status"] == "crosses"]
    what = ("Llama-3-8B decoder layer linears" if info["layer"] == "llama-3-8b"
            else "tiny layer, torch references (CPU: timings mean nothing)")
    title = (f"{what}: {info['device']}, torch {info['torch']}, triton "
             f"{info.get('triton', '-')}, {info['date']}")
    shapes = ", ".join(f"{s['name']} {s['n']}x{s['k']}" for s in info["shapes"])
    note = (f"{shapes}; tokens/s = M / ({info['layers_for_tokens_per_s']} layers x layer time);"
            " medians of CUDA-graph replays" if info["mode"] == "gpu" else shapes)
    return plots.speedup_plot(path, result["ms"], series(result, "tokens_per_s"),
                              series(result, "speedup"), marks, title, note)


def print_tables(result: dict):
    info, ms, schemes = result["info"], result["ms"], result["schemes"]
    print(f"\n{info['device']} ({info['mode']}), "
          + ", ".join(f"{s['name']} {s['n']}x{s['k']}" for s in info["shapes"]))
    print("checks (max |out - ref| / max |ref|): "
          + "; ".join(f"{s} " + (f"{c['rel_err_vs_ref']:.1e} (vs bf16 {c['rel_err_vs_bf16']:.1e})"
                                 if "error" not in c else f"FAILED {c['error'][:80]}")
                      for s, c in result["checks"].items()))
    t_ms, tok, sp = series(result, "ms"), series(result, "tokens_per_s"), series(result, "speedup")
    w = 14
    print(f"\nms per layer (speedup over bf16)")
    print(f"{'M':>5} " + "".join(f"{s:>{w + 9}.{w + 9}s}" for s in schemes) + "   fastest")
    for j, m in enumerate(ms):
        cells = []
        for s in schemes:
            if t_ms[s][j] is None:
                cells.append(f"{'-':>{w + 9}}")
            else:
                x = f"({sp[s][j]:.2f}x)" if sp[s][j] else ""
                cells.append(f"{t_ms[s][j]:>{w}.4f} {x:>8}")
        print(f"{m:>5} " + "".join(cells) + f"   {result['fastest'].get(m, '-')}")
    print(f"\ntokens/s, {info['layers_for_tokens_per_s']} layers' linears")
    print(f"{'M':>5} " + "".join(f"{s:>{w + 1}}" for s in schemes))
    for j, m in enumerate(ms):
        print(f"{m:>5} " + "".join(f"{tok[s][j]:>{w + 1}.4g}" if tok[s][j] else f"{'-':>{w + 1}}"
                                   for s in schemes))
    used = {}
    for r in result["results"]:
        if r.get("kernels"):
            used.setdefault(r["scheme"], set()).add(",".join(r["kernels"]))
    print("kernels: " + "; ".join(f"{s}: {' / '.join(sorted(k))}" for s, k in used.items()))
    print("\ncrossovers")
    for c in result["crossovers"]:
        where = ""
        if c["status"] == "crosses":
            where = f" from M={c['m']} (interpolated M≈{c['m_interp']}, between {c['between']})"
        elif c["m"] is not None:
            where = f" from M={c['m']}"
        print(f"  {c['winner']:>10} faster than {c['loser']:<10}: {c['status']}{where}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder for qps.json and qps.png")
    p.add_argument("--cpu", action="store_true", help="reduced reference-only run (no GPU)")
    p.add_argument("--separate", action="store_true",
                   help="q, k, v, gate, up as separate GEMMs (default: fused as vLLM runs them)")
    p.add_argument("--ms", default=None, help="comma list of batch rows M")
    p.add_argument("--budget", type=float, default=None,
                   help="stop starting new M after this many seconds (results so far are kept)")
    a = p.parse_args(argv)
    cpu = a.cpu or not torch.cuda.is_available()
    if cpu and not a.cpu:
        print("no CUDA GPU: reduced CPU mode (tiny shapes, torch references)")
    ms = [int(x) for x in a.ms.split(",")] if a.ms else None
    return run(a.out_dir, cpu, a.separate, ms, a.budget)


if __name__ == "__main__":
    main()
