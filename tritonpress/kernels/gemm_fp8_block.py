"""FP8 block-scaled GEMM (FP8_BLOCK): y = x @ W^T with W fp8 e4m3 and one scale per 128 x 128
block of W [N, K], x quantized to fp8 per token and group of 128 input features.

    y[m, n] = sum_t  sa[m, t] * sw[n // 128, t] * sum_{k in K tile t} a[m, k] * b[n, k]

One kernel, two modes:
  W8A8  (sm89+) a fp8 activations with scales sa [M, K / 128]: fp8 tensor-core dot per K tile
        of 128, the two scales applied to the tile's fp32 partial sum (DeepSeek-V3's recipe).
  A16   (sm80, no fp8 tensor cores) a = the bf16/fp16 activations, not quantized: the weight
        bytes are decoded to the activation dtype in registers (exact) and the block scale is
        applied to each K tile's partial sum, as vLLM runs fp8 checkpoints on Ampere.
The K tile is the quantization group (BLOCK_K = 128), so every scale is constant over a tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import fits_gpu, interpreting, launch, row_major
from .fp8_block import BLOCK, dequantize_fp8_block_ref
from .gemm_w8a8 import grouped_tile
from .primitives import e4m3_byte_to_f32, tune_bench


# ----------------------------------------------------------------------------- references

def fp8_block_ref(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                  out_dtype: torch.dtype, block=BLOCK) -> torch.Tensor:
    """Dequantize both sides, fp32 matmul: xq fp8 [M, K] with sx [M, K / g] (g = block[1]),
    wq fp8 [N, K] with sw [ceil(N / block[0]), ceil(K / block[1])]."""
    x_hat = xq.float() * sx.float().repeat_interleave(block[1], 1)[:, :xq.shape[1]]
    return (x_hat @ dequantize_fp8_block_ref(wq, sw, block).t()).to(out_dtype)


def fp8_block_a16_ref(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, block=BLOCK):
    """Weight-only: x [M, K] as it comes, W dequantized."""
    return (x.float() @ dequantize_fp8_block_ref(wq, sw, block).t()).to(x.dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _fp8_block_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, y_ptr, M, N, K, M_KEY,
                           stride_am, stride_bn, stride_sam, stride_sbn, stride_ym,
                           BLOCK_N_W: tl.constexpr, A_FP8: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    sb_row = sb_ptr + (offs_n // BLOCK_N_W) * stride_sbn       # each column's block row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        sb = tl.load(sb_row + t, mask=mask_n, other=0.0).to(tl.float32)
        if A_FP8:
            part = tl.dot(a, b)
            sa = tl.load(sa_ptr + offs_m * stride_sam + t, mask=mask_m, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        else:
            if UPCAST:       # interpreter: no bf16 arithmetic
                a = a.to(tl.float32)
            part = tl.dot(a, e4m3_byte_to_f32(b).to(a.dtype))
            acc += part * sb[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _prune(configs, named_args, **kwargs):
    m = named_args["M_KEY"]
    configs = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs
    a = named_args["a_ptr"].element_size()
    a16 = not kwargs.get("A_FP8", True)
    # pipelined A and B tiles (+ B's widened copy in A16 mode). Each K tile's partial sum is a
    # second fp32 tile beside the accumulator: at most 32 accumulators per thread (64 spilled
    # 16 B on sm_89 at 128 x 64 x 4 warps, 128 x 256 x 8 warps 652 B on sm_90; with 32 the
    # --all compile is clean on sm_80/90/100, compile_kernels, triton 3.9)
    need = lambda c: (c.num_stages * (c.kwargs["BLOCK_M"] * a + c.kwargs["BLOCK_N"])  # noqa: E731
                      + (c.kwargs["BLOCK_N"] * a if a16 else 0)) * c.kwargs["BLOCK_K"]
    cap = 32
    return fits_gpu(configs, need, cap)


def _cfg(bm, bn, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8),
                         num_warps=warps, num_stages=stages)


CONFIGS = [_cfg(128, 256, 8, 3), _cfg(128, 128, 8, 4), _cfg(128, 128, 4, 4),
           _cfg(64, 128, 4, 4), _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 4), _cfg(32, 128, 4, 4),
           _cfg(32, 64, 4, 4), _cfg(16, 128, 4, 4), _cfg(16, 64, 4, 5)]
_tuned = triton.autotune(CONFIGS, key=["M_KEY", "N", "K", "A_FP8"],
                         prune_configs_by={"early_config_prune": _prune},
                         do_bench=tune_bench, cache_results=True)(_fp8_block_gemm_kernel)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)


def _launch(a, sa, wq, sw, out_dtype, block, config):
    m, k = a.shape
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"activation has {k} features, weight expects {wq.shape[1]}")
    if block[1] != 128 or (config or {}).get("BLOCK_K", 128) != block[1]:
        raise ValueError(f"the block GEMM tiles K by the weight block's {block[1]} columns: "
                         "only 128 x n blocks are supported (FP8_BLOCK's)")
    if sw.shape != (triton.cdiv(n, block[0]), triton.cdiv(k, block[1])):
        raise ValueError(f"block scales {tuple(sw.shape)} do not fit weight {(n, k)} in "
                         f"blocks of {tuple(block)}")
    y = torch.empty(m, n, device=a.device, dtype=out_dtype)
    if m == 0:
        return y
    a_fp8 = sa is not None
    sw = sw.float().contiguous()
    sa = sa.float().contiguous() if a_fp8 else sw

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (a, wq if a_fp8 else wq.view(torch.uint8), sa, sw, y, m, n, k,
            triton.next_power_of_2(m), a.stride(0), wq.stride(0), sa.stride(0), sw.stride(0),
            y.stride(0))
    consts = dict(BLOCK_N_W=block[0], A_FP8=a_fp8,
                  UPCAST=not a.is_cuda and a.dtype in (torch.bfloat16, torch.float16))
    if config is None and interpreting() and not a.is_cuda:
        config = INTERPRET_CONFIG
    launch(_fp8_block_gemm_kernel, _tuned, grid, args, consts, config)
    return y



def fp8_block_gemm(xq: torch.Tensor, sx: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, block=BLOCK,
                   config: dict | None = None) -> torch.Tensor:
    """xq fp8 [M, K] with per token-group sx [M, K / 128], wq fp8 [N, K] with block scales
    sw [ceil(N / block[0]), K / 128] -> [M, N] out_dtype (needs sm89+)."""
    if xq.dtype != torch.float8_e4m3fn or wq.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_block_gemm takes float8_e4m3fn operands, got {xq.dtype} and "
                        f"{wq.dtype}")
    if sx.shape != (xq.shape[0], triton.cdiv(xq.shape[1], block[1])):
        raise ValueError(f"activation scales {tuple(sx.shape)} do not fit {tuple(xq.shape)} "
                         f"in groups of {block[1]}")
    return _launch(row_major(xq), sx, row_major(wq), sw, out_dtype, block, config)


def fp8_block_a16_gemm(x: torch.Tensor, wq: torch.Tensor, sw: torch.Tensor, block=BLOCK,
                       config: dict | None = None) -> torch.Tensor:
    """x bf16/fp16/fp32 [M, K] (not quantized), wq fp8 [N, K] with block scales -> x.dtype."""
    if wq.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_block_a16_gemm takes float8_e4m3fn weights, got {wq.dtype}")
    return _launch(row_major(x), None, row_major(wq), sw, x.dtype, block, config)
