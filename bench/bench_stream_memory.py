"""Peak memory of compression with and without streaming, by model depth; and runs under a
memory cap smaller than the model.

Random-weight Llama models of one width (default hidden 2048, TinyLlama's shapes) and several
depths are saved as sharded safetensors; each run is a fresh process (peak RSS is a process
high-water mark) that compresses one with `--stream off` (the whole model in memory) or `on`
(one decoder layer at a time). Prints a markdown table: layers, model size, mode, peak RSS,
seconds; JSON rows go to --out-dir/results.json as they finish.

  python bench/bench_stream_memory.py                      # W4A16 GPTQ, 4/16/32 layers,
                                                           # off / on / bounded
  python bench/bench_stream_memory.py --cap-gb 3 --cap-layers 48   # + capped runs (cgroup limit):
      W8A8-FP8 (data-free) and W4A16 GPTQ on the deepest model streamed inside a cgroup memory
      limit smaller than the model, each checkpoint then compared byte for byte with an
      uncapped in-memory run's and loaded by transformers (compressed-tensors), its weights
      checked against ours

Random weights are right for memory and time, never for quality.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from tritonpress.cli import compress_from_flags as compress
from tritonpress.report import peak_cpu_bytes
c = json.loads(sys.argv[1])
if c.get("bounded"):   # what compress() chooses when the model exceeds the memory available
    assert c["stream"] == "on"
    from tritonpress.loop.stream import map_large_allocations
    map_large_allocations()
t0 = time.perf_counter()
r = compress(c["model"], c["scheme"], c["out"], method=c.get("method"), dataset="canterbury",
             num_samples=c["n"], seq_len=c["seq"], group_size=c.get("group_size"),
             evaluate_quality=False, progress=False, device="cpu", stream=c["stream"],
             overwrite=True, max_shard_bytes=c.get("shard"))
print(json.dumps({"cpu_rss": peak_cpu_bytes(), "seconds": time.perf_counter() - t0,
                  "streamed": r["streamed"], "compress_s": r["seconds"]["compress"]}))
"""


def make_model(path: Path, layers: int, hidden: int, intermediate: int) -> int:
    """A random Llama saved as bf16 safetensors shards of 1 GB; returns its bf16 bytes."""
    from tritonpress.models import byte_tokenizer, random_llama
    if not (path / "config.json").is_file():
        model = random_llama(hidden=hidden, intermediate=intermediate, heads=hidden // 64,
                             kv_heads=max(1, hidden // 512), layers=layers, vocab=32000)
        model.save_pretrained(path, max_shard_size="1GB")
        byte_tokenizer().save_pretrained(path)   # byte tokenizer: ids < 258 fit any vocab
        del model
    cfg = json.loads((path / "config.json").read_text())
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * (n * per_layer + 2 * cfg["vocab_size"] * h + h)


def run(case: dict, cap_bytes: int | None = None, timeout: float = 3600) -> dict:
    """One compress in a fresh process, optionally inside a cgroup memory limit."""
    cmd = [sys.executable, "-c", CHILD, json.dumps(case)]
    group = None
    if cap_bytes is not None:
        group = memory_cgroup(cap_bytes)
        if group is None:
            return {"error": "no writable cgroup memory controller here (needs root and "
                             "/sys/fs/cgroup/memory, or cgroup v2 with the memory controller)"}
    t0 = time.perf_counter()
    try:
        preexec = None
        if group is not None:
            procs = group / "cgroup.procs"
            preexec = lambda: procs.write_text(str(os.getpid()))  # noqa: E731
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        peak = _cgroup_peak(group)
        if group is not None:
            _remove_cgroup(group)
    res = {"wall_s": time.perf_counter() - t0, "cgroup_peak": peak}
    if out.returncode:
        killed = out.returncode in (-9, 137)
        res["error"] = ("killed: out of memory under the cap" if killed else
                        (out.stderr.strip().splitlines() or ["failed"])[-1])
        return res
    res.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return res


def memory_cgroup(limit: int) -> Path | None:
    """A fresh memory cgroup limited to `limit` bytes (v1, or v2), or None if none can be made."""
    for root, files in ((Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes",
                                                         "memory.memsw.limit_in_bytes")),
                        (Path("/sys/fs/cgroup"), ("memory.max", "memory.swap.max"))):
        if not (root / files[0]).exists() and not (root / "cgroup.controllers").exists():
            continue
        g = root / f"tritonpress-bench-{os.getpid()}-{time.monotonic_ns()}"
        try:
            g.mkdir()
            (g / files[0]).write_text(str(limit))
            if (g / files[1]).exists():      # no swapping past the cap either
                try:
                    (g / files[1]).write_text(str(limit) if "memsw" in files[1] else "0")
                except OSError:
                    pass
            return g
        except OSError:
            _remove_cgroup(g)
    return None


def _cgroup_peak(g: Path | None) -> int | None:
    for f in ("memory.max_usage_in_bytes", "memory.peak"):
        if g is not None and (g / f).exists():
            try:
                return int((g / f).read_text())
            except (OSError, ValueError):
                return None
    return None


def _remove_cgroup(g: Path) -> None:
    for _ in range(50):
        try:
            g.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def same_files(a: Path, b: Path) -> bool:
    fa = sorted(p.name for p in a.iterdir() if p.is_file())
    fb = sorted(p.name for p in b.iterdir() if p.is_file())
    return fa == fb and all((a / n).read_bytes() == (b / n).read_bytes() for n in fa)


def check_loads(ckpt: Path) -> str:
    """transformers + compressed-tensors load the checkpoint, decompressed, with exactly the
    weights our reader reconstructs (QuantizedWeight.dequantize)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    from tritonpress.checkpoint import load_quantized_weights
    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True))
    qw = load_quantized_weights(ckpt)
    bad = [n for n, q in qw.items()
           if not torch.equal(model.get_submodule(n).weight, q.dequantize(torch.bfloat16))]
    return "exact" if not bad else f"{len(bad)} weights differ, e.g. {bad[0]}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="4,16,32")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--samples", type=int, default=4, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cap-gb", type=float, default=None, help="also run capped at this size")
    p.add_argument("--modes", default="off,on,bounded",
                   help="depth rows: off (whole model in memory), on (streamed), bounded "
                        "(streamed with the fixed mmap threshold compress() chooses when the "
                        "model exceeds the memory available); '' for none")
    p.add_argument("--shard-mb", type=int, default=256, help="output shard size of the depth rows")
    p.add_argument("--cap-layers", type=int, default=None,
                   help="depth of the capped runs' model (default: the deepest of --layers)")
    p.add_argument("--cap-shard-mb", type=int, default=32,
                   help="output shard size of the capped runs")
    p.add_argument("--no-cap-reference", action="store_true",
                   help="skip the uncapped in-memory runs the capped checkpoints are compared "
                        "with byte for byte (the tests compare the two paths on small models)")
    p.add_argument("--out-dir", default="out/stream_memory")
    p.add_argument("--models-dir", default=None, help="where the random models are saved "
                   "(default OUT_DIR/models; several GB)")
    a = p.parse_args(argv)
    out = Path(a.out_dir)
    models = Path(a.models_dir) if a.models_dir else out / "models"
    out.mkdir(parents=True, exist_ok=True)
    prior = out / "results.json"            # rows of earlier runs are kept (another --modes)
    results, rows = (json.loads(prior.read_text()) if prior.is_file() else []), []

    def record(row):
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(row), flush=True)

    # one shard size for every run, so the uncapped in-memory run of the deepest model is
    # also the reference the capped runs are compared with byte for byte
    shard = a.shard_mb * 2**20
    w4 = dict(scheme="W4A16", method="gptq", n=a.samples, seq=a.seq_len, group_size=128,
              shard=shard)
    for n in [int(x) for x in a.layers.split(",")]:
        path = models / f"llama-h{a.hidden}-l{n}"
        size = make_model(path, n, a.hidden, a.intermediate)
        for mode in [m for m in a.modes.split(",") if m]:
            r = run(dict(w4, model=str(path), out=str(out / f"ckpt-l{n}-{mode}"),
                         stream="on" if mode == "bounded" else mode, bounded=mode == "bounded"))
            record(dict(layers=n, model_bytes=size, stream=mode, shard=shard, **r))
            rows.append((n, size, mode, r))
    print("\n| layers | model bf16 GB | stream | peak RSS GB | compress s |\n|---|---|---|---|---|")
    for n, size, mode, r in rows:
        rss = f"{r['cpu_rss'] / 1e9:.2f}" if "cpu_rss" in r else r.get("error")
        print(f"| {n} | {size / 1e9:.2f} | {mode} | {rss} | {r.get('compress_s', 0):.1f} |")

    if a.cap_gb:
        n = a.cap_layers or max(int(x) for x in a.layers.split(","))
        path = models / f"llama-h{a.hidden}-l{n}"
        size = make_model(path, n, a.hidden, a.intermediate)
        cap = int(a.cap_gb * 1e9)
        shard = a.cap_shard_mb * 2**20
        print("\n| scheme | model GB | cap GB | finished | cgroup peak GB | compress s | same bytes "
              "as uncapped in-memory | transformers load |\n|---|---|---|---|---|---|---|---|")
        for case in (dict(scheme="W8A8_FP8", method="rtn", n=0, seq=0), w4):
            tag = case["scheme"]
            capped = dict(case, model=str(path), out=str(out / f"capped-l{n}-{tag}"),
                          stream="on", shard=shard)
            r = run(capped, cap_bytes=cap)
            ref_out = out / f"uncapped-l{n}-{tag}"
            rr = (run(dict(capped, out=str(ref_out), stream="off"))
                  if "error" not in r and not a.no_cap_reference else {"error": "skipped"})
            same = ("-" if rr.get("error") == "skipped" else "error" not in r
                    and "error" not in rr and same_files(Path(capped["out"]), ref_out))
            load = check_loads(Path(capped["out"])) if "error" not in r else "-"
            record(dict(capped=tag, layers=n, model_bytes=size, cap=cap, shard=shard, result=r,
                        uncapped=rr, same_bytes=same, load=load))
            peak = r.get("cgroup_peak")
            print(f"| {tag} | {size / 1e9:.2f} | {a.cap_gb:g} | {r.get('error', 'yes')} | "
                  f"{peak / 1e9 if peak else float('nan'):.2f} | {r.get('compress_s', 0):.1f} | "
                  f"{same} | {load} |", flush=True)


if __name__ == "__main__":
    main()
