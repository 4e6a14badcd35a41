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

from ..kernels import fp4
from ..kernels.hessian import output_error
from ..kernels.quant import dequantize_ref, qparams_from_minmax, quantize_ref, quantize_weight
from ..schemes import QuantArgs, Scheme
from ..checkpoint.qweight import QuantizedWeight
from ..recipe import Method
from ..report import step

CLIP_SHRINKS = tuple(1.0 - i / 20 for i in range(10))      # 1.0 ... 0.55, as AWQ's original
# The searches below go through a weight this many rows at a time: their [rows, in] fp32
# temporaries then stay in cache. An MoE layer's stacked gate/up (24576 x 576, W4A16 g64, 2
# threads): 4096 rows 692 ms, 2048 335 ms, 1024 267 ms, 512 291 ms; the same choices.
CHUNK_ROWS = 1024


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
                shrinks=CLIP_SHRINKS, chunk_rows: int = CHUNK_ROWS, damp: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of w [N, K]: (lo, hi) [N, K/g] from shrinking the group's min/max by the
    factor f in `shrinks` that minimises e_g H_g e_g^T, e_g = Q_f(w_g) - w_g, and the chosen f.

    hb [K/g, g, g]: the diagonal blocks of X^T X (group_gram, AWQ) or of GPTQ's Hessian
    (hessian_blocks): the output error of group g on the calibration data needs only its own
    block, so each candidate costs one small batched matmul. damp: H_g + damp * mean(diag H) * I
    instead, i.e. the output error plus damp * mean(diag H) * ||e_g||^2 (the weight error, for
    directions the calibration data never excited)."""
    n, k = w.shape
    g = args.group_size
    ng = k // g
    if damp:
        eye = torch.eye(g, device=hb.device, dtype=hb.dtype)
        hb = hb + damp * hb.diagonal(dim1=1, dim2=2).mean() * eye
    lo_all, hi_all, f_all = [], [], []
    for r0 in range(0, n, chunk_rows):
        # group-major [ng, rows, g]: the error products need no transposed copy per candidate
        wt = w[r0:r0 + chunk_rows].float().view(-1, ng, g).transpose(0, 1).contiguous()
        lo0, hi0 = wt.amin(-1), wt.amax(-1)                   # [ng, rows]
        best = torch.full_like(lo0, math.inf)
        best_f = torch.ones_like(lo0)
        d = torch.empty_like(wt)
        for f in shrinks:
            scale, zp = qparams_from_minmax(lo0 * f, hi0 * f, args, scale_dtype)
            # on a CPU output_error's bf16 route (oneDNN; bf16 multiplies with fp32 sums where
            # it takes them, on this Zen CPU bit-equal to fp32 at these shapes): 24576 x 576
            # g64, 10 shrinks 180 -> 117 ms, the same picks. A GPU keeps fp32 (cheap there).
            err = output_error(_rounding_error(wt, scale, zp, args, out=d), hb,
                               bf16=wt.device.type == "cpu")
            better = err < best
            best = torch.where(better, err, best)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
        lo_all.append((lo0 * best_f).T)
        hi_all.append((hi0 * best_f).T)
        f_all.append(best_f.T)
    return torch.cat(lo_all), torch.cat(hi_all), torch.cat(f_all)


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                    args: QuantArgs, out: torch.Tensor) -> torch.Tensor:
    """Q(w) - w for w [..., g] with one scale/zp [...] per last-axis group, written into out:
    quantize_ref then dequantize_ref's arithmetic, in place (integer grids; fp8 through them)."""
    s = scale.unsqueeze(-1)
    if args.type == "float":
        w2, s2 = w.reshape(-1, w.shape[-1]), scale.reshape(-1, 1)
        return torch.sub(dequantize_ref(quantize_ref(w2, s2, None, args), s2, None).view_as(w),
                         w, out=out)
    y = torch.div(w, s, out=out).round_()
    if zp is None:
        return y.clamp_(args.qmin, args.qmax).mul_(s).sub_(w)
    z = zp.unsqueeze(-1)
    return y.add_(z).clamp_(args.qmin, args.qmax).sub_(z).mul_(s).sub_(w)


# MXFP4 clip search: the exponent steps from the format's own exponent e a group may choose
# (-1: half the scale, finer steps, the largest values clipped; +1: twice, nothing saturates).
# GPTQ on SmolLM2-135M MXFP4A16, 16 x 256 calibration tokens, mean KL canterbury / code:
# e only 0.219 / 0.155; (-1, 0) 0.199 / 0.145; (0, 1) 0.222 / 0.168; (-1, 0, 1) 0.205 / 0.151;
# (0, 1, 2) 0.221 / 0.163; (-2, -1, 0) 0.205 / 0.156 (docs: the lead's results notes)
MX_EXPONENT_STEPS = (-1, 0)


def fp4_scale_candidates(amax_g: torch.Tensor, args: QuantArgs, global_scale, shrinks,
                         mx_steps) -> list[torch.Tensor]:
    """The stored group scales a search tries, the format's own first (what a group keeps
    unless another is strictly better, and all there is without a search): NVFP4 from the
    range shrunk by each factor, MXFP4 the format's exponent moved by each step (any power of
    two is a valid MX scale)."""
    if args.is_mx:
        e = fp4.mx_exponents_ref(amax_g).to(torch.int32)
        return [(e + k).clamp(0, 254).to(torch.uint8)
                for k in (0, *(k for k in mx_steps if k != 0))]
    return [fp4.nvfp4_group_scales_ref(amax_g * f, global_scale)
            for f in (1.0, *(f for f in shrinks if f != 1.0))]


@torch.no_grad()
@step("clip search")
def fp4_scale_search(w: torch.Tensor, hb: torch.Tensor | None, args: QuantArgs,
                     global_scale: torch.Tensor | None, shrinks=None, mx_steps=None,
                     chunk_rows: int = CHUNK_ROWS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of w [N, K]: the stored fp4 scale (fp4_scale_candidates) minimising the
    group's output error e_g H_g e_g^T, e_g = Q(w_g) - w_g (hb: the diagonal blocks of the
    Hessian, as clip_search; None: the format's own scales). Returns (stored [N, K/g], the
    share of groups that chose another scale than the format's first candidate)."""
    g = args.group_size
    shrinks = CLIP_SHRINKS if shrinks is None else shrinks
    mx_steps = MX_EXPONENT_STEPS if mx_steps is None else mx_steps
    out, moved = [], 0
    for r0 in range(0, w.shape[0], chunk_rows):
        wc = w[r0:r0 + chunk_rows]
        wg = wc.reshape(wc.shape[0], -1, g)
        cands = fp4_scale_candidates(wg.abs().amax(-1), args, global_scale, shrinks, mx_steps)
        dtype = cands[0].dtype
        if hb is None or len(cands) == 1:
            out.append(cands[0].view(torch.uint8))
            continue
        wf = wg.float()
        aw, sw = wf.abs(), torch.sign(wf)
        best, pick = None, torch.zeros(wg.shape[:2], dtype=torch.long, device=w.device)
        for i, c in enumerate(cands):
            sc = fp4.effective_scale(c, global_scale, args).unsqueeze(-1)
            # Q(w) - w as sign(w) (e2m1(|w| / s) s - |w|): the same numbers in half the passes
            a = (aw / sc).clamp_(max=fp4.E2M1_MAX)
            d = fp4.e2m1_magnitude(a).mul_(sc).sub_(aw).mul_(sw)
            err = output_error(d.transpose(0, 1), hb).T            # [rows, ng]
            if best is None:
                best = err
            else:
                better = err < best
                best = torch.where(better, err, best)
                pick = torch.where(better, torch.full_like(pick, i), pick)
        stacked = torch.stack([c.view(torch.uint8) for c in cands])      # fp8 as its bytes
        out.append(stacked.gather(0, pick.unsqueeze(0)).squeeze(0))
        moved += int((pick != 0).sum())
    return torch.cat(out).view(dtype), moved / max(1, w.shape[0] * (w.shape[1] // g))


def group_index(cols: int, args: QuantArgs, partial_last_group: bool = False,
                device=None) -> torch.Tensor:
    """[cols] long: the scale column (group) of each input column."""
    if args.strategy in ("group", "tensor_group"):
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


def row_sample(rows: int, max_rows: int = 256, device=None) -> torch.Tensor | None:
    """max_rows evenly spaced row indices of a weight with more rows (None: all of them): what
    the reports' per-weight errors are estimated from. Rows are independent, and the full
    products cost as much as the quantization itself (FP8 RTN of an MoE layer: 0.4 of 1.7 ms
    a weight)."""
    if rows <= max_rows:
        return None
    return torch.linspace(0, rows - 1, max_rows, device=device).round().long()


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


# Linears whose NVFP4 global scales vLLM needs equal, since it runs them as one fused GEMM
# (llm-compressor's FUSED_LAYER_NAMES): siblings under one parent module
FUSED_LINEARS = (("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj"),
                 ("q_a_proj", "kv_a_proj_with_mqa"), ("w1", "w3"))


def fused_groups(names) -> list[list[str]]:
    """The full names in `names` that share a global scale, as lists (singletons for the rest):
    the members of one FUSED_LINEARS tuple under one parent, when all of them are there."""
    names = list(names)
    left, out = set(names), []
    for n in names:
        if n not in left:
            continue
        parent, _, leaf = n.rpartition(".")
        pre = f"{parent}." if parent else ""
        group = next(([pre + m for m in t] for t in FUSED_LINEARS
                      if leaf in t and all(pre + m in left for m in t)), [n])
        left -= set(group)
        out.append(group)
    return out


def nvfp4_global_scales(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight's NVFP4 global scale 448 * 6 / amax, from the amax over its fused group."""
    out = {}
    for group in fused_groups(weights):
        amax = torch.stack([weights[n].detach().abs().amax().cpu() for n in group]).amax()
        g = fp4.nvfp4_global_scale_ref(amax)
        out.update({n: g for n in group})
    return out


@step("rtn")
def rtn_quantize(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype | None = None,
                 partial_last_group: bool = False, global_scale: torch.Tensor | None = None
                 ) -> tuple[QuantizedWeight, torch.Tensor]:
    """Round-to-nearest w [out, in] -> (QuantizedWeight, dequantized weight fp32): the fused
    kernel on a GPU and its torch reference elsewhere (kernels.quant.quantize_weight,
    kernels.fp4.quantize_fp4, kernels.fp8_block.quantize_fp8_block); a shorter last group or a
    per-tensor scale by the reference's formulas. global_scale: NVFP4's (default: from w)."""
    scale_dtype = scale_dtype or w.dtype
    if args.is_fp4:
        if partial_last_group:
            raise ValueError("fp4 formats have fixed groups: partial_last_group does not apply")
        packed, scale, gs = fp4.quantize_fp4(w, args, None if global_scale is None
                                             else global_scale.to(w.device))
        qw = QuantizedWeight(fp4.unpack_fp4_codes(packed), scale, None, args, gs)
        return qw, qw.dequantize()
    if args.strategy == "block":
        from ..kernels.fp8_block import quantize_fp8_block
        q, scale = quantize_fp8_block(w, tuple(args.block_structure), scale_dtype)
        qw = QuantizedWeight(q, scale, None, args)
        return qw, qw.dequantize()
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
    gscales = (nvfp4_global_scales({n: lin.weight for n, lin in linears.items()})
               if scheme.weights.strategy == "tensor_group" else {})
    for name, lin in linears.items():
        t0 = time.perf_counter()
        w = lin.weight.data
        dev = device if device is not None else w.device
        wd = w.to(dev)
        qw, deq = rtn_quantize(wd, scheme.weights, w.dtype, partial_last_group,
                               gscales.get(name))
        rows = row_sample(w.shape[0], device=dev)    # the report's error: a few hundred rows
        wf = (wd if rows is None else wd[rows]).float()
        d = deq if rows is None else deq[rows]
        err = (d - wf).square_().sum() / torch.linalg.vector_norm(wf).square().clamp_min(1e-30)
        lin.weight.data = deq.to(w.dtype).to(w.device)
        qweights[name] = qw.cpu()
        infos[name] = {"method": "rtn", "weight_rel_err": float(err),
                       "seconds": round(time.perf_counter() - t0, 4)}
    return qweights, infos


@dataclass(frozen=True)
class RTN(Method):
    """Round-to-nearest of every target Linear: no calibration data (the FP8 default)."""
    data_free = True

    def check(self, scheme):
        a = scheme.input_activations
        if a is not None and a.dynamic == "local":
            raise ValueError(f"scheme {scheme.name} calibrates a static global scale of each "
                             "Linear's inputs from data, and RTN() reads none: use GPTQ() (its "
                             "default recipe) with calibration data, or NVFP4A16 for RTN")

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return quantize_linears_rtn(ctx.linears, ctx.scheme, ctx.device, ctx.partial_last_group)
