"""GPTQ's linear algebra and column sweep for one weight (methods/gptq.py is the method):

1. inverse_cholesky(H, damp): U, the upper Cholesky factor of the dampened H^-1, the
   dampening raised x10 while H is not positive definite. inverse_hessian_factor gets U with
   one Cholesky and one triangular inverse instead of Cholesky, cholesky_inverse and
   Cholesky: if J reverses the index order and J H J = L L^T, then H = R R^T with R = J L J
   upper, and U = R^-1 = J L^-1 J (inverse_cholesky_factor: L^-1 by halves, GEMMs). Half
   the O(n^3) work of the usual route, all in torch.
2. gptq_sweep(W, U, ...): the sweep of every column, the one place the implementation is
   chosen, once per solve: on a GPU the whole-layer solve below whenever it applies, else the
   paper's loop over blocks (sweep_blocks), its block step the fused kernel on a GPU and the
   torch reference elsewhere (kernels/gptq_sweep.py).
3. solve_in_order: the whole-layer solve, columns in order. Against the paper's loop:
   - qparams are indexed per group inside the block sweep (no [rows, B] expanded copies);
     with scale=None (group strategy) they are computed when the sweep reaches the group's
     first column, from the updated weights -- gptq.py's "dynamic" mode;
   - errors go to the later columns in two levels: inside a super-block of `outer` columns
     after every block (K = block_size), to the columns right of the super-block once per
     super-block (K = outer). The same sums, but the big update is one GEMM with K = 1024
     instead of eight memory-bound K = 128 ones;
   - the trailing GEMM runs on tensor cores at `precision` (see TRAILING_PRECISION).
   Same-shape weights that share the Hessian and quant args (q/k/v, gate/up) can be stacked
   along rows and solved in one call: rows never interact.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..kernels.dispatch import use_triton
from ..kernels.gptq_sweep import (SCALE_DTYPES, TRAILING_PRECISION, fp8_round_ref,
                                  sweep_block_ref, sweep_block_triton,
                                  sweep_block_triton_batched, trailing_update_ref,
                                  trailing_update_triton)
from ..kernels.quant import qparams_from_minmax
from ..models import all_finite
from ..schemes import QuantArgs
from .rtn import expand


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, max_damp: float = 10.0,
                     overwrite: bool = False):
    """Upper Cholesky factor of (H + frac * mean(|diag H|) * I)^-1, raising frac x10 from
    `damp` (0 -> 1e-4) up to `max_damp` until both factorizations succeed.
    overwrite: dampen H itself (it is left dampened; no n x n copy, for callers done with H).

    Returns (U or None, frac used or None, fractions that failed)."""
    diag_mean = H.diagonal().abs().mean()
    if not torch.isfinite(diag_mean) or not all_finite(H):
        return None, None, []
    if diag_mean == 0:
        diag_mean = torch.ones_like(diag_mean)
    frac, failed = damp, []
    diag = H.diagonal().clone()
    while frac <= max_damp * (1 + 1e-9):
        damped = H if overwrite else H.clone()   # H + frac * mean * I, no identity made
        damped.diagonal().copy_(diag).add_(frac * diag_mean)
        # the same U as cholesky(cholesky_inverse(cholesky(H)), upper) to 2e-7, in half the
        # time at 1536
        U, info = inverse_hessian_factor(damped)
        del damped
        if info == 0 and all_finite(U):
            return U, frac, failed
        failed.append(frac)
        frac = frac * 10 if frac > 0 else 1e-4
    return None, None, failed


def inverse_hessian_factor(H: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Upper U with U^T U = H^-1 for a (dampened) positive definite H: (U, 0), or (None, info)
    when the Cholesky fails. The inverse Cholesky factor of the index-reversed H."""
    Linv, info = inverse_cholesky_factor(H.flip(0, 1))
    if int(info) != 0:
        return None, int(info)
    return Linv.flip(0, 1), 0


def inverse_cholesky_factor(A: torch.Tensor, leaf: int = 512):
    """(L^-1, info) for A = L L^T, by halves: with L = [[L11, 0], [L21, L22]],
    L21 = A21 L11^-T, L22 L22^T = A22 - L21 L21^T and L^-1 = [[L11^-1, 0],
    [-L22^-1 L21 L11^-1, L22^-1]]. n^3/3 multiply-adds for each of the factor and its inverse,
    nearly all in GEMMs; L itself is never assembled (cholesky_ex then a triangular inverse
    took 31.6 ms at 1536 on 2 Zen cores, this 27: no full-size tril of the factor). A [..., n, n]:
    leading dimensions are a batch; info (as cholesky_ex's) nonzero where any leaf failed."""
    n = A.shape[-1]
    if n <= leaf:
        L, info = torch.linalg.cholesky_ex(A)
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        return torch.linalg.solve_triangular(L, eye, upper=False), info
    h = (n // 2 + 127) // 128 * 128 if n > 256 else n // 2  # edges on multiples of 128
    Ai, info1 = inverse_cholesky_factor(A[..., :h, :h], leaf)
    L21 = A[..., h:, :h] @ Ai.mT
    Di, info2 = inverse_cholesky_factor(A[..., h:, h:] - L21 @ L21.mT, leaf)
    out = torch.zeros_like(A)
    out[..., :h, :h] = Ai
    out[..., h:, h:] = Di
    out[..., h:, :h] = -(Di @ (L21 @ Ai))
    return out, torch.where(info1 != 0, info1, info2)


# ----------------------------------------------------------------------------- batched
# E problems of equal shape, each its own Hessian (the routed experts of one MoE layer): the
# same steps with a leading expert dimension, each expert's result the one it gets alone.

def inverse_cholesky_batched(H: torch.Tensor, damp: float = 0.01, max_damp: float = 10.0,
                             batched: bool | None = None):
    """inverse_cholesky of each H[e] ([E, n, n], dampened in place). Returns (U [E, n, n],
    zero for experts that never succeeded; [frac or None] per expert; [failed fractions] per
    expert). batched (default: where the fused kernels run, a GPU, each factorisation a
    launch): one batched factorisation per dampening step, the experts that failed tried again
    at frac x10. Else each expert's inverse_cholesky in turn: on CPU 8 x 1536^2 fp32 took
    0.90 s batched and 0.62 s one by one (1 thread; LAPACK is blocked already, and batched
    matmuls copy strided blocks)."""
    if batched is None:
        batched = use_triton(H)
    if batched:
        return _inverse_cholesky_batch(H, damp, max_damp)
    U = torch.zeros_like(H)
    fracs, failed = [], []
    for e in range(H.shape[0]):
        u, frac, fl = inverse_cholesky(H[e], damp, max_damp, overwrite=True)
        if u is not None:
            U[e] = u
        fracs.append(frac)
        failed.append(fl)
    return U, fracs, failed


def _inverse_cholesky_batch(H, damp, max_damp):
    E = H.shape[0]
    diag = H.diagonal(dim1=1, dim2=2).clone()                    # [E, n]
    diag_mean = diag.abs().mean(1)
    finite = torch.isfinite(H).flatten(1).all(1) & torch.isfinite(diag_mean)
    diag_mean = torch.where(diag_mean == 0, torch.ones_like(diag_mean), diag_mean)
    U, fracs, failed = None, [None] * E, [[] for _ in range(E)]
    todo = [e for e in range(E) if finite[e]]
    frac = damp
    while todo and frac <= max_damp * (1 + 1e-9):
        idx = torch.tensor(todo, device=H.device)
        damped = H[idx] if len(todo) < E else H             # H itself when nobody is done
        damped.diagonal(dim1=1, dim2=2).copy_(diag[idx]).add_(frac * diag_mean[idx, None])
        Linv, info = inverse_cholesky_factor(damped.flip(1, 2))
        del damped
        Ui = Linv.flip(1, 2)
        del Linv
        ok = ((info == 0) & torch.isfinite(Ui).flatten(1).all(1)).tolist()
        if U is None:                   # everyone at the first try: U itself, no copy
            U = Ui if all(ok) and len(todo) == E else torch.zeros_like(H)
        for j, e in enumerate(todo):
            if ok[j]:
                if U is not Ui:
                    U[e] = Ui[j]
                fracs[e] = frac
            else:
                failed[e].append(frac)
        todo = [e for j, e in enumerate(todo) if not ok[j]]
        frac = frac * 10 if frac > 0 else 1e-4
    return (torch.zeros_like(H) if U is None else U), fracs, failed


def gptq_sweep_batched(W, Hinv, args, scale, zp, gcol, *, dynamic, scale_dtype, block_size):
    """gptq_sweep of E problems (sweep_blocks_batched's arguments), the one place the batched
    sweep's implementation is chosen: each block's column sweep for all experts one launch of
    the fused kernel on a GPU (the expert index a grid dimension), sweep_block_batched's torch
    ops elsewhere; the trailing updates one batched matmul either way."""
    triton = use_triton(W, Hinv)
    return sweep_blocks_batched(
        W, Hinv, args, scale, zp, gcol, dynamic=dynamic, scale_dtype=scale_dtype,
        block_size=block_size,
        sweep_block=sweep_block_triton_batched if triton else sweep_block_batched,
        sub_block=block_size if triton else SUB_BLOCK)


def sweep_blocks_batched(W, Hinv, args, scale, zp, gcol, *, dynamic, scale_dtype, block_size,
                         sweep_block, sub_block):
    """sweep_blocks for E problems at once: W [E, rows, cols] fp32 (overwritten), Hinv
    [E, cols, cols], scale/zp [E, rows, ngroups], gcol [E, cols] (each expert's own column
    order). Per block: each column's quantize and error step on all experts' rows together
    (sweep_block, sub_block columns at a time), then the block's errors to the later columns
    in one batched matmul.
    Bit for bit the single sweeps' arithmetic, except with dynamic scales under activation
    order: the blocks are then also cut where any expert first meets a group (the same sums,
    grouped differently: equal to fp32 rounding). Returns (Q, scale, zp, losses [E, rows])."""
    E, rows, cols = W.shape
    bounds = set(range(0, cols, block_size)) | {cols}
    ar = torch.arange(cols, device=W.device)
    if dynamic:
        ng = scale.shape[2]
        first = torch.full((E, ng), cols, dtype=torch.long, device=W.device)
        first = first.scatter_reduce(1, gcol, ar.expand(E, -1), "amin")   # [E, ngroups]
        bounds |= set(first.flatten().tolist())
    bounds = sorted(bounds)
    Q = torch.zeros_like(W)
    losses = torch.zeros(E, rows, device=W.device)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if dynamic:
            for e in range(E):                # the experts that first meet a group here
                g = int(gcol[e, i1])
                if int(first[e, g]) == i1:
                    Wg = W[e][:, gcol[e] == g]
                    s, z = qparams_from_minmax(Wg.amin(1, keepdim=True), Wg.amax(1, keepdim=True),
                                               args, scale_dtype)
                    scale[e, :, g:g + 1] = s
                    if zp is not None:
                        zp[e, :, g:g + 1] = z
        g = gcol[:, None, i1:i2].expand(E, rows, -1)
        Q1, Err1, L1 = sweep_in_sub_blocks(
            sweep_block, W[:, :, i1:i2].clone(), Hinv[:, i1:i2, i1:i2], scale.gather(2, g),
            None if zp is None else zp.gather(2, g), args, sub_block)
        Q[:, :, i1:i2] = Q1
        losses += L1.sum(2) / 2
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    return Q, scale, zp, losses


def sweep_block_batched(W1, Hinv1, scale, zp, args):
    """kernels.gptq_sweep.sweep_block_ref (expanded qparams: one per column) with a leading
    expert dimension: W1, scale, zp [E, rows, B], Hinv1 [E, B, B] -> (Q1, Err1, Losses1)
    [E, rows, B]. One set of torch ops per column for all experts, the same roundings."""
    Wt = W1.float().transpose(1, 2).contiguous()                  # [E, B, rows]
    St = scale.float().transpose(1, 2).contiguous()
    Zt = None if zp is None else zp.float().transpose(1, 2)
    fp8 = args.type == "float"
    qmin, qmax = float(args.qmin), float(args.qmax)
    Qt, Dt = torch.empty_like(Wt), torch.empty_like(Wt)
    d = Hinv1.diagonal(dim1=1, dim2=2).float()                    # [E, B]
    for i in range(Wt.shape[1]):
        w = Wt[:, i]
        y = w / St[:, i]
        if fp8:
            q = fp8_round_ref(y)
        elif Zt is None:
            q = y.clamp_(qmin, qmax).round_()
        else:
            q = torch.clamp(y, qmin - Zt[:, i], qmax - Zt[:, i]).round_()
        qd = torch.mul(q, St[:, i], out=Qt[:, i])
        diff = torch.sub(w, qd, out=Dt[:, i])
        Wt[:, i + 1:].sub_(Hinv1[:, i, i + 1:, None] * (diff / d[:, i, None])[:, None])
    Q1, Diff1 = Qt.transpose(1, 2), Dt.transpose(1, 2)
    dd = d[:, None, :]
    return Q1, Diff1 / dd, (Diff1 * Diff1) / (dd * dd)


def gptq_sweep(W: torch.Tensor, Hinv: torch.Tensor, args: QuantArgs, scale: torch.Tensor,
               zp: torch.Tensor | None, gcol: torch.Tensor, *, dynamic: bool = False,
               scale_dtype: torch.dtype = torch.bfloat16, block_size: int = 128):
    """The whole GPTQ sweep of W [rows, cols] fp32, its columns in sweep order, given U =
    Hinv (the upper Cholesky factor of the dampened H^-1 in that order). Column j belongs to
    group gcol[j] of scale/zp [rows, ngroups] (under activation order the groups are
    scattered). dynamic (group strategy): a group's qparams are computed from the updated
    weights when the sweep first meets it, into scale/zp.

    On a GPU the whole-layer solve (solve_in_order) whenever it applies; else the paper's loop
    (sweep_blocks). Returns (Q [rows, cols] fp32 in sweep order, scale, zp, losses [rows]);
    W is overwritten."""
    triton = use_triton(W, Hinv)            # the one choice of device for this solve
    rows, cols = W.shape
    if triton and args.strategy in ("group", "channel"):
        gsize = args.group_size if args.strategy == "group" else cols
        # the whole-layer solve indexes groups as column // group size: columns in that order
        in_order = args.strategy == "channel" or torch.equal(
            gcol, torch.arange(cols, device=gcol.device) // gsize)
        if in_order and (not dynamic or block_size % gsize == 0):
            return solve_in_order(W, Hinv, args, None if dynamic else scale,
                                  None if dynamic else zp, triton=True,
                                  scale_dtype=scale_dtype, block_size=block_size)
        if not dynamic:             # scattered groups: each column its group's qparams
            Q, _, _, losses = solve_in_order(
                W, Hinv, dataclasses.replace(args, group_size=1), expand(scale, gcol, rows),
                expand(zp, gcol, rows), triton=True, scale_dtype=scale_dtype,
                block_size=block_size)
            return Q, scale, zp, losses
    return sweep_blocks(W, Hinv, args, scale, zp, gcol, dynamic=dynamic, scale_dtype=scale_dtype,
                        block_size=block_size,
                        sweep_block=sweep_block_triton if triton else sweep_block_ref,
                        sub_block=block_size if triton else SUB_BLOCK)


def sweep_blocks(W, Hinv, args, scale, zp, gcol, *, dynamic, scale_dtype, block_size,
                 sweep_block, sub_block):
    """The paper's loop (gptq_sweep's arguments): per block of block_size columns,
    sweep_block with each column's group qparams (sub_block columns at a time:
    sweep_in_sub_blocks), then the block's errors to every later column in one matmul."""
    rows, cols = W.shape
    # Block boundaries; in dynamic mode also wherever the sweep first meets a group, so that
    # its scale is computed from weights carrying all earlier updates.
    bounds = set(range(0, cols, block_size)) | {cols}
    if dynamic:
        first = torch.full((int(gcol.max()) + 1,), cols, dtype=torch.long, device=W.device)
        first = first.scatter_reduce(0, gcol, torch.arange(cols, device=W.device), "amin")
        bounds |= set(first.tolist())
    bounds = sorted(bounds)
    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, device=W.device)
    seen = torch.zeros(scale.shape[1], dtype=torch.bool, device=W.device)
    for i1, i2 in zip(bounds[:-1], bounds[1:]):
        if dynamic and not seen[gcol[i1]]:
            g = int(gcol[i1])
            Wg = W[:, gcol == g]
            s, z = qparams_from_minmax(Wg.amin(1, keepdim=True), Wg.amax(1, keepdim=True), args,
                                       scale_dtype)
            scale[:, g:g + 1] = s
            if zp is not None:
                zp[:, g:g + 1] = z
            seen[g] = True
        Q1, Err1, L1 = sweep_in_sub_blocks(
            sweep_block, W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], expand(scale, gcol[i1:i2], rows),
            expand(zp, gcol[i1:i2], rows), args, sub_block)
        Q[:, i1:i2] = Q1
        losses += L1.sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scale, zp, losses


# The torch sweeps' blocks go column by column in sub-blocks of this many columns, each
# sub-block's errors reaching the rest of its block in one matmul (the lazy-batch idea one
# level down): a column's rank-1 update then touches 16 columns, not up to 127, and stays in
# cache. The same sums grouped differently (equal to fp32 rounding). An MoE layer's experts,
# SmolLM2 shapes, 2 threads: the column steps 0.27 -> 0.13 s (8: 0.16, 32: 0.15).
SUB_BLOCK = 16


def sweep_in_sub_blocks(sweep_block, W1, Hinv1, scale, zp, args, sub: int):
    """sweep_block (a block step: (W1 [..., rows, B], Hinv1 [..., B, B], scale/zp one per
    column [..., rows, B], args) -> (Q1, Err1, Losses1)) over sub-blocks of `sub` columns,
    each sub-block's errors applied to the block's later columns in one matmul. W1 is
    overwritten; returns what sweep_block returns for the whole block."""
    B = W1.shape[-1]
    if sub >= B:
        return sweep_block(W1, Hinv1, scale, zp, args)
    Q1, Err1, L1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    for k1 in range(0, B, sub):
        k2 = min(k1 + sub, B)
        q, e, l = sweep_block(W1[..., k1:k2], Hinv1[..., k1:k2, k1:k2], scale[..., k1:k2],
                              None if zp is None else zp[..., k1:k2], args)
        Q1[..., k1:k2], Err1[..., k1:k2], L1[..., k1:k2] = q, e, l
        if k2 < B:
            W1[..., k2:] -= e @ Hinv1[..., k1:k2, k2:]
    return Q1, Err1, L1


def solve_in_order(W: torch.Tensor, Hinv: torch.Tensor, args: QuantArgs,
                   scale: torch.Tensor | None = None, zp: torch.Tensor | None = None, *,
                   triton: bool, scale_dtype: torch.dtype = torch.bfloat16,
                   block_size: int = 128, outer: int | None = None,
                   precision: str | None = None, block_m: int | None = None):
    """GPTQ sweep of a whole weight W [rows, cols] (columns in order) given U = Hinv, the upper
    Cholesky factor of the dampened H^-1: the two-level schedule of the module docstring, its
    steps the Triton kernels (triton=True) or their torch references.

    scale/zp: [rows, ngroups] qparams fixed before the sweep (values already rounded to the
    storage dtype; zp fp32 or None), or scale=None with group strategy: computed when the sweep
    reaches each group, from the updated weights (needs block_size % group_size == 0).
    Returns (Q dequantized fp32 [rows, cols], scale, zp, losses [rows]: half the sum of
    (w - q)^2 / U_ii^2, the paper's loss). W is not modified.
    outer: super-block width for the two-level update (default: the multiple of block_size
    nearest 1024 from below); precision: the trailing GEMM's (default TRAILING_PRECISION on
    the GPU, "ieee" in torch); block_m: the Triton row tile (default: autotuned)."""
    outer = outer or block_size * max(1, 1024 // block_size)
    W, rows, cols, gdiv, scale, zp, dynamic = _setup(W, Hinv, args, scale, zp, scale_dtype,
                                                     block_size, outer)
    if triton:
        sweep, trailing = functools.partial(sweep_block_triton, block_m=block_m), \
            trailing_update_triton
        precision = precision or TRAILING_PRECISION
    else:
        sweep, trailing, precision = sweep_block_ref, trailing_update_ref, precision or "ieee"
    Hinv = Hinv.float()
    Hinv = Hinv if Hinv.stride(-1) == 1 else Hinv.contiguous()
    losses = torch.zeros(rows, device=W.device)
    E = torch.empty(rows, min(outer, cols), device=W.device)
    for j1 in range(0, cols, outer):
        j2 = min(j1 + outer, cols)
        for i1 in range(j1, j2, block_size):
            i2 = min(i1 + block_size, j2)
            Wb = W[:, i1:i2]
            sweep(Wb, Hinv[i1:i2, i1:i2], scale, zp, args, col0=i1, gdiv=gdiv, dynamic=dynamic,
                  scale_dtype=scale_dtype, out=(Wb, E[:, i1 - j1:], losses))
            if i2 < j2:
                trailing(W[:, i2:j2], E[:, i1 - j1:i2 - j1], Hinv[i1:i2, i2:j2], precision)
        if j2 < cols:
            trailing(W[:, j2:], E[:, :j2 - j1], Hinv[j1:j2, j2:], precision)
    return W, scale, zp, losses / 2


def _setup(W, Hinv, args, scale, zp, scale_dtype, block_size, outer):
    rows, cols = W.shape
    if Hinv.shape != (cols, cols):
        raise ValueError(f"Hinv {list(Hinv.shape)} does not match weight {list(W.shape)}")
    if block_size <= 0 or outer % block_size:
        raise ValueError(f"outer ({outer}) must be a positive multiple of block_size "
                         f"({block_size})")
    if args.strategy not in ("group", "channel"):
        raise ValueError(f"the whole-layer GPTQ solve handles group and channel weights, not "
                         f"{args.strategy}; use gptq_sweep")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype {scale_dtype} not supported: use one of "
                         f"{list(SCALE_DTYPES)}")
    gsize = args.group_size if args.strategy == "group" else cols
    ngroups = -(-cols // gsize)
    dynamic = scale is None
    if dynamic:
        if args.strategy != "group":
            raise ValueError("scale=None (computed in the sweep) is for group strategy only: "
                             "pass per-channel scales computed from the weight")
        if block_size % gsize:
            raise ValueError(f"qparams computed in the sweep need groups inside blocks: group "
                             f"size {gsize} must divide block_size {block_size}")
        scale = torch.empty(rows, ngroups, device=W.device)
        zp = None if args.symmetric else torch.empty_like(scale)
    else:
        want = (rows, ngroups)
        if tuple(scale.shape) != want or (zp is not None and tuple(zp.shape) != want):
            raise ValueError(f"scale/zp must be [{rows}, {ngroups}] (rows x groups), got "
                             f"{list(scale.shape)}" + ("" if zp is None else f", {list(zp.shape)}"))
        if zp is None and not args.symmetric and args.type == "int":
            raise ValueError("asymmetric args need a zero point: pass zp")
        scale = scale.float().contiguous()
        zp = None if zp is None else zp.float().contiguous()
    return W.float().clone(), rows, cols, gsize, scale, zp, dynamic
