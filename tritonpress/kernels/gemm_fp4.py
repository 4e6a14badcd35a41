"""FP4 GEMMs: y = x @ W^T with W in NVFP4 or MXFP4 (e2m1 codes, two per byte, group scales).

  NVFP4  groups of 16, e4m3 group scales, an fp32 global scale:  W = e2m1 * s / g_w
  MXFP4  groups of 32, e8m0 (power-of-two) group scales:         W = e2m1 * 2^(e - 127)
The checkpoint's layout is read as it is: packed uint8 [N, K / 2] (column 2j in the low
nibble) and stored scales [N, K / group] (fp4.py holds the references of both).

Three modes of one kernel:
  A16      (any sm80+) activations bf16/fp16 as they come; each weight tile is decoded in
           registers to e2m1 * group scale, which is exact in bf16 (2 + 4 significant bits),
           and multiplied on bf16/fp16 tensor cores; the global scale is applied once at the
           end.
  W4A4     (any sm80+, emulated) activations quantized to the same format first (NVFP4: group
           scales from each token's own values under the static input global scale; MXFP4:
           e8m0 scales), decoded in registers like the weights: the products are exact, sums
           fp32.
  W4A4 dot_scaled (sm100, MXFP4) Triton's tl.dot_scaled on the packed codes and e8m0 scales:
           Blackwell's block-scaled tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from .dispatch import fits_gpu, interpreting, launch, row_major
from .fp4 import dequantize_fp4_ref
from .fp4_triton import e2m1_value, e8m0_value
from .gemm_w8a8 import grouped_tile
from .primitives import e4m3_byte_to_f32, tune_bench


# ----------------------------------------------------------------------------- references

def fp4_a16_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                global_scale: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Weight-only: dequantize W (fp4.dequantize_fp4_ref), fp32 matmul, in x's dtype."""
    w = dequantize_fp4_ref(packed, scale, global_scale, args)
    return (x.float() @ w.t()).to(x.dtype)


def fp4_w4a4_ref(xp: torch.Tensor, xs: torch.Tensor, x_global: torch.Tensor | None,
                 packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                 args: QuantArgs, out_dtype: torch.dtype) -> torch.Tensor:
    """Both sides quantized (packed codes, stored scales, global scales): dequantize both,
    fp32 matmul."""
    x = dequantize_fp4_ref(xp, xs, x_global, args)
    w = dequantize_fp4_ref(packed, scale, global_scale, args)
    return (x @ w.t()).to(out_dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _decode(byte, shift, s_byte, IS_MX: tl.constexpr):
    """Packed byte, nibble shift (0 or 4) and stored scale byte -> e2m1 value * group scale."""
    v = e2m1_value((byte.to(tl.int32) >> shift) & 15)
    if IS_MX:
        s = e8m0_value(s_byte)
    else:
        s = e4m3_byte_to_f32(s_byte)
    return v * s


@triton.jit
def _fp4_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, M_KEY, out_scale,
                     stride_xm, stride_xsm, stride_wn, stride_wsn, stride_ym,
                     GS: tl.constexpr, IS_MX: tl.constexpr, A_FP4: tl.constexpr,
                     DOT_SCALED: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if DOT_SCALED:
            # packed operands as they are stored: A [BM, BK/2], B [BK/2, BN], scales [., BK/GS]
            kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            kg = k0 // GS + tl.arange(0, BLOCK_K // GS)
            kb_ok = kb < K // 2
            kg_ok = kg < K // GS
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + kb[None, :],
                        mask=mask_m[:, None] & kb_ok[None, :], other=0)
            b = tl.load(w_ptr + offs_n[None, :] * stride_wn + kb[:, None],
                        mask=kb_ok[:, None] & mask_n[None, :], other=0)
            sa = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + kg[None, :],
                         mask=mask_m[:, None] & kg_ok[None, :], other=127)
            sb = tl.load(ws_ptr + offs_n[:, None] * stride_wsn + kg[None, :],
                         mask=mask_n[:, None] & kg_ok[None, :], other=127)
            acc = tl.dot_scaled(a, sa, "e2m1", b, sb, "e2m1", acc)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            shift = (offs_k % 2) * 4
            wmask = mask_k[:, None] & mask_n[None, :]
            # each byte and scale is loaded by every column it covers (L1 hits)
            wb = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k // 2)[:, None],
                         mask=wmask, other=0)
            wsb = tl.load(ws_ptr + offs_n[None, :] * stride_wsn + (offs_k // GS)[:, None],
                          mask=wmask, other=0)
            b = _decode(wb, shift[:, None], wsb, IS_MX)
            xmask = mask_m[:, None] & mask_k[None, :]
            if A_FP4:
                xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_k // 2)[None, :],
                             mask=xmask, other=0)
                xsb = tl.load(xs_ptr + offs_m[:, None] * stride_xsm + (offs_k // GS)[None, :],
                              mask=xmask, other=0)
                a = _decode(xb, shift[None, :], xsb, IS_MX)
                if not UPCAST:       # products exact in bf16; the interpreter dots in fp32
                    a = a.to(tl.bfloat16)
            else:
                a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=xmask, other=0.0)
                if UPCAST:           # interpreter: no bf16 arithmetic
                    a = a.to(tl.float32)
            acc = tl.dot(a, b.to(a.dtype), acc)
    y = acc * out_scale
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _prune(configs, named_args, **kwargs):
    m = named_args["M_KEY"]
    configs = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs
    if kwargs.get("DOT_SCALED"):
        configs = [c for c in configs if c.kwargs["BLOCK_K"] >= 128] or configs
    # the decoded B tile (and A in W4A4) live in registers beside the accumulator
    need = lambda c: c.num_stages * c.kwargs["BLOCK_K"] * (  # noqa: E731
        c.kwargs["BLOCK_M"] * 2 + c.kwargs["BLOCK_N"] * 2)
    return fits_gpu(configs, need, 32)


def _cfg(bm, bn, bk, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                         num_warps=warps, num_stages=stages)


CONFIGS = [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 8, 3), _cfg(128, 64, 64, 8, 3),
           _cfg(64, 64, 64, 4, 3), _cfg(64, 64, 128, 4, 3), _cfg(32, 64, 128, 4, 3),
           _cfg(16, 64, 128, 4, 3), _cfg(16, 128, 64, 4, 3), _cfg(16, 32, 128, 4, 4)]
_tuned = triton.autotune(CONFIGS, key=["M_KEY", "N", "K", "GS", "A_FP4", "DOT_SCALED"],
                         prune_configs_by={"early_config_prune": _prune},
                         do_bench=tune_bench, cache_results=True)(_fp4_gemm_kernel)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)


def _check_weight(packed, scale, args, k):
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] * 2 != k:
        raise ValueError(f"fp4 weight must be packed uint8 [N, K / 2] = [., {k // 2}], got "
                         f"{tuple(packed.shape)} {packed.dtype}")
    if scale.shape != (packed.shape[0], k // args.group_size):
        raise ValueError(f"fp4 scales {tuple(scale.shape)} do not fit weight "
                         f"{(packed.shape[0], k)} in groups of {args.group_size}")


def _out_scale(*globals_):
    s = 1.0
    for g in globals_:
        if g is not None:
            s /= float(g.reshape(-1)[0])
    return s


def _launch(x, xs, packed, scale, out_scale, args, out_dtype, a_fp4, dot_scaled, config):
    m = x.shape[0]
    n, k = packed.shape[0], packed.shape[1] * 2
    y = torch.empty(m, n, device=packed.device, dtype=out_dtype)
    if m == 0:
        return y
    ws = scale.view(torch.uint8)
    xs = ws if xs is None else xs.view(torch.uint8)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    cargs = (x, xs, packed, ws, y, m, n, k, triton.next_power_of_2(m), out_scale,
             x.stride(0), xs.stride(0), packed.stride(0), ws.stride(0), y.stride(0))
    consts = dict(GS=args.group_size, IS_MX=args.is_mx, A_FP4=a_fp4, DOT_SCALED=dot_scaled,
                  UPCAST=not packed.is_cuda)
    if config is None and interpreting() and not packed.is_cuda:
        config = INTERPRET_CONFIG
    launch(_fp4_gemm_kernel, _tuned, grid, cargs, consts, config)
    return y



def fp4_a16_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                 global_scale: torch.Tensor | None, args: QuantArgs,
                 config: dict | None = None) -> torch.Tensor:
    """x bf16/fp16/fp32 [M, K] (not quantized), W NVFP4/MXFP4 -> [M, N] in x's dtype."""
    k = x.shape[1]
    _check_weight(packed, scale, args, k)
    return _launch(row_major(x), None, row_major(packed), row_major(scale), _out_scale(global_scale),
                   args, x.dtype, False, False, config)


def fp4_w4a4_gemm(xp: torch.Tensor, xs: torch.Tensor, x_global: torch.Tensor | None,
                  packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
                  args: QuantArgs, out_dtype: torch.dtype = torch.bfloat16,
                  dot_scaled: bool = False, config: dict | None = None) -> torch.Tensor:
    """Activations packed like the weight (xp uint8 [M, K / 2], xs [M, K / group], x_global)
    -> [M, N] out_dtype. dot_scaled: Blackwell's block-scaled MMA (MXFP4 only; sm100)."""
    k = xp.shape[1] * 2
    _check_weight(packed, scale, args, k)
    if xs.shape != (xp.shape[0], k // args.group_size):
        raise ValueError(f"activation scales {tuple(xs.shape)} do not fit {(xp.shape[0], k)}")
    if dot_scaled and not args.is_mx:
        raise ValueError("tl.dot_scaled takes e8m0 group scales (MXFP4); NVFP4 runs emulated")
    return _launch(row_major(xp), row_major(xs), row_major(packed), row_major(scale),
                   _out_scale(global_scale, x_global), args, out_dtype, True, dot_scaled,
                   config)
