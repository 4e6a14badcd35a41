"""Compression speed: end-to-end time and peak memory per scheme, against llm-compressor.

    python bench/bench_compress_speed.py out/compress          # GPU: 2-layer Llama-3-8B shapes
    python bench/bench_compress_speed.py out/compress --llmc-python .venv-llmc/bin/python
    python bench/bench_compress_speed.py out/compress --small  # CPU: tiny model, seconds

Model: a Llama with random weights and Llama-3-8B layer shapes (hidden 4096, intermediate
14336, 32 heads, 8 kv heads, vocab 32000), 2 decoder layers, bf16, saved once to OUT/_model;
calibration 64 windows x 2048 tokens (the llm-compressor anchors' setting) cut from a
generated text file (no network: timing does not depend on the words). --shape smollm2 uses
SmolLM2-135M's layer shapes instead, --small a tiny model for CI (8 x 64 tokens).

Per scheme, tritonpress.api.compress(MODEL_DIR, scheme, out, method=its default)
runs in this process, after a warm-up on a tiny model that compiles the Triton kernels (its
seconds are reported apart: a first run pays them once per machine and kernel cache).
Measured: the "compress" seconds of compress()'s own report (calibration forwards and the
algorithm, which is what llm-compressor's `oneshot` time covers too), load and save seconds,
peak GPU memory allocated, peak resident CPU memory of the step (VmHWM, reset before each
scheme), and the checkpoint's size. llm-compressor runs the matching recipe through
bench/llmc_oneshot.py on the same model directory and the same token windows, in the python
given by --llmc-python (default: this one when it can import llmcompressor, else
.venv-llmc/bin/python when present), one subprocess per recipe; its peak memory is read the
same way inside that process. speedup = llm-compressor seconds / ours.

Writes compress_speed.json, and compress_speed.png (seconds) and compress_memory.png (peak
GPU memory, or peak RSS on the CPU) when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common, plots  # noqa: E402

SHAPES = {   # random_llama arguments (2 decoder layers each)
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000),
    "smollm2": dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152),
    "tiny": dict(hidden=128, intermediate=256, heads=4, kv_heads=2, vocab=512),
}
# scheme -> (our default method, llm-compressor recipe in bench/llmc_oneshot.py)
SCHEMES = {   # in the order they run: the costliest calibrated methods first
    "W4A16": ("gptq", "gptq-w4a16"),
    "W8A8_FP8_24": ("sparsegpt", "sparsegpt-fp8"),
    "W8A8_INT8": ("gptq", "gptq-w8a8"),
    "W4A16_ASYM": ("awq", "awq-w4a16-asym"),
    "W8A8_FP8": ("rtn", "fp8"),
}
GIB = 2 ** 30


# ----------------------------------------------------------------------------- memory

def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux: VmHWM), so each step reads its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- inputs

def write_calibration_text(path: Path, n_chars: int, seed: int = 0) -> Path:
    """Lines of random lowercase words: enough bytes for the windows (the byte-level
    tokenizer makes one token per byte), no download."""
    gen = torch.Generator().manual_seed(seed)
    letters = torch.randint(0, 27, (n_chars,), generator=gen)
    chars = bytes(32 if c == 26 else 97 + c for c in letters.tolist()).decode()
    lines = [chars[i:i + 79] for i in range(0, n_chars, 79)]
    path.write_text("\n".join(lines) + "\n")
    return path


def build_model(model_dir: Path, shape: str, seed: int = 0) -> Path:
    """Save a 2-layer random Llama of the given shape with the byte-level tokenizer."""
    from tritonpress.models import random_llama
    if (model_dir / "config.json").is_file():
        return model_dir
    device = "cuda" if torch.cuda.is_available() else "cpu"   # random numbers are faster there
    model = random_llama(**SHAPES[shape], layers=2, seed=seed, max_positions=4096, device=device)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    common.save_with_tokenizer(model, tmp)
    os.replace(tmp, model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return model_dir


# ----------------------------------------------------------------------------- ours

def run_ours(scheme: str, model_dir: Path, calib: Path, out: Path, samples: int, seq_len: int,
             device: str) -> dict:
    from tritonpress.cli import compress_from_flags as compress
    method = SCHEMES[scheme][0]
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    reset_peak_rss()
    report = compress(str(model_dir), scheme, str(out), method=method, dataset=str(calib),
                      num_samples=samples, seq_len=seq_len, evaluate_quality=False,
                      device=device, overwrite=True, progress=False,
                      report_path=str(out) + ".report.json")
    s = report["seconds"]
    row = dict(tool="tritonpress", scheme=scheme, method=method, seconds=s["compress"],
               load_s=s.get("load"), save_s=s.get("save"), total_s=s["total"],
               peak_gpu_bytes=report["memory"].get("gpu"), peak_rss_bytes=peak_rss_bytes(),
               size_bytes=report.get("size_bytes"), original_bytes=report.get("original_bytes"))
    shutil.rmtree(out, ignore_errors=True)
    return row


def warm_up(scheme: str, calib: Path, device: str) -> float:
    """Compile and first-use costs on a tiny model, so the timed run measures the work."""
    from tritonpress.cli import compress_from_flags as compress
    from tritonpress.models import byte_tokenizer, random_llama
    tok = byte_tokenizer()
    model = random_llama(128, 256, 4, 2, layers=1, vocab=len(tok), tie=True)
    model.tokenizer = tok
    t = time.perf_counter()
    compress(model, scheme, None, method=SCHEMES[scheme][0], dataset=str(calib), num_samples=2,
             seq_len=64, evaluate_quality=False, device=device, progress=False)
    return round(time.perf_counter() - t, 3)


# ----------------------------------------------------------------------------- llm-compressor

LLMC_WRAPPER = r"""
import json, runpy, sys, torch
sys.argv = ["llmc_oneshot.py"] + sys.argv[1:]
try:
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
runpy.run_path(%r, run_name="__main__")
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps({"peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                  else None, "peak_rss_bytes": int(hwm[0].split()[1]) * 1024 if hwm else None}))
"""


def run_llmc(python: str, scheme: str, model_dir: Path, calib_ids: Path, timeout: float) -> dict:
    recipe = SCHEMES[scheme][1]
    cmd = [python, "-c", LLMC_WRAPPER % str(common.LLMC_ONESHOT),
           *common.llmc_oneshot_args(model_dir, calib_ids, recipe, group_size=128)]
    row = dict(tool="llm-compressor", scheme=scheme, method=recipe)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {timeout:.0f} s")
    row["process_s"] = round(time.perf_counter() - t, 2)
    found = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            try:
                found.update(json.loads(line))
            except json.JSONDecodeError:
                pass
    if p.returncode != 0 or "seconds" not in found:
        return dict(row, error=(p.stderr.strip().splitlines() or ["no output"])[-1][:300])
    return dict(row, seconds=round(found["seconds"], 3), peak_gpu_bytes=found.get("peak_gpu_bytes"),
                peak_rss_bytes=found.get("peak_rss_bytes"))


def llmc_version(python: str) -> str | None:
    try:
        p = subprocess.run([python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                           capture_output=True, text=True, timeout=120)
        lines = p.stdout.strip().splitlines()   # its logger may print first
        return lines[-1].strip() if lines else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ----------------------------------------------------------------------------- run

def run(out_dir: str, shape: str, samples: int, seq_len: int, schemes: list[str],
        llmc_python: str | None, budget_s: float | None, device: str, warm: bool,
        llmc_timeout: float = 300) -> dict:
    from tritonpress.data import calibration_batches
    from tritonpress.models import byte_tokenizer

    t_start = time.time()
    out = Path(out_dir)
    work = out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    # 90% of each document is the calibration split; 30% spare for the random offset
    n_chars = int(samples * seq_len * 1.3 / 0.9) + 4 * seq_len
    calib = write_calibration_text(work / "calib.txt", n_chars)
    t = time.perf_counter()
    model_dir = build_model(work / f"model-{shape}", shape)
    build_s = round(time.perf_counter() - t, 1)
    # the exact windows compress() will draw (same seed), for llm-compressor
    ids = torch.cat([b["input_ids"] for b in calibration_batches(byte_tokenizer(), str(calib),
                                                                 samples, seq_len, seed=0)])
    torch.save(ids, work / "calib_ids.pt")

    info = dict(common.env_info(device == "cuda", date=True), shape=shape, layers=2,
                model=SHAPES[shape], samples=samples, seq_len=seq_len, build_model_s=build_s,
                llmc_python=llmc_python, llmc=llmc_version(llmc_python) if llmc_python else None,
                warm_up=warm)
    common.add_versions(info, ("triton", "transformers"))
    path = out / "compress_speed.json"
    rows, skipped = [], []
    # `timeout` ends us: keep what we have
    previous = signal.signal(signal.SIGTERM, common.raise_stopped)
    try:
        for scheme in schemes:
            if budget_s is not None and time.time() - t_start > budget_s:
                skipped.append(scheme)
                print(f"  {scheme}: skipped (budget of {budget_s:.0f} s spent)", flush=True)
                continue
            try:
                w = warm_up(scheme, calib, device) if warm else None
                row = run_ours(scheme, model_dir, calib, work / f"ckpt-{scheme}", samples,
                               seq_len, device)
                row["warmup_s"] = w
            except Exception as e:
                row = dict(tool="tritonpress", scheme=scheme, method=SCHEMES[scheme][0],
                           error=f"{type(e).__name__}: {e}"[:300])
            rows.append(row)
            print(f"  {scheme:<12} tritonpress {_cell(row)}", flush=True)
            if llmc_python and (budget_s is None or time.time() - t_start < budget_s):
                left = llmc_timeout if budget_s is None else \
                    max(30.0, budget_s - (time.time() - t_start))
                r = run_llmc(llmc_python, scheme, model_dir, work / "calib_ids.pt",
                             min(llmc_timeout, left))
                rows.append(r)
                print(f"  {scheme:<12} llm-compressor {_cell(r)}", flush=True)
            assemble(info, rows, skipped, t_start, path)   # a later kill keeps these rows
    except common.Stopped:
        print("  stopped (SIGTERM): reporting what was measured", flush=True)
        done = {r["scheme"] for r in rows}
        skipped += [s for s in schemes if s not in done and s not in skipped]
    finally:
        signal.signal(signal.SIGTERM, previous)
    result = assemble(info, rows, skipped, t_start, path)
    print_table(result)
    png = plot(result, out / "compress_speed.png")
    print(f"\nwrote {path}" + (f" and {png}" if png else " (no plot: matplotlib is not installed)"))
    return result


def assemble(info: dict, rows: list[dict], skipped: list[str], t_start: float, path: Path):
    """The result so far, with llm-compressor's seconds / ours per scheme; written to path."""
    rows = [dict(r) for r in rows]
    ours = {r["scheme"]: r for r in rows if r["tool"] == "tritonpress"}
    for r in rows:
        mine = ours.get(r["scheme"], {})
        if r["tool"] == "llm-compressor" and r.get("seconds") and mine.get("seconds"):
            mine["speedup_vs_llmc"] = round(r["seconds"] / mine["seconds"], 2)
    result = dict(info=dict(info, skipped=list(skipped), seconds=round(time.time() - t_start, 1)),
                  results=rows)
    path.write_text(json.dumps(result, indent=1))
    return result


def _gib(b):
    return f"{b / GIB:.2f}" if b else "-"


def _mib(b):
    return f"{b / 2**20:.1f}" if b else "-"


def _cell(r):
    if r.get("error"):
        return f"FAILED: {r['error'][:120]}"
    return f"{r['seconds']:.2f} s, peak GPU {_gib(r.get('peak_gpu_bytes'))} GiB, " \
           f"peak RSS {_gib(r.get('peak_rss_bytes'))} GiB"


def print_table(result: dict):
    i = result["info"]
    print(f"\n{i['device']}: 2-layer {i['shape']} Llama, {i['samples']} x {i['seq_len']} "
          f"calibration tokens; llm-compressor {i['llmc'] or 'not available'}")
    head = (f"{'scheme':<12}{'tool':<16}{'method':<16}{'compress s':>11}{'warm-up s':>10}"
            f"{'save s':>8}{'GPU GiB':>9}{'RSS GiB':>9}{'MiB out':>9}{'speedup':>9}")
    print(head)
    for r in result["results"]:
        if r.get("error"):
            print(f"{r['scheme']:<12}{r['tool']:<16}{r['method']:<16}  FAILED: {r['error'][:90]}")
            continue
        sp = f"{r['speedup_vs_llmc']:.2f}x" if r.get("speedup_vs_llmc") else "-"
        print(f"{r['scheme']:<12}{r['tool']:<16}{r['method']:<16}{r['seconds']:>11.2f}"
              f"{r['warmup_s'] if r.get('warmup_s') is not None else '-':>10}"
              f"{r['save_s'] if r.get('save_s') is not None else '-':>8}"
              f"{_gib(r.get('peak_gpu_bytes')):>9}{_gib(r.get('peak_rss_bytes')):>9}"
              f"{_mib(r.get('size_bytes')):>9}{sp:>9}")


def plot(result: dict, path: Path):
    i = result["info"]
    schemes = list(dict.fromkeys(r["scheme"] for r in result["results"]))
    by = {(r["tool"], r["scheme"]): r for r in result["results"]}
    tools = [t for t in ("tritonpress", "llm-compressor")
             if any((t, s) in by for s in schemes)]
    series = {t: [by.get((t, s), {}).get("seconds") for s in schemes] for t in tools}
    methods = {r["scheme"]: r["method"] for r in result["results"] if r["tool"] == "tritonpress"}
    labels = [f"{s}\n({methods.get(s, '-')})" for s in schemes]
    what = (f"2-layer {i['shape']} Llama, {i['samples']}x{i['seq_len']} tokens: {i['device']}, "
            f"{i['date']}")
    note = f"torch {i['torch']}, triton {i.get('triton', '-')}, llm-compressor {i['llmc'] or '-'}"
    png = plots.bar_plot(path, labels, series, "seconds (calibration + algorithm)",
                         f"compression time, {what}", note)
    key = "peak_gpu_bytes" if i["capability"] else "peak_rss_bytes"
    mem = {t: [(by.get((t, s), {}).get(key) or 0) / GIB or None for s in schemes] for t in tools}
    plots.bar_plot(Path(path).with_name("compress_memory.png"), labels, mem,
                   f"peak {'GPU memory allocated' if i['capability'] else 'resident memory'} (GiB)",
                   f"compression peak memory, {what}", note)
    return png


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="folder for compress_speed.json/.png and the work files")
    p.add_argument("--small", action="store_true",
                   help="tiny model, 8 x 64 tokens, RTN/GPTQ/SparseGPT/AWQ on the CPU (CI)")
    p.add_argument("--shape", choices=list(SHAPES), default=None)
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--schemes", default=",".join(SCHEMES),
                   help="comma list of " + ", ".join(SCHEMES))
    p.add_argument("--llmc-python", default=None,
                   help="python with llmcompressor (default: this one if it has it, else "
                        ".venv-llmc/bin/python if present)")
    p.add_argument("--skip-llmc", action="store_true")
    p.add_argument("--llmc-timeout", type=float, default=300)
    p.add_argument("--no-warm-up", action="store_true")
    p.add_argument("--budget", type=float, default=None,
                   help="start no new scheme after this many seconds")
    p.add_argument("--keep-work", action="store_true", help="keep OUT/_work (model, text)")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = a.small or (device == "cpu" and a.shape is None)
    if small and not a.small:
        print("no CUDA GPU: --small (tiny model); pass --shape to force a bigger one")
    shape = a.shape or ("tiny" if small else "llama3-8b")
    samples = a.samples or (8 if small else 64)
    seq_len = a.seq_len or (64 if small else 2048)
    schemes = [s.strip().upper() for s in a.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        p.error(f"unknown scheme(s) {bad}: choose from {', '.join(SCHEMES)}")
    llmc = None if a.skip_llmc else common.find_llmc_python(a.llmc_python)
    result = run(a.out_dir, shape, samples, seq_len, schemes, llmc, a.budget, device,
                 warm=(device == "cuda" and not a.no_warm_up), llmc_timeout=a.llmc_timeout)
    if not a.keep_work:
        shutil.rmtree(Path(a.out_dir) / "_work", ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
