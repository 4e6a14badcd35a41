"""GPTQ of E same-shape problems, each with its own Hessian, in one batched solve: the routed
experts of one MoE layer (each expert's gate/up against its input's Hessian, or its
down_proj against its own). gptq.gptq_linears groups them and calls gptq_quantize_batched.

Per expert, the cheap row-wise preparation of gptq_quantize_stacked (dead columns, group
scales, clipping search, activation order); then the two expensive steps once for all experts
(gptq_solve.py): the dampened Cholesky factor of each H^-1 as one batched factorisation
(experts that fail retried with more dampening), and the column sweep with a leading expert
dimension (each block's column steps one batched op: torch ops on CPU, one launch of the
fused sweep kernel with the expert index as a grid dimension on a GPU; each block's trailing
update one batched matmul: gptq_sweep_batched). Each expert's result is the one
gptq_quantize_stacked gives it alone, bit for bit on CPU, except dynamic group scales under
activation order (equal to fp32 rounding; see sweep_blocks_batched). An expert whose Hessian
stays singular is rounded to nearest, as alone.
"""
from __future__ import annotations

import time

import torch

from ..checkpoint.qweight import QuantizedWeight
from ..kernels.quant import quantize_ref
from ..recipe import check_actorder
from ..report import step
from ..schemes import QuantArgs
from .gptq import DEFAULT_GROUP_SCALES, _split, clip_shrinks, int_scales, zero_dead_columns
from .gptq_solve import gptq_sweep_batched, inverse_cholesky_batched
from .rtn import CLIP_SHRINKS, column_qparams, group_index, rtn_quantize

# Experts per batched solve at most this many bytes of fp32 Hessians and weights (a 128-expert
# layer is solved in several batches).
MAX_BATCH_BYTES = 1 << 30


@torch.no_grad()
@step("gptq solve")
def gptq_quantize_batched(weights: list[list[torch.Tensor]], Hs: list[torch.Tensor],
                          args: QuantArgs, scale_dtype: torch.dtype | None = None, *,
                          block_size: int = 128, damp: float = 0.01, max_damp: float = 10.0,
                          actorder: str | None = None, group_scales: str = DEFAULT_GROUP_SCALES,
                          partial_last_group: bool = False, clip: bool = False,
                          clip_damp: float = 0.0, clip_min: float = min(CLIP_SHRINKS)
                          ) -> list[list[tuple]]:
    """GPTQ expert e's weights[e] (Linears reading one input, stacked along rows as in
    gptq_quantize_stacked; every expert the same shapes) against its Hessian Hs[e], all experts
    in batched solves. Returns, per expert, gptq_quantize_stacked's [(QuantizedWeight,
    dequantized fp32, info)]; the options are its."""
    actorder = check_actorder(actorder)
    if group_scales not in ("static", "dynamic"):
        raise ValueError(f"group_scales={group_scales!r}: use 'static' or 'dynamic'")
    shapes = {tuple(tuple(w.shape) for w in ws) for ws in weights}
    if len(shapes) != 1 or len({tuple(H.shape) for H in Hs}) != 1 or len(Hs) != len(weights):
        raise ValueError(f"a batched GPTQ solve needs one Hessian per expert and equal shapes; "
                         f"got weights {sorted(shapes)} and Hessians "
                         f"{sorted({tuple(H.shape) for H in Hs})}: solve them one by one")
    rows, cols = sum(s[0] for s in shapes.pop()), weights[0][0].shape[1]
    per = 4 * (cols * cols * 2 + rows * cols * 4)     # H, U; W, Q and the sweep's copies
    n = max(1, MAX_BATCH_BYTES // per)
    out = []
    for e0 in range(0, len(weights), n):
        out += _solve(weights[e0:e0 + n], Hs[e0:e0 + n], args, scale_dtype, block_size, damp,
                      max_damp, actorder, group_scales, partial_last_group, clip,
                      clip_shrinks(clip_min), clip_damp)
    return out


def _solve(weights, Hs, args, scale_dtype, block_size, damp, max_damp, actorder, group_scales,
           partial_last_group, clip, shrinks, clip_damp):
    t0 = time.perf_counter()
    E = len(weights)
    stacked = [ws[0] if len(ws) == 1 else torch.cat(ws) for ws in weights]
    splits = [w.shape[0] for w in weights[0]]
    scale_dtype = scale_dtype or stacked[0].dtype
    cols = stacked[0].shape[1]
    if Hs[0].shape != (cols, cols):
        raise ValueError(f"Hessian {tuple(Hs[0].shape)} does not match weight "
                         f"{tuple(stacked[0].shape)}")
    gidx = group_index(cols, args, partial_last_group, stacked[0].device)
    dynamic = group_scales == "dynamic" and args.strategy == "group"

    # 1-2. per expert (row-wise, cheap): dead columns, group scales, clipping, the sweep order
    H0s = [H.float() for H in Hs]
    H = torch.stack(H0s)                                   # [E, cols, cols], a copy
    W = torch.stack([w.float() for w in stacked])          # [E, rows, cols]
    infos, scales, zps, perms = [], [], [], []
    for e in range(E):
        info = {"method": "gptq", "actorder": actorder, "batch": E}
        zero_dead_columns(W[e], H[e], info)
        scale, zp = int_scales(W[e], H[e], args, scale_dtype, gidx, clip and not dynamic,
                               shrinks, clip_damp, info)
        perm = torch.argsort(H[e].diagonal(), descending=True) if actorder else \
            torch.arange(cols, device=W.device)
        W[e], H[e] = W[e][:, perm], H[e][perm][:, perm]
        infos.append(info)
        scales.append(scale)
        zps.append(zp)
        perms.append(perm)

    # 3-4. one batched factorisation per dampening step
    U, fracs, failed = inverse_cholesky_batched(H, damp, max_damp)
    del H
    ok = [f is not None for f in fracs]
    for e in range(E):
        infos[e].update(dampening=fracs[e], dampening_failed=failed[e])
    idx = torch.tensor([e for e in range(E) if ok[e]], dtype=torch.long, device=W.device)

    # 5. the column sweep of every expert that factorised, in one batched loop
    if len(idx):
        gcol = torch.stack([gidx[p] for p in perms])[idx]
        scale = torch.stack(scales)[idx]
        zp = None if zps[0] is None else torch.stack(zps)[idx]
        Q, scale, zp, losses = gptq_sweep_batched(
            W[idx] if len(idx) < E else W, U[idx] if len(idx) < E else U, args, scale, zp, gcol,
            dynamic=dynamic, scale_dtype=scale_dtype, block_size=block_size)
    del W, U
    seconds = (time.perf_counter() - t0) / E
    out, j = [], 0
    for e in range(E):
        if not ok[e]:
            qw, deq = rtn_quantize(stacked[e], args, scale_dtype, partial_last_group)
            infos[e].update(fallback="rtn")
            out.append(_split(stacked[e], qw, deq, None, H0s[e], splits, infos[e],
                              time.perf_counter() - seconds))
            continue
        Qe = Q[j][:, torch.argsort(perms[e])]
        s, z = scale[j], None if zp is None else zp[j]
        q = quantize_ref(Qe, *column_qparams(s, z, gidx), args)
        qw = QuantizedWeight(q, s.to(scale_dtype), None if z is None else z.to(torch.int8), args)
        infos[e].update(fallback=None)
        # _split times from its t0: each expert gets an equal share of the batch's seconds
        out.append(_split(stacked[e], qw, Qe, losses[j], H0s[e], splits, infos[e],
                          time.perf_counter() - seconds))
        j += 1
    return out
