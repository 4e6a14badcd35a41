"""Round-to-nearest weight quantization: the data-free FP8 path and the baseline for GPTQ/AWQ.

Also what GPTQ and AWQ share: the group bookkeeping (which group each input column belongs to,
a shorter last group when `partial_last_group`; group qparams; the one way they are expanded
to columns) and the clipping search of group ranges under a Hessian's blocks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.hessian import output_error
from ..kernels.quant import dequantize_ref, qparams_from_minmax, quantize_ref, quantize_weight
from ..schemes import QuantArgs, Scheme
from ..checkpoint.qweight import QuantizedWeight
from ..recipe import Method
from ..report import step

CLIP_SHRINKS = tuple(1.0 - i / 20 for i in range(10))      # 1.0 ... 0.55, as AWQ's original


def group_gram(x: torch.Tensor, g: int) -> torch.Tensor:
    """The g x g diagonal blocks of X^T X for inputs x [tokens, K]: [K/g, g, g] fp32."""
    xg = x.float().view(-1, x.shape[-1] // g, g).transpose(0, 1)    # [ng, T, g]
    return xg.transpose(1, 2) @ xg


def hessian_blocks(H: torch.Tensor, g: int) -> torch.Tensor:
    """The g x g diagonal blocks of a Hessian [K, K]: [K/g, g, g] fp32."""
    ng = H.shape[0] // g
    return H.float().view(ng, g, ng, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@torch.no_grad()
@step("clip search")
def clip_search(w: torch.Tensor, hb: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype,
                shrinks=CLIP_SHRINKS, chunk_rows: int = 4096
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of w [N, K]: (lo, hi) [N, K/g] from shrinking the group's min/max by the
    factor f in `shrinks` that minimises e_g H_g e_g^T, e_g = Q_f(w_g) - w_g, and the chosen f.

    hb [K/g, g, g]: the diagonal blocks of X^T X (group_gram, AWQ) or of GPTQ's Hessian
    (hessian_blocks): the output error of group g on the calibration data needs only its own
    block, so each candidate costs one small batched matmul."""
    n, k = w.shape
    g = args.group_size
    ng = k // g
    lo_all, hi_all, f_all = [], [], []
    for r0 in range(0, n, chunk_rows):
        wc = w[r0:r0 + chunk_rows].float()
        wg = wc.view(-1, ng, g)
        lo0, hi0 = wg.amin(-1), wg.amax(-1)
        best = torch.full_like(lo0, math.inf)
        best_f = torch.ones_like(lo0)
        for f in shrinks:
            scale, zp = qparams_from_minmax(lo0 * f, hi0 * f, args, scale_dtype)
            d = dequantize_ref(quantize_ref(wc, scale, zp, args), scale, zp) - wc
            d = d.view(-1, ng, g).transpose(0, 1)              # [ng, rows, g]
            err = output_error(d, hb).T                        # [rows, ng]
            better = err < best
            best = torch.where(better, err, best)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
        lo_all.append(lo0 * best_f)
        hi_all.append(hi0 * best_f)
        f_all.append(best_f)
    return torch.cat(lo_all), torch.cat(hi_all), torch.cat(f_all)


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


def expand(p: torch.Tensor | None, gidx: torch.Tensor, rows: int) -> torch.Tensor | None:
    """[rows or 1, ngroups] -> [rows, cols]: each column gets its group's value."""
    if p is None:
        return None
    return p[:, gidx].expand(rows, -1) if p.shape[0] == 1 else p[:, gidx]


def column_qparams(scale: torch.Tensor, zp: torch.Tensor | None, gidx: torch.Tensor):
    """Group qparams [rows, ngroups] as quantize_ref / dequantize_ref take them: as they are
    when the groups are equal and in order (they broadcast them), else expanded to columns."""
    cols, ng = gidx.numel(), scale.shape[1]
    if cols % ng == 0 and torch.equal(gidx, torch.arange(cols, device=gidx.device)
                                      // (cols // ng)):
        return scale, zp
    return expand(scale, gidx, scale.shape[0]), expand(zp, gidx, scale.shape[0])


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


@step("rtn")
def rtn_quantize(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
                 partial_last_group: bool = False) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round-to-nearest w [out, in] -> (QuantizedWeight, dequantized weight fp32): the fused
    kernel on a GPU and its torch reference elsewhere (kernels.quant.quantize_weight); a
    shorter last group or a per-tensor scale by the reference's formulas."""
    scale_dtype = scale_dtype or w.dtype
    gidx = group_index(w.shape[1], args, partial_last_group, w.device)
    if args.strategy == "channel" or (args.strategy == "group"
                                      and w.shape[1] % args.group_size == 0):
        q, scale, zp = quantize_weight(w, args, scale_dtype)
    else:
        scale, zp = group_qparams(w, args, scale_dtype, gidx)
        q = quantize_ref(w, *column_qparams(scale, zp, gidx), args)
        scale, zp = scale.to(scale_dtype), None if zp is None else zp.to(torch.int8)
    deq = dequantize_ref(q, *column_qparams(scale, zp, gidx))
    return QuantizedWeight(q, scale, zp, args), deq


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


@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest of every target Linear: no calibration data (the FP8 default)."""
    data_free = True

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return quantize_linears_rtn(ctx.linears, ctx.scheme, ctx.device, ctx.partial_last_group)
