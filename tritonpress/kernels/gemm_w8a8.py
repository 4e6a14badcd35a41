"""8-bit GEMMs with a fused scale epilogue: y = (a @ b^T) * sa[:, None] * sb[None, :].

  int8  a int8 [M, K] (per-token quantized activations), b int8 [N, K] (per-channel weights):
        int8 x int8 tensor cores, exact int32 accumulation (sm80+).
  fp8   a, b float8_e4m3fn: fp8 tensor cores, fp32 accumulation (sm89+).
  w8a16 a = the bf16/fp16 activations themselves (no sa), b fp8 or int8 weights converted to
        the activation dtype inside the kernel (exact: 3 mantissa bits, or |q| <= 127) and a
        bf16 tensor-core dot. This is the fp8 path below sm89, as vLLM runs fp8 checkpoints on
        Ampere (weight-only); fp8 bits are decoded with integer ops, so it needs no fp8 support
        from the compiler.

The weight stays [N, K] row-major: a [BLOCK_K, BLOCK_N] tile read from it is K-major, which
is what the Hopper 8-bit tensor-core instructions want for their second operand.
Per-token activation quantization runs in front (tritonpress.kernels.quant).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import capability, fits_gpu, interpreting, launch, row_major
from .primitives import e4m3_byte_to_f32, tune_bench


# ----------------------------------------------------------------------------- references

def scaled_mm_ref(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize both sides, fp32 matmul. a [M, K], sa [M] or [M, 1], b [N, K], sb [N]."""
    a_hat = a.float() * sa.float().reshape(-1, 1)
    b_hat = b.float() * sb.float().reshape(-1, 1)
    return (a_hat @ b_hat.t()).to(out_dtype)


def w8a16_ref(x: torch.Tensor, b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """x [M, K] unquantized, b [N, K] fp8 or int8 with per-channel sb [N]."""
    return (x.float() @ (b.float() * sb.float().reshape(-1, 1)).t()).to(x.dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles share each
    column tile of the weight while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr, M, N, K, M_KEY,
                      stride_am, stride_bn, stride_ym,
                      HAS_SA: tl.constexpr, INT_ACC: tl.constexpr, B_FP8_BITS: tl.constexpr,
                      UPCAST: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:          # interpreter: no bf16 arithmetic
            a = a.to(tl.float32)
        if B_FP8_BITS:      # w8a16: fp8 weights arrive as raw bytes
            b = e4m3_byte_to_f32(b).to(a.dtype)
        elif b.dtype != a.dtype:
            b = b.to(a.dtype)
        if INT_ACC:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc)

    y = acc.to(tl.float32)
    sb = tl.load(sb_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_SA:
        sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
        y = y * sa[:, None]
    y = y * sb[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _prune(configs, named_args, **kwargs):
    # no row tiles much taller than the batch: they only multiply padding
    m = named_args["M_KEY"]
    configs = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs
    a, b = named_args["a_ptr"].element_size(), named_args["b_ptr"].element_size()
    convert = a != b or kwargs.get("B_FP8_BITS", False)   # w8a16: B widened in registers
    if convert:   # 5 stages spill 12 B on sm_80 under triton 3.6
        configs = [c for c in configs if c.num_stages <= 4] or configs
    # pipelined A and B tiles, plus B's widened copy; no more than this spills (measured):
    # 8-bit A x 8-bit B: 64 accumulators per thread before sm_90, 128 on sm_90 (wgmma);
    # w8a16: 32 (the fp8 decode and the widened B tile need registers of their own)
    need = lambda c: (c.num_stages * (c.kwargs["BLOCK_M"] * a + c.kwargs["BLOCK_N"] * b)  # noqa: E731
                      + (c.kwargs["BLOCK_N"] * a if convert else 0)) * c.kwargs["BLOCK_K"]
    cap = 32 if convert else (128 if (capability() or (0, 0)) >= (9, 0) else 64)
    return fits_gpu(configs, need, cap)


def _cfg(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m),
                         num_warps=warps, num_stages=stages)


# 8-bit operands: BLOCK_K = 128 is 128 bytes per row. The big tiles are Hopper's (wgmma,
# 228 KB shared memory); _prune keeps those the GPU's shared memory and registers hold.
CONFIGS = [
    _cfg(128, 256, 128, 8, 3), _cfg(256, 128, 128, 8, 3), _cfg(128, 128, 128, 8, 4),
    _cfg(128, 128, 64, 4, 4), _cfg(64, 128, 128, 4, 4), _cfg(128, 64, 128, 4, 4),
    _cfg(64, 64, 128, 4, 4), _cfg(32, 128, 128, 4, 4), _cfg(32, 64, 256, 4, 4),
    _cfg(16, 64, 256, 4, 4), _cfg(16, 128, 128, 4, 5), _cfg(16, 32, 256, 4, 4),
]


_tuned = triton.autotune(CONFIGS, key=["M_KEY", "N", "K", "HAS_SA", "INT_ACC", "B_FP8_BITS"],
                         prune_configs_by={"early_config_prune": _prune},
                         do_bench=tune_bench, cache_results=True)(_scaled_mm_kernel)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)


def _launch(a, b, sa, sb, out_dtype, int_acc, b_fp8_bits, config):
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"activation has {k} features, weight expects {b.shape[1]}")
    y = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0:
        return y
    has_sa = sa is not None
    sb = sb.reshape(-1).float()
    sa = sa.reshape(-1).float() if has_sa else sb      # placeholder pointer when unused

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (a, b, sa, sb, y, m, n, k, triton.next_power_of_2(m), a.stride(0), b.stride(0),
            y.stride(0))
    consts = dict(HAS_SA=has_sa, INT_ACC=int_acc, B_FP8_BITS=b_fp8_bits,
                  UPCAST=not a.is_cuda and a.dtype in (torch.bfloat16, torch.float16))
    if config is None and interpreting() and not a.is_cuda:
        config = INTERPRET_CONFIG
    launch(_scaled_mm_kernel, _tuned, grid, args, consts, config)
    return y



def int8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None):
    """a int8 [M, K] with per-token sa, b int8 [N, K] with per-channel sb -> [M, N]."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_gemm takes int8 operands, got {a.dtype} and {b.dtype}")
    return _launch(row_major(a), row_major(b), sa, sb, out_dtype, True, False, config)


def fp8_gemm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None):
    """a, b float8_e4m3fn with per-token sa and per-channel sb -> [M, N] (needs sm89+)."""
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_gemm takes float8_e4m3fn operands, got {a.dtype} and {b.dtype}")
    return _launch(row_major(a), row_major(b), sa, sb, out_dtype, False, False, config)


def w8a16_gemm(x: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, config: dict | None = None):
    """x bf16/fp16/fp32 [M, K] (not quantized), b fp8 or int8 [N, K], per-channel sb -> x.dtype."""
    if b.dtype == torch.float8_e4m3fn:
        b, bits = b.view(torch.uint8), True
    elif b.dtype == torch.int8:
        bits = False
    else:
        raise TypeError(f"w8a16_gemm takes float8_e4m3fn or int8 weights, got {b.dtype}")
    return _launch(row_major(x), row_major(b), None, sb, x.dtype, False, bits, config)
