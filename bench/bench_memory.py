"""Peak memory of GPTQ compression vs model size (issue #9 item 3).

Each case runs in a fresh subprocess (peak RSS is a per-process high-water mark): the model is
built / loaded on CPU, compress() moves one decoder layer at a time to the device, and the
cached activations stay on CPU (or in files with --spill). Prints a markdown table:
parameters, calibration tokens, peak CPU RSS, peak GPU allocated (CUDA only), seconds.

  python bench/bench_memory.py                 # CPU: demo model + Llama-3-8B ratios at 1/4 width
  python bench/bench_memory.py --llama8b       # + Llama-3-8B layer shapes, 1/2/4 layers (GPU)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

CASE = r"""
import json, sys, time, torch
from tritonpress.cli import compress_from_flags as compress
from tritonpress.models import byte_tokenizer, random_llama
from tritonpress.report import peak_cpu_bytes
c = json.loads(sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(max(1, torch.get_num_threads()))
base = peak_cpu_bytes()
if c["model"] == "demo":
    model = "smollm2-135m"
    nparams = 134_515_008
else:
    h, i, layers = c["shape"]
    model = random_llama(hidden=h, intermediate=i, heads=max(1, h // 128),
                         kv_heads=max(1, h // 512), layers=layers, vocab=c.get("vocab", 32000))
    model.tokenizer = byte_tokenizer()
    nparams = sum(p.numel() for p in model.parameters())
t0 = time.perf_counter()
r = compress(model, "W4A16", None, method="gptq", dataset="canterbury", num_samples=c["n"],
             seq_len=c["seq"], group_size=64, evaluate_quality=False, progress=False, device=dev,
             spill_dir=c.get("spill"))
print(json.dumps({"params": nparams, "cpu_rss": peak_cpu_bytes(), "import_rss": base,
                  "gpu": r["memory"].get("gpu"), "seconds": time.perf_counter() - t0}))
"""


def run_case(case: dict, timeout: float) -> dict:
    try:
        out = subprocess.run([sys.executable, "-c", CASE, json.dumps(case)],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama8b", action="store_true", help="Llama-3-8B layer shapes too")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None)
    p.add_argument("--no-demo", action="store_true", help="skip the demo model (slow on CPU)")
    a = p.parse_args(argv)
    spill = tempfile.mkdtemp(prefix="tp-spill-")
    cases = [] if a.no_demo else [("demo SmolLM2-135M", {"model": "demo"}),
                                  ("demo SmolLM2-135M, spill", {"model": "demo", "spill": spill})]
    for layers in (1, 2, 4):
        cases.append((f"Llama-3-8B ratios 1/4 width, {layers} layers",
                      {"model": "random", "shape": [1024, 3584, layers]}))
    if a.llama8b:
        for layers in (1, 2, 4):
            cases.append((f"Llama-3-8B shapes, {layers} layers",
                          {"model": "random", "shape": [4096, 14336, layers], "vocab": 128256}))
    rows = []
    print(f"| case | params (M) | calib tokens | peak CPU RSS (GiB) | peak GPU (GiB) | s |")
    print("|---|---|---|---|---|---|")
    for name, case in cases:
        case.update(n=a.samples, seq=a.seq_len)
        t0 = time.perf_counter()
        r = run_case(case, a.timeout)
        r["case"] = name
        rows.append(r)
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | | {time.perf_counter() - t0:.0f} |")
            continue
        gpu = "-" if r["gpu"] is None else f"{r['gpu'] / 2**30:.2f}"
        print(f"| {name} | {r['params'] / 1e6:.0f} | {a.samples * a.seq_len} | "
              f"{r['cpu_rss'] / 2**30:.2f} | {gpu} | {r['seconds']:.0f} |", flush=True)
    print(f"\nRSS includes ~{max(r.get('import_rss', 0) for r in rows) / 2**30:.2f} GiB of imports "
          "(torch, transformers). The weights stay on CPU; one decoder layer and its batch's "
          "activations are on the device at a time.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
