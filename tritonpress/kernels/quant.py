"""Quantization primitives: qparams, quantize, dequantize, int4 packing.

compressed-tensors conventions, exactly:
  symmetric scale   = amax / ((qmax - qmin) / 2)   (amax/7.5 int4, /127.5 int8, /448 fp8)
  asymmetric scale  = (max - min) / (qmax - qmin), with min <= 0 <= max,
  zero point        = round(qmin - min / scale), clamped to [qmin, qmax]
  q                 = clamp(round_half_even(x / scale) + zp, qmin, qmax)   (int)
  q                 = e4m3(clamp(x / scale, -448, 448))                    (fp8, RNE)
  x_hat             = (q - zp) * scale
Scales are rounded to their storage dtype *before* quantizing, so the integers are optimal
for the scale that is saved.

This file holds the torch references (also the CPU path). Triton kernels and the dispatch
between the two live below them.
"""
from __future__ import annotations

import torch

from ..schemes import ACT_SIMS, QuantArgs

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


# ----------------------------------------------------------------------------- references

def fp8_round_ref(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the e4m3 grid (RNE, saturating at +-448); fp32 out."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()


def group_view(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[rows, cols] -> [rows, ngroups, group_size]; cols must be a multiple of group_size."""
    rows, cols = x.shape
    if group_size is None:
        return x.reshape(rows, 1, cols)
    if cols % group_size:
        raise ValueError(f"{cols} columns are not a multiple of group size {group_size}")
    return x.reshape(rows, cols // group_size, group_size)


def qparams_from_minmax(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs,
                        scale_dtype: torch.dtype = torch.float32):
    """Scale (rounded to scale_dtype, returned as fp32) and zero point (fp32 or None)."""
    xmin = torch.clamp(xmin.float(), max=0.0)
    xmax = torch.clamp(xmax.float(), min=0.0)
    if args.symmetric:
        amax = torch.maximum(-xmin, xmax)
        scale = amax / ((args.qmax - args.qmin) / 2)
    else:
        scale = (xmax - xmin) / (args.qmax - args.qmin)
    eps = torch.finfo(scale_dtype).eps if scale_dtype.is_floating_point else 1e-12
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    scale = scale.to(scale_dtype).float()
    if args.symmetric:
        return scale, None
    zp = torch.round(args.qmin - xmin / scale).clamp(args.qmin, args.qmax)
    return scale, zp


def weight_qparams_ref(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype):
    """Per-channel or per-group qparams of a weight [out, in]: scale/zp [out, ngroups]."""
    g = group_view(w.float(), args.group_size if args.strategy == "group" else None)
    return qparams_from_minmax(g.amin(-1), g.amax(-1), args, scale_dtype)


def _expand(p: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, ngroups] -> [rows, cols] (each group's value over its columns)."""
    return p.repeat_interleave(cols // p.shape[1], dim=1) if p.shape[1] != cols else p


def _by_group(x: torch.Tensor, p: torch.Tensor):
    """x [rows, cols] as [rows, ngroups, group] and p [rows or 1, ngroups] as [.., ngroups, 1]:
    each group's value broadcast over its columns without a [rows, cols] copy of it (the same
    arithmetic, element for element, as dividing by the expanded tensor)."""
    rows, cols = x.shape
    ng = p.shape[1]
    return x.reshape(rows, ng, cols // ng), p.float().unsqueeze(-1)


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                 args: QuantArgs) -> torch.Tensor:
    """x [rows, cols] with scale/zp [rows, ngroups] -> int8 (int) or float8_e4m3fn (float).
    One fp32 working copy of x, operated on in place (weights of a 70B layer are GBs)."""
    rows, cols = x.shape
    y, s = _by_group(x.to(torch.float32, copy=True), scale)
    y.div_(s)
    if args.type == "float":
        return y.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).reshape(rows, cols)
    y.round_()
    if zp is not None:
        y.add_(zp.float().unsqueeze(-1))
    return y.clamp_(args.qmin, args.qmax).to(torch.int8).reshape(rows, cols)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = q.shape
    y, s = _by_group(q.to(torch.float32, copy=True), scale)
    if zp is not None:
        y.sub_(zp.float().unsqueeze(-1))
    return y.mul_(s).to(dtype).reshape(rows, cols)


def quantize_weight_ref(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """Round-to-nearest weight quantization: (q, scale [out, ngroups] in scale_dtype, zp int8|None)."""
    scale_dtype = scale_dtype or w.dtype
    scale, zp = weight_qparams_ref(w, args, scale_dtype)
    q = quantize_ref(w, scale, zp, args)
    return q, scale.to(scale_dtype), (None if zp is None else zp.to(torch.int8))


def quantize_per_token_ref(x: torch.Tensor, args: QuantArgs):
    """Dynamic per-token (row) activation quantization: (q, scale [rows, 1] fp32)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    amax = x2.abs().amax(-1, keepdim=True)
    scale, _ = qparams_from_minmax(-amax, amax, QuantArgs(args.num_bits, args.type, True, "token"))
    q = quantize_ref(x2, scale, None, args)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_per_token_vllm(x: torch.Tensor, args: QuantArgs):
    """Dynamic per-token quantization as vLLM's CUDA kernels do it: (q, scale [rows, 1] fp32).

    int8 (csrc/quantization/compressed_tensors/int8_quant_kernels.cu): scale = absmax / 127,
    q = cvt.rni.sat.s8(x * (127 / absmax)) (round half even, saturate), 0 for an all-zero row.
    fp8 (csrc/quantization/fp8/common.cu): scale = max(absmax / 448, 1 / (448 * 512)),
    q = e4m3(clamp(x / scale, -448, 448)), round to nearest even."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    amax = x2.abs().amax(-1, keepdim=True)
    if args.type == "float":
        scale = (amax / FP8_MAX).clamp(min=1.0 / (FP8_MAX * 512))
        q = (x2 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    elif args.type == "int" and args.num_bits == 8:
        qmax = float(args.qmax)                       # 127
        inv = torch.where(amax == 0, torch.zeros_like(amax), qmax / amax)
        q = torch.round(x2 * inv).clamp(args.qmin, qmax).to(torch.int8)
        scale = amax / qmax
    else:
        raise ValueError(f"vLLM quantizes activations dynamically to int8 or fp8, not "
                         f"{args.type}{args.num_bits}")
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [rows, cols] -> int32 [rows, ceil(cols/8)]: element k of each
    word at bits 4k..4k+3, stored as value + 8 (compressed-tensors pack-quantized)."""
    rows, cols = q.shape
    pad = (-cols) % 8
    u = (q.to(torch.int32) + 8) & 0xF
    if pad:
        u = torch.nn.functional.pad(u, (0, pad), value=8)  # pads unpack to zero
    u = u.reshape(rows, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return _sum_to_int32(u << shifts)


def _sum_to_int32(parts: torch.Tensor) -> torch.Tensor:
    # OR of disjoint nibbles; int64 sum then wrap into int32's two's complement.
    s = parts.to(torch.int64).sum(-1)
    s = torch.where(s >= 2 ** 31, s - 2 ** 32, s)
    return s.to(torch.int32)


def unpack_int4_ref(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_int4_ref: int32 [rows, ceil(cols/8)] -> int8 [rows, cols] in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    u = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (u.reshape(packed.shape[0], -1)[:, :cols] - 8).to(torch.int8)


def quantize_pack_int4_ref(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """quantize_weight_ref then pack_int4_ref: (packed int32 [out, ceil(in/8)], scale, zp)."""
    q, scale, zp = quantize_weight_ref(w, args, scale_dtype)
    return pack_int4_ref(q), scale, zp


# ----------------------------------------------------------------------------- Triton kernels
#
# Bit-exact with the references above, on a GPU and in the interpreter:
#  - every division is IEEE (tl.div_rn): Triton's plain `/` is approximate on NVIDIA GPUs;
#  - round half to even is the 1.5 * 2**23 magic add, exact for |y| < 2**22 (callers clamp);
#  - bf16 scales are rounded on the fp32 bits (the interpreter's fp32->bf16 cast truncates);
#  - fp8 values are rounded to the e4m3 grid on the fp32 bits and their bytes are built by
#    hand and stored as uint8 (the interpreter's fp32->fp8 cast rounds wrongly, and this
#    needs no fp8 conversion support on pre-sm89 GPUs);
#  - inputs are upcast to fp32 right after loading (interpreter bf16 arithmetic is wrong).

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from .dispatch import use_triton  # noqa: E402
from .primitives import e4m3_byte, e4m3_round, qparams, rne  # noqa: E402

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


def _quantize_groups_triton(x: torch.Tensor, args: QuantArgs, group_size: int,
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
        q = torch.empty(rows, cols, dtype=FP8_DTYPE if is_fp8 else torch.int8, device=x.device)
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


def _fp8_round_triton(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    if n:
        block = 4096
        _fp8_round_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block, num_warps=8)
    return y


def _pack_int4_triton(q: torch.Tensor) -> torch.Tensor:
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


def _unpack_int4_triton(packed: torch.Tensor, cols: int) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- public API

def _check_args(args: QuantArgs) -> None:
    if args.type == "float":
        if args.num_bits != 8 or not args.symmetric:
            raise ValueError(f"float quantization is fp8 e4m3, symmetric only; got {args}")
    elif args.type == "int":
        if not 2 <= args.num_bits <= 8:
            raise ValueError(f"int quantization needs 2..8 bits, got {args.num_bits}")
    else:
        raise ValueError(f"quantization type must be 'int' or 'float', got {args.type!r}")


def _weight_group_size(w: torch.Tensor, args: QuantArgs) -> int:
    """Columns per scale: args.group_size for strategy 'group', else the whole row."""
    _check_args(args)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in], got {tuple(w.shape)} "
                         f"{w.dtype}")
    if w.shape[1] == 0:
        raise ValueError("weight has no input columns")
    if args.strategy != "group":
        return w.shape[1]
    if not args.group_size or args.group_size <= 0:
        raise ValueError(f"group strategy needs a positive group_size, got {args.group_size}")
    group_view(w[:0], args.group_size)  # raises the reference's error for a ragged last group
    return args.group_size


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """Values rounded to the e4m3 grid (RNE, saturating at +-448), fp32, same shape."""
    return _fp8_round_triton(x) if use_triton(x) else fp8_round_ref(x)


def quantize_weight(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """Round-to-nearest weight quantization: (q int8|fp8 [out, in], scale [out, ngroups] in
    scale_dtype (default w.dtype), zp int8 [out, ngroups] or None)."""
    gs = _weight_group_size(w, args)
    if use_triton(w):
        return _quantize_groups_triton(w, args, gs, scale_dtype or w.dtype)
    return quantize_weight_ref(w, args, scale_dtype)


def quantize_pack_int4(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """quantize_weight and pack_int4 in one pass: (packed int32 [out, ceil(in/8)], scale, zp)."""
    gs = _weight_group_size(w, args)
    if args.type != "int" or args.num_bits > 4:
        raise ValueError(f"int4 packing needs int weights of at most 4 bits, got {args}")
    if not use_triton(w):
        return quantize_pack_int4_ref(w, args, scale_dtype)
    if gs % 8 and gs != w.shape[1]:  # groups must not share a word: pack separately
        q, scale, zp = _quantize_groups_triton(w, args, gs, scale_dtype or w.dtype)
        return _pack_int4_triton(q), scale, zp
    return _quantize_groups_triton(w, args, gs, scale_dtype or w.dtype, pack=True)



def check_act_sim(act_sim: str) -> str:
    if act_sim not in ACT_SIMS:
        raise ValueError(f"unknown activation simulation {act_sim!r}: choose one of "
                         f"{', '.join(ACT_SIMS)}")
    return act_sim


def quantize_per_token(x: torch.Tensor, args: QuantArgs, act_sim: str = "compressed-tensors"):
    """Dynamic per-token activation quantization of x [..., hidden]:
    (q like x in int8|fp8, scale [..., 1] fp32), rounded by the `act_sim` convention:
    "compressed-tensors" (quantize_per_token_ref, scale = absmax / 127.5 for int8; a Triton
    kernel on GPUs) or "vllm" (quantize_per_token_vllm, absmax / 127; torch everywhere)."""
    _check_args(args)
    if x.dim() == 0 or x.shape[-1] == 0 or not x.is_floating_point():
        raise ValueError(f"activations must be a float tensor [..., hidden], got "
                         f"{tuple(x.shape)} {x.dtype}")
    if check_act_sim(act_sim) == "vllm":
        return quantize_per_token_vllm(x, args)
    if not use_triton(x):
        return quantize_per_token_ref(x, args)
    sym = QuantArgs(args.num_bits, args.type, True, "token")
    q, scale, _ = _quantize_groups_triton(x.reshape(-1, x.shape[-1]), sym, x.shape[-1],
                                          torch.float32)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols/8)] (see pack_int4_ref)."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes int8 [rows, cols], got {tuple(q.shape)} {q.dtype}")
    return _pack_int4_triton(q) if use_triton(q) else pack_int4_ref(q)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [rows, ceil(cols/8)] -> int8 [rows, cols] in [-8, 7]."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4 takes int32 [rows, words], got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    if packed.shape[1] != (cols + 7) // 8:
        raise ValueError(f"{packed.shape[1]} packed words per row do not hold {cols} columns: "
                         f"expected {(cols + 7) // 8}; pass the unpacked column count")
    if use_triton(packed):
        return _unpack_int4_triton(packed, cols)
    return unpack_int4_ref(packed, cols)
