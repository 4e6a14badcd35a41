"""Triton kernels of quant.py's references, and their launchers: min/max qparams, quantize
(int or fp8 bytes, optionally packed to int4 words) of groups, rows or tokens in one pass;
fp8 rounding; int4 pack/unpack. quant.py dispatches to them on CUDA tensors.

Bit-exact with the references, on a GPU and in the interpreter:
 - every division is IEEE (tl.div_rn): Triton's plain `/` is approximate on NVIDIA GPUs;
 - round half to even is the 1.5 * 2**23 magic add, exact for |y| < 2**22 (callers clamp);
 - bf16 scales are rounded on the fp32 bits (the interpreter's fp32->bf16 cast truncates);
 - fp8 values are rounded to the e4m3 grid on the fp32 bits and their bytes are built by
   hand and stored as uint8 (the interpreter's fp32->fp8 cast rounds wrongly, and this
   needs no fp8 conversion support on pre-sm89 GPUs);
 - inputs are upcast to fp32 right after loading (interpreter bf16 arithmetic is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from .primitives import e4m3_byte, e4m3_round, qparams, rne


@triton.jit
def _quantize(x, s, zp, qmin, qmax, IS_FP8: tl.constexpr):
    """quantize_ref on a tile: integers, or e4m3 bytes, as int32."""
    y = tl.div_rn(x, s)
    if IS_FP8:
        return e4m3_byte(e4m3_round(y))
    # clamping before rounding equals clamping after: the bounds are integers
    y = tl.minimum(tl.maximum(y, qmin - zp), qmax - zp)
    return (rne(y) + zp).to(tl.int32)


@triton.jit
def _store_q(q_ptr, q, row, col0, start, unit_ok, group_size, stride_q,
             G: tl.constexpr, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """Store a [G, BLOCK] tile of quantized values from column col0 + start of each unit's row,
    as bytes, or with PACK as int4 words (value + 8, element k at bits 4k..4k+3)."""
    j = tl.arange(0, BLOCK)
    ok = unit_ok[:, None] & (start + j[None, :] < group_size)
    if PACK:
        u = tl.where(ok, (q + 8) & 0xF, 8)                 # padding unpacks to zero
        u = tl.reshape(u, (G, BLOCK // 8, 8))
        words = tl.sum(u << (tl.arange(0, 8) * 4)[None, None, :], axis=2)  # disjoint: sum == or
        j8 = tl.arange(0, BLOCK // 8) * 8
        wok = unit_ok[:, None] & (start + j8[None, :] < group_size)
        ptrs = q_ptr + row[:, None] * stride_q + (col0[:, None] + start + j8[None, :]) // 8
        tl.store(ptrs, words, mask=wok)
    else:
        ptrs = q_ptr + row[:, None] * stride_q + col0[:, None] + start + j[None, :]
        tl.store(ptrs, q.to(q_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, scale_ptr, zp_ptr,
                            n_units, ngroups, group_size, stride_x, stride_q,
                            div, qmin, qmax, eps,
                            SYMMETRIC: tl.constexpr, IS_FP8: tl.constexpr, PACK: tl.constexpr,
                            G: tl.constexpr, BLOCK: tl.constexpr, ONE_TILE: tl.constexpr):
    """A unit is one group of one row (the whole row per channel or per token); a program
    quantizes G units. ONE_TILE: a unit fits in BLOCK columns and is read once; otherwise it
    is swept twice, for its min/max and then to quantize."""
    units = tl.program_id(0) * G + tl.arange(0, G)
    unit_ok = units < n_units
    row = (units // ngroups).to(tl.int64)
    col0 = (units % ngroups) * group_size
    x_unit = x_ptr + row * stride_x + col0
    j = tl.arange(0, BLOCK)
    SCALE_DTYPE: tl.constexpr = scale_ptr.dtype.element_ty
    if ONE_TILE:
        ok = unit_ok[:, None] & (j[None, :] < group_size)
        x = tl.load(x_unit[:, None] + j[None, :], mask=ok, other=0.0).to(tl.float32)
        # padding reads 0, which min/max ignore: the range is widened to include 0 anyway
        s, zp = qparams(tl.min(x, 1), tl.max(x, 1), div, qmin, qmax, eps, SYMMETRIC, SCALE_DTYPE)
        q = _quantize(x, s[:, None], zp[:, None], qmin, qmax, IS_FP8)
        _store_q(q_ptr, q, row, col0, 0, unit_ok, group_size, stride_q, G, BLOCK, PACK)
    else:
        lo = tl.zeros((G, BLOCK), tl.float32)
        hi = tl.zeros((G, BLOCK), tl.float32)
        for start in range(0, group_size, BLOCK):
            ok = unit_ok[:, None] & (start + j[None, :] < group_size)
            x = tl.load(x_unit[:, None] + start + j[None, :], mask=ok, other=0.0).to(tl.float32)
            lo = tl.minimum(lo, x)
            hi = tl.maximum(hi, x)
        s, zp = qparams(tl.min(lo, 1), tl.max(hi, 1), div, qmin, qmax, eps, SYMMETRIC, SCALE_DTYPE)
        for start in range(0, group_size, BLOCK):
            ok = unit_ok[:, None] & (start + j[None, :] < group_size)
            x = tl.load(x_unit[:, None] + start + j[None, :], mask=ok, other=0.0).to(tl.float32)
            q = _quantize(x, s[:, None], zp[:, None], qmin, qmax, IS_FP8)
            _store_q(q_ptr, q, row, col0, start, unit_ok, group_size, stride_q, G, BLOCK, PACK)
    tl.store(scale_ptr + units, s.to(SCALE_DTYPE), mask=unit_ok)
    if not SYMMETRIC:
        tl.store(zp_ptr + units, zp.to(tl.int8), mask=unit_ok)


@triton.jit
def _fp8_round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, e4m3_round(x), mask=ok)


@triton.jit
def _pack_int4_kernel(q_ptr, out_ptr, rows, cols, words, stride_q, stride_o,
                      BR: tl.constexpr, BW: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    r_ok = r < rows
    q_row = q_ptr + r.to(tl.int64)[:, None] * stride_q
    word = tl.zeros((BR, BW), tl.int32)
    for k in tl.static_range(8):
        c = w * 8 + k
        ok = r_ok[:, None] & (c < cols)[None, :]
        v = tl.load(q_row + c[None, :], mask=ok, other=0).to(tl.int32)
        word = word | (tl.where(ok, (v + 8) & 0xF, 8) << (4 * k))   # padding unpacks to zero
    ptrs = out_ptr + r.to(tl.int64)[:, None] * stride_o + w[None, :]
    tl.store(ptrs, word, mask=r_ok[:, None] & (w < words)[None, :])


@triton.jit
def _unpack_int4_kernel(p_ptr, out_ptr, rows, cols, stride_p, stride_o,
                        BR: tl.constexpr, BC: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (r < rows)[:, None] & (c < cols)[None, :]
    p = tl.load(p_ptr + r.to(tl.int64)[:, None] * stride_p + (c // 8)[None, :], mask=ok, other=0)
    v = ((p >> ((c % 8) * 4)[None, :]) & 0xF) - 8
    tl.store(out_ptr + r.to(tl.int64)[:, None] * stride_o + c[None, :], v.to(tl.int8), mask=ok)


# ----------------------------------------------------------------------------- launchers

_TILE = 4096            # elements per program when groups are short
_MAX_BLOCK = 16384      # longer groups (rows) are swept in chunks of this many columns
_SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _num_warps(elements: int) -> int:
    return min(16, max(4, elements // 512))


def quantize_groups_triton(x: torch.Tensor, args: QuantArgs, group_size: int,
                            scale_dtype: torch.dtype, pack: bool = False,
                            max_block: int = _MAX_BLOCK):
    """x [rows, cols] (last dim contiguous), groups of group_size columns (cols per channel):
    (q [rows, cols] int8|fp8, or with pack int32 words [rows, ceil(cols/8)];
     scale [rows, cols // group_size] scale_dtype; zp int8 or None)."""
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale dtype {scale_dtype} is not supported by the Triton kernels: "
                         "use bfloat16, float16 or float32")
    rows, cols = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    ngroups = cols // group_size
    n_units = rows * ngroups
    is_fp8 = args.type == "float"
    if pack:
        q = torch.empty(rows, (cols + 7) // 8, dtype=torch.int32, device=x.device)
    else:
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn if is_fp8 else torch.int8,
                        device=x.device)
    scale = torch.empty(rows, ngroups, dtype=scale_dtype, device=x.device)
    zp = None if args.symmetric else torch.empty(rows, ngroups, dtype=torch.int8, device=x.device)
    if n_units == 0:
        return q, scale, zp
    block = max(16, triton.next_power_of_2(group_size))
    one_tile = block <= max_block
    block = min(block, max_block)
    g = max(1, min(_TILE // block, triton.next_power_of_2(n_units)))
    span = args.qmax - args.qmin
    _quantize_groups_kernel[(triton.cdiv(n_units, g),)](
        x, q.view(torch.uint8) if is_fp8 and not pack else q, scale,
        scale if zp is None else zp,
        n_units, ngroups, group_size, x.stride(0), q.stride(0),
        span / 2 if args.symmetric else span, args.qmin, args.qmax,
        torch.finfo(scale_dtype).eps,
        SYMMETRIC=args.symmetric, IS_FP8=is_fp8, PACK=pack, G=g, BLOCK=block,
        ONE_TILE=one_tile, num_warps=_num_warps(g * block))
    return q, scale, zp


def fp8_round_triton(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    if n:
        block = 4096
        _fp8_round_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block, num_warps=8)
    return y


def pack_int4_triton(q: torch.Tensor) -> torch.Tensor:
    rows, cols = q.shape
    if q.stride(1) != 1:
        q = q.contiguous()
    words = (cols + 7) // 8
    out = torch.empty(rows, words, dtype=torch.int32, device=q.device)
    if rows and words:
        bw = min(128, triton.next_power_of_2(words))
        br = max(1, 2048 // bw)
        grid = (triton.cdiv(rows, br), triton.cdiv(words, bw))
        _pack_int4_kernel[grid](q, out, rows, cols, words, q.stride(0), out.stride(0),
                                BR=br, BW=bw, num_warps=4)
    return out


def unpack_int4_triton(packed: torch.Tensor, cols: int) -> torch.Tensor:
    rows = packed.shape[0]
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    out = torch.empty(rows, cols, dtype=torch.int8, device=packed.device)
    if rows and cols:
        bc = min(1024, triton.next_power_of_2(cols))
        br = max(1, 8192 // bc)
        grid = (triton.cdiv(rows, br), triton.cdiv(cols, bc))
        _unpack_int4_kernel[grid](packed, out, rows, cols, packed.stride(0), out.stride(0),
                                  BR=br, BC=bc, num_warps=8)
    return out
