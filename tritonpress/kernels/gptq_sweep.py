"""GPTQ's column sweep on the chip: the two Triton kernels of the fused solve, their launchers
and the torch references they are tested against. The loops that drive them (the paper's loop
over blocks, the two-level whole-layer solve) are GPTQ's, in methods/gptq_solve.py.

1. The block sweep, sweep_block_ref's contract (see there): per column i of a block
       q = dequant(quant(w_i)),  err = (w_i - q) / Hinv1[i, i],  W1[:, i:] -= err * Hinv1[i, i:]
   Rows are independent inside a block, so one program owns a tile of rows and keeps the
   tile's whole block in registers for the B sequential column steps. Every op is rounded as
   torch rounds it (IEEE division, no fused multiply-add), so the result is bit-identical to
   the reference at the same inputs, on the GPU and in the interpreter. Qparams are indexed
   per group (no [rows, B] expanded copies) and, for "dynamic" group scales, computed when
   the sweep reaches the group's first column, from the updated weights.

2. The trailing update C -= A @ B of the columns right of a block, on tensor cores at
   `precision` (see TRAILING_PRECISION); trailing_update_ref emulates each precision in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from .dispatch import interpreting
from .primitives import e4m3_round, qparams, rne
from .fp4 import round_e2m1_ref
from .quant import fp8_round_ref, qparams_from_minmax

# Precision of the trailing GEMM W[:, right] -= Err @ Hinv[block, right] on the GPU. Measured
# by emulating the operand rounding in fp32 (bench_gptq_gpu.py --precision-study; 512 x 1024,
# correlated H, vs exact fp32): tf32 changes 0.3-0.6% of the chosen values and the loss by
# ~1e-4; bf16 3-4% and 2-6e-4; tf32x3 and bf16x3 ~3e-5 of the values and 3e-6 of the loss
# (as fp32 reassociation does). tf32x3: fp32-grade at 3 tf32 MMAs (bf16x3 would cost 1.5).
TRAILING_PRECISION = "tf32x3"
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3")

SCALE_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------- references

def sweep_block_ref(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor,
                    zp: torch.Tensor | None, args: QuantArgs, *, col0: int = 0, gdiv: int = 1,
                    dynamic: bool = False, scale_dtype: torch.dtype = torch.float32,
                    out: tuple | None = None):
    """Quantize the columns of one block in order, with OBS error feedback inside the block.

    Contract (the fused kernel keeps it, bit for bit):
      W1      [rows, B] fp32, the block's current weights (not modified)
      Hinv1   [B, B] fp32, the block's diagonal block of the upper Cholesky factor of H^-1
      scale   [rows, ngroups] fp32: block column c takes group (col0 + c) // gdiv (gdiv = 1,
              col0 = 0: expanded, one value per column); values already rounded to the scale
              storage dtype; zp the same for zero points (fp32) or None (symmetric)
      dynamic a group's qparams are computed (at scale_dtype) when the block reaches its first
              column, from the current weights of its columns, and written into scale/zp
              (launches start on group starts)
      args    the weight QuantArgs (int: round-half-even + clamp; float: e4m3 RNE; fp4: the
              e2m1 grid, kernels/fp4.py's rounding; scale is then the effective fp32 scale)
    Returns (Q1, Err1, Losses1), each [rows, B] fp32:
      Q1      the dequantized values chosen, (q - zp) * scale
      Err1    (w - q) / Hinv1[i, i], the scaled errors the caller propagates to later columns
      Losses1 (w - q)^2 / Hinv1[i, i]^2 (the paper's loss is half their sum)
    where w is column i after the updates from columns < i of the block. With out=(Q, E, L)
    nothing is returned: Q1 and Err1 go into Q and E [rows, B] (Q may be W1) and each row's
    Losses1, summed in column order, is added to L [rows]."""
    _check_block(W1, Hinv1, scale, zp, col0, gdiv)
    # Column-major copies, so that each step reads and writes contiguous rows; seven torch ops
    # a column (the Python loop is the CPU cost), the same roundings as the kernel.
    Wt = W1.float().t().contiguous()
    St = scale.float().t().contiguous()
    Zt = None if zp is None else zp.float().t()
    fp8 = args.type == "float" and not args.is_fp4
    qmin, qmax = float(args.qmin), float(args.qmax)
    Qt, Dt = torch.empty_like(Wt), torch.empty_like(Wt)
    d = Hinv1.diagonal().float()
    dl = d.tolist()                         # Python floats: no tensor indexing per column
    Hc = Hinv1.float().unsqueeze(-1)        # row i's later entries as a column: Hc[i, i + 1:]
    for i in range(Wt.shape[0]):
        g = (col0 + i) // gdiv
        if dynamic and ((col0 + i) % gdiv == 0 or i == 0):
            grp = Wt[i:i + gdiv]
            St[g], z = qparams_from_minmax(grp.amin(0), grp.amax(0), args, scale_dtype)
            scale[:, g] = St[g]
            if zp is not None:
                zp[:, g] = z
                Zt = zp.float().t()
        w, s = Wt[i], St[g]
        y = w / s
        if args.is_fp4:
            q = round_e2m1_ref(y)
        elif fp8:
            q = fp8_round_ref(y)
        elif Zt is None:    # clamp, then round: integer bounds commute with rounding
            q = y.clamp_(qmin, qmax).round_()
        else:               # y clamped to [qmin - zp, qmax - zp]
            q = torch.clamp(y, qmin - Zt[g], qmax - Zt[g]).round_()
        qd = torch.mul(q, s, out=Qt[i])
        diff = torch.sub(w, qd, out=Dt[i])
        Wt[i + 1:].sub_(Hc[i, i + 1:] * (diff / dl[i]))
    Q1, Diff1 = Qt.t(), Dt.t()
    Err1, Losses1 = Diff1 / d, (Diff1 * Diff1) / (d * d)
    if out is None:
        return Q1, Err1, Losses1
    Q, E, L = out
    Q.copy_(Q1)
    E[:, :Q1.shape[1]] = Err1
    row = torch.zeros_like(L)
    for i in range(Losses1.shape[1]):       # the kernel's order: a row sum, then into L
        row += Losses1[:, i]
    L += row


def _check_block(W1, Hinv1, scale, zp, col0, gdiv):
    rows, n = W1.shape
    if Hinv1.shape != (n, n):
        raise ValueError(f"Hinv block must be [{n}, {n}] for a block of {n} columns, "
                         f"got {list(Hinv1.shape)}")
    need = (col0 + n - 1) // gdiv + 1
    for name, t in (("scale", scale), ("zp", zp)):
        if t is not None and (t.dim() != 2 or t.shape[0] != rows or t.shape[1] < need):
            raise ValueError(f"{name} must be [{rows}, >= {need}], a value per group of {gdiv} "
                             "columns (gdiv = 1: expanded, one value per column), got "
                             f"{list(t.shape)}")


def trailing_update_ref(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                        precision: str = "ieee") -> torch.Tensor:
    """C -= A @ B in fp32 with the operands rounded as `precision` rounds them on tensor cores
    (an emulation: used on CPU to measure what a precision costs)."""
    if precision == "ieee":
        return C.sub_(A @ B)
    if precision == "tf32":
        return C.sub_(round_tf32(A) @ round_tf32(B))
    if precision == "tf32x3":  # hi*hi + hi*lo + lo*hi, the lo*lo term dropped
        ah, bh = round_tf32(A), round_tf32(B)
        al, bl = round_tf32(A - ah), round_tf32(B - bh)
        return C.sub_(ah @ bh + (ah @ bl + al @ bh))
    if precision in ("bf16", "bf16x3"):
        ah, bh = A.bfloat16().float(), B.bfloat16().float()
        if precision == "bf16":
            return C.sub_(ah @ bh)
        al, bl = (A - ah).bfloat16().float(), (B - bh).bfloat16().float()
        return C.sub_(ah @ bh + (ah @ bl + al @ bh))
    raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}, bf16")


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest tf32 value (10 mantissa bits, ties to even), as fp32."""
    b = x.float().contiguous().view(torch.int32)
    b = (b + 0xFFF + ((b >> 13) & 1)) & ~0x1FFF
    return b.view(torch.float32)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _sweep_kernel(W, Hinv, S, Z, Q, E, L, rows, n, col0,
                  stride_w, stride_h, stride_sr, stride_sc, stride_q, stride_e, stride_l,
                  qmin, qmax, half_range, eps,
                  ex_w, ex_h, ex_s, ex_q, ex_e, ex_l,
                  GDIV: tl.constexpr, FP8: tl.constexpr, FP4: tl.constexpr,
                  HAS_ZP: tl.constexpr,
                  DYNAMIC: tl.constexpr, SCALE_DTYPE: tl.constexpr, LOSS_COLS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: rows [pid*BLOCK_M, +BLOCK_M) of a block of n columns of problem
    program_id(1) (the experts of an MoE layer, each its own weights and Hinv: ex_* are the
    tensors' expert strides, 0 for one problem).

    Scale of column c: S[r, (col0 + c) // GDIV] (GDIV = 1: one scale per column, the
    expanded contract; GDIV = group size: per group; stride_sc = 0: per channel). DYNAMIC
    computes it at each group start from the current weights and stores it there.
    Outputs: Q (dequantized, may alias W), E (errors), L (per-column losses when LOSS_COLS,
    else added to a per-row sum)."""
    ex = tl.program_id(1).to(tl.int64)
    W += ex * ex_w
    Hinv += ex * ex_h
    S += ex * ex_s
    Z += ex * ex_s
    Q += ex * ex_q
    E += ex * ex_e
    L += ex * ex_l
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = r < rows
    r64 = r.to(tl.int64)
    tile_mask = rmask[:, None] & (cols < n)[None, :]
    work = tl.load(W + r64[:, None] * stride_w + cols[None, :], mask=tile_mask, other=0.0)
    work = work.to(tl.float32)
    err_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    loss_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    loss_row = tl.zeros([BLOCK_M], dtype=tl.float32)
    s = tl.full([BLOCK_M], 1.0, tl.float32)
    z = tl.zeros([BLOCK_M], dtype=tl.float32)

    for c in range(0, n):
        at = cols[None, :] == c
        w = tl.sum(tl.where(at, work, 0.0), axis=1)               # column c
        if ((col0 + c) % GDIV == 0) | (c == 0):     # a new group starts, or a new launch
            sp = S + r64 * stride_sr + ((col0 + c) // GDIV) * stride_sc
            zpp = Z + r64 * stride_sr + ((col0 + c) // GDIV) * stride_sc
            if DYNAMIC:  # the caller guarantees that launches start on group starts
                grp = (cols[None, :] >= c) & (cols[None, :] < c + GDIV)
                lo = tl.min(tl.where(grp, work, float("inf")), axis=1)
                hi = tl.max(tl.where(grp, work, float("-inf")), axis=1)
                s, z = qparams(lo, hi, (qmax - qmin) if HAS_ZP else half_range, qmin, qmax, eps,
                               not HAS_ZP, SCALE_DTYPE)
                tl.store(sp, s, mask=rmask)
                if HAS_ZP:
                    tl.store(zpp, z, mask=rmask)
            else:
                s = tl.load(sp, mask=rmask, other=1.0).to(tl.float32)
                if HAS_ZP:
                    z = tl.load(zpp, mask=rmask, other=0.0).to(tl.float32)

        y = tl.div_rn(w, s)
        if FP4:
            q = _e2m1_round(y) * s
        elif FP8:
            q = e4m3_round(y) * s
        else:
            # clamp before rounding (the bounds are integers, so it commutes with rounding)
            q = rne(tl.minimum(tl.maximum(y, qmin - z), qmax - z)) * s
        d = tl.load(Hinv + c * stride_h + c)
        diff = w - q
        err = tl.div_rn(diff, d)
        loss = tl.div_rn(diff * diff, d * d)
        h = tl.load(Hinv + c * stride_h + cols, mask=(cols > c) & (cols < n), other=0.0)
        work = tl.where(at, q[:, None], work - err[:, None] * h[None, :])
        err_tile = tl.where(at, err[:, None], err_tile)
        if LOSS_COLS:
            loss_tile = tl.where(at, loss[:, None], loss_tile)
        else:
            loss_row += loss

    tl.store(Q + r64[:, None] * stride_q + cols[None, :], work, mask=tile_mask)
    tl.store(E + r64[:, None] * stride_e + cols[None, :], err_tile, mask=tile_mask)
    if LOSS_COLS:
        tl.store(L + r64[:, None] * stride_l + cols[None, :], loss_tile, mask=tile_mask)
    else:
        lp = L + r64
        tl.store(lp, tl.load(lp, mask=rmask, other=0.0) + loss_row, mask=rmask)


@triton.jit
def _e2m1_round(y):
    """fp4.round_e2m1_ref: the e2m1 grid, compressed-tensors' thresholds (ties to even),
    saturating at 6; a negative value rounding to zero gives -0.0."""
    a = tl.abs(y)
    m = tl.where(a > 5.0, 6.0, tl.where(a >= 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(
        a >= 1.75, 2.0, tl.where(a > 1.25, 1.5, tl.where(a >= 0.75, 1.0, tl.where(
            a > 0.25, 0.5, 0.0)))))))
    return tl.where(y < 0, -m, m)


def _sweep_configs():
    return [triton.Config({"BLOCK_M": m}, num_warps=w)
            for m, w in [(8, 2), (16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]]


# Q may alias W and L accumulates: restore both between autotuning trials. Tuning results are
# cached on disk (cache_results), so a pipeline run does not pay for them again.
_sweep_tuned = triton.autotune(_sweep_configs(), key=["rows", "n", "GDIV", "DYNAMIC", "LOSS_COLS"],
                               restore_value=["Q", "L"], cache_results=True)(_sweep_kernel)


def sweep_block_triton(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor,
                       zp: torch.Tensor | None, args: QuantArgs, *, col0: int = 0,
                       gdiv: int = 1, dynamic: bool = False,
                       scale_dtype: torch.dtype = torch.float32, out: tuple | None = None,
                       block_m: int | None = None):
    """sweep_block_ref's contract in one launch. Dynamic qparams are written in place: scale
    (and zp) fp32 and row-major."""
    _check_block(W1, Hinv1, scale, zp, col0, gdiv)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale dtype {scale_dtype} not supported: use one of "
                         f"{list(SCALE_DTYPES)}")
    rows, n = W1.shape
    W1, Hinv1 = _rowmajor(W1.float()), _rowmajor(Hinv1.float())
    S = _rowmajor(scale.float())
    Z = None if zp is None else _rowmajor(zp.float())
    if Z is not None and Z.stride() != S.stride():
        S, Z = S.contiguous(), Z.contiguous()
    if dynamic and (S is not scale or (zp is not None and Z is not zp)):
        raise ValueError("dynamic qparams are written into scale/zp: pass them fp32, row-major")
    if out is None:
        Q = torch.empty(rows, n, device=W1.device, dtype=torch.float32)
        E, L = torch.empty_like(Q), torch.empty_like(Q)
    else:
        Q, E, L = out
    stride_sc = S.stride(1) if S.shape[1] > 1 else 0      # one group: every column reads it
    argv = (W1, Hinv1, S, Z if Z is not None else S, Q, E, L, rows, n, col0,
            W1.stride(0), Hinv1.stride(0), S.stride(0), stride_sc, Q.stride(0), E.stride(0),
            L.stride(0), float(args.qmin), float(args.qmax), (args.qmax - args.qmin) / 2,
            torch.finfo(scale_dtype).eps, 0, 0, 0, 0, 0, 0)
    if dynamic and args.is_fp4:
        raise ValueError("fp4 group scales are fixed before the sweep (dynamic=False)")
    kw = dict(GDIV=gdiv, FP8=args.type == "float" and not args.is_fp4, FP4=args.is_fp4,
              HAS_ZP=Z is not None, DYNAMIC=dynamic,
              SCALE_DTYPE=SCALE_DTYPES[scale_dtype], LOSS_COLS=out is None,
              BLOCK_N=max(triton.next_power_of_2(n), 16))
    # no fused multiply-add: round every op as torch does (bit-identical to the reference)
    if block_m is None and not interpreting():
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)  # noqa: E731
        _sweep_tuned[grid](*argv, **kw, enable_fp_fusion=False)
    else:
        block_m = block_m or 64
        _sweep_kernel[(triton.cdiv(rows, block_m),)](*argv, **kw, BLOCK_M=block_m,
                                                      enable_fp_fusion=False)
    if out is None:
        return Q, E, L


def sweep_block_triton_batched(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor,
                               zp: torch.Tensor | None, args: QuantArgs,
                               block_m: int | None = None):
    """methods.gptq_solve.sweep_block_batched's contract (E problems, expanded qparams: W1,
    scale, zp [E, rows, B], Hinv1 [E, B, B] -> (Q1, Err1, Losses1) [E, rows, B]) in one launch,
    the expert index a grid dimension; each problem's result is sweep_block_triton's."""
    Ex, rows, n = W1.shape
    if Hinv1.shape != (Ex, n, n) or scale.shape != W1.shape or \
            (zp is not None and zp.shape != W1.shape):
        raise ValueError(f"batched sweep: W1 {list(W1.shape)} needs Hinv1 [{Ex}, {n}, {n}] "
                         f"and scale/zp {list(W1.shape)}, got {list(Hinv1.shape)}, "
                         f"{list(scale.shape)}" + ("" if zp is None else f", {list(zp.shape)}"))
    W1, Hinv1 = W1.float().contiguous(), Hinv1.float().contiguous()
    S = scale.float().contiguous()
    Z = S if zp is None else zp.float().contiguous()
    Q = torch.empty_like(W1)
    E, L = torch.empty_like(Q), torch.empty_like(Q)
    argv = (W1, Hinv1, S, Z, Q, E, L, rows, n, 0,
            n, n, n, 1, n, n, n, float(args.qmin), float(args.qmax),
            (args.qmax - args.qmin) / 2, torch.finfo(torch.float32).eps,
            rows * n, n * n, rows * n, rows * n, rows * n, rows * n)
    kw = dict(GDIV=1, FP8=args.type == "float" and not args.is_fp4, FP4=args.is_fp4,
              HAS_ZP=zp is not None, DYNAMIC=False, SCALE_DTYPE=SCALE_DTYPES[torch.float32],
              LOSS_COLS=True, BLOCK_N=max(triton.next_power_of_2(n), 16))
    if block_m is None and not interpreting():
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), Ex)  # noqa: E731
        _sweep_tuned[grid](*argv, **kw, enable_fp_fusion=False)
    else:
        block_m = block_m or 64
        _sweep_kernel[(triton.cdiv(rows, block_m), Ex)](*argv, **kw, BLOCK_M=block_m,
                                                         enable_fp_fusion=False)
    return Q, E, L


def _trailing_configs():
    # fp32 operands split three ways (tf32x3): tiles of at most 64 accumulators per thread;
    # 4-warp 64x128 tiles already spill on sm_80/sm_89 (measured, tests/compile_kernels.py)
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3),
                                     (128, 64, 32, 8, 3), (64, 64, 32, 4, 4)]]


@triton.jit
def _trailing_kernel(C, A, B, M, N, K, stride_c, stride_a, stride_b,
                     PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    """C[M, N] -= A[M, K] @ B[K, N] (fp32, row-major with the given row strides)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = tl.load(A + rm[:, None] * stride_a + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(B + rk[:, None].to(tl.int64) * stride_b + rn[None, :],
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    cm = (rm[:, None] < M) & (rn[None, :] < N)
    cp = C + rm[:, None] * stride_c + rn[None, :]
    tl.store(cp, tl.load(cp, mask=cm, other=0.0) - acc, mask=cm)


# N (the columns right of the block) changes every call: tune on the row count and K only.
_trailing_tuned = triton.autotune(_trailing_configs(), key=["M", "K", "PRECISION"],
                                  restore_value=["C"], cache_results=True)(_trailing_kernel)


def trailing_update_triton(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           precision: str = TRAILING_PRECISION) -> torch.Tensor:
    M, N = C.shape
    K = A.shape[1]
    if M == 0 or N == 0 or K == 0:
        return C
    if interpreting():  # the interpreter's dot is plain fp32
        _trailing_kernel[(triton.cdiv(M, 64), triton.cdiv(N, 64))](
            C, A, B, M, N, K, C.stride(0), A.stride(0), B.stride(0), PRECISION="ieee",
            BM=64, BN=64, BK=32)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))  # noqa: E731
        _trailing_tuned[grid](C, A, B, M, N, K, C.stride(0), A.stride(0), B.stride(0),
                              PRECISION=precision)
    return C


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
