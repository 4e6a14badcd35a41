"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"), in plain torch: the CPU path and the oracle for the fused kernels.

For one Linear with weight W [rows, cols] and Hessian H = 2/n sum x x^T [cols, cols]:
  1. dead inputs (H_ii == 0): H_ii = 1, W[:, i] = 0
  2. activation order ("static", llm-compressor's default and compress()'s): sweep the
     columns by decreasing H_ii
  3. dampening: H += frac * mean(diag H) * I, frac raised x10 while H is not positive definite
  4. U = upper Cholesky factor of H^-1: row i of U holds the OBS update for column i given
     that columns < i are already fixed
  5. sweep the columns in blocks of 128: quantize column i, spread its error (w - q) / U_ii
     over the remaining columns of the block along U[i, i:], and after each block apply the
     block's errors to all later columns in one matmul ("lazy batch" updates)
Groups always stay on the ORIGINAL columns (activation order only changes the sweep order), so
the result is plain group-wise (no g_idx). Group scales are either fixed from the weights before
the sweep ("static", as llm-compressor) or computed from the updated weights when the sweep
first reaches a group ("dynamic", as the paper); see DEFAULT_GROUP_SCALES.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass

import torch

from ..kernels import fp4
from ..kernels.hessian import output_error
from ..kernels.quant import qparams_from_minmax, quantize_ref
from ..schemes import QuantArgs
from ..recipe import Method, check_actorder, check_int, check_number, check_type
from ..checkpoint.qweight import QuantizedWeight
from ..report import step
from .rtn import (CLIP_SHRINKS, clip_search, column_qparams, fp4_scale_search, group_index,
                  group_qparams, hessian_blocks, nvfp4_global_scales, quantize_linears_rtn,
                  row_sample, rtn_quantize)
# Steps 3-5 (the inverse factor and the column sweep, which picks the fused kernels on a GPU)
from .gptq_solve import gptq_sweep, inverse_cholesky

# Static group scales (from the weights before the sweep, as llm-compressor), chosen by an
# earlier measurement on SmolLM2-135M W4A16 g64 against scales made as the sweep meets a group.
DEFAULT_GROUP_SCALES = "static"
# llm-compressor 0.14's GPTQModifier default: sweep by decreasing H_ii, scales and groups on
# the original columns (no g_idx). GPTQ() uses it;
# gptq_quantize itself orders only when asked (it is also the fused kernels' oracle).
DEFAULT_ACTORDER = "static"
# The clip search's Hessian blocks dampened by mean(diag H) (its error: output error plus weight
# error). W4A16 g64 mean KL canterbury/code, 2026-12-07 (docs/results.md): Gemma 3 270M
# 0.122/0.324 undampened -> 0.094/0.308; SmolLM2-135M 0.128/0.241 -> 0.132/0.225.
DEFAULT_CLIP_DAMP = 1.0
# GPTQ's dampening (a fraction of mean(diag H)): 0.01 as the paper and llm-compressor, 0.1 on
# the fp4 grids. Measured 2026-12-07 (docs/formats.md), KL canterbury / code at 0.01 -> 0.1:
# SmolLM2 MXFP4A16 0.1561/0.2870 -> 0.1592/0.2647, NVFP4A16 0.0789/0.1156 -> 0.0792/0.1057;
# Gemma 3 270M MXFP4A16 0.1038/0.2947 -> 0.1032/0.2438, NVFP4A16 0.0552/0.1420 -> 0.0544/0.1222.
DEFAULT_DAMP, FP4_DAMP = 0.01, 0.1


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, args: QuantArgs,
                  scale_dtype: torch.dtype | None = None, **options):
    """GPTQ one weight [rows, cols] against its Hessian [cols, cols] (not modified); the
    options are gptq_quantize_stacked's. Returns (QuantizedWeight, dequantized weight
    [rows, cols] fp32, info dict)."""
    return gptq_quantize_stacked([weight], H, args, scale_dtype, **options)[0]


@torch.no_grad()
@step("gptq solve")
def gptq_quantize_stacked(weights: list[torch.Tensor], H: torch.Tensor, args: QuantArgs,
                          scale_dtype: torch.dtype | None = None, *, block_size: int = 128,
                          damp: float = 0.01, max_damp: float = 10.0,
                          actorder: str | None = None, group_scales: str = DEFAULT_GROUP_SCALES,
                          partial_last_group: bool = False, clip: bool = False,
                          clip_damp: float = 0.0, clip_min: float = min(CLIP_SHRINKS),
                          global_scales: list | None = None) -> list[tuple]:
    """GPTQ several weights that read the same input (q/k/v, gate/up) against their shared
    Hessian in one solve: rows never interact, so stacking them along rows gives each the result
    it would get alone, with one factorisation of H and one column sweep instead of one each.

    clip: static group scales from each group's range shrunk by the factor that minimises the
    group's output error e H_gg e^T on the calibration data (rtn.clip_search, AWQ's clipping
    search with GPTQ's own Hessian blocks) instead of the full min/max; clip_damp: those blocks
    dampened by this fraction of mean(diag H) (the error measured as output error plus weight
    error); clip_min: the smallest shrink factor tried (rtn.CLIP_SHRINKS from 1.0 down to it;
    integer grids only). On the fp4 grids
    (rtn.fp4_scale_search): NVFP4's group ranges shrunk the same way under the tensor's fixed
    global scale, MXFP4's power-of-two exponent moved by rtn.MX_EXPONENT_STEPS.
    global_scales: NVFP4's global scale of each weight (default: one from all of `weights`,
    which are q/k/v or gate/up: the fused Linears vLLM wants to share it).

    actorder: None (default here: columns in order) or "static" (sweep columns by decreasing
    H_ii; see check_actorder); GPTQ() passes DEFAULT_ACTORDER. group_scales:
    "static" or "dynamic" (group strategy only; channel scales always come from the weights as
    given). Returns [(QuantizedWeight, dequantized weight fp32, info dict)] in the order of
    `weights`."""
    actorder = check_actorder(actorder)
    if group_scales not in ("static", "dynamic"):
        raise ValueError(f"group_scales={group_scales!r}: use 'static' or 'dynamic'")
    t0 = time.perf_counter()
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    splits = [w.shape[0] for w in weights]
    scale_dtype = scale_dtype or weight.dtype
    W = weight.to(torch.float32, copy=True)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(H.shape)} does not match weight {tuple(W.shape)}")
    H0 = H.float()
    H = H0.clone()
    gidx = group_index(cols, args, partial_last_group, W.device)
    info = {"method": "gptq", "actorder": actorder}

    zero_dead_columns(W, H, info)

    dynamic = group_scales == "dynamic" and args.strategy == "group" and not args.is_fp4
    gparts = None
    if args.is_fp4:     # the format's group scales (searched), fixed before the sweep
        if partial_last_group:
            raise ValueError("fp4 formats have fixed groups: partial_last_group does not apply")
        stored, gparts, scale = _fp4_scales(weights, W, H, args, global_scales, clip, info)
        zp = None
    else:
        scale, zp = int_scales(W, H, args, scale_dtype, gidx, clip and not dynamic,
                               clip_shrinks(clip_min), clip_damp, info)

    perm = torch.argsort(H.diagonal(), descending=True) if actorder else \
        torch.arange(cols, device=W.device)
    W, H, gcol = W[:, perm], H[perm][:, perm], gidx[perm]

    Hinv, frac, failed = inverse_cholesky(H, damp, max_damp, overwrite=True)
    del H                                       # the sweep needs only its inverse factor
    info.update(dampening=frac, dampening_failed=failed)
    if Hinv is None:
        if args.is_fp4:     # each part its own global scale: one RTN per part
            res = [rtn_quantize(w, args, scale_dtype, global_scale=g)
                   for w, g in zip(weights, gparts)]
            qw = _cat_fp4([r[0] for r in res])
            deq = torch.cat([r[1] for r in res])
        else:
            qw, deq = rtn_quantize(weight, args, scale_dtype, partial_last_group)
        info.update(fallback="rtn")
        return _split(weight, qw, deq, None, H0, splits, info, t0, gparts)

    # the sweep (gptq_solve.py): the fused whole-layer solve on a GPU when it applies, else
    # the paper's loop over blocks of columns
    # NVFP4's groups under their fixed global scale sweep as plain groups
    sweep_args = dataclasses.replace(args, strategy="group") if args.is_fp4 else args
    Q, scale, zp, Losses = gptq_sweep(W, Hinv, sweep_args, scale, zp, gcol, dynamic=dynamic,
                                      scale_dtype=scale_dtype, block_size=block_size)
    del W                                       # swept: only Q is needed now
    Q = Q[:, torch.argsort(perm)]
    if args.is_fp4:     # the e2m1 codes of the values chosen (exact: Q = value * scale)
        g = args.group_size
        q = fp4.e2m1_codes_ref((Q.reshape(len(Q), -1, g) / scale.unsqueeze(-1))
                               .clamp(-6, 6)).reshape(Q.shape)
        qw = QuantizedWeight(q, stored, None, args)
    else:
        q = quantize_ref(Q, *column_qparams(scale, zp, gidx), args)   # the integers (exact)
        qw = QuantizedWeight(q, scale.to(scale_dtype), None if zp is None else zp.to(torch.int8),
                             args)
    info.update(fallback=None)
    return _split(weight, qw, Q, Losses, H0, splits, info, t0, gparts)


def zero_dead_columns(W: torch.Tensor, H: torch.Tensor, info: dict) -> None:
    """Inputs that never fired (H_ii = 0): their weights to zero and H_ii to 1, in place, as
    the reference GPTQ does (nothing to compensate with, and H stays invertible)."""
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    info["dead_columns"] = int(dead.sum())


def int_scales(W, H, args, scale_dtype, gidx, clip, shrinks, clip_damp, info):
    """The integer grids' group qparams of W fixed before the sweep: each group's min/max,
    shrunk by the clipping search under H's blocks where `clip` and the groups are whole."""
    if clip and args.strategy == "group" and W.shape[1] % args.group_size == 0:
        lo, hi, f = clip_search(W, hessian_blocks(H, args.group_size), args, scale_dtype,
                                shrinks, damp=clip_damp)
        info["clipped_groups"] = float((f < 1).float().mean())
        return qparams_from_minmax(lo, hi, args, scale_dtype)
    return group_qparams(W, args, scale_dtype, gidx)


def clip_shrinks(clip_min: float) -> tuple:
    """The shrink factors of rtn.CLIP_SHRINKS down to clip_min."""
    return tuple(f for f in CLIP_SHRINKS if f >= clip_min - 1e-9)


def _fp4_scales(weights, W, H, args, global_scales, clip, info):
    """fp4 group scales of the stacked weights W (dead columns zeroed): (stored [rows, ng],
    each part's global scale (NVFP4) or Nones, the effective fp32 scale [rows, ng])."""
    gparts = [None] * len(weights)
    if args.strategy == "tensor_group":
        if global_scales is None:       # the stacked weights are one fused group
            g = nvfp4_global_scales({"w": torch.cat([w.reshape(-1) for w in weights])})["w"]
            global_scales = [g] * len(weights)
        gparts = [g.to(W.device).float().reshape(1) for g in global_scales]
    hb = hessian_blocks(H, args.group_size) if clip else None
    stored, eff, row = [], [], 0
    for w, g in zip(weights, gparts):
        part = W[row:row + w.shape[0]].to(w.dtype)      # the weights' dtype, as observers see
        row += w.shape[0]
        st, moved = fp4_scale_search(part, hb, args, g)
        info["clipped_groups"] = info.get("clipped_groups", 0.0) + moved * w.shape[0] / len(W)
        stored.append(st.view(torch.uint8))
        eff.append(fp4.effective_scale(st, g, args))
    dtype = torch.uint8 if args.is_mx else torch.float8_e4m3fn
    return torch.cat(stored).view(dtype), gparts, torch.cat(eff)


def _cat_fp4(qws: list[QuantizedWeight]) -> QuantizedWeight:
    st = torch.cat([q.scale.view(torch.uint8) for q in qws]).view(qws[0].scale.dtype)
    return QuantizedWeight(torch.cat([q.q for q in qws]), st, None, qws[0].args)


def _split(weight, qw, deq, losses, H, splits, info, t0, gparts=None) -> list[tuple]:
    """The stacked result back into one (QuantizedWeight, dequantized, info) per weight; the
    seconds shared out by rows."""
    out, row, seconds = [], 0, time.perf_counter() - t0
    zp = qw.zero_point
    stacked = len(splits) > 1
    for n in splits:
        r = slice(row, row + n)
        row += n
        own = (lambda t: t[r].clone()) if stacked else (lambda t: t)  # no shared storage
        part = QuantizedWeight(own(qw.q), _rows(qw.scale, r, own), None if zp is None else own(zp),
                               qw.args, None if gparts is None else gparts[len(out)])
        i = dict(info, seconds=seconds * n / weight.shape[0])
        if losses is not None:
            i["loss"] = float(losses[r].sum())
        i.update(_losses(weight[r], deq[r], H))
        out.append((part, deq[r], i))
    return out


def _rows(t, r, own):
    """Rows r of t (fp8 has no slicing copy on every build: through its bytes)."""
    if t.element_size() == 1 and t.dtype not in (torch.int8, torch.uint8):
        return own(t.view(torch.uint8)).view(t.dtype)
    return own(t)


def _losses(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, max_rows: int = 256) -> dict:
    """Output error on the calibration data: tr(E H E^T) and relative to tr(W H W^T), for the
    report. Rows are independent, so beyond max_rows it is estimated from max_rows evenly
    spaced rows (row_sample; scaled to all): two [rows, cols] x H products per weight cost
    more than GPTQ's own sweep on an MoE layer's experts. The products' multiplies in bf16 (a
    few digits)."""
    rows = W.shape[0]
    idx = row_sample(rows, max_rows, W.device)
    w = (W if idx is None else W[idx]).float()
    e = w - (Q if idx is None else Q[idx])
    err = float(output_error(e, H, dim=None, bf16=True)) * rows / w.shape[0]
    ref = float(output_error(w, H, dim=None, bf16=True)) * rows / w.shape[0]
    return {"output_err": err, "output_rel_err": err / ref if ref > 0 else float("nan")}


def gptq_linears(linears: dict[str, torch.nn.Linear], hessians: dict[str, torch.Tensor],
                 args: QuantArgs, scale_dtype: torch.dtype, *, stack_experts: bool = True,
                 **options) -> dict[str, tuple]:
    """GPTQ every Linear against its Hessian, one stacked solve per shared Hessian (the same H
    object: q/k/v, gate/up); writes each dequantized weight back into its Linear. Returns
    {name: (QuantizedWeight on the CPU, info)}; the options are gptq_quantize_stacked's. The one
    GPTQ-per-Linear step of the plain, distributed and AWQ+GPTQ runs.
    stack_experts: groups of equal shapes with Hessians of their own (the routed experts of an
    MoE layer) are solved together, in one batched solve (gptq_batched.py)."""
    from .gptq_batched import gptq_quantize_batched     # it builds on this file's pieces

    groups: dict[int, list[str]] = {}
    for name in linears:
        if name not in hessians:
            raise RuntimeError(f"{name} was not called during the calibration forward: "
                               "no Hessian to quantize it with (add it to ignore)")
        groups.setdefault(id(hessians[name]), []).append(name)
    gscales = (nvfp4_global_scales({n: lin.weight for n, lin in linears.items()})
               if args.strategy == "tensor_group" else None)
    # groups of the same shapes (experts of one layer): one batched solve each; fp4 grids one
    # by one (the batched solve has no fp4 group scales)
    alike: dict[tuple, list[list[str]]] = {}
    for names in groups.values():
        key = tuple((tuple(linears[n].weight.shape), linears[n].weight.dtype) for n in names)
        batched = stack_experts and not args.is_fp4
        alike.setdefault(key if batched else id(names), []).append(names)
    out = {}
    for batch in alike.values():
        weights = [[linears[n].weight.data for n in names] for names in batch]
        if len(batch) > 1:
            results = gptq_quantize_batched(weights, [hessians[names[0]] for names in batch],
                                            args, scale_dtype, **options)
        else:
            extra = {} if gscales is None else {"global_scales": [gscales[n] for n in batch[0]]}
            results = [gptq_quantize_stacked(weights[0], hessians[batch[0][0]], args,
                                             scale_dtype, **options, **extra)]
        for names, result in zip(batch, results):
            for name, (qw, deq, info) in zip(names, result):
                out[name] = _store(name, linears[name], qw, deq, info, names)
    return out


def _store(name, lin, qw, deq, info, names):
    """The dequantized weight into the Linear, a warning when the Hessian needed more
    dampening; (QuantizedWeight on the CPU, info)."""
    lin.weight.data = deq.to(lin.weight.dtype)
    if info["fallback"] or info["dampening_failed"]:
        what = ("fell back to RTN" if info["fallback"] else
                f"needed dampening {info['dampening']:g}")
        warnings.warn(f"GPTQ {name}: Hessian not positive definite with dampening "
                      f"{info['dampening_failed']}; {what}", stacklevel=4)
    info["hessian_shared_with"] = [m for m in names if m != name]
    return qw.cpu(), info


@dataclass(frozen=True)
class GPTQ(Method):
    """GPTQ of every target Linear of a layer, from the layer's Hessians (the plain ones, or
    all-reduced over ranks under torchrun: ctx.hessians). damp: a fraction of the Hessian's
    mean diagonal; block_size: the columns of one lazy-batch block; actorder: "static"
    (llm-compressor's default: columns swept by decreasing H_ii) or None; clip: the clipping
    search of 4-bit group scales (SmolLM2 W4A16 g64: mean KL 0.217 -> 0.128, docs/results.md);
    clip_damp: the search's Hessian blocks dampened by this fraction of mean(diag H) (0: as
    GPTQ's Hessian before dampening; DEFAULT_CLIP_DAMP); clip_min: the smallest range shrink
    it tries (steps of 0.05 from 1.0); both for the integer grids (fp4 keeps the raw blocks).
    damp=None: the scheme's default, DEFAULT_DAMP or FP4_DAMP on the fp4 grids (a recipe
    resolved against its scheme holds the number: for_scheme)."""
    damp: float | None = None
    block_size: int = 128
    actorder: str | None = DEFAULT_ACTORDER
    clip: bool = True
    clip_damp: float = DEFAULT_CLIP_DAMP
    clip_min: float = min(CLIP_SHRINKS)
    max_damp: float = 10.0      # the dampening is raised x10 up to this while H is not PD
    min_tokens: int = 16        # a Linear whose statistics saw fewer (a rarely routed
                                # expert) is rounded to nearest, and the report says so
    stack_experts: bool = True  # a layer's experts (equal shapes, own Hessians) solved as one
                                # batch (gptq_batched.py); False: one after another

    def __post_init__(self):
        if self.damp is not None:
            check_number("damp", self.damp, 0, None,
                         "the dampening is a fraction >= 0 of the Hessian's mean diagonal "
                         "(e.g. 0.01)")
        check_int("block_size", self.block_size, 1, "pass a positive number of columns (e.g. 128)")
        object.__setattr__(self, "actorder", check_actorder(self.actorder))
        check_type("clip", self.clip, bool, "pass True or False")
        check_number("clip_damp", self.clip_damp, 0, None,
                     "the clip search's dampening is a fraction >= 0 of the Hessian's mean "
                     "diagonal (e.g. 0.1)")
        check_number("clip_min", self.clip_min, min(CLIP_SHRINKS), 1,
                     f"the smallest range shrink lies in {min(CLIP_SHRINKS):g} ... 1 (e.g. 0.8; "
                     "1 tries the full range only)")
        check_number("max_damp", self.max_damp, 0, None, "pass a fraction >= damp (e.g. 10)")
        check_int("min_tokens", self.min_tokens, 1, "pass a positive number of tokens")
        check_type("stack_experts", self.stack_experts, bool, "pass True or False")

    def check(self, scheme):
        if scheme.sparsity_24:
            raise ValueError("scheme W8A8_FP8_24 prunes to 2:4: use SparseGPT() or Magnitude()")
        if scheme.weights.strategy == "block":
            raise ValueError(f"scheme {scheme.name} scales 128 x 128 blocks of fp8 weights, "
                             "which GPTQ does not solve for: use RTN() (its default, data-free)")
        if scheme.weights.is_fp4 and (self.clip_damp != DEFAULT_CLIP_DAMP
                                      or self.clip_min != min(CLIP_SHRINKS)):
            raise ValueError(f"scheme {scheme.name}: clip_damp and clip_min apply to integer "
                             "grids only (fp4 scales are searched by rtn.fp4_scale_search): "
                             "leave them at their defaults")

    def for_scheme(self, scheme):
        if self.damp is not None:
            return self
        return dataclasses.replace(self, damp=FP4_DAMP if scheme.weights.is_fp4 else DEFAULT_DAMP)

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        if self.damp is None:
            return self.for_scheme(ctx.scheme)(layer_idx, layer, prefix, inputs, ctx)
        hessians = ctx.hessians(layer, ctx.linears, inputs)
        qweights, infos = rtn_fallback(ctx, hessians, self.min_tokens)
        solve = {n: lin for n, lin in ctx.linears.items() if n not in infos}
        done = gptq_linears(solve, {n: st.H for n, st in hessians.items()},
                            ctx.scheme.weights, ctx.scale_dtype, block_size=self.block_size,
                            damp=self.damp, max_damp=self.max_damp, actorder=self.actorder,
                            clip=self.clip, clip_damp=self.clip_damp, clip_min=self.clip_min,
                            stack_experts=self.stack_experts,
                            partial_last_group=ctx.partial_last_group)
        for name, (qw, info) in done.items():
            info["tokens"] = hessians[name].n
            qweights[name], infos[name] = qw, info
        input_global_scales(ctx, hessians, qweights)
        return qweights, infos


def input_global_scales(ctx, hessians, qweights) -> None:
    """NVFP4 (W4A4): each Linear's static activation global scale 448 * 6 / amax over its
    calibration inputs (llm-compressor's static_minmax observer), into its QuantizedWeight and
    onto the Linear (input_global_scale, which the evaluation's activation simulation reads)."""
    act = ctx.scheme.input_activations
    if act is None or act.dynamic != "local":
        return
    for name, qw in qweights.items():
        amax = getattr(hessians.get(name), "amax", None)
        # no inputs seen (an expert no token was routed to): 1, llm-compressor's fallback
        qw.input_global_scale = (torch.ones(1) if amax is None
                                 else fp4.nvfp4_global_scale_ref(amax).cpu())
        ctx.linears[name].input_global_scale = qw.input_global_scale


def rtn_fallback(ctx, hessians, min_tokens: int):
    """Round to nearest the Linears whose statistics saw fewer than `min_tokens` tokens
    (none at all: an expert no calibration token was routed to); (qweights, infos) with the
    fallback and the token count recorded."""
    few = {n: lin for n, lin in ctx.linears.items()
           if n not in hessians or hessians[n].n < min_tokens}
    if not few:
        return {}, {}
    qweights, infos = quantize_linears_rtn(few, ctx.scheme, ctx.device, ctx.partial_last_group)
    for n in few:
        infos[n].update(fallback="rtn", tokens=hessians[n].n if n in hessians else 0,
                        why=f"fewer than {min_tokens} calibration tokens")
    return qweights, infos
