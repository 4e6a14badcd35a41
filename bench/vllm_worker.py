"""Runs inside .venv-vllm (vLLM's CPU build), one checkpoint per process; bench_vllm.py and
tests/test_vllm.py start it. Reads a JSON job, writes a JSON result. Imports nothing from
tritonpress (that lives in the other venv).

    .venv-vllm/bin/python bench/vllm_worker.py JOB.json RESULT.json

Jobs ("mode"):
  generate  greedy generation of each prompt (token ids) for max_tokens tokens, with the
            logprob of every generated token; optionally `score`: token sequences teacher-forced
            through the model (prompt_logprobs), each position's logprob of the given token and
            vLLM's own top-1 there, from position `score_from` on.
  load      build the engine and generate max_tokens (may be 0: load only).
  qps       for each concurrency C: C requests of prompt_len random byte-range tokens, each
            max_tokens long (ignore_eos), submitted at once (offline batch = C concurrent
            requests); wall time of max_tokens=1 (prefill + first token) and of the full run.

Every result carries `layers`: per quantized linear, the vLLM scheme, the kernel class that
serves it and the kernel's own switches (use_w4a8, isa_hint, linear_method), when the engine
runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0; otherwise the parent reads vLLM's
log lines "Using X for Y").
"""
from __future__ import annotations

import json
import os
import random
import sys
import time


def describe_layers(model) -> dict:
    """{module name: {method, scheme, kernel, ...}} for every module with a quant_method."""
    out = {}
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if qm is None or type(qm).__name__.endswith(("EmbeddingMethod", "KVCacheMethod")):
            continue
        scheme = getattr(m, "scheme", None)
        kernel = None
        if scheme is not None:
            kernel = getattr(scheme, "kernel", None) or getattr(scheme, "fp8_linear", None)
        row = {"method": type(qm).__name__,
               "scheme": type(scheme).__name__ if scheme is not None else None,
               "kernel": type(kernel).__name__ if kernel is not None else None}
        lm = getattr(kernel, "linear_method", None)
        if lm is not None:
            row["linear_method"] = getattr(lm, "__name__", str(lm))
        for attr in ("use_w4a8", "isa_hint"):
            if hasattr(m, attr):
                row[attr] = getattr(m, attr)
        out[name] = row
    return out


def engine(job: dict):
    from vllm import LLM
    kw = dict(model=job["model"], dtype="bfloat16", max_model_len=job.get("max_model_len", 1024),
              seed=0)
    kw.update(job.get("llm_kwargs", {}))
    t0 = time.perf_counter()
    llm = LLM(**kw)
    return llm, time.perf_counter() - t0


def layers_of(llm) -> dict | None:
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
        return None
    try:
        return llm.apply_model(describe_layers)[0]
    except Exception as e:   # an internal API: the log lines still say which kernel
        return {"error": f"{type(e).__name__}: {e}"}


def generate(llm, job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    res = {}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job.get("prompts", [])]
    if prompts and job["max_tokens"] > 0:
        sp = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=1,
                            ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        res["gen_s"] = time.perf_counter() - t0
        res["tokens"], res["logprobs"] = [], []
        for o in outs:
            c = o.outputs[0]
            res["tokens"].append(list(c.token_ids))
            res["logprobs"].append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
    if job.get("score"):
        start = job["score_from"]
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in job["score"]], sp,
                            use_tqdm=False)
        res["score_s"] = time.perf_counter() - t0
        res["scored_logprobs"], res["scored_top1"] = [], []
        for seq, o in zip(job["score"], outs):
            pl = o.prompt_logprobs
            res["scored_logprobs"].append([pl[i][seq[i]].logprob for i in range(start, len(seq))])
            res["scored_top1"].append([next(t for t, lp in pl[i].items() if lp.rank == 1)
                                       for i in range(start, len(seq))])
    return res


def qps(llm, job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    rng = random.Random(0)
    lo, hi = job.get("token_range", (3, 258))
    rows = []
    for c in job["concurrency"]:
        prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(lo, hi)
                                                  for _ in range(job["prompt_len"])])
                   for _ in range(c)]
        first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        full = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                              detokenize=False)
        llm.generate(prompts[:1], first, use_tqdm=False)            # warm this batch path
        t0 = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, full, use_tqdm=False)
        t_full = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"concurrency": c, "output_tokens": n_out, "first_token_s": t_first,
                     "wall_s": t_full, "tokens_per_s": n_out / t_full,
                     # each request gets one token per engine step after its first
                     "tpot_ms": 1e3 * (t_full - t_first) / max(1, job["max_tokens"] - 1)})
        print(f"qps: concurrency {c}: {n_out / t_full:.1f} tok/s", file=sys.stderr, flush=True)
    return {"qps": rows}


def main(argv: list[str]) -> int:
    job = json.loads(open(argv[1]).read())
    result = {"mode": job["mode"]}
    try:
        import vllm
        import torch
        result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
        result["amx_tile"] = bool(torch.cpu._is_amx_tile_supported())
        llm, result["load_s"] = engine(job)
        result["layers"] = layers_of(llm)
        if job["mode"] in ("generate", "load"):
            result.update(generate(llm, job))
        elif job["mode"] == "qps":
            result.update(qps(llm, job))
        else:
            raise ValueError(f"unknown mode {job['mode']!r}")
    except Exception as e:
        import traceback
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"
    with open(argv[2], "w") as f:
        json.dump(result, f)
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
