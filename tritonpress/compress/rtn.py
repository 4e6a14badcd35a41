"""Round-to-nearest weight quantization: the data-free FP8 path and the baseline for GPTQ/AWQ.

Also the group bookkeeping GPTQ shares: which group each input column belongs to (a
shorter last group when `partial_last_group`), and group qparams expanded to columns.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..kernels.quant import dequantize_ref, qparams_from_minmax, quantize_ref
from ..schemes import QuantArgs, Scheme
from .qweight import QuantizedWeight


def group_index(cols: int, args: QuantArgs, partial_last_group: bool = False,
                device=None) -> torch.Tensor:
    """[cols] long: the scale column (group) of each input column."""
    if args.strategy == "group":
        g = args.group_size
        if cols % g and not partial_last_group:
            raise ValueError(f"{cols} in-features are not a multiple of group size {g}: choose "
                             "a group size dividing it, ignore the layer, or pass "
                             "partial_last_group=True")
        return torch.arange(cols, device=device) // g
    if args.strategy in ("channel", "tensor"):
        return torch.zeros(cols, dtype=torch.long, device=device)
    raise ValueError(f"weights cannot be quantized per {args.strategy}")


def group_qparams(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype,
                  gidx: torch.Tensor):
    """Min/max qparams of each group of w [rows, cols]: scale (fp32 values rounded to
    scale_dtype) and zp (fp32 or None), [rows, ngroups] ([1, 1] for per-tensor)."""
    w = w.float()
    ngroups = int(gidx.max()) + 1
    if args.strategy == "tensor":
        return qparams_from_minmax(w.amin().reshape(1, 1), w.amax().reshape(1, 1), args,
                                   scale_dtype)
    lo = torch.full((w.shape[0], ngroups), float("inf"), device=w.device)
    hi = torch.full((w.shape[0], ngroups), float("-inf"), device=w.device)
    idx = gidx.unsqueeze(0).expand_as(w)
    lo = lo.scatter_reduce(1, idx, w, "amin")
    hi = hi.scatter_reduce(1, idx, w, "amax")
    return qparams_from_minmax(lo, hi, args, scale_dtype)


def expand(p: torch.Tensor | None, gidx: torch.Tensor, rows: int) -> torch.Tensor | None:
    """[rows or 1, ngroups] -> [rows, cols]: each column gets its group's value."""
    if p is None:
        return None
    return p[:, gidx].expand(rows, -1) if p.shape[0] == 1 else p[:, gidx]


def rtn_quantize(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
                 partial_last_group: bool = False) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round-to-nearest w [out, in] -> (QuantizedWeight, dequantized weight fp32)."""
    scale_dtype = scale_dtype or w.dtype
    gidx = group_index(w.shape[1], args, partial_last_group, w.device)
    scale, zp = group_qparams(w, args, scale_dtype, gidx)
    s_cols, z_cols = expand(scale, gidx, w.shape[0]), expand(zp, gidx, w.shape[0])
    q = quantize_ref(w, s_cols, z_cols, args)
    deq = dequantize_ref(q, s_cols, z_cols)
    zp = None if zp is None else zp.to(torch.int8)
    return QuantizedWeight(q, scale.to(scale_dtype), zp, args), deq


@torch.no_grad()
def quantize_linears_rtn(linears: dict[str, nn.Linear], scheme: Scheme, device=None,
                         partial_last_group: bool = False):
    """RTN every Linear in `linears` (full name -> module), writing dequantized weights back.

    One weight at a time on `device` (default: where it is). Returns (qweights, infos)."""
    qweights, infos = {}, {}
    for name, lin in linears.items():
        t0 = time.perf_counter()
        w = lin.weight.data
        dev = device if device is not None else w.device
        qw, deq = rtn_quantize(w.to(dev), scheme.weights, w.dtype, partial_last_group)
        err = (deq - w.to(dev).float()).pow(2).sum() / w.float().pow(2).sum().clamp_min(1e-30)
        lin.weight.data = deq.to(w.dtype).to(w.device)
        qweights[name] = QuantizedWeight(qw.q.cpu(), qw.scale.cpu(),
                                         None if qw.zero_point is None else qw.zero_point.cpu(),
                                         qw.args)
        infos[name] = {"method": "rtn", "weight_rel_err": float(err),
                       "seconds": round(time.perf_counter() - t0, 4)}
    return qweights, infos


def rtn_layer(layer_idx, layer, prefix, inputs, ctx):
    """Pipeline method function: RTN the layer's target Linears (no calibration data used)."""
    return quantize_linears_rtn(ctx.linears, ctx.scheme, ctx.device, ctx.partial_last_group)
