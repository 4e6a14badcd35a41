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

This file holds the torch references (also the CPU path) and, below them, the dispatch: the
functions without _ref run the Triton kernels of quant_triton.py on CUDA tensors.
"""
from __future__ import annotations

import torch

from ..schemes import ACT_SIMS, QuantArgs
from . import quant_triton
from .dispatch import use_triton

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


# ----------------------------------------------------------------------------- references

def fp8_round_ref(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the e4m3 grid (RNE, saturating at +-448); fp32 out."""
    return fp8_to_float(x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))


def fp8_to_float(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> a new fp32 tensor, exactly. On a CPU through fp16, whose conversion is
    vectorised (torch's from e4m3 is scalar there: a 576 x 1536 weight 1.26 -> 0.77 ms on 2 Zen
    cores, 0.25 ms when in cache): an e4m3 code's exponent and mantissa bits moved into
    fp16's places (sign to bit 15) are 2^-8 of its value, subnormals included; codes 0x7F and
    0xFF are NaN."""
    if q.device.type != "cpu":
        return q.float()
    v = q.view(torch.uint8).to(torch.int16)
    h = ((v & 0x7F) << 7) | ((v & 0x80) << 8)
    out = h.view(torch.float16).float().mul_(256.0)
    return out.masked_fill_((v & 0x7F) == 0x7F, float("nan"))


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
    y, s = _by_group(fp8_to_float(q) if q.dtype == FP8_DTYPE else
                     q.to(torch.float32, copy=True), scale)
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


# ----------------------------------------------------------------------------- dispatch

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
    return quant_triton.fp8_round_triton(x) if use_triton(x) else fp8_round_ref(x)


def quantize_weight(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """Round-to-nearest weight quantization: (q int8|fp8 [out, in], scale [out, ngroups] in
    scale_dtype (default w.dtype), zp int8 [out, ngroups] or None)."""
    gs = _weight_group_size(w, args)
    if use_triton(w):
        return quant_triton.quantize_groups_triton(w, args, gs, scale_dtype or w.dtype)
    return quantize_weight_ref(w, args, scale_dtype)


def quantize_pack_int4(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None):
    """quantize_weight and pack_int4 in one pass: (packed int32 [out, ceil(in/8)], scale, zp)."""
    gs = _weight_group_size(w, args)
    if args.type != "int" or args.num_bits > 4:
        raise ValueError(f"int4 packing needs int weights of at most 4 bits, got {args}")
    if not use_triton(w):
        return quantize_pack_int4_ref(w, args, scale_dtype)
    if gs % 8 and gs != w.shape[1]:  # groups must not share a word: pack separately
        q, scale, zp = quant_triton.quantize_groups_triton(w, args, gs, scale_dtype or w.dtype)
        return quant_triton.pack_int4_triton(q), scale, zp
    return quant_triton.quantize_groups_triton(w, args, gs, scale_dtype or w.dtype, pack=True)


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
    q, scale, _ = quant_triton.quantize_groups_triton(x.reshape(-1, x.shape[-1]), sym,
                                                      x.shape[-1], torch.float32)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols/8)] (see pack_int4_ref)."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes int8 [rows, cols], got {tuple(q.shape)} {q.dtype}")
    return quant_triton.pack_int4_triton(q) if use_triton(q) else pack_int4_ref(q)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """int32 [rows, ceil(cols/8)] -> int8 [rows, cols] in [-8, 7]."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"unpack_int4 takes int32 [rows, words], got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    if packed.shape[1] != (cols + 7) // 8:
        raise ValueError(f"{packed.shape[1]} packed words per row do not hold {cols} columns: "
                         f"expected {(cols + 7) // 8}; pass the unpacked column count")
    if use_triton(packed):
        return quant_triton.unpack_int4_triton(packed, cols)
    return unpack_int4_ref(packed, cols)
