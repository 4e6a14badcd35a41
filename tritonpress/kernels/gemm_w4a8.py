"""W4A8 GEMM: int4 group-quantized weights with 8-bit dynamic per-token activations.

  W4A8    int8 activations: int8 x int8 tensor cores, exact int32 sums per K tile (sm80+)
  W4AFP8  fp8 activations: the int4 values are exact in e4m3, fp8 tensor cores (sm89+)

    y[m, n] = sa[m] * sum_g  sw[g, n] * sum_{k in group g} a[m, k] * (u[k, n] - z[g, n])

The weight is gemm_w4a16's layout (WNA16Weight: int32 words [K / 8, N], scales [ngroups, N],
optional zero points), so one packed copy serves this kernel and the weight-only one. A K tile
lies inside one group (BLOCK_K divides the group size), so the group scale multiplies the
tile's partial sum: the integer dot stays exact and the scales cost one multiply per tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import capability, fits_gpu, interpreting, launch
from .gemm_w4a16 import WNA16Weight, unpack_wna16
from .gemm_w8a8 import grouped_tile
from .primitives import tune_bench


# ----------------------------------------------------------------------------- reference

def w4a8_ref(xq: torch.Tensor, sx: torch.Tensor, w: WNA16Weight,
             out_dtype: torch.dtype) -> torch.Tensor:
    """Dequantize both sides, fp32 matmul: xq int8/fp8 [M, K] with per-token sx [M, 1]."""
    _, wt = unpack_wna16(w)
    return ((xq.float() * sx.float().reshape(-1, 1)) @ wt).to(out_dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _w4a8_kernel(a_ptr, sa_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_KEY,
                 stride_am, stride_ym,
                 GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, A_FP8: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        words = tl.load(w_ptr + (offs_k // 8)[:, None] * N + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0)
        u = (words >> ((offs_k % 8) * 4)[:, None]) & 0xF
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=8)[None, :]
        else:
            z = 8
        wq = u - z                                      # in [-15, 15]: exact in int8 and e4m3
        if A_FP8:
            part = tl.dot(a, wq.to(tl.float32).to(a.dtype))
        else:
            part = tl.dot(a, wq.to(tl.int8), out_dtype=tl.int32).to(tl.float32)
        acc += part * s[None, :]
    sa = tl.load(sa_ptr + offs_m, mask=mask_m, other=0.0)
    y = acc * sa[:, None]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _prune(configs, named_args, **kwargs):
    m = named_args["M_KEY"]
    g = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    if g != named_args["K"]:       # per-channel scales: every tile is in the one group
        configs = [c for c in configs if g % c.kwargs["BLOCK_K"] == 0] or configs
    configs = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs
    # A tile (1 byte) + the word tile (4 bytes, each word loaded by its 8 rows) per stage
    need = lambda c: c.num_stages * c.kwargs["BLOCK_K"] * (  # noqa: E731
        c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"] * 4)
    cap = 64 if (capability() or (0, 0)) >= (9, 0) else 32
    return fits_gpu(configs, need, cap)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                         num_warps=warps, num_stages=stages)


CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 128, 8, 3), _cfg(128, 64, 64, 4, 3),
           _cfg(64, 64, 128, 4, 3), _cfg(64, 64, 64, 4, 4), _cfg(32, 64, 128, 4, 3),
           _cfg(16, 64, 128, 4, 4), _cfg(16, 128, 64, 4, 4), _cfg(16, 32, 128, 4, 4),
           _cfg(32, 32, 32, 4, 4)]
_tuned = triton.autotune(CONFIGS, key=["M_KEY", "N", "K", "GROUP_SIZE", "A_FP8"],
                         prune_configs_by={"early_config_prune": _prune},
                         do_bench=tune_bench, cache_results=True)(_w4a8_kernel)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8)


def w4a8_gemm(xq: torch.Tensor, sx: torch.Tensor, w: WNA16Weight,
              out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None):
    """xq int8 (W4A8) or float8_e4m3fn (W4AFP8, sm89+) [M, K] with per-token sx [M] or
    [M, 1], w an int4 WNA16Weight with groups -> [M, N] out_dtype."""
    if xq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"w4a8_gemm takes int8 or float8_e4m3fn activations, got {xq.dtype}")
    if w.bits != 4:
        raise ValueError(f"w4a8_gemm takes 4-bit weights, got {w.bits}-bit")
    m, k = xq.shape
    if k != w.in_features:
        raise ValueError(f"activation has {k} features, weight expects {w.in_features}")
    n = w.out_features
    gs = w.group_size
    if gs != k and gs % 16:
        raise ValueError(f"group size {gs}: the 8-bit dot tiles K by 16 or more inside a group; "
                         "use a group size that is a multiple of 16")
    if config is not None and gs != k and gs % config["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {config['BLOCK_K']} does not divide group size {gs}")
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    y = torch.empty(m, n, device=xq.device, dtype=out_dtype)
    if m == 0:
        return y
    sx = sx.reshape(-1).float().contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (xq, sx, w.words, w.scale, w.zero if w.zero is not None else w.words, y, m, n, k,
            triton.next_power_of_2(m), xq.stride(0), y.stride(0))
    consts = dict(GROUP_SIZE=gs, HAS_ZERO=w.zero is not None,
                  A_FP8=xq.dtype == torch.float8_e4m3fn)
    if config is None and interpreting() and not xq.is_cuda:
        config = dict(INTERPRET_CONFIG, BLOCK_K=64 if gs == k else min(gs & -gs, 64))
    launch(_w4a8_kernel, _tuned, grid, args, consts, config)
    return y
