"""SparseGPT 2:4 in-block sweep: choose the 2:4 mask, prune, optionally round to fp8, and
spread each column's error over the rest of the block through the inverse Hessian.

Contract shared by the torch reference and the Triton kernel:
  prune24_block(W1 [rows, n] fp32, Hinv1 [n, n] fp32 upper Cholesky factor of H^-1,
                scale [rows, 1] fp32 or None, keep [rows, n] bool or None)
      -> (Q1 [rows, n], Err1 [rows, n])
  n a multiple of 4. At every 4th column i, per row, the 2 of columns i..i+3 with the largest
  w^2 / Hinv1[j, j]^2 (current, error-updated w) are kept, ties to the lower column (or, when
  `keep` is given, the mask is keep's: a sweep that only rounds and compensates). Column i
  then becomes q = keep ? w : 0 (q = fp8(q / scale) * scale when scale is given),
  err = (w - q) / Hinv1[i, i], and W1[:, i:] -= err * Hinv1[i, i:].
The trailing update of the columns right of the block (W -= Err1 @ Hinv[block, right]) is a
plain matmul done by the caller.

The Triton kernel runs one program per tile of rows and holds the tile's whole block in
registers, so the n sequential column steps never leave the chip.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, use_triton
from .primitives import e4m3_round
from .quant import fp8_round_ref

# ----------------------------------------------------------------------------- reference


def keep_2_of_4(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask [rows, cols] keeping the 2 largest scores of every 4 consecutive columns.

    Ties go to the lower column, so exactly 2 of 4 are kept, deterministically: column a
    ranks below column b when s_b > s_a, or s_b == s_a and b < a; keep ranks 0 and 1."""
    rows, cols = scores.shape
    s = scores.reshape(rows, cols // 4, 4)
    idx = torch.arange(4, device=scores.device)
    sa, sb = s.unsqueeze(-1), s.unsqueeze(-2)             # [.., a, 1] and [.., 1, b]
    beaten = (sb > sa) | ((sb == sa) & (idx[None, :] < idx[:, None]))
    return (beaten.sum(-1) < 2).reshape(rows, cols)


def prune24_block_ref(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor | None = None,
                      keep: torch.Tensor | None = None):
    # Column-major copies: each step reads and writes contiguous rows (the Python loop over
    # columns is the CPU cost); the same operations, in the same order, as the kernel.
    Wt = W1.float().t().contiguous()
    Qt, Et = torch.empty_like(Wt), torch.empty_like(Wt)
    d = torch.diagonal(Hinv1).float()
    s = None if scale is None else scale[:, 0].float()
    zero = torch.zeros_like(Wt[0])
    fixed = None if keep is None else keep.t().contiguous()
    for i in range(Wt.shape[0]):
        if i % 4 == 0:
            k4 = fixed[i:i + 4] if fixed is not None else \
                keep_2_of_4((Wt[i:i + 4] ** 2 / d[i:i + 4, None] ** 2).t()).t()
        w = Wt[i]
        q = torch.where(k4[i % 4], w, zero)
        if s is not None:
            q = fp8_round_ref(q / s) * s
        err = (w - q) / d[i]
        Wt[i + 1:] -= Hinv1[i, i + 1:, None] * err
        Qt[i] = q
        Et[i] = err
    return Qt.t(), Et.t()


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _column(X, cols, i):
    # one column of a register tile (the others contribute exact zeros)
    return tl.sum(tl.where(cols[None, :] == i, X, 0.0), axis=1)


@triton.jit
def _prune_column(work, err_tile, keep, i, cols, n, s, Hinv, stride_h, QUANT: tl.constexpr):
    """Column i: prune (and round), then push its error into the later columns of the tile."""
    at = cols[None, :] == i
    w = _column(work, cols, i)
    q = tl.where(keep, w, 0.0)
    if QUANT:
        q = e4m3_round(tl.div_rn(q, s)) * s
    err = tl.div_rn(w - q, tl.load(Hinv + i * stride_h + i))
    h = tl.load(Hinv + i * stride_h + cols, mask=(cols > i) & (cols < n), other=0.0)
    work = tl.where(at, q[:, None], work - err[:, None] * h[None, :])   # column i now holds q
    err_tile = tl.where(at, err[:, None], err_tile)
    return work, err_tile


@triton.jit
def _score(work, cols, i, Hinv, stride_h):
    w = _column(work, cols, i)
    d = tl.load(Hinv + i * stride_h + i)
    return tl.div_rn(w * w, d * d)


@triton.jit
def _prune24_block_kernel(W, Hinv, S, K, Q, E, rows, n, stride_w, stride_h, stride_k, stride_q,
                          stride_e, QUANT: tl.constexpr, FIXED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: rows [pid * BLOCK_M, +BLOCK_M) of a block of n columns, in registers."""
    r = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    tile_mask = (r < rows)[:, None] & (cols < n)[None, :]
    work = tl.load(W + r[:, None] * stride_w + cols[None, :], mask=tile_mask, other=0.0)
    work = work.to(tl.float32)
    err_tile = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s = tl.full([BLOCK_M], 1.0, tl.float32)
    if QUANT:
        s = tl.load(S + r, mask=r < rows, other=1.0)
    for g in range(0, n, 4):
        if FIXED:   # the given mask, one column of it at a time from memory
            kp = K + r * stride_k + g
            k0 = tl.load(kp, mask=r < rows, other=0) != 0
            k1 = tl.load(kp + 1, mask=r < rows, other=0) != 0
            k2 = tl.load(kp + 2, mask=r < rows, other=0) != 0
            k3 = tl.load(kp + 3, mask=r < rows, other=0) != 0
        else:
            # 2:4 mask of columns g..g+3 from the current (error-updated) weights
            s0 = _score(work, cols, g, Hinv, stride_h)
            s1 = _score(work, cols, g + 1, Hinv, stride_h)
            s2 = _score(work, cols, g + 2, Hinv, stride_h)
            s3 = _score(work, cols, g + 3, Hinv, stride_h)
            # rank = how many of the others beat it (ties to the lower column); keep 0, 1
            k0 = ((s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32)
                  + (s3 > s0).to(tl.int32)) < 2
            k1 = ((s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32)
                  + (s3 > s1).to(tl.int32)) < 2
            k2 = ((s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32)
                  + (s3 > s2).to(tl.int32)) < 2
            k3 = ((s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32)
                  + (s2 >= s3).to(tl.int32)) < 2
        work, err_tile = _prune_column(work, err_tile, k0, g, cols, n, s, Hinv, stride_h, QUANT)
        work, err_tile = _prune_column(work, err_tile, k1, g + 1, cols, n, s, Hinv, stride_h,
                                       QUANT)
        work, err_tile = _prune_column(work, err_tile, k2, g + 2, cols, n, s, Hinv, stride_h,
                                       QUANT)
        work, err_tile = _prune_column(work, err_tile, k3, g + 3, cols, n, s, Hinv, stride_h,
                                       QUANT)
    tl.store(Q + r[:, None] * stride_q + cols[None, :], work, mask=tile_mask)
    tl.store(E + r[:, None] * stride_e + cols[None, :], err_tile, mask=tile_mask)


def _configs():
    # 32-row tiles spill 16 B (4 warps under triton 3.6, 8 warps on sm_80 under 3.9; measured
    # with tests/compile_kernels.py)
    return [triton.Config({"BLOCK_M": m}, num_warps=w)
            for m, w in [(8, 2), (16, 2), (16, 4), (64, 8)]]


_prune24_tuned = triton.autotune(_configs(), key=["rows", "n", "QUANT", "FIXED"])(
    _prune24_block_kernel)


def prune24_block_triton(W1: torch.Tensor, Hinv1: torch.Tensor,
                         scale: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                         block_m: int | None = None):
    rows, n = W1.shape
    W1 = W1 if W1.stride(1) == 1 else W1.contiguous()
    Hinv1 = Hinv1.float()
    Hinv1 = Hinv1 if Hinv1.stride(1) == 1 else Hinv1.contiguous()
    Q1 = torch.empty(rows, n, device=W1.device, dtype=torch.float32)
    Err1 = torch.empty_like(Q1)
    s = scale.reshape(rows).float().contiguous() if scale is not None else Q1  # unused if None
    k = keep.to(torch.int8).contiguous() if keep is not None else Q1           # unused if None
    argv = (W1, Hinv1, s, k, Q1, Err1, rows, n, W1.stride(0), Hinv1.stride(0), k.stride(0),
            Q1.stride(0), Err1.stride(0))
    # no fused multiply-add and IEEE division: every op rounds as the torch reference's does
    kw = dict(QUANT=scale is not None, FIXED=keep is not None,
              BLOCK_N=max(triton.next_power_of_2(n), 16), enable_fp_fusion=False)
    if block_m is None and not interpreting():
        _prune24_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]),)](*argv, **kw)
    else:
        block_m = block_m or 64
        _prune24_block_kernel[(triton.cdiv(rows, block_m),)](*argv, **kw, BLOCK_M=block_m,
                                                             num_warps=4)
    return Q1, Err1


# ----------------------------------------------------------------------------- dispatch


def prune24_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None):
    """In-block 2:4 sweep (see the module docstring): Triton on CUDA, torch reference on CPU."""
    n = W1.shape[1]
    if n % 4:
        raise ValueError(f"a 2:4 block needs a multiple of 4 columns, got {n}")
    if Hinv1.shape != (n, n):
        raise ValueError(f"Hinv block must be [{n}, {n}], got {list(Hinv1.shape)}")
    if scale is not None and scale.shape != (W1.shape[0], 1):
        raise ValueError(f"scale must be [{W1.shape[0]}, 1] (per output channel), "
                         f"got {list(scale.shape)}")
    if keep is not None and keep.shape != W1.shape:
        raise ValueError(f"keep must be [{W1.shape[0]}, {n}] like the block, "
                         f"got {list(keep.shape)}")
    if use_triton(W1, Hinv1):
        return prune24_block_triton(W1, Hinv1, scale, keep)
    return prune24_block_ref(W1, Hinv1, scale, keep)
