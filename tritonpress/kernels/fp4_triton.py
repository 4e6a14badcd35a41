"""Triton kernels of fp4.py's references: fused fp4 quantize + pack (per group: amax, the scale
rounded to e4m3 under the global scale (NVFP4) or to an e8m0 exponent (MXFP4), e2m1 rounding
with compressed-tensors' tie rules, two codes per byte), and the e2m1 / scale decoders the fp4
GEMMs (gemm_fp4.py) share.

Bit-exact with fp4.quantize_fp4_ref, on a GPU and in the interpreter: divisions are IEEE
(tl.div_rn), NVFP4's amax_g / 6 is rounded to the weight's dtype on the fp32 bits as
compressed-tensors' observer computes it in that dtype, the e4m3 scale is rounded on the bits
(primitives.e4m3_round), and e2m1 rounding is the threshold count of fp4._e2m1_index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from .fp4 import nvfp4_global_scale_ref
from .primitives import e4m3_byte, e4m3_round, round_to

MX_MIN_SCALE = tl.constexpr(5.877471754111438e-39)   # 2^-127, e8m0 exponent 0 (fp32 subnormal)


@triton.jit
def e2m1_code(y):
    """fp32 values already clamped to [-6, 6] -> codes 0..15 (int32): the magnitude's index in
    {0, .5, 1, 1.5, 2, 3, 4, 6} with ties to the even index, bit 3 the sign (y < 0)."""
    a = tl.abs(y)
    idx = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
           + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
           + (a > 5.0).to(tl.int32))
    return idx | tl.where(y < 0, 8, 0)


@triton.jit
def e2m1_value(code):
    """Code 0..15 (any int type) -> its e2m1 value in fp32, built on the bits: index 1 is 0.5,
    index i >= 2 is 2^(i // 2 - 1) * (1 + (i % 2) / 2)."""
    c = code.to(tl.int32)
    i = c & 7
    normal = ((((i >> 1) + 126) << 23) | ((i & 1) << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(i < 2, i.to(tl.float32) * 0.5, normal)
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def e8m0_value(e):
    """uint8 e8m0 exponent -> 2^(e - 127) in fp32 (exponent 0 is the subnormal 2^-127)."""
    e = e.to(tl.int32) & 0xFF
    return tl.where(e == 0, MX_MIN_SCALE, (e << 23).to(tl.float32, bitcast=True))


@triton.jit
def fp4_group_scale(amax, gscale, IS_MX: tl.constexpr, AMAX_DTYPE: tl.constexpr):
    """A group's (stored scale as int32 bits: e4m3 byte or e8m0 exponent, effective fp32
    scale) from its absolute maximum, as fp4.fp4_qparams_ref."""
    if IS_MX:
        # round_to_power_2: a quarter of the leading bit added, mantissa dropped
        p2 = ((amax.to(tl.int32, bitcast=True) + (1 << 21)) & 0x7F800000) >> 23
        e = tl.minimum(tl.maximum(p2 - 2, 0), 255)          # 127 + log2(p2) - 2 (0: amax 0)
        return e, e8m0_value(e)
    t = round_to(tl.div_rn(amax, 6.0), AMAX_DTYPE)           # amax_g / 6 in the weight dtype
    s = e4m3_round(gscale * t)
    s = tl.where(s == 0.0, 0.125, s)
    return e4m3_byte(s), tl.div_rn(s, gscale)


@triton.jit
def _fp4_quantize_kernel(w_ptr, p_ptr, s_ptr, g_ptr, rows, cols, ngroups,
                         stride_w, stride_p, stride_s,
                         GS: tl.constexpr, IS_MX: tl.constexpr, AMAX_DTYPE: tl.constexpr,
                         BR: tl.constexpr, G: tl.constexpr):
    """A program quantizes BR rows x G groups. Even and odd columns are loaded as two tiles,
    so the two codes of a byte meet without a shuffle; a group is GS / 2 of each."""
    HALF: tl.constexpr = GS // 2
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    g = tl.program_id(1) * G + tl.arange(0, G)
    j = tl.program_id(1) * (G * HALF) + tl.arange(0, G * HALF)      # byte column
    r_ok = r < rows
    ok = r_ok[:, None] & (j < cols // 2)[None, :]
    r64 = r.to(tl.int64)
    row = w_ptr + r64[:, None] * stride_w + 2 * j[None, :]
    xe = tl.load(row, mask=ok, other=0.0).to(tl.float32)
    xo = tl.load(row + 1, mask=ok, other=0.0).to(tl.float32)
    xe = tl.reshape(xe, (BR, G, HALF))
    xo = tl.reshape(xo, (BR, G, HALF))
    amax = tl.maximum(tl.max(tl.abs(xe), 2), tl.max(tl.abs(xo), 2))            # [BR, G]
    if IS_MX:
        gscale = 1.0
    else:
        gscale = tl.load(g_ptr).to(tl.float32)
    stored, scale = fp4_group_scale(amax, gscale, IS_MX, AMAX_DTYPE)
    ye = tl.minimum(tl.maximum(tl.div_rn(xe, scale[:, :, None]), -6.0), 6.0)
    yo = tl.minimum(tl.maximum(tl.div_rn(xo, scale[:, :, None]), -6.0), 6.0)
    byte = e2m1_code(ye) | (e2m1_code(yo) << 4)
    tl.store(p_ptr + r64[:, None] * stride_p + j[None, :],
             tl.reshape(byte, (BR, G * HALF)).to(tl.uint8), mask=ok)
    tl.store(s_ptr + r64[:, None] * stride_s + g[None, :], stored.to(tl.uint8),
             mask=r_ok[:, None] & (g < ngroups)[None, :])


_AMAX_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                torch.float16: tl.float16}
_TILE = 4096          # values per program


def quantize_fp4_triton(w: torch.Tensor, args: QuantArgs,
                        global_scale: torch.Tensor | None = None):
    """fp4.quantize_fp4_ref's contract on w [rows, cols] (cols a multiple of the group size,
    checked by fp4.quantize_fp4): (packed uint8 [rows, cols/2], stored scale [rows, cols/g]
    float8_e4m3fn (NVFP4) or uint8 (MXFP4), global scale fp32 [1] or None)."""
    if w.dtype not in _AMAX_DTYPES:
        raise ValueError(f"fp4 quantization takes float32, bfloat16 or float16, got {w.dtype}")
    rows, cols = w.shape
    gs = args.group_size
    if w.stride(1) != 1:
        w = w.contiguous()
    is_mx = args.is_mx
    if not is_mx and global_scale is None:
        global_scale = nvfp4_global_scale_ref(w.abs().amax())  # one reduction, in torch
    gscale = None if is_mx else global_scale.to(w.device, torch.float32).reshape(1)
    ngroups = cols // gs
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(rows, ngroups, dtype=torch.uint8, device=w.device)
    if rows and ngroups:
        g = min(triton.next_power_of_2(ngroups), max(1, 256 // gs))   # <= 256 columns
        br = max(1, min(_TILE // (g * gs), triton.next_power_of_2(rows)))
        grid = (triton.cdiv(rows, br), triton.cdiv(ngroups, g))
        _fp4_quantize_kernel[grid](w, packed, scale, packed if is_mx else gscale,
                                   rows, cols, ngroups, w.stride(0), packed.stride(0),
                                   scale.stride(0), GS=gs, IS_MX=is_mx,
                                   AMAX_DTYPE=_AMAX_DTYPES[w.dtype], BR=br, G=g, num_warps=8)
    if not is_mx:
        scale = scale.view(torch.float8_e4m3fn)
    return packed, scale, gscale

