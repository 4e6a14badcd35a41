"""AWQ W4A16_ASYM end to end on one GPU: tritonpress against llm-compressor's `oneshot`.

    python bench/bench_awq_gpu.py out/bench_awq            # CUDA: about 2 minutes
    python bench/bench_awq_gpu.py out/bench_awq --llmc-python .venv-llmc/bin/python
    python bench/bench_awq_gpu.py out/bench_awq            # no GPU: tiny shapes, torch path

Model: a 2-layer Llama with random weights and Llama-3-8B shapes (hidden 4096, intermediate
14336, 32 heads, 8 kv heads, vocab 32000), bf16; calibration 64 x 2048 random token ids.
Both tools start from the same weights on the CPU and compute on the GPU one layer at a time.
Rows: tritonpress AWQ (fused grid-search kernel; defaults: x_mean^r scales, clipping search),
tritonpress with llm-compressor's recipe (duo scaling, no clipping), round-to-nearest
(no calibration: the floor any method must beat), and llm-compressor 0.14 AWQModifier
(scheme W4A16_ASYM) - in this process when importable, else in --llmc-python's venv by
re-running this file as a worker there. Measured per row: wall seconds of the compression
(model build and evaluation excluded; our Triton kernels are compiled in a warm-up on a tiny
model first, its seconds reported apart), peak GPU memory allocated, and the output loss:
relative MSE of the final hidden states (after the last norm) on 4 x 2048 held-out tokens
against the float model. Targets: <= 1/4 of llm-compressor's time, <= 1/3 of its peak memory,
equal or lower loss. Prints a table; writes results.json into the folder argument.
"""
from __future__ import annotations

import argparse
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

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FULL = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000,
            samples=64, seq_len=2048, batch=4, eval_windows=4)
TINY = dict(hidden=256, intermediate=768, heads=4, kv_heads=2, vocab=1000,
            samples=8, seq_len=128, batch=4, eval_windows=2)


# ----------------------------------------------------------------------------- shared
# (also run by the llm-compressor worker: torch and transformers only at module level)

@torch.no_grad()
def final_hidden(model, ids: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """Final-norm hidden states [n, seq, hidden] fp32 on CPU, computed where the model is."""
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, ids.shape[0], batch):
        h = model.model(input_ids=ids[i:i + batch].to(dev)).last_hidden_state
        outs.append(h.float().cpu())
    return torch.cat(outs)


def rel_mse(h: torch.Tensor, ref: torch.Tensor) -> float:
    return float((h - ref).pow(2).mean() / ref.pow(2).mean())


# ----------------------------------------------------------------------------- ours

def build_model(cfg, seed=0):
    from tritonpress.models import random_llama
    # built on the GPU (fast random init), kept on the CPU like a loaded checkpoint
    model = random_llama(cfg["hidden"], cfg["intermediate"], cfg["heads"], cfg["kv_heads"],
                         layers=2, vocab=cfg["vocab"], device=DEV, seed=seed)
    return model.to("cpu")


def run_ours(model, state, batches, method, eval_ids, ref, group_size):
    from tritonpress.loop.sequential import compress_sequential
    from tritonpress.schemes import get_scheme

    model.load_state_dict(state)
    model.to("cpu")
    scheme = get_scheme("W4A16_ASYM", group_size=group_size)
    common.reset_peak_memory(empty_cache=True)
    common.sync()
    t0 = time.perf_counter()
    res = compress_sequential(model, batches, scheme, method, device=DEV, offload=True,
                              progress=False)
    common.sync()
    seconds = time.perf_counter() - t0
    peak = common.peak_gib()
    loss = rel_mse(final_hidden(model.to(DEV), eval_ids), ref)
    model.to("cpu")
    ratios = [v["ratio"] for v in res.infos.values() if "smooth" in v]
    return dict(seconds=seconds, peak_gib=peak, loss=loss, linears=len(res.qweights),
                ratios=sorted(set(r for r in ratios if r is not None)),
                mappings_kept_rtn=sum(r is None for r in ratios))


def warm_up(group_size):
    """Compile the Triton kernels on a tiny model with the same block/dtype choices."""
    from tritonpress.methods.awq import AWQ
    from tritonpress.models import random_llama
    from tritonpress.loop.sequential import compress_sequential
    from tritonpress.schemes import get_scheme

    t0 = time.perf_counter()
    m = random_llama(256, 512, 4, 2, layers=1, vocab=512, device=DEV)
    ids = torch.randint(0, 512, (2, 256))
    compress_sequential(m, [{"input_ids": ids}], get_scheme("W4A16_ASYM", group_size=group_size),
                        AWQ(), device=DEV, progress=False)
    common.sync()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- llm-compressor

def llmc_oneshot(model, calib_ids, eval_ids, ref, group_size):
    """llm-compressor 0.14 AWQ W4A16_ASYM oneshot on `model` (on the CPU, as loaded)."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier

    ds = Dataset.from_dict({"input_ids": calib_ids.tolist(),
                            "attention_mask": torch.ones_like(calib_ids).tolist()})
    if group_size == 128:
        recipe = AWQModifier(targets="Linear", ignore=["lm_head"], scheme="W4A16_ASYM")
    else:
        recipe = AWQModifier(targets="Linear", ignore=["lm_head"], config_groups={"group_0": {
            "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": False,
                                               "strategy": "group", "group_size": group_size}}})
    common.reset_peak_memory(empty_cache=True)
    common.sync()
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib_ids.shape[0],
            max_seq_length=calib_ids.shape[1], shuffle_calibration_samples=False)
    common.sync()
    r = dict(seconds=time.perf_counter() - t0, peak_gib=common.peak_gib())
    try:
        try:   # oneshot may leave offloading hooks; evaluate with the whole model on the GPU
            from accelerate.hooks import remove_hook_from_module
            remove_hook_from_module(model, recurse=True)
        except ImportError:
            pass
        r["loss"] = rel_mse(final_hidden(model.to(DEV), eval_ids), ref)
    except Exception as e:  # the time and memory still count
        r["loss_note"] = f"{type(e).__name__}: {e}"[:400]
    import llmcompressor
    r["version"] = getattr(llmcompressor, "__version__", "?")
    return r


def llmc_worker(folder: str):
    """Entry point inside llm-compressor's venv: everything it needs is in `folder`."""
    from transformers import AutoModelForCausalLM
    d = torch.load(f"{folder}/data.pt")
    model = AutoModelForCausalLM.from_pretrained(f"{folder}/model", dtype=torch.bfloat16)
    r = llmc_oneshot(model, d["calib"], d["eval"], d["ref"], d["group_size"])
    print(json.dumps(r), flush=True)


def run_llmc(model, state, calib_ids, eval_ids, ref, group_size, llmc_python):
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        if not llmc_python or not Path(llmc_python).exists():
            return {"note": "llm-compressor not importable and no --llmc-python"}
        with tempfile.TemporaryDirectory(prefix="bench_awq_llmc_") as d:
            model.load_state_dict(state)
            common.save_with_tokenizer(model, f"{d}/model")
            torch.save(dict(calib=calib_ids, eval=eval_ids, ref=ref, group_size=group_size),
                       f"{d}/data.pt")
            p = subprocess.run([llmc_python, __file__, "--llmc-worker", d], capture_output=True,
                               text=True, timeout=900)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode or not lines:
            return {"note": f"worker failed: {p.stderr[-800:]}"}
        return json.loads(lines[-1])
    model.load_state_dict(state)
    return llmc_oneshot(model, calib_ids, eval_ids, ref, group_size)


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(ROOT / "out" / "bench_awq_gpu"))
    ap.add_argument("--llmc-python", default=common.llmc_venv_python())
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--search-tokens", type=int, default=8192)
    ap.add_argument("--skip-llmc", action="store_true")
    ap.add_argument("--llmc-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.llmc_worker:
        return llmc_worker(a.llmc_worker)

    from tritonpress.methods.awq import AWQ
    from tritonpress.methods.rtn import RTN

    cfg = FULL if CUDA else TINY
    if not CUDA:
        print("No GPU: tiny shapes, torch reference path; timings mean nothing.")
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg["vocab"], (cfg["samples"], cfg["seq_len"]), generator=g)
    eval_ids = torch.randint(0, cfg["vocab"], (cfg["eval_windows"], cfg["seq_len"]), generator=g)
    batches = [{"input_ids": calib[i:i + cfg["batch"]]}
               for i in range(0, cfg["samples"], cfg["batch"])]

    out = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
           "config": dict(cfg, group_size=a.group_size, search_tokens=a.search_tokens)}
    t_all = time.perf_counter()
    out["warmup_s"] = warm_up(a.group_size)
    model = build_model(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = final_hidden(model.to(DEV), eval_ids)
    model.to("cpu")

    rows = {}
    for name, fn in [("tritonpress AWQ", AWQ(search_tokens=a.search_tokens)),
                     ("tritonpress AWQ, llmc recipe", AWQ(clip=False, duo_scaling=True,
                                                          search_tokens=a.search_tokens)),
                     ("tritonpress RTN", RTN())]:
        rows[name] = run_ours(model, state, batches, fn, eval_ids, ref, a.group_size)
        print(name, json.dumps(rows[name]), flush=True)
    if CUDA and not a.skip_llmc:
        rows["llm-compressor AWQ"] = run_llmc(model, state, calib, eval_ids, ref, a.group_size,
                                              a.llmc_python)
    else:
        rows["llm-compressor AWQ"] = {"note": "skipped (no GPU: its AWQ needs an accelerator)"
                                      if not CUDA else "skipped (--skip-llmc)"}
    print("llm-compressor AWQ", json.dumps(rows["llm-compressor AWQ"]), flush=True)
    out["rows"] = rows
    out["total_s"] = time.perf_counter() - t_all

    base = rows["llm-compressor AWQ"]
    print(f"\nAWQ W4A16_ASYM g{a.group_size}, 2-layer Llama ({cfg['hidden']}/"
          f"{cfg['intermediate']}), {cfg['samples']} x {cfg['seq_len']} tokens, {out['device']}; "
          f"Triton warm-up {out['warmup_s']:.1f} s (not in the rows)")
    head = ["method", "seconds", "peak GiB", "output rel MSE", "time vs llmc", "mem vs llmc"]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name, r in rows.items():
        tv = (f"{r['seconds'] / base['seconds']:.2f}" if base.get("seconds") and r.get("seconds")
              else "-")
        mv = (f"{r['peak_gib'] / base['peak_gib']:.2f}"
              if base.get("peak_gib") and r.get("peak_gib") else "-")
        print(" | ".join([name, common.fmt(r.get("seconds")), common.fmt(r.get("peak_gib")),
                          common.fmt(r.get("loss"), 4), tv, mv])
              + (f"  ({r['note']})" if "note" in r else ""))
    print("targets: time <= 0.25, memory <= 0.33, loss <= llm-compressor's")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {Path(a.out) / 'results.json'}")


if __name__ == "__main__":
    main()
