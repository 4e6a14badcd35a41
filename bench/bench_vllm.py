"""The real engine in the loop: every scheme's checkpoint served by vLLM (CPU build).

    make setup vllm-env
    .venv/bin/python bench/bench_vllm.py out/vllm            # agreement, demo model (~32 min)
    .venv/bin/python bench/bench_vllm.py out/vllm_qps --qps  # throughput (about 45 min, 2 cores)
    .venv/bin/python bench/bench_vllm.py out/vllm_qps_small --qps --small   # plumbing (~7 min)

Agreement (default). For every scheme, compress the demo model (SmolLM2-135M, small
calibration), serve the checkpoint with vLLM in .venv-vllm (bench/vllm_worker.py in a
subprocess: greedy generation of N prompts x T tokens with per-token logprobs, and the linear
kernel class that served each layer), and compare, per position:

  vs ours   tritonpress.runtime.load_compressed(act_sim="vllm") teacher-forced on vLLM's greedy
            tokens: does our runtime's top-1 equal vLLM's token, |logprob difference|;
            and our runtime's own greedy run: tokens before the first divergence.
  vs bf16   the uncompressed model in vLLM: the scheme's model teacher-forced on bf16's greedy
            tokens (vLLM prompt_logprobs), top-1 agreement and |logprob difference|.

The floor is the first row: bf16 in vLLM against bf16 in transformers, the same weights in two
engines. A scheme's "vs ours" is judged against its own sensitivity to bf16 rounding (our
runtime against itself, attention sdpa vs eager): within DLOGP_FACTOR times that, plus
DLOGP_SLACK, and top-1 agreement >= TOP1_MIN (docs/vllm.md says why). "vs bf16" is what
quantization costs.

4-bit schemes run with VLLM_CPU_INT4_W4A8=0 (true A16): vLLM's default on AMX CPUs is W4A8
(int8 activations), which our runtime cannot simulate (int4 weights with int8 activations are
not a kernel of ours); on AMX machines that default is served too and reported beside.
FP8 on a CPU without AMX-FP8 runs torch._scaled_mm (fine on the machine measured; reported
very slow on another): --fp8-generate off skips its greedy generation, and the FP8 rows are
then compared on bf16's greedy tokens only (teacher-forced, one prefill); load is still checked.

QPS (--qps). A random-weight Llama (hidden 2048, 16 layers, byte tokenizer) as bf16, W4A16
served as A16 and as vLLM's default (W4A8 on AMX), and W8A8-INT8 (RTN checkpoints: timing does
not depend on the values), at 1, 4, 16 and 64 concurrent requests (one offline batch each,
64 prompt + 64 output tokens per request, ignore_eos, no prefix caching): output tokens/s, and
time per output token from the run's wall time less that of the same batch stopped after its
first token. Each configuration in its own vLLM process (vLLM's usual engine process), two runs
each (interleaved); table, qps.json, qps.png.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common, plots  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
WORKER = ROOT / "bench" / "vllm_worker.py"

# (name, flags for compress_from_flags): SmolLM2's hidden 576 takes groups of 64, not 128
SCHEMES = [("W4A16", {"group_size": 64}), ("W4A16_ASYM", {"group_size": 64}),
           ("W8A8_INT8", {}), ("W8A8_FP8", {}), ("W8A8_FP8_24", {})]
FOUR_BIT = ("W4A16", "W4A16_ASYM")
FP8 = ("W8A8_FP8", "W8A8_FP8_24")

# Tolerance of vLLM against our runtime, teacher-forced on vLLM's greedy tokens (why: docs).
# The yardstick is the scheme's own sensitivity: our runtime against itself with attention
# computed another way (sdpa vs eager: the same function, other bf16 roundings). W8A8
# amplifies such rounding (an activation near a rounding boundary flips), W4A16 does not.
DLOGP_FACTOR = 2.5  # mean |dlogprob| vs ours <= 2.5 x that sensitivity (+ DLOGP_SLACK)
DLOGP_SLACK = 0.02  # nats: the bf16 floor's own noise on a few hundred positions
TOP1_MIN = 0.90     # our top-1 equals vLLM's greedy token at >= 90% of positions

KERNEL_LINE = re.compile(r"(?:Using|Selected) (\w+) for (\w+)")


# ----------------------------------------------------------------------------- the engine

def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vllm_env(w4a8: bool = False, in_process: bool = True, threads: str | None = None) -> dict:
    """The environment of one vLLM worker: 2 GiB KV cache, OpenMP bound to this machine's
    cores (or `threads`, e.g. "0-1"), the 4-bit activation mode, the engine in-process (so
    the worker can look at its layers) unless timing wants vLLM's usual engine process."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["VLLM_CPU_OMP_THREADS_BIND"] = threads or env.get(
        "VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env["VLLM_CPU_INT4_W4A8"] = "1" if w4a8 else "0"
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for k in ("PYTHONPATH", "VIRTUAL_ENV"):   # .venv's, not vLLM's
        env.pop(k, None)
    return env


def run_worker(job: dict, env: dict, workdir: Path, tag: str, timeout: float = 1800,
               python: Path = VLLM_PYTHON) -> dict:
    """One vLLM process for one job; its log goes to workdir/TAG.log. The result JSON, plus
    `kernels` (vLLM's "Using X for Y" lines), `wall_s`, and `error` when it failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    jpath, rpath, log = (workdir / f"{tag}.job.json", workdir / f"{tag}.result.json",
                         workdir / f"{tag}.log")
    jpath.write_text(json.dumps(job))
    rpath.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run([str(python), str(WORKER), str(jpath), str(rpath)], env=env,
                                  stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=str(ROOT))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    res = json.loads(rpath.read_text()) if rpath.is_file() else {}
    res["wall_s"] = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    res["kernels"] = sorted({f"{k} for {s}" for k, s in KERNEL_LINE.findall(text)})
    res["log"] = str(log)
    if rc is None:
        res["error"] = f"timed out after {timeout:.0f} s (log: {log})"
    elif rc and "error" not in res:
        res["error"] = f"exit status {rc} (log: {log}): {text.strip().splitlines()[-1:]}"
    return res


def kernel_summary(res: dict) -> str:
    """The kernel classes that served the linears, with their switches, e.g.
    'CPUWNA16LinearKernel (isa vec, A16)'."""
    layers = res.get("layers") or {}
    if isinstance(layers, dict) and layers and "error" not in layers:
        kinds = set()
        for row in layers.values():
            k = row.get("kernel") or row.get("method")
            extra = []
            if "isa_hint" in row:
                extra.append(f"isa {row['isa_hint']}")
            if "use_w4a8" in row:
                extra.append("W4A8" if row["use_w4a8"] else "A16")
            if "linear_method" in row:
                extra.append(row["linear_method"].lstrip("_"))
            kinds.add(k + (f" ({', '.join(extra)})" if extra else ""))
        return "; ".join(sorted(kinds))
    names = sorted({k.split(" for ")[0] for k in res.get("kernels", [])})
    return "; ".join(names) or "unquantized (bf16)"


# ----------------------------------------------------------------------------- agreement

def prompts_from_text(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the held-out text, spread over it."""
    from tritonpress import data
    stream = data.split_stream(tokenizer, "canterbury", "eval")
    step = max(length, (len(stream) - length) // n)
    return [stream[i * step:i * step + length].tolist() for i in range(n)]


def score_ours(model, sequences: list[list[int]], start: int, attn: str = "sdpa"):
    """Teacher-forced: per sequence, logprob of each token from `start` on and the top-1 there,
    with attention computed by transformers' `attn` implementation."""
    import torch
    ids = torch.tensor(sequences)
    model.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
    finally:
        model.set_attn_implementation("sdpa")
    lp = torch.log_softmax(logits[:, start - 1:-1], dim=-1)
    tgt = ids[:, start:]
    return (lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).tolist(), lp.argmax(-1).tolist())


def sensitivity(model, sequences: list[list[int]], start: int, scored=None) -> dict:
    """Our runtime against itself, attention sdpa vs eager (a bf16-rounding perturbation):
    mean |dlogprob| of the given tokens and how often the top-1 stays."""
    lp_s, top_s = scored or score_ours(model, sequences, start)
    lp_e, top_e = score_ours(model, sequences, start, attn="eager")
    d = [abs(a - b) for xs, ys in zip(lp_s, lp_e) for a, b in zip(xs, ys)]
    same = sum(a == b for xs, ys in zip(top_s, top_e) for a, b in zip(xs, ys))
    return {"positions": len(d), "top1_same": same, "mean_abs_dlogp": sum(d) / len(d)}


def tolerance(sens: dict) -> float:
    return DLOGP_FACTOR * sens["mean_abs_dlogp"] + DLOGP_SLACK


def within(vs_ours: dict, sens: dict) -> bool:
    return (vs_ours["top1_agree"] >= TOP1_MIN * vs_ours["positions"]
            and vs_ours["mean_abs_dlogp"] <= tolerance(sens))


def greedy_ours(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import torch
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def compare(tokens, lp_ref, lp_other, top1_other) -> dict:
    """Per position: top-1 agreement with the reference's tokens and |logprob difference|."""
    flat = [(t, a, b, k) for ts, la, lb, ks in zip(tokens, lp_ref, lp_other, top1_other)
            for t, a, b, k in zip(ts, la, lb, ks)]
    d = [abs(a - b) for _, a, b, _ in flat]
    return {"positions": len(flat), "top1_agree": sum(t == k for t, _, _, k in flat),
            "mean_abs_dlogp": sum(d) / len(d), "max_abs_dlogp": max(d)}


def common_prefix(a: list[list[int]], b: list[list[int]]) -> int:
    total = 0
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        total += n
    return total


def compress_demo(name: str, flags: dict, out: Path, args) -> dict:
    from tritonpress.cli import compress_from_flags
    if args.reuse and (out / "config.json").is_file():
        return {"reused": True}
    t0 = time.perf_counter()
    compress_from_flags(args.model, name, str(out), num_samples=args.num_samples,
                        seq_len=args.seq_len, evaluate_quality=False, overwrite=True,
                        progress=False, device="cpu", **flags)
    return {"compress_s": time.perf_counter() - t0}


def agreement(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tritonpress.models import model_path
    from tritonpress.runtime import load_compressed

    out_dir = Path(args.out_dir)
    flags = cpu_flags()
    amx, amx_fp8 = "amx_tile" in flags, "amx_fp8" in flags
    base = model_path(args.model)
    tok = AutoTokenizer.from_pretrained(base)
    prompts = prompts_from_text(tok, args.prompts, args.prompt_len)
    P, T = args.prompt_len, args.tokens
    info = common.env_info(False, date=True)
    info.update({"cpu_amx": sorted(f for f in flags if f.startswith("amx")),
                 "cores": os.cpu_count(), "model": args.model, "prompts": args.prompts,
                 "prompt_len": P, "tokens": T,
                 "calibration": f"{args.num_samples} x {args.seq_len}",
                 "tolerance": {"top1_min": TOP1_MIN, "dlogp_factor": DLOGP_FACTOR,
                               "dlogp_slack": DLOGP_SLACK}})
    fp8_gen = args.fp8_generate == "on"
    results = {"info": info, "rows": []}

    # ---- the floor: bf16 in vLLM against bf16 in transformers
    print(f"bf16: vLLM greedy, {len(prompts)} prompts x {T} tokens", flush=True)
    llm_kwargs = {"enforce_eager": True} if args.eager else {}
    info["vllm_llm_kwargs"] = llm_kwargs
    b = run_worker({"mode": "generate", "model": str(base), "prompts": prompts, "max_tokens": T,
                    "llm_kwargs": llm_kwargs},
                   vllm_env(), out_dir / "logs", "bf16")
    if "error" in b:
        raise SystemExit(f"bf16 in vLLM failed: {b['error']}")
    info["versions"] = b.get("versions")
    g0, l0 = b["tokens"], b["logprobs"]
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).eval()
    seqs0 = [p + g for p, g in zip(prompts, g0)]
    lp, top1 = score_ours(ref, seqs0, P)
    row = {"scheme": "bf16 (floor)", "kernel": kernel_summary(b), "vllm_generated": True,
           "vs_ours": compare(g0, l0, lp, top1),
           "sensitivity": sensitivity(ref, seqs0, P, (lp, top1)),
           "vs_ours_prefix": common_prefix(g0, greedy_ours(ref, prompts, T)),
           "vs_bf16": None, "load_s": b.get("load_s"), "gen_s": b.get("gen_s")}
    row["within_tolerance"] = within(row["vs_ours"], row["sensitivity"])
    del ref
    results["rows"].append(row)
    print_row(row, T * len(prompts))

    for name, sflags in SCHEMES:
        if args.schemes and name not in args.schemes:
            continue
        ckpt = out_dir / "checkpoints" / name
        print(f"{name}: compress", flush=True)
        made = compress_demo(name, sflags, ckpt, args)
        configs = [("", False)]
        if name in FOUR_BIT and amx:
            configs.append((" (vLLM default W4A8)", True))
        for label, w4a8 in configs:
            gen = name not in FP8 or fp8_gen
            job = {"mode": "generate", "model": str(ckpt), "llm_kwargs": llm_kwargs,
                   "prompts": prompts if gen else [], "max_tokens": T if gen else 0,
                   "score": [p + g for p, g in zip(prompts, g0)], "score_from": P}
            print(f"{name}{label}: vLLM {'greedy + ' if gen else ''}scoring bf16's tokens",
                  flush=True)
            r = run_worker(job, vllm_env(w4a8=w4a8), out_dir / "logs",
                           name + ("-w4a8" if w4a8 else ""), timeout=args.timeout)
            row = {"scheme": name + label, "kernel": kernel_summary(r), "vllm_generated": gen,
                   "load_s": r.get("load_s"), "gen_s": r.get("gen_s"),
                   "score_s": r.get("score_s"), **made}
            if not gen:
                row["why_not_generated"] = (
                    "--fp8-generate off" + ("" if amx_fp8 else " (no AMX-FP8 on this CPU: "
                    "vLLM serves FP8 through torch._scaled_mm)") + "; compared on bf16's "
                    "greedy tokens (teacher-forced) only")
            if "error" in r:
                row["error"] = r["error"]
                results["rows"].append(row)
                print(f"  {name}{label}: FAILED {r['error']}", flush=True)
                continue
            row["vs_bf16"] = compare(g0, l0, r["scored_logprobs"], r["scored_top1"])
            ours, _ = load_compressed(str(ckpt), device="cpu", dtype=torch.bfloat16,
                                      act_sim="vllm")
            if gen:
                seqs = [p + g for p, g in zip(prompts, r["tokens"])]
                lp, top1 = score_ours(ours, seqs, P)
                row["vs_ours"] = compare(r["tokens"], r["logprobs"], lp, top1)
                row["vs_ours_prefix"] = common_prefix(r["tokens"], greedy_ours(ours, prompts, T))
                row["vs_bf16_prefix"] = common_prefix(r["tokens"], g0)
            else:   # both teacher-forced on bf16's tokens
                seqs = seqs0
                lp, top1 = score_ours(ours, seqs, P)
                row["vs_ours"] = compare(g0, r["scored_logprobs"], lp, top1)
            row["sensitivity"] = sensitivity(ours, seqs, P, (lp, top1))
            if not w4a8:   # W4A8 is not what our runtime computes: reported, not judged
                row["within_tolerance"] = within(row["vs_ours"], row["sensitivity"])
            del ours
            results["rows"].append(row)
            print_row(row, T * len(prompts))
            (out_dir / "vllm_agreement.json").write_text(json.dumps(results, indent=1))

    (out_dir / "vllm_agreement.json").write_text(json.dumps(results, indent=1))
    print()
    print(agreement_table(results))
    return results


def print_row(row: dict, n: int):
    v = row["vs_ours"]
    print(f"  {row['scheme']}: {row['kernel']}; vs ours top-1 {v['top1_agree']}/{v['positions']}"
          f", mean |dlogp| {v['mean_abs_dlogp']:.4f}", flush=True)


def agreement_table(results: dict) -> str:
    rows = []
    for r in results["rows"]:
        if "error" in r:
            rows.append([r["scheme"], r["kernel"], "FAILED", "", "", "", "", "",
                         r["error"][:60]])
            continue
        v, b, sens = r["vs_ours"], r.get("vs_bf16"), r["sensitivity"]
        gen = r["vllm_generated"]
        rows.append([
            r["scheme"], r["kernel"],
            f"{v['top1_agree']}/{v['positions']}" + ("" if gen else " *"),
            f"{r['vs_ours_prefix']}/{v['positions']}" if "vs_ours_prefix" in r else "-",
            f"{v['mean_abs_dlogp']:.3f} (max {v['max_abs_dlogp']:.2f})",
            f"{sens['mean_abs_dlogp']:.3f} -> {tolerance(sens):.3f}",
            {True: "yes", False: "NO"}.get(r.get("within_tolerance"), "-"),
            f"{b['top1_agree']}/{b['positions']}" if b else "-",
            f"{b['mean_abs_dlogp']:.3f}" if b else "-"])
    head = ["scheme", "vLLM kernel", "top-1 = vLLM's token (ours)", "greedy prefix (ours)",
            "mean abs dlogprob vs ours", "ours sdpa/eager -> tolerance", "in tolerance",
            "top-1 = bf16's token (vLLM)", "mean abs dlogprob vs bf16"]
    note = ("\n* not generated by vLLM (--fp8-generate off): vLLM and ours both "
            "teacher-forced on bf16's greedy tokens."
            if any(not r.get("vllm_generated", True) for r in results["rows"]) else "")
    return common.md_table(head, rows) + note


# ----------------------------------------------------------------------------- QPS

QPS_FULL = dict(hidden=2048, intermediate=5632, layers=16, concurrency=[1, 4, 16, 64],
                prompt_len=64, tokens=64)
QPS_SMALL = dict(hidden=256, intermediate=512, layers=2, concurrency=[1, 4],
                 prompt_len=32, tokens=16)
# (label, checkpoint scheme or None for bf16, W4A8 on)
QPS_CONFIGS = [("bf16", None, False), ("W4A16 (A16)", "W4A16", False),
               ("W4A16 (vLLM default)", "W4A16", True), ("W8A8-INT8", "W8A8_INT8", False)]


def qps_checkpoints(out_dir: Path, cfg: dict) -> dict[str | None, Path]:
    from bench.bench_stream_memory import make_model
    from tritonpress.cli import compress_from_flags
    base = out_dir / "model"
    make_model(base, cfg["layers"], cfg["hidden"], cfg["intermediate"])
    paths = {None: base}
    for scheme in ("W4A16", "W8A8_INT8"):
        ckpt = out_dir / "checkpoints" / scheme
        if not (ckpt / "config.json").is_file():
            print(f"compress {scheme} (RTN)", flush=True)
            compress_from_flags(str(base), scheme, str(ckpt), method="rtn",
                                evaluate_quality=False, overwrite=True, progress=False,
                                device="cpu")
        paths[scheme] = ckpt
    return paths


def qps(args) -> dict:
    out_dir = Path(args.out_dir)
    cfg = dict(QPS_SMALL if args.small else QPS_FULL)
    if args.concurrency:
        cfg["concurrency"] = args.concurrency
    paths = qps_checkpoints(out_dir, cfg)
    info = common.env_info(False, date=True)
    info.update({"cpu_amx": sorted(f for f in cpu_flags() if f.startswith("amx")),
                 "cores": os.cpu_count(), **cfg, "runs": args.runs,
                 "note": "offline batches: C requests submitted at once, ignore_eos"})
    max_len = cfg["prompt_len"] + cfg["tokens"] + 16
    # without AMX vLLM runs 4-bit as A16 whatever VLLM_CPU_INT4_W4A8 says: one config, not two
    configs = [c for c in QPS_CONFIGS if not c[2] or "amx_tile" in cpu_flags()]
    runs = {label: [] for label, _, _ in configs}
    for rep in range(args.runs):             # interleaved: drift hits every config alike
        for label, scheme, w4a8 in configs:
            job = {"mode": "qps", "model": str(paths[scheme]), "concurrency": cfg["concurrency"],
                   "prompt_len": cfg["prompt_len"], "max_tokens": cfg["tokens"],
                   "max_model_len": max_len,
                   # no prefix caching: the full run must prefill again, as the first did
                   "llm_kwargs": {"max_num_seqs": max(cfg["concurrency"]),
                                  "enable_prefix_caching": False}}
            tag = f"qps-{label.split()[0]}{'-w4a8' if w4a8 else ''}-run{rep}"
            print(f"run {rep + 1}/{args.runs}: {label}", flush=True)
            r = run_worker(job, vllm_env(w4a8=w4a8, in_process=False), out_dir / "logs", tag,
                           timeout=args.timeout)
            r["label"] = label
            if scheme == "W4A16":   # vLLM's rule (mixed_precision/cpu.py): W4A8 needs AMX
                r["w4a8"] = w4a8 and "amx_tile" in cpu_flags()
            if "error" in r:
                print(f"  FAILED: {r['error']}", flush=True)
            else:
                print(f"  {kernel_summary(r)}: " + ", ".join(
                    f"C={q['concurrency']} {q['tokens_per_s']:.1f} tok/s"
                    for q in r["qps"]), flush=True)
            runs[label].append(r)
    info["versions"] = next((r["versions"] for rs in runs.values() for r in rs
                             if r.get("versions")), None)
    results = {"info": info, "runs": runs, "summary": qps_summary(runs, cfg["concurrency"])}
    (out_dir / "qps.json").write_text(json.dumps(results, indent=1))
    print()
    print(qps_table(results))
    png = qps_plot(out_dir / "qps.png", results, cfg)
    if png:
        print(f"plot: {png}")
    return results


def qps_summary(runs: dict, concurrency: list[int]) -> dict:
    """Per config and concurrency: mean tokens/s and TPOT over the runs, and their spread."""
    out = {}
    for label, rs in runs.items():
        rows = {}
        for c in concurrency:
            got = [q for r in rs if "qps" in r for q in r["qps"] if q["concurrency"] == c]
            if not got:
                rows[c] = None
                continue
            tps = [q["tokens_per_s"] for q in got]
            tpot = [q["tpot_ms"] for q in got]
            rows[c] = {"tokens_per_s": sum(tps) / len(tps), "tokens_per_s_runs": tps,
                       "tpot_ms": sum(tpot) / len(tpot), "tpot_ms_runs": tpot}
        ok = [r for r in rs if "error" not in r]
        kern = kernel_summary(ok[0]) if ok else "failed"
        if ok and "w4a8" in ok[0]:
            kern += " (W4A8)" if ok[0]["w4a8"] else " (A16)"
        out[label] = {"kernel": kern, "by_concurrency": rows}
    return out


def qps_table(results: dict) -> str:
    summ = results["summary"]
    conc = results["info"]["concurrency"]
    head = ["config", "vLLM kernel"] + [f"C={c} tok/s" for c in conc] + \
        [f"C={c} TPOT ms" for c in conc]
    rows = []
    for label, s in summ.items():
        bc = s["by_concurrency"]
        cell = (lambda c, k: "-" if bc.get(c) is None else
                f"{bc[c][k]:.1f} ({'/'.join(f'{x:.1f}' for x in bc[c][k + '_runs'])})")
        rows.append([label, s["kernel"]] + [cell(c, "tokens_per_s") for c in conc] +
                    [cell(c, "tpot_ms") for c in conc])
    return common.md_table(head, rows) + "\n(mean of the runs; each run in parentheses)"


def qps_plot(path: Path, results: dict, cfg: dict):
    """Two panels over concurrent requests (log2 axis): output tokens/s and time per output
    token, one line per configuration, each run's points beside the mean."""
    plt = plots.plt
    if plt is None:
        return None
    conc, info = cfg["concurrency"], results["info"]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {"bf16": "bf16", "W4A16 (A16)": "W4A16", "W8A8-INT8": "W8A8-INT8"}
    for i, (label, s) in enumerate(results["summary"].items()):
        color, marker = plots._style(styles.get(label, "FP8 _scaled_mm"), i)
        ls = "--" if "default" in label else "-"
        for ax, key in ((ax_t, "tokens_per_s"), (ax_l, "tpot_ms")):
            pts = [(c, s["by_concurrency"][c]) for c in conc if s["by_concurrency"].get(c)]
            if not pts:
                continue
            ax.plot([c for c, _ in pts], [v[key] for _, v in pts], ls=ls, marker=marker,
                    color=color, label=f"{label}: {s['kernel']}", lw=1.6, ms=5)
            for c, v in pts:
                ax.scatter([c] * len(v[key + "_runs"]), v[key + "_runs"], color=color, s=8,
                           alpha=0.5)
    for ax, ylabel in ((ax_t, "output tokens / s"), (ax_l, "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(conc)
        ax.set_xticklabels([str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    ax_t.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"vLLM {(info.get('versions') or {}).get('vllm', '')} CPU "
                 f"({info['cores']} cores, AMX: {', '.join(info['cpu_amx']) or 'none'}): random "
                 f"Llama hidden {cfg['hidden']} x {cfg['layers']} layers, {cfg['prompt_len']} "
                 f"prompt + {cfg['tokens']} output tokens per request", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--qps", action="store_true", help="throughput instead of agreement")
    ap.add_argument("--small", action="store_true", help="--qps on a tiny model (plumbing)")
    ap.add_argument("--runs", type=int, default=2, help="--qps: runs per configuration")
    ap.add_argument("--concurrency", type=int, nargs="*", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", nargs="*", default=None, help="a subset of the schemes")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--fp8-generate", default="on", choices=["on", "off"],
                    help="greedy generation of FP8 checkpoints in vLLM; off where vLLM's "
                         "reference FP8 matmul is too slow (CPUs without AMX-FP8 may be)")
    ap.add_argument("--reuse", action="store_true", help="keep checkpoints already in OUT")
    ap.add_argument("--eager", action="store_true",
                    help="vLLM without torch.compile (enforce_eager): no fused ops")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per vLLM process")
    args = ap.parse_args(argv)
    if not VLLM_PYTHON.is_file():
        raise SystemExit(f"{VLLM_PYTHON} is missing: run `make vllm-env` first")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    qps(args) if args.qps else agreement(args)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
