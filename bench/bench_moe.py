"""Compress time on a Mixture-of-Experts model: each layer's experts solved as one batch
(GPTQ(stack_experts=True), the default) against one after another (stack_experts=False), and
AWQ on the same model and calibration, all in one run.

  python bench/upcycle_moe.py out/smollm2-moe            # the 8-expert Mixtral, once
  python bench/bench_moe.py --model out/smollm2-moe --out-dir out/bench_moe
  python bench/bench_moe.py --tiny                       # smoke run: a tiny random Mixtral

Each variant runs tritonpress.compress in a fresh process (the model loaded in bf16, as
bench_vs_llmcompressor.py does), in the order of --order (default: stacked, loop, awq, loop,
stacked: each GPTQ variant twice, on both sides of the others, so that drift in a shared
machine shows). "compress s" is the report's seconds["compress"] (calibration forwards,
statistics, solves, propagation; not loading or saving). Results go to OUT_DIR/results.json
after every run. At the end the stacked and loop checkpoints are compared tensor by tensor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (scheme, recipe as built in the worker)
    "stacked": ("W4A16", "gptq", {"stack_experts": True}),
    "loop": ("W4A16", "gptq", {"stack_experts": False}),
    "awq": ("W4A16_ASYM", "awq", {}),
}


def worker(job: dict) -> None:
    import tritonpress as tp
    scheme, method, opts = VARIANTS[job["variant"]]
    recipe = [tp.GPTQ(**opts)] if method == "gptq" else [tp.AWQ(**opts)]
    report = tp.compress(job["model"], tp.get_scheme(scheme, group_size=job["group_size"]),
                         job["out"], recipe,
                         calibration=tp.Calibration("canterbury", job["num_samples"],
                                                    job["seq_len"]),
                         evaluation=None,
                         run=tp.Run(device="cpu", dtype="bfloat16", progress=False,
                                    overwrite=True))
    print(json.dumps({"worker": True, "seconds": report["seconds"],
                      "profile": report.get("profile")}), flush=True)


def run_variant(name: str, args, out_dir: Path) -> dict:
    out = out_dir / "checkpoints" / name
    shutil.rmtree(out, ignore_errors=True)
    job = dict(variant=name, model=str(args.model), out=str(out), group_size=args.group_size,
               num_samples=args.num_samples, seq_len=args.seq_len)
    log = out_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    load, t0 = os.getloadavg()[0], time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                              stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log}:\n"
                           + "\n".join(text.splitlines()[-25:]))
    res = next(json.loads(line) for line in reversed(text.splitlines())
               if line.startswith('{"worker"'))
    return {"variant": name, "scheme": VARIANTS[name][0], "compress_s": res["seconds"]["compress"],
            "process_s": round(wall, 1), "load_avg_start": round(load, 2),
            "end": datetime.datetime.now().isoformat(timespec="seconds"),
            "profile": {k: v["seconds"] for k, v in (res.get("profile") or {}).items()}}


def same_tensors(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file
    ta, tb = ({k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()}
              for p in (a, b))
    if ta.keys() != tb.keys():
        return {"same_names": False}
    equal = sum(torch.equal(ta[k], tb[k]) for k in ta)
    worst = max((float((ta[k].float() - tb[k].float()).abs().max()) for k in ta
                 if ta[k].is_floating_point() and not torch.equal(ta[k], tb[k])), default=0.0)
    return {"same_names": True, "tensors": len(ta), "bit_identical": equal,
            "max_abs_diff_float": worst}


def tiny_model(folder: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM
    from tritonpress.models import byte_tokenizer
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(byte_tokenizer()), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=8, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def table(rows: list[dict]) -> str:
    steps = ("gptq solve", "clip search", "hessian", "statistics pass", "propagate",
             "awq search")
    out = ["| variant | scheme | compress s | " + " | ".join(steps) + " | load avg at start |",
           "|---|---|---|" + "---|" * len(steps) + "---|"]
    for r in rows:
        p = r["profile"]
        out.append(f"| {r['variant']} | {r['scheme']} | {r['compress_s']:.1f} | "
                   + " | ".join(f"{p[s]:.1f}" if s in p else "-" for s in steps)
                   + f" | {r['load_avg_start']} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "out" / "smollm2-moe"))
    ap.add_argument("--out-dir", default=str(ROOT / "out" / "bench_moe"))
    ap.add_argument("--order", default="stacked,loop,awq,loop,stacked")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Mixtral, seconds")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="bench_moe_"))
        args.model, args.out_dir = str(tiny_model(tmp / "model")), str(tmp / "out")
        args.num_samples, args.seq_len, args.group_size = 4, 32, 32
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.node()}",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "model": args.model, "group_size": args.group_size,
            "calibration": f"canterbury {args.num_samples} x {args.seq_len}"}
    rows, results = [], out_dir / "results.json"
    for name in args.order.split(","):
        rows.append(run_variant(name, args, out_dir))
        print(f"[bench_moe] {name}: compress {rows[-1]['compress_s']:.1f} s", flush=True)
        results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = {r["variant"] for r in rows}
    if {"stacked", "loop"} <= names:
        ck = out_dir / "checkpoints"
        meta["stacked_vs_loop"] = same_tensors(ck / "stacked", ck / "loop")
        results.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    for name in ("stacked", "loop", "awq"):
        got = [r["compress_s"] for r in rows if r["variant"] == name]
        if got:
            print(f"{name}: mean compress {sum(got) / len(got):.1f} s over {len(got)} run(s)")
    if "stacked_vs_loop" in meta:
        print("stacked vs loop checkpoints:", meta["stacked_vs_loop"])


if __name__ == "__main__":
    main()
