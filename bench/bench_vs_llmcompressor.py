"""tritonpress vs llm-compressor on one model: compress time and quality, same data.

For each scheme both tools get the SAME calibration windows (saved as input_ids for
llm-compressor, which runs in its own venv through bench/llmc_oneshot.py) and every
checkpoint, theirs and ours, is scored on the SAME held-out windows against the bf16 model
(perplexity and KL per text source, dynamic activation quantization simulated for W8A8).
Our RTN checkpoint is there for reference: a calibrated method should beat it.

  python bench/bench_vs_llmcompressor.py --schemes W4A16,W8A8_INT8,W8A8_FP8 --out-dir out/vs_llmc
  python bench/bench_vs_llmcompressor.py --model gemma3-270m --schemes W4A16 --eval-windows 8
  python bench/bench_vs_llmcompressor.py --tiny          # CI smoke run, seconds

Windows start with BOS when the model's tokenizer puts one first (data.py); llm-compressor gets
the same input_ids. gemma3-270m's bf16 references take 2.1 GB per 8 x 512 windows of a text.

Times: "compress" is each tool's own compression time (llm-compressor's `oneshot` call,
tritonpress' report["seconds"]["compress"], both including calibration forwards); "process"
is the whole subprocess (imports, load, save) in wall and CPU seconds (CPU seconds are less
sensitive to a machine shared with other work); "save" writes the checkpoint (llm-compressor
quantizes the weights there: its FP8 oneshot only computes scales). speedup =
llm-compressor's compress seconds / this row's. Results accumulate in OUT_DIR/results.json
(rows replaced by scheme/tool/method), so schemes can be run one at a time. After the table, where each tritonpress run's compress
seconds went (the report's profile: capture, statistics passes, Hessians, solves, propagation),
beside llm-compressor's total for the scheme.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402

# scheme -> llm-compressor recipe (bench/llmc_oneshot.py) and our uncalibrated reference
SCHEMES = {
    "W4A16": dict(recipe="gptq-w4a16", reference="rtn"),
    "W8A8_INT8": dict(recipe="gptq-w8a8", reference="rtn"),
    "W8A8_FP8": dict(recipe="fp8", reference=None),          # our default is RTN already
    "W8A8_FP8_24": dict(recipe="sparsegpt-fp8", reference="magnitude"),
    # ours only: llm-compressor's AWQ does not run on a CPU (its time is reported beside)
    "W4A16_ASYM": dict(recipe=None, reference=None, method="awq"),
    # a row name, not a scheme: SmoothQuant 0.8 before GPTQ in both tools
    "W8A8_INT8+SQ": dict(recipe="smoothquant-gptq-w8a8", reference=None, scheme="W8A8_INT8",
                         opts={"smoothquant": 0.8}),
    # issue #29's schemes, llm-compressor's presets of the same names (bench/llmc_oneshot.py):
    # fp8 blocks data-free in both, the 4-bit grids by GPTQ in both (tritonpress' defaults)
    "FP8_BLOCK": dict(recipe="rtn-FP8_BLOCK", reference=None),
    "NVFP4A16": dict(recipe="gptq-NVFP4A16", reference="rtn"),
    "NVFP4": dict(recipe="gptq-NVFP4", reference="rtn"),
    "MXFP4A16": dict(recipe="gptq-MXFP4A16", reference="rtn"),
    "MXFP4": dict(recipe="gptq-MXFP4", reference="rtn"),
    "W4A8": dict(recipe="gptq-W4A8", reference="rtn"),
    "W4AFP8": dict(recipe="gptq-W4AFP8", reference="rtn"),
}
GROUPED = ("W4A16", "W4A16_ASYM", "W4A8", "W4AFP8")   # --group-size applies (int 4-bit groups)
SOURCES = ("canterbury", "code")


# ----------------------------------------------------------------------------- runs

def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_logged(cmd: list[str], log: Path, env=None) -> tuple[str, float, float, float]:
    """Run cmd with stdout+stderr to `log`; (stdout text, wall s, CPU s of the child, load average at the start)."""
    load, cpu0, t0 = os.getloadavg()[0], _child_cpu(), time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - cpu0
    text = log.read_text(errors="replace")
    if proc.returncode:
        tail = "\n".join(text.splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); "
                           f"log {log}:\n{tail}")
    return text, wall, cpu, load


def _last_json(text: str, key: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and key in line:
            return json.loads(line)
    raise RuntimeError(f"no JSON line with {key!r} in the output")


def run_llmc(llmc_python: str, model_dir: Path, calib: Path, recipe: str, group_size: int,
             out: Path, logs: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [llmc_python, str(common.LLMC_ONESHOT),
           *common.llmc_oneshot_args(model_dir, calib, recipe, group_size=group_size, out=out)]
    text, wall, cpu, load = _run_logged(cmd, logs / f"{out.name}.log")
    res = _last_json(text, '"seconds"')
    return {"compress_s": res["seconds"], "save_s": res.get("save_seconds"), "process_s": wall,
            "process_cpu_s": cpu, "load_avg_start": load}


def run_ours(model: str, scheme: str, method: str, out: Path, opts: dict, logs: Path) -> dict:
    """tritonpress compress() in a fresh process, like llm-compressor (same imports/load cost)."""
    shutil.rmtree(out, ignore_errors=True)
    job = dict(model=model, scheme=scheme, out=str(out), method=method, **opts)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    text, wall, cpu, load = _run_logged(cmd, logs / f"{out.name}.log")
    res = _last_json(text, '"worker"')
    return {"compress_s": res["seconds"]["compress"], "save_s": res["seconds"].get("save"),
            "process_s": wall, "process_cpu_s": cpu, "load_avg_start": load,
            "seconds": res["seconds"], "profile": res.get("profile")}


def worker(job: dict) -> None:
    from tritonpress.cli import compress_from_flags as compress
    job.setdefault("dtype", "bfloat16")          # llmc_oneshot.py loads bf16 too
    # the whole model loaded first, as llmc_oneshot.py does: "compress" then times the work its
    # oneshot times (streamed, it would also hold each layer's read and write: FP8 on the MoE
    # 2.4 of its 4.4 s)
    job.setdefault("stream", "off")
    report = compress(job.pop("model"), job.pop("scheme"), job.pop("out"),
                      evaluate_quality=False, progress=False, **job)
    print(json.dumps({"worker": True, "seconds": report["seconds"],
                      "profile": report.get("profile")}), flush=True)


# ----------------------------------------------------------------------------- quality

class Scorer:
    """api.evaluate, with the base model's reference distributions computed once
    and shared by every checkpoint (the same windows, references and evaluate() calls).
    `cache` (a folder) keeps the references between runs; they are reused only for the same
    windows."""

    def __init__(self, base_model: str, windows: int, seq_len: int, sources=SOURCES, cache=None):
        from tritonpress import data
        from tritonpress import quality as evaluate
        from tritonpress import models
        base, tokenizer = models.load_model(base_model, dtype="bfloat16")   # as llm-compressor
        self.windows, self.seq_len, self.sets = windows, seq_len, {}
        for src in sources:
            w = data.eval_windows(tokenizer, src, windows, seq_len)
            path = cache and Path(cache) / f"ref-{src}-{windows}x{seq_len}.pt"
            if path and path.exists():
                w_saved, ref = torch.load(path, weights_only=False)
                if torch.equal(w_saved, w):
                    self.sets[src] = (w, ref)
                    continue
            ref = evaluate.reference(base, w, progress=False)
            if path:
                torch.save((w, ref), path)
            self.sets[src] = (w, ref)
        del base

    def score(self, checkpoint: Path) -> dict:
        from tritonpress import quality as evaluate
        from tritonpress.checkpoint import load_dequantized
        model, act_args, ignore = load_dequantized(checkpoint)
        out = {}
        for src, (w, ref) in self.sets.items():
            r = evaluate.evaluate(model, w, ref=ref, act_args=act_args, ignore=ignore,
                                  progress=False)
            out[src] = {"ppl_before": ref.ppl, "ppl": r["ppl"], "kl": r["kl"]}
        return out


# ----------------------------------------------------------------------------- table

COLUMNS = ("scheme", "tool", "method", "compress s", "speedup", "save s", "process s",
           "process cpu s", "zeros", *(f"ppl {s}" for s in SOURCES), *(f"KL {s}" for s in SOURCES))


def _f(x, nd):
    return "-" if x is None else f"{x:.{nd}f}"


def add_speedups(rows: list[dict]) -> None:
    """speedup = llm-compressor's compress seconds / the row's, same scheme."""
    llmc = {r["scheme"]: r["compress_s"] for r in rows if r["tool"] == "llm-compressor"}
    for r in rows:
        r["speedup"] = (llmc[r["scheme"]] / r["compress_s"]
                        if r["scheme"] in llmc and r.get("compress_s") else None)


def table(rows: list[dict]) -> str:
    add_speedups(rows)
    lines = [COLUMNS]
    for r in rows:
        q = r.get("quality") or {}
        lines.append((r["scheme"], r["tool"], r["method"], _f(r.get("compress_s"), 1),
                      _f(r.get("speedup"), 2) + ("x" if r.get("speedup") else ""),
                      _f(r.get("save_s"), 1), _f(r.get("process_s"), 1),
                      _f(r.get("process_cpu_s"), 1),
                      _f(r.get("zero_fraction"), 3),
                      *(_f(q.get(s, {}).get("ppl"), 3) for s in SOURCES),
                      *(_f(q.get(s, {}).get("kl"), 5) for s in SOURCES)))
    return common.md_table(lines[0], lines[1:])


def profile_table(rows: list[dict]) -> str:
    """Seconds per compress step of each tritonpress row, llm-compressor's total beside."""
    llmc = {r["scheme"]: r["compress_s"] for r in rows if r["tool"] == "llm-compressor"}
    mine = [r for r in rows if r["tool"] == "tritonpress" and r.get("profile")]
    steps: list[str] = []
    for r in mine:
        steps += [k for k in r["profile"] if k not in steps and k != "other"]
    flow = ("capture", "statistics pass", "hessian", "smoothquant", "awq search", "clip search",
            "gptq solve", "sparsegpt solve", "quantize", "rtn", "propagate")   # pipeline order
    steps.sort(key=lambda k: flow.index(k) if k in flow else len(flow))
    head = ("scheme", "method", *steps, "other", "compress s", "llm-compressor s")
    lines = [head]
    for r in mine:
        p = r["profile"]
        lines.append((r["scheme"], r["method"],
                      *(_f(p[k]["seconds"], 1) if k in p else "-" for k in (*steps, "other")),
                      _f(r["compress_s"], 1), _f(llmc.get(r["scheme"]), 1)))
    return common.md_table(lines[0], lines[1:])


def save(rows: list[dict], meta: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, path)


def upsert(rows: list[dict], row: dict) -> None:
    key = (row["scheme"], row["tool"], row["method"])
    rows[:] = [r for r in rows if (r["scheme"], r["tool"], r["method"]) != key] + [row]


# ----------------------------------------------------------------------------- main

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m",
                    help="built-in name (smollm2-135m, gemma3-270m: converted once into the "
                         "cache, the folder both tools load) or a local HF dir")
    ap.add_argument("--schemes", default="W4A16,W8A8_INT8,W8A8_FP8",
                    help=f"comma list of {', '.join(SCHEMES)}")
    ap.add_argument("--group-size", type=int, default=64,
                    help=f"group of {', '.join(GROUPED)} (SmolLM2's hidden 576 is not a "
                         "multiple of 128)")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat-template", action="store_true",
                    help="calibration windows as user turns of the model's chat template "
                         "(both tools get the same windows)")
    ap.add_argument("--variant", action="append", default=[], metavar="METHOD[:KEY=VALUE,...]",
                    help="an extra tritonpress row for each scheme, e.g. gptq:clip=false, "
                         "gptq:actorder=null or awq+gptq (values are JSON); repeatable")
    ap.add_argument("--no-reference", action="store_true", help="skip our RTN reference rows")
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--skip-ours", action="store_true", help="only llm-compressor's rows")
    ap.add_argument("--llmc-python", default=str(common.LLMC_VENV_PYTHON))
    ap.add_argument("--out-dir", default=str(ROOT / "out" / "bench_vs_llmc"))
    ap.add_argument("--delete-checkpoints", action="store_true",
                    help="remove each checkpoint once scored (kept by default, in OUT_DIR/checkpoints)")
    ap.add_argument("--tiny", action="store_true",
                    help="CI size: 8 x 64 calibration, 2 x 64 eval; llm-compressor skipped if "
                         "its python is missing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.num_samples, args.seq_len, args.eval_windows, args.eval_seq_len = 8, 64, 2, 64
    args.schemes = [s.strip().upper() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in args.schemes if s not in SCHEMES]
    if bad:
        ap.error(f"unknown scheme(s) {bad}: choose from {', '.join(SCHEMES)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return []
    from tritonpress import data
    from tritonpress import models

    out_dir = Path(args.out_dir).resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    ckpts = out_dir / "checkpoints"
    model_dir = models.model_path(args.model).resolve()    # a built-in: its converted folder
    use_llmc = not args.skip_llmc
    if use_llmc and not Path(args.llmc_python).exists():
        if not args.tiny:
            raise SystemExit(f"llm-compressor's python {args.llmc_python} not found: run "
                             "`make llmc-env`, pass --llmc-python, or --skip-llmc")
        print(f"[bench] {args.llmc_python} missing: llm-compressor skipped (--tiny)")
        use_llmc = False

    # the calibration windows, exactly as compress() makes them (same source, sizes, seed)
    tokenizer = models.load_model(model_dir)[1]
    batches = data.calibration_batches(tokenizer, "canterbury", args.num_samples, args.seq_len,
                                       seed=args.seed, chat_template=args.chat_template)
    calib = out_dir / "calib_input_ids.pt"
    torch.save(torch.cat([b["input_ids"] for b in batches]), calib)

    results = out_dir / "results.json"
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.node()}",
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "model": str(args.model), "group_size": args.group_size,
            "calibration": f"canterbury {args.num_samples} x {args.seq_len} seed {args.seed}"
                           f"{' chat template' if args.chat_template else ''}"
                           f"{' BOS first' if data.bos_prefix(tokenizer) else ''}",
            "eval": f"{'+'.join(SOURCES)} {args.eval_windows} x {args.eval_seq_len} each"}
    opts = dict(dataset="canterbury", num_samples=args.num_samples, seq_len=args.seq_len,
                seed=args.seed, chat_template=args.chat_template)
    t0 = time.perf_counter()
    scorer = Scorer(str(model_dir), args.eval_windows, args.eval_seq_len, cache=out_dir)
    print(f"[bench] reference distributions: {time.perf_counter() - t0:.0f}s", flush=True)
    bf16 = {"scheme": "-", "tool": "bf16", "method": "-",
            "quality": {s: {"ppl": scorer.sets[s][1].ppl, "kl": 0.0} for s in SOURCES}}
    upsert(rows, bf16)

    def record(scheme, tool, method, timing, ckpt):
        t = time.perf_counter()
        row = {"scheme": scheme, "tool": tool, "method": method, **timing,
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "load_avg_end": os.getloadavg()[0], "size_bytes": _dir_size(ckpt),
               "zero_fraction": _zero_fraction(ckpt),
               "checkpoint": str(ckpt)}
        try:
            row["quality"] = scorer.score(ckpt)
        except Exception as e:  # keep the timing and the checkpoint; rescore it by hand
            row["quality"], row["eval_error"] = {}, f"{type(e).__name__}: {e}"
            print(f"[bench] scoring {ckpt} failed: {row['eval_error']}", flush=True)
        row["eval_s"] = time.perf_counter() - t
        upsert(rows, row)
        save(rows, meta, results)
        print(f"[bench] {scheme} {tool} {method}: compress {row['compress_s']:.1f}s, "
              f"process {row['process_s']:.1f}s, eval {row['eval_s']:.0f}s, "
              f"KL {[row['quality'].get(s, {}).get('kl') for s in SOURCES]}", flush=True)
        if args.delete_checkpoints and "eval_error" not in row:
            shutil.rmtree(ckpt, ignore_errors=True)

    from tritonpress.recipe import default_recipe, recipe_label
    from tritonpress.schemes import get_scheme
    for scheme in args.schemes:
        spec, gs = SCHEMES[scheme], (args.group_size if scheme in GROUPED else None)
        method = spec.get("method") or recipe_label(
            default_recipe(get_scheme(spec.get("scheme", scheme))))
        runs = [] if args.skip_ours else [(method, method, {})]      # (row label, method, options)
        if spec["reference"] and runs and not args.no_reference:
            runs.append((spec["reference"], spec["reference"], {}))
        for v in args.variant:
            m, _, kv = v.partition(":")
            runs.append((v, m, {k: json.loads(x) for k, x in (p.split("=", 1)
                                                              for p in kv.split(",") if p)}))
        for name, method, extra in runs:
            out = ckpts / f"{scheme}-tp-{''.join(c if c.isalnum() else '-' for c in name)}"
            timing = run_ours(args.model, spec.get("scheme", scheme), method, out,
                              dict(opts, group_size=gs, **spec.get("opts", {}), **extra),
                              out_dir / "logs")
            record(scheme, "tritonpress", name, timing, out)
        if use_llmc and spec["recipe"]:
            out = ckpts / f"{scheme}-llmc"
            timing = run_llmc(args.llmc_python, model_dir, calib, spec["recipe"],
                              args.group_size, out, out_dir / "logs")
            method = spec["recipe"] + (" (static actorder)" if "gptq" in spec["recipe"] else "")
            record(scheme, "llm-compressor", method, timing, out)

    meta["seconds_total"] = round(time.perf_counter() - t0, 1)
    order = {s: i for i, s in enumerate(["-", *SCHEMES])}
    rows.sort(key=lambda r: (order.get(r["scheme"], 99), r["tool"] != "llm-compressor"))
    add_speedups(rows)
    save(rows, meta, results)
    print(f"\n{meta['model']}: calibration {meta['calibration']}; eval {meta['eval']}; "
          f"{meta['machine']}, torch threads {meta['torch_threads']}")
    print(table(rows))
    if any(r.get("profile") for r in rows):
        print("\nwhere tritonpress' compress seconds went (report['profile']):")
        print(profile_table(rows))
    print(f"results: {results}")
    return rows


def _zero_fraction(path: Path) -> float | None:
    """Fraction of exact zeros in the decoder layers' 2-D weights (dense forms): a 2:4 row
    must show 0.5, or the tool did not prune."""
    from safetensors import safe_open
    zeros = total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if ".layers." in k and k.endswith(".weight"):
                    t = st.get_tensor(k)
                    if t.dim() == 2:
                        if t.dtype == torch.float8_e4m3fn:     # +0 and -0
                            t = t.view(torch.uint8) & 0x7F
                        zeros += int((t == 0).sum())
                        total += t.numel()
    return zeros / total if total else None


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


if __name__ == "__main__":
    main()
