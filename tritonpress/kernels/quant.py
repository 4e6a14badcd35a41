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

from ..schemes import QuantArgs

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


def quantize_ref(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                 args: QuantArgs) -> torch.Tensor:
    """x [rows, cols] with scale/zp [rows, ngroups] -> int8 (int) or float8_e4m3fn (float)."""
    cols = x.shape[1]
    y = x.float() / _expand(scale.float(), cols)
    if args.type == "float":
        return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    y = torch.round(y)
    if zp is not None:
        y = y + _expand(zp.float(), cols)
    return y.clamp(args.qmin, args.qmax).to(torch.int8)


def dequantize_ref(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    cols = q.shape[1]
    y = q.float()
    if zp is not None:
        y = y - _expand(zp.float(), cols)
    return (y * _expand(scale.float(), cols)).to(dtype)


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
