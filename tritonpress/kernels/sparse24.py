"""SparseGPT 2:4 in-block sweep: choose the 2:4 mask, prune, optionally round to fp8, and
spread each column's error over the rest of the block through the inverse Hessian.

Contract shared by the torch reference and the Triton kernel:
  prune24_block(W1 [rows, n] fp32, Hinv1 [n, n] fp32 upper Cholesky factor of H^-1,
                scale [rows, 1] fp32 or None) -> (Q1 [rows, n], Err1 [rows, n])
  n a multiple of 4. At every 4th column i, per row, the 2 of columns i..i+3 with the largest
  w^2 / Hinv1[j, j]^2 (current, error-updated w) are kept, ties to the lower column. Column i
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

from .dispatch import use_triton
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


def prune24_block_ref(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor | None = None):
    W1 = W1.float().clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    d = torch.diagonal(Hinv1)
    keep = None
    for i in range(W1.shape[1]):
        if i % 4 == 0:
            keep = keep_2_of_4(W1[:, i:i + 4] ** 2 / d[i:i + 4] ** 2)
        w = W1[:, i]
        q = torch.where(keep[:, i % 4], w, torch.zeros_like(w))
        if scale is not None:
            q = fp8_round_ref(q / scale[:, 0]) * scale[:, 0]
        err = (w - q) / d[i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Q1[:, i] = q
        Err1[:, i] = err
    return Q1, Err1


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _fp8_round(x):
    """fp32 -> nearest e4m3 value (RNE, saturating at +-448), still fp32. Done on the bits
    because the interpreter's fp32->fp8 cast rounds wrongly."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    # normals: keep 3 of the 23 mantissa bits, round half to even
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = ((bits >> 20) << 20).to(tl.float32, bitcast=True)
    # subnormals (|x| < 2^-6) sit on the 2^-9 grid: adding 1.5 * 2^14 rounds there (RNE)
    sub = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) < 0.015625, sub, normal)


@triton.jit
def _column(X, cols, i):
    # one column of a register tile (the others contribute exact zeros)
    return tl.sum(tl.where(cols[None, :] == i, X, 0.0), axis=1)


@triton.jit
def _prune_column(W1, keep, i, rows_, rmask, cols, cmask, s, Hinv, stride_h, Q, stride_q,
                  E, stride_e, QUANT: tl.constexpr):
    w = _column(W1, cols, i)
    d = tl.load(Hinv + i * stride_h + i)
    q = tl.where(keep, w, 0.0)
    if QUANT:
        q = _fp8_round(q / s) * s
    err = (w - q) / d
    h = tl.load(Hinv + i * stride_h + cols, mask=cmask & (cols >= i), other=0.0)
    W1 = W1 - err[:, None] * h[None, :]
    tl.store(Q + rows_ * stride_q + i, q, mask=rmask)
    tl.store(E + rows_ * stride_e + i, err, mask=rmask)
    return W1


@triton.jit
def _prune24_block_kernel(W, Hinv, S, Q, E, rows, n, stride_w, stride_h, stride_q, stride_e,
                          QUANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows_ = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows_ < rows
    cmask = cols < n
    W1 = tl.load(W + rows_[:, None] * stride_w + cols[None, :],
                 mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    s = 1.0
    if QUANT:
        s = tl.load(S + rows_, mask=rmask, other=1.0)
    for g in range(0, n, 4):
        # 2:4 mask of columns g..g+3 from the current (error-updated) weights
        w0 = _column(W1, cols, g)
        w1 = _column(W1, cols, g + 1)
        w2 = _column(W1, cols, g + 2)
        w3 = _column(W1, cols, g + 3)
        d0 = tl.load(Hinv + g * stride_h + g)
        d1 = tl.load(Hinv + (g + 1) * stride_h + g + 1)
        d2 = tl.load(Hinv + (g + 2) * stride_h + g + 2)
        d3 = tl.load(Hinv + (g + 3) * stride_h + g + 3)
        s0 = w0 * w0 / (d0 * d0)
        s1 = w1 * w1 / (d1 * d1)
        s2 = w2 * w2 / (d2 * d2)
        s3 = w3 * w3 / (d3 * d3)
        # rank = how many of the others beat it (ties to the lower column), keep ranks 0, 1
        k0 = ((s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)) < 2
        k1 = ((s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)) < 2
        k2 = ((s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)) < 2
        k3 = ((s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)) < 2
        W1 = _prune_column(W1, k0, g, rows_, rmask, cols, cmask, s, Hinv, stride_h,
                           Q, stride_q, E, stride_e, QUANT)
        W1 = _prune_column(W1, k1, g + 1, rows_, rmask, cols, cmask, s, Hinv, stride_h,
                           Q, stride_q, E, stride_e, QUANT)
        W1 = _prune_column(W1, k2, g + 2, rows_, rmask, cols, cmask, s, Hinv, stride_h,
                           Q, stride_q, E, stride_e, QUANT)
        W1 = _prune_column(W1, k3, g + 3, rows_, rmask, cols, cmask, s, Hinv, stride_h,
                           Q, stride_q, E, stride_e, QUANT)


def prune24_block_triton(W1: torch.Tensor, Hinv1: torch.Tensor,
                         scale: torch.Tensor | None = None, block_m: int | None = None):
    rows, n = W1.shape
    if W1.stride(1) != 1:
        W1 = W1.contiguous()
    Hinv1 = Hinv1.float()
    if Hinv1.stride(1) != 1:
        Hinv1 = Hinv1.contiguous()
    Q1 = torch.empty(rows, n, device=W1.device, dtype=torch.float32)
    Err1 = torch.empty_like(Q1)
    block_n = max(triton.next_power_of_2(n), 16)
    # small row tiles: enough programs to fill the SMs, the block stays in registers
    block_m = block_m or (16 if block_n <= 128 else 8)
    s = scale.reshape(rows).float().contiguous() if scale is not None else Q1  # unused if None
    grid = (triton.cdiv(rows, block_m),)
    _prune24_block_kernel[grid](W1, Hinv1, s, Q1, Err1, rows, n, W1.stride(0), Hinv1.stride(0),
                                Q1.stride(0), Err1.stride(0), QUANT=scale is not None,
                                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return Q1, Err1


# ----------------------------------------------------------------------------- dispatch


def prune24_block(W1: torch.Tensor, Hinv1: torch.Tensor, scale: torch.Tensor | None = None):
    """In-block 2:4 sweep (see the module docstring): Triton on CUDA, torch reference on CPU."""
    n = W1.shape[1]
    if n % 4:
        raise ValueError(f"a 2:4 block needs a multiple of 4 columns, got {n}")
    if Hinv1.shape != (n, n):
        raise ValueError(f"Hinv block must be [{n}, {n}], got {list(Hinv1.shape)}")
    if scale is not None and scale.shape != (W1.shape[0], 1):
        raise ValueError(f"scale must be [{W1.shape[0]}, 1] (per output channel), "
                         f"got {list(scale.shape)}")
    if use_triton(W1, Hinv1):
        return prune24_block_triton(W1, Hinv1, scale)
    return prune24_block_ref(W1, Hinv1, scale)
