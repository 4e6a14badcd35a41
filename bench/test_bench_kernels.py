"""Kernel benchmarks with pytest-benchmark (GPU only; skipped without CUDA or the plugin).

    python -m pytest bench/test_bench_kernels.py --benchmark-json out/bench_kernels.json
    python -m pytest bench/test_bench_kernels.py --benchmark-columns=median,iqr,ops

Groups put each kernel beside its baseline measured in the same run:
  gemm 4096x4096 M=...   bf16 cuBLAS against our W4A16, INT8, FP8 and 2:4 FP8 (gemm.linear,
                         per-token activation quantization included), M in 1, 16, 256, 4096
  quant ...              per-token fp8/int8 activation quantization, RTN weight quantization
                         and fused quantize+pack int4, against a device-to-device copy of the
                         same input (the bandwidth floor)
One round is CALLS calls then a synchronize (so launch overhead overlaps, as in a model);
pytest-benchmark's times are per round, extra_info["us_per_call"] per call.
"""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytest_benchmark")
if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA GPU", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:   # `python bench/X.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))
from bench import common  # noqa: E402
from tritonpress.kernels import gemm, quant  # noqa: E402
from tritonpress.schemes import PRESETS, QuantArgs  # noqa: E402

CALLS = 10
ROUNDS = 25
N, K = 4096, 4096
MS = [1, 16, 256, 4096]
INT4 = QuantArgs(4, "int", True, "group", 128)
W8 = {s: (PRESETS[s].weights, PRESETS[s].input_activations) for s in ("W8A8_INT8", "W8A8_FP8")}


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    w = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
    (wi, ai), (wf, af) = W8["W8A8_INT8"], W8["W8A8_FP8"]
    q4, s4, _ = quant.quantize_weight_ref(w, INT4, torch.bfloat16)
    q8, s8, _ = quant.quantize_weight_ref(w, wi, torch.float32)
    f8, sf8, _ = quant.quantize_weight_ref(w, wf, torch.float32)
    f24, sf24, _ = quant.quantize_weight_ref(common.prune24(w.float()), wf, torch.float32)
    return {"bf16": w, "w4a16": gemm.prepare(q4, s4, None, INT4),
            "int8": gemm.prepare(q8, s8, None, wi, ai), "fp8": gemm.prepare(f8, sf8, None, wf, af),
            "2:4 fp8": gemm.prepare(f24, sf24, None, wf, af, sparse24=True)}


def _bench(benchmark, fn, group, **info):
    """Warm up (compile, autotune), then ROUNDS rounds of CALLS calls + synchronize."""
    fn()
    torch.cuda.synchronize()

    def run():
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    benchmark.group = group
    benchmark.extra_info.update(info, calls_per_round=CALLS, device=torch.cuda.get_device_name())
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=2)
    benchmark.extra_info["us_per_call"] = benchmark.stats.stats.median / CALLS * 1e6


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", ["bf16", "w4a16", "int8", "fp8", "2:4 fp8"])
def test_gemm(benchmark, weights, impl, m):
    x = torch.randn(m, K, device="cuda").to(torch.bfloat16)
    w = weights[impl]
    if impl == "bf16":
        fn, kernel = (lambda: torch.nn.functional.linear(x, w)), "cublas"
    else:
        fn, kernel = (lambda: gemm.linear(x, w)), gemm.choose_kernel(w, x)
        ref = gemm.gemm_ref(x, w).float()
        err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, f"{impl} differs from its reference by {err:.2e}"
    _bench(benchmark, fn, f"gemm {N}x{K} M={m}", impl=impl, kernel=kernel, m=m)
    benchmark.extra_info["tflops"] = 2 * m * N * K / (benchmark.extra_info["us_per_call"] * 1e6)


QUANT_CASES = {   # name -> (rows, cols, function of x)
    "per-token fp8": (4096, 4096, lambda x: quant.quantize_per_token(x, W8["W8A8_FP8"][1])),
    "per-token int8": (4096, 4096, lambda x: quant.quantize_per_token(x, W8["W8A8_INT8"][1])),
    "weight fp8 channel": (14336, 4096, lambda x: quant.quantize_weight(x, W8["W8A8_FP8"][0],
                                                                         torch.float32)),
    "weight int4 g128": (14336, 4096, lambda x: quant.quantize_weight(x, INT4)),
    "weight int4 g128 +pack": (14336, 4096, lambda x: quant.quantize_pack_int4(x, INT4)),
}


@pytest.mark.parametrize("name", list(QUANT_CASES) + ["copy 4096x4096", "copy 14336x4096"])
def test_quant(benchmark, name):
    if name.startswith("copy"):
        rows, cols = map(int, name.split()[1].split("x"))
        x = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
        y = torch.empty_like(x)
        fn = (lambda: y.copy_(x))
    else:
        rows, cols, f = QUANT_CASES[name]
        x = torch.randn(rows, cols, device="cuda").to(torch.bfloat16)
        fn = (lambda: f(x))
    _bench(benchmark, fn, f"quant {rows}x{cols}", kernel=name)
    # bf16 in, 1-byte (or half-byte) out: at least the input bytes move
    benchmark.extra_info["input_gb_per_s"] = rows * cols * 2 / (benchmark.extra_info["us_per_call"]
                                                               * 1e3)
