"""Fused GPTQ column sweep: quantize a column, compute its error, update the later columns,
for a whole block of columns without leaving the chip; plus the layer-level solver that
drives it with two-level lazy updates on tensor cores.

1. sweep_block(W1, Hinv1, scale1, zp1, args) -> (Q1, Err1, Losses1): the contract of
   `sweep_block_ref` (see there): per column i of the block
       q = dequant(quant(w_i)),  err = (w_i - q) / Hinv1[i, i],  W1[:, i:] -= err * Hinv1[i, i:]
   Rows are independent inside a block, so one program owns a tile of rows and keeps the
   tile's whole block in registers for the B sequential column steps. Every op is rounded as
   torch rounds it (IEEE division, no fused multiply-add), so the result is bit-identical to
   the reference at the same inputs, on the GPU and in the interpreter.

2. gptq_solve(W, Hinv, args, scale, zp, ...) -> (Q, scale, zp, losses): the whole sweep of one
   weight (no activation order). Differences from the block-by-block reference loop:
   - qparams are indexed per group inside the kernel (no [rows, B] expanded copies); with
     scale=None (group strategy) they are computed in the kernel when the sweep reaches the
     group's first column, from the updated weights -- gptq.py's "dynamic" mode;
   - errors go to the later columns in two levels: inside a super-block of `outer` columns
     after every block (K = block_size), to the columns right of the super-block once per
     super-block (K = outer). The same sums, but the big update is one GEMM with K = 1024
     instead of eight memory-bound K = 128 ones;
   - the trailing GEMM runs on tensor cores at `precision` (see TRAILING_PRECISION).
   Same-shape weights that share the Hessian and quant args (q/k/v, gate/up) can be stacked
   along rows and solved in one call: rows never interact.

3. inverse_hessian_factor(H): the upper Cholesky factor U of H^-1 (U^T U = H^-1) with one
   Cholesky and one triangular inverse instead of Cholesky, cholesky_inverse and Cholesky:
   if J reverses the index order and J H J = L L^T, then H = R R^T with R = J L J upper, and
   U = R^-1 = J L^-1 J. Half the O(n^3) work of the usual route, all in torch (cuSOLVER).

4. gptq_sweep(W, Hinv, args, scale, zp, gcol, ...): what compress/gptq.py calls, any column
   order (gcol: each swept column's group); the one place the implementation is chosen: 2.
   on CUDA when it applies, else the paper's loop over blocks with 1.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from .dispatch import interpreting, use_triton
from .primitives import e4m3_round, qparams, rne

# Precision of the trailing GEMM W[:, right] -= Err @ Hinv[block, right] on the GPU. Measured
# by emulating the operand rounding in fp32 (bench_gptq_gpu.py --precision-study; 512 x 1024,
# correlated H, vs exact fp32): tf32 changes 0.3-0.6% of the chosen values and the loss by
# ~1e-4; bf16 3-4% and 2-6e-4; tf32x3 and bf16x3 ~3e-5 of the values and 3e-6 of the loss
# (as fp32 reassociation does). tf32x3: fp32-grade at 3 tf32 MMAs (bf16x3 would cost 1.5).
TRAILING_PRECISION = "tf32x3"
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3")

_SCALE_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16,
                 torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------- references

def sweep_block_ref(W1: torch.Tensor, Hinv1: torch.Tensor, scale1: torch.Tensor,
                    zp1: torch.Tensor | None, args: QuantArgs):
    """Quantize the columns of one block in order, with OBS error feedback inside the block.

    Contract (the fused kernel keeps it, bit for bit):
      W1      [rows, B] fp32, the block's current weights (not modified)
      Hinv1   [B, B] fp32, the block's diagonal block of the upper Cholesky factor of H^-1
      scale1  [rows, B] fp32, the scale of each column's group (values already rounded to the
              scale storage dtype); zp1 the same for zero points (fp32) or None (symmetric)
      args    the weight QuantArgs (int: round-half-even + clamp; float: e4m3 RNE)
    Returns (Q1, Err1, Losses1), each [rows, B] fp32:
      Q1      the dequantized values chosen, (q - zp) * scale
      Err1    (w - q) / Hinv1[i, i], the scaled errors the caller propagates to later columns
      Losses1 (w - q)^2 / Hinv1[i, i]^2 (the paper's loss is half their sum)
    where w is column i after the updates from columns < i of the block.
    """
    from .quant import fp8_round_ref as fp8_round
    # Column-major copies, so that each step reads and writes contiguous rows; ten torch ops a
    # column (the Python loop is the CPU cost), the same roundings as the kernel.
    Wt = W1.float().t().contiguous()
    St = scale1.float().t().contiguous()
    fp8 = args.type == "float"
    if not fp8:   # clamping y to [qmin - zp, qmax - zp] before rounding: integer bounds commute
        lo, hi = ((torch.full_like(St, float(args.qmin)), torch.full_like(St, float(args.qmax)))
                  if zp1 is None else (float(args.qmin) - zp1.float().t(),
                                       float(args.qmax) - zp1.float().t()))
    Qt, Dt = torch.empty_like(Wt), torch.empty_like(Wt)
    d = Hinv1.diagonal().float()
    for i in range(Wt.shape[0]):
        w = Wt[i]
        y = w / St[i]
        q = (fp8_round(y) if fp8 else torch.round(torch.clamp(y, lo[i], hi[i]))).mul_(St[i])
        Qt[i] = q
        diff = torch.sub(w, q, out=Dt[i])
        Wt[i + 1:].sub_(Hinv1[i, i + 1:, None] * (diff / d[i]))
    Q1, Diff1 = Qt.t(), Dt.t()
    return Q1, Diff1 / d, (Diff1 * Diff1) / (d * d)


def gptq_solve_ref(W: torch.Tensor, Hinv: torch.Tensor, args: QuantArgs,
                   scale: torch.Tensor | None = None, zp: torch.Tensor | None = None, *,
                   scale_dtype: torch.dtype = torch.bfloat16, block_size: int = 128,
                   outer: int = 1024, precision: str = "ieee"):
    """gptq_solve in torch: the same two-level schedule, per-column loop in Python."""
    from .quant import qparams_from_minmax
    W, rows, cols, gsize, scale, zp, dynamic = _solve_setup(W, Hinv, args, scale, zp,
                                                           scale_dtype, block_size, outer)
    losses = torch.zeros(rows, device=W.device)
    for j1 in range(0, cols, outer):
        j2 = min(j1 + outer, cols)
        E = torch.empty(rows, j2 - j1, device=W.device)
        for i1 in range(j1, j2, block_size):
            i2 = min(i1 + block_size, j2)
            for c in range(i1, i2):
                g = c // gsize
                if dynamic and c % gsize == 0:
                    grp = W[:, c:c + gsize]
                    s, z = qparams_from_minmax(grp.amin(1), grp.amax(1), args, scale_dtype)
                    scale[:, g] = s
                    if zp is not None:
                        zp[:, g] = z
                s = scale[:, g:g + 1]
                z = None if zp is None else zp[:, g:g + 1]
                Q1, Err1, L1 = sweep_block_ref(W[:, c:c + 1], Hinv[c:c + 1, c:c + 1], s, z, args)
                W[:, c:c + 1] = Q1
                E[:, c - j1:c - j1 + 1] = Err1
                losses += L1[:, 0]
                W[:, c + 1:i2] -= Err1 @ Hinv[c:c + 1, c + 1:i2]
            if i2 < j2:
                trailing_update_ref(W[:, i2:j2], E[:, i1 - j1:i2 - j1], Hinv[i1:i2, i2:j2],
                                    precision)
        if j2 < cols:
            trailing_update_ref(W[:, j2:], E, Hinv[j1:j2, j2:], precision)
    return W, scale, zp, losses / 2


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


def inverse_hessian_factor(H: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Upper U with U^T U = H^-1 for a (dampened) positive definite H: (U, 0), or (None, info)
    when the Cholesky fails. One Cholesky of the index-reversed H and one triangular inverse."""
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if int(info) != 0:
        return None, int(info)
    return lower_triangular_inverse(L).flip(0, 1), 0


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """L^-1 by halves: inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]. n^3/3
    multiply-adds, nearly all in GEMMs (a triangular solve against I costs n^3)."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        return torch.linalg.solve_triangular(L, eye, upper=False)
    h = (n // 2 + 127) // 128 * 128 if n > 256 else n // 2  # edges on multiples of 128
    out = torch.zeros_like(L)
    Ai = out[:h, :h] = lower_triangular_inverse(L[:h, :h], leaf)
    Di = out[h:, h:] = lower_triangular_inverse(L[h:, h:], leaf)
    out[h:, :h] = -(Di @ (L[h:, :h] @ Ai))
    return out


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _sweep_kernel(W, Hinv, S, Z, Q, E, L, rows, n, col0,
                  stride_w, stride_h, stride_sr, stride_sc, stride_q, stride_e, stride_l,
                  qmin, qmax, half_range, eps,
                  GDIV: tl.constexpr, FP8: tl.constexpr, HAS_ZP: tl.constexpr,
                  DYNAMIC: tl.constexpr, SCALE_DTYPE: tl.constexpr, LOSS_COLS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: rows [pid*BLOCK_M, +BLOCK_M) of a block of n columns.

    Scale of column c: S[r, (col0 + c) // GDIV] (GDIV = 1: one scale per column, gptq.py's
    expanded contract; GDIV = group size: per group; stride_sc = 0: per channel). DYNAMIC
    computes it at each group start from the current weights and stores it there.
    Outputs: Q (dequantized, may alias W), E (errors), L (per-column losses when LOSS_COLS,
    else added to a per-row sum)."""
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
        if FP8:
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


def _sweep_configs():
    return [triton.Config({"BLOCK_M": m}, num_warps=w)
            for m, w in [(8, 2), (16, 2), (16, 4), (32, 4), (32, 8), (64, 8)]]


# Q may alias W and L accumulates: restore both between autotuning trials. Tuning results are
# cached on disk (cache_results), so a pipeline run does not pay for them again.
_sweep_tuned = triton.autotune(_sweep_configs(), key=["rows", "n", "GDIV", "DYNAMIC", "LOSS_COLS"],
                               restore_value=["Q", "L"], cache_results=True)(_sweep_kernel)


def _launch_sweep(W1, Hinv1, S, Z, Q, E, L, args, col0, gdiv, stride_sc, dynamic, loss_cols,
                  scale_dtype, block_m=None):
    rows, n = W1.shape
    block_n = max(triton.next_power_of_2(n), 16)
    eps = torch.finfo(scale_dtype).eps
    argv = (W1, Hinv1, S, Z if Z is not None else S, Q, E, L, rows, n, col0,
            W1.stride(0), Hinv1.stride(0), S.stride(0), stride_sc, Q.stride(0), E.stride(0),
            L.stride(0), float(args.qmin), float(args.qmax), (args.qmax - args.qmin) / 2, eps)
    kw = dict(GDIV=gdiv, FP8=args.type == "float", HAS_ZP=Z is not None, DYNAMIC=dynamic,
              SCALE_DTYPE=_SCALE_DTYPES[scale_dtype], LOSS_COLS=loss_cols, BLOCK_N=block_n)
    if block_m is None and not interpreting():
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)  # noqa: E731
        # no fused multiply-add: round every op as torch does (bit-identical to the reference)
        _sweep_tuned[grid](*argv, **kw, enable_fp_fusion=False)
    else:
        block_m = block_m or 64
        _sweep_kernel[(triton.cdiv(rows, block_m),)](*argv, **kw, BLOCK_M=block_m,
                                                      enable_fp_fusion=False)


def sweep_block_triton(W1: torch.Tensor, Hinv1: torch.Tensor, scale1: torch.Tensor,
                       zp1: torch.Tensor | None, args: QuantArgs, block_m: int | None = None):
    rows, n = W1.shape
    W1, Hinv1 = _rowmajor(W1.float()), _rowmajor(Hinv1.float())
    S = _rowmajor(scale1.float())
    Z = None if zp1 is None else _rowmajor(zp1.float())
    if Z is not None and Z.stride() != S.stride():
        Z = Z.contiguous()
        S = S.contiguous()
    Q1 = torch.empty(rows, n, device=W1.device, dtype=torch.float32)
    Err1, Losses1 = torch.empty_like(Q1), torch.empty_like(Q1)
    # scale1 is expanded per column (its values are already rounded): GDIV = 1, not dynamic
    _launch_sweep(W1, Hinv1, S, Z, Q1, Err1, Losses1, args, 0, 1, S.stride(1), False, True,
                  torch.float32, block_m)
    return Q1, Err1, Losses1


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


def gptq_solve_triton(W: torch.Tensor, Hinv: torch.Tensor, args: QuantArgs,
                      scale: torch.Tensor | None = None, zp: torch.Tensor | None = None, *,
                      scale_dtype: torch.dtype = torch.bfloat16, block_size: int = 128,
                      outer: int = 1024, precision: str = TRAILING_PRECISION,
                      block_m: int | None = None):
    W, rows, cols, gsize, scale, zp, dynamic = _solve_setup(W, Hinv, args, scale, zp,
                                                           scale_dtype, block_size, outer)
    Hinv = _rowmajor(Hinv.float())
    losses = torch.zeros(rows, device=W.device)
    E = torch.empty(rows, min(outer, cols), device=W.device)
    stride_sc = 0 if args.strategy == "channel" else scale.stride(1)
    gdiv = cols if args.strategy == "channel" else gsize
    if zp is not None and zp.stride() != scale.stride():
        zp = zp.contiguous()
    for j1 in range(0, cols, outer):
        j2 = min(j1 + outer, cols)
        for i1 in range(j1, j2, block_size):
            i2 = min(i1 + block_size, j2)
            Wb = W[:, i1:i2]
            _launch_sweep(Wb, Hinv[i1:i2, i1:i2], scale, zp, Wb, E[:, i1 - j1:], losses, args,
                          i1, gdiv, stride_sc, dynamic, False, scale_dtype, block_m)
            if i2 < j2:
                trailing_update_triton(W[:, i2:j2], E[:, i1 - j1:i2 - j1], Hinv[i1:i2, i2:j2],
                                       precision)
        if j2 < cols:
            trailing_update_triton(W[:, j2:], E[:, :j2 - j1], Hinv[j1:j2, j2:], precision)
    return W, scale, zp, losses / 2


# ----------------------------------------------------------------------------- dispatch

def sweep_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale1: torch.Tensor,
                zp1: torch.Tensor | None, args: QuantArgs):
    """sweep_block_ref's contract; the fused kernel on CUDA tensors."""
    rows, n = W1.shape
    if Hinv1.shape != (n, n):
        raise ValueError(f"Hinv block must be [{n}, {n}] for a block of {n} columns, "
                         f"got {list(Hinv1.shape)}")
    for name, t in (("scale1", scale1), ("zp1", zp1)):
        if t is not None and t.shape != W1.shape:
            raise ValueError(f"{name} must be expanded to the block's shape {list(W1.shape)} "
                             f"(one value per column), got {list(t.shape)}")
    if use_triton(W1, Hinv1):
        return sweep_block_triton(W1, Hinv1, scale1, zp1, args)
    return sweep_block_ref(W1, Hinv1, scale1, zp1, args)


def gptq_solve(W: torch.Tensor, Hinv: torch.Tensor, args: QuantArgs,
               scale: torch.Tensor | None = None, zp: torch.Tensor | None = None, *,
               scale_dtype: torch.dtype = torch.bfloat16, block_size: int = 128,
               outer: int | None = None, precision: str = TRAILING_PRECISION):
    """GPTQ sweep of a whole weight W [rows, cols] (columns in order) given U = Hinv, the upper
    Cholesky factor of the dampened H^-1.

    scale/zp: [rows, ngroups] qparams fixed before the sweep (values already rounded to the
    storage dtype; zp fp32 or None), or scale=None with group strategy: computed when the sweep
    reaches each group, from the updated weights (needs block_size % group_size == 0).
    Returns (Q dequantized fp32 [rows, cols], scale, zp, losses [rows]: half the sum of
    (w - q)^2 / U_ii^2, the paper's loss). W is not modified.
    outer: super-block width for the two-level update (default: the multiple of block_size
    nearest 1024 from below)."""
    outer = outer or block_size * max(1, 1024 // block_size)
    if use_triton(W, Hinv):
        return gptq_solve_triton(W, Hinv, args, scale, zp, scale_dtype=scale_dtype,
                                 block_size=block_size, outer=outer, precision=precision)
    return gptq_solve_ref(W, Hinv, args, scale, zp, scale_dtype=scale_dtype,
                          block_size=block_size, outer=outer, precision="ieee")


def gptq_sweep(W: torch.Tensor, Hinv: torch.Tensor, args: QuantArgs, scale: torch.Tensor,
               zp: torch.Tensor | None, gcol: torch.Tensor, *, dynamic: bool = False,
               scale_dtype: torch.dtype = torch.bfloat16, block_size: int = 128):
    """The whole GPTQ sweep of W [rows, cols] fp32, its columns in sweep order, given U =
    Hinv (the upper Cholesky factor of the dampened H^-1 in that order). Column j belongs to
    group gcol[j] of scale/zp [rows, ngroups] (under activation order the groups are
    scattered). dynamic (group strategy): a group's qparams are computed from the updated
    weights when the sweep first meets it, into scale/zp.

    The one place the implementation is chosen: on CUDA the fused whole-layer solve
    (gptq_solve) whenever it applies; else the paper's loop: per block of block_size
    columns, sweep_block (the fused block kernel on CUDA, its reference elsewhere), then
    the block's errors to every later column in one matmul. Returns (Q [rows, cols] fp32 in
    sweep order, scale, zp, losses [rows]); W is overwritten."""
    from .quant import expand, qparams_from_minmax
    rows, cols = W.shape
    if use_triton(W, Hinv) and args.strategy in ("group", "channel"):
        gsize = args.group_size if args.strategy == "group" else cols
        # the fused solve indexes groups as column // group size: columns in that order
        in_order = args.strategy == "channel" or torch.equal(
            gcol, torch.arange(cols, device=gcol.device) // gsize)
        if in_order and (not dynamic or block_size % gsize == 0):
            return gptq_solve(W, Hinv, args, None if dynamic else scale,
                              None if dynamic else zp, scale_dtype=scale_dtype,
                              block_size=block_size)
        if not dynamic:             # scattered groups: each column its group's qparams
            Q, _, _, losses = gptq_solve(W, Hinv, dataclasses.replace(args, group_size=1),
                                         expand(scale, gcol, rows), expand(zp, gcol, rows),
                                         scale_dtype=scale_dtype, block_size=block_size)
            return Q, scale, zp, losses

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
        Q1, Err1, L1 = sweep_block(W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2],
                                   expand(scale, gcol[i1:i2], rows),
                                   expand(zp, gcol[i1:i2], rows), args)
        Q[:, i1:i2] = Q1
        losses += L1.sum(1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, scale, zp, losses


# ----------------------------------------------------------------------------- plumbing

def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _solve_setup(W, Hinv, args, scale, zp, scale_dtype, block_size, outer):
    rows, cols = W.shape
    if Hinv.shape != (cols, cols):
        raise ValueError(f"Hinv {list(Hinv.shape)} does not match weight {list(W.shape)}")
    if block_size <= 0 or outer % block_size:
        raise ValueError(f"outer ({outer}) must be a positive multiple of block_size ({block_size})")
    if args.strategy not in ("group", "channel"):
        raise ValueError(f"the fused GPTQ sweep handles group and channel weights, not "
                         f"{args.strategy}; use compress/gptq.py's torch path")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale dtype {scale_dtype} not supported: use one of "
                         f"{list(_SCALE_DTYPES)}")
    gsize = args.group_size if args.strategy == "group" else cols
    ngroups = triton.cdiv(cols, gsize)
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
