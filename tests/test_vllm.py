"""vLLM itself serves our checkpoints (its CPU build, in .venv-vllm: `make vllm-env`). Opt-in,
a few minutes (one vLLM process per checkpoint):

    TRITONPRESS_VLLM_TESTS=1 .venv/bin/python -m pytest -q tests/test_vllm.py

Skipped unless TRITONPRESS_VLLM_TESTS=1 and .venv-vllm exists. The model is a tiny random
Llama with a sharpened LM head (logits 20x larger), so greedy choices are not near-ties that
any rounding flips; vLLM runs eager (no torch.compile) to start in seconds. The agreement
measurement on a real model is bench/bench_vllm.py (docs/vllm.md).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench import bench_vllm as bv  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITONPRESS_VLLM_TESTS") != "1",
                       reason="opt-in: set TRITONPRESS_VLLM_TESTS=1"),
    pytest.mark.skipif(not bv.VLLM_PYTHON.is_file(),
                       reason=f"{bv.VLLM_PYTHON} missing: run `make vllm-env`"),
]

SCHEMES = ["W4A16", "W4A16_ASYM", "W8A8_INT8", "W8A8_FP8", "W8A8_FP8_24"]
PROMPT_LEN, TOKENS = 16, 16
EAGER = {"enforce_eager": True}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def base_model(workdir):
    from tritonpress.models import byte_tokenizer, random_llama
    path = workdir / "tiny"
    model = random_llama(hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2,
                         vocab=512, seed=0, max_positions=1024)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)   # peaked next-token distributions, few near-ties
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(workdir, base_model):
    from tritonpress.cli import compress_from_flags
    made = {}

    def get(scheme: str) -> Path:
        if scheme not in made:
            out = workdir / scheme
            compress_from_flags(str(base_model), scheme, str(out), num_samples=8, seq_len=64,
                                evaluate_quality=False, progress=False, device="cpu")
            made[scheme] = out
        return made[scheme]
    return get


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 258, (4, PROMPT_LEN), generator=g).tolist()   # byte ids


def serve(path: Path, workdir: Path, tag: str) -> dict:
    job = {"mode": "generate", "model": str(path), "prompts": prompts(), "max_tokens": TOKENS,
           "llm_kwargs": EAGER}
    res = bv.run_worker(job, bv.vllm_env(w4a8=False), workdir / "logs", tag, timeout=900)
    assert "error" not in res, res["error"]
    return res


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_loads_and_generates_in_vllm(scheme, checkpoint, workdir):
    res = serve(checkpoint(scheme), workdir, scheme)
    assert [len(t) for t in res["tokens"]] == [TOKENS] * len(prompts())
    assert all(math.isfinite(x) and x <= 0 for lps in res["logprobs"] for x in lps)
    # every decoder linear went through compressed-tensors, none stayed bf16
    layers = res["layers"]
    assert layers and "error" not in layers, layers
    linears = {n: r for n, r in layers.items() if n.startswith("model.layers.")}
    assert len(linears) == 2 * 4   # qkv, o, gate_up, down per layer (vLLM fuses them)
    assert all(r["method"] == "CompressedTensorsLinearMethod" and r["kernel"]
               for r in linears.values()), linears


def test_w4a16_greedy_tokens_agree_with_our_runtime(checkpoint, workdir):
    """vLLM's greedy tokens (VLLM_CPU_INT4_W4A8=0: true A16), teacher-forced through
    load_compressed: top-1 agreement and mean |dlogprob| within the bench's tolerance
    (bench_vllm.within: 2.5 x our runtime's own sdpa/eager sensitivity + 0.02 nats)."""
    from tritonpress.runtime import load_compressed
    path = checkpoint("W4A16")
    res = serve(path, workdir, "W4A16-agree")
    assert {r.get("use_w4a8") for r in res["layers"].values()} == {False}
    ours, _ = load_compressed(str(path), device="cpu", dtype=torch.bfloat16, act_sim="vllm")
    seqs = [p + t for p, t in zip(prompts(), res["tokens"])]
    lp, top1 = bv.score_ours(ours, seqs, PROMPT_LEN)
    vs_ours = bv.compare(res["tokens"], res["logprobs"], lp, top1)
    sens = bv.sensitivity(ours, seqs, PROMPT_LEN, (lp, top1))
    assert bv.within(vs_ours, sens), (vs_ours, sens, bv.tolerance(sens))
