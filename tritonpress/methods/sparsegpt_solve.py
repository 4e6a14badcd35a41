"""SparseGPT 2:4 with fp8 weights (Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", with the N:M extension of its section 3.3).

Per Linear, from the Hessian H = 2 X^T X of its calibration inputs:
  1. dampen H (1% of its mean diagonal), zero the weights of dead inputs;
  2. activation order ("static", the default): the groups of 4 columns that the 2:4 pattern
     is made on are swept by decreasing sum of their H_ii, each group's columns together and
     in order, so the pattern stays on the original groups (GPTQ's static order, by groups);
  3. Hinv = upper Cholesky factor of H^-1 (in the sweep's column order);
  4. sweep the columns in blocks of 128; at the start of every 4 columns, per row, keep the 2
     weights with the largest w^2 / [Hinv]_jj^2 and prune the others; the error of each
     column, err = (w - q) / [Hinv]_jj, is spread over the later columns of the block by
     rank-1 updates (kernels/sparse24.py), and over the columns right of the block by one
     matmul after it, exactly as GPTQ does for rounding errors.
fp8 (e4m3, per output channel) comes in one of two ways:
  "joint"               the kept weights are rounded to the fp8 grid inside the same sweep, so
                        the rounding error is compensated too (scale fixed before the sweep);
  "prune_then_quantize" the sweep prunes only; the 2:4 float weights are then rounded to fp8.
The joint scale is 2 x amax(original row) / 448: the error updates push the largest weight of
about two rows in three above the original amax, and e4m3 is a float, so one binade of
headroom keeps the same grid for every normal value while (in column order) nothing clips;
the static group order lets a rare code saturate, its clipping error compensated like any
rounding error. On SmolLM2-135M (in column order) this matched taking the amax from a first
float sweep ("sparse", twice the work) and beat both the plain amax and prune-then-quantize
(bench/bench_sparsegpt_gpu.py --quality).
magnitude_24 is the data-free baseline: keep the 2 largest |w| of every 4, no update.
This file solves one weight; sparsegpt.py runs the solve in the layer loop.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..checkpoint.qweight import QuantizedWeight
from ..kernels.quant import quantize_ref, quantize_weight, weight_qparams_ref
from ..kernels.sparse24 import keep_2_of_4, prune24_block
from ..models import all_finite
from ..recipe import check_actorder
from ..schemes import QuantArgs
from .gptq_solve import inverse_cholesky

FP8_CHANNEL = QuantArgs(8, "float", True, "channel")
MODES = ("joint", "prune_then_quantize")
SCALE_FROM = ("original", "sparse")
DEFAULT_MODE = "joint"
HEADROOM = 2.0      # joint mode: scale = HEADROOM * amax / 448 (a power of 2: same fp8 grid)
# Groups of 4 swept by decreasing H_ii: on SmolLM2-135M, 32 x 512 calibration tokens, mean KL
# 0.997 -> 0.909 (held-out canterbury) and 2.006 -> 1.844 (code) against columns in order.
DEFAULT_ACTORDER = "static"


class InverseHessian(NamedTuple):
    U: torch.Tensor      # upper Cholesky factor of the dampened H^-1 in the sweep's column
                         # order (U^T U = H[perm][:, perm]^-1)
    dead: torch.Tensor   # [in] bool, original order: inputs never active (weights zeroed)
    frac: float          # dampening used, as a fraction of the mean diagonal
    damp: float          # the value added to the diagonal
    perm: torch.Tensor | None = None   # the sweep's column order (None: as given)


def group_order(H: torch.Tensor) -> torch.Tensor:
    """Static activation order by 2:4 groups: the column order that sweeps the groups of 4
    by decreasing sum of H_ii, each group's 4 columns together and in order (ties: the lower
    group first)."""
    g = H.diagonal().reshape(-1, 4).sum(1)
    first = torch.argsort(g, descending=True, stable=True)
    return (first[:, None] * 4 + torch.arange(4, device=H.device)).reshape(-1)


def inverse_hessian_cholesky(H: torch.Tensor, damp: float = 0.01,
                             actorder: str | None = DEFAULT_ACTORDER) -> InverseHessian:
    """Dampen H [in, in], put its columns in the sweep's order (actorder "static": by 2:4
    groups, group_order; None: as given) and factor its inverse. The dampening grows x10
    while the factorization fails (as GPTQ). Linears sharing an input (q/k/v, gate/up)
    share this."""
    H = H.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    perm = group_order(H) if check_actorder(actorder) else None
    U, frac, failed = inverse_cholesky(H if perm is None else H[perm][:, perm], damp)
    if U is None:
        raise ValueError(f"the Hessian is not positive definite even with dampening up to "
                         f"{failed[-1] if failed else damp}: it holds NaN/Inf or too few "
                         "tokens; use more calibration samples")
    # the same value gptq.inverse_cholesky added
    return InverseHessian(U, dead, frac, frac * float(H.diagonal().abs().mean()), perm)


def sparsegpt_sweep(W: torch.Tensor, Hinv: torch.Tensor, block_size: int = 128,
                    scale: torch.Tensor | None = None, keep: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocked OBS sweep: W [out, in] fp32 -> (2:4 weights, on the fp8 grid times `scale`
    when a per-channel scale [out, 1] is given; loss of each row [out]). With `keep` [out, in]
    the 2:4 mask is that one instead of the sweep's own choice.

    W - Wq = Err @ U with U = Hinv (upper, U^T U = H^-1), so each row's loss
    (w - wq) H (w - wq)^T under the dampened H is exactly its sum of err^2."""
    W = W.clone()
    cols = W.shape[1]
    losses = torch.zeros(W.shape[0], device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        Q1, Err1 = prune24_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scale,
                                 None if keep is None else keep[:, i1:i2])
        W[:, i1:i2] = Q1
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)    # the lazy trailing update
        losses += Err1.square().sum(1)
    return W, losses


def refit_kept(W0: torch.Tensor, W: torch.Tensor, keep: torch.Tensor, A: torch.Tensor,
               iters: int = 50, tol: float = 1e-3) -> torch.Tensor:
    """The kept weights refit for a fixed mask: per row, argmin (w - w0) A (w - w0)^T over the
    w that are 0 where keep is False, by conjugate gradients from W (already 0 there), with
    A's diagonal as preconditioner (the inputs' scales differ by orders of magnitude). Rows
    are independent systems, solved side by side: one [out, in] x [in, in] product a step.
    Stops when every row's residual is below `tol` of where it started."""
    M = keep.float()
    inv_d = 1.0 / A.diagonal().clamp_min(1e-12)
    W = W.clone()
    r = ((W0 - W) @ A) * M                     # minus half the gradient, on the kept set
    z = r * inv_d
    p, rz = z, (r * z).sum(1)
    stop = tol * tol * rz.clamp_min(1e-30)
    for _ in range(iters):
        Ap = (p @ A) * M
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(1e-30), torch.zeros_like(rz))
        W.addcmul_(alpha[:, None], p)
        r.addcmul_(alpha[:, None], Ap, value=-1)
        z = r * inv_d
        rz_new = (r * z).sum(1)
        if bool((rz_new <= stop).all()):
            break
        p = z + (rz_new / rz.clamp_min(1e-30))[:, None] * p
        rz = rz_new
    return W


def sparsegpt_24(W: torch.Tensor, H: torch.Tensor | None, *, mode: str = DEFAULT_MODE,
                 scale_from: str = "original", headroom: float = HEADROOM,
                 block_size: int = 128, damp: float = 0.01,
                 actorder: str | None = DEFAULT_ACTORDER, args: QuantArgs = FP8_CHANNEL,
                 scale_dtype: torch.dtype | None = None, hinv: InverseHessian | None = None,
                 refit: float | None = None) -> tuple[QuantizedWeight, torch.Tensor]:
    """SparseGPT 2:4 + fp8 per-channel weights of one Linear (W [out, in], H [in, in] fp32)
    and the loss of each row [out] under the dampened H (their sum: tr((W-Wq) H (W-Wq)^T)).

    scale_from (joint mode): "original" takes the fp8 scale from the unpruned rows; "sparse"
    runs a float sweep first and takes it from the 2:4 weights it gives (twice the work);
    either amax is multiplied by `headroom` (see the module docstring).
    actorder: "static" (default: 2:4 groups by decreasing H_ii) or None (columns in order).
    hinv: inverse_hessian_cholesky(H, damp, actorder) when already computed (then H may be
    None unless refit is given; its order is used).
    refit (joint mode; needs H): a float sweep chooses the mask, the kept weights are refit
    to the least-squares optimum for it under H + refit * mean(diag H) * I (the ridge keeps
    them near the originals, so the fit holds on text unlike the calibration text), then
    the joint sweep rounds them to fp8 on that mask."""
    _check(W, H if hinv is None else hinv.U, args, block_size)
    if mode not in MODES:
        raise ValueError(f"unknown SparseGPT mode {mode!r}: choose one of {', '.join(MODES)}")
    if not headroom >= 1:
        raise ValueError(f"headroom must be >= 1 (a multiple of the amax), got {headroom}")
    if scale_from not in SCALE_FROM:
        raise ValueError(f"scale_from={scale_from!r}: choose one of {', '.join(SCALE_FROM)}")
    if refit is not None and (mode != "joint" or H is None or not refit > 0):
        raise ValueError(f"refit={refit}: a ridge > 0 (a fraction of H's mean diagonal), in "
                         "joint mode, with H given")
    scale_dtype = scale_dtype or W.dtype
    Hinv, dead, _, _, perm = hinv if hinv is not None else \
        inverse_hessian_cholesky(H, damp, actorder)
    W = W.float().masked_fill(dead, 0.0)     # inputs never seen: nothing to preserve
    if perm is not None:                     # the sweep runs in Hinv's column order
        W = W[:, perm]
    if mode == "prune_then_quantize":
        Wq, _ = sparsegpt_sweep(W, Hinv, block_size)
        qw = _to_quantized(Wq, None, args, scale_dtype)
        # the fp8 rounding came after the sweep
        return _unpermuted(qw, perm), _dampened_loss_rows(W, qw.dequantize(), Hinv)
    keep, start = None, W
    if refit is not None:
        Wf = sparsegpt_sweep(W, Hinv, block_size)[0]
        keep = Wf != 0
        A = H.float() if perm is None else H.float()[perm][:, perm]
        A = A + refit * float(A.diagonal().mean()) * torch.eye(A.shape[0], device=A.device)
        start = refit_kept(W, Wf, keep, A)
    source = W if scale_from == "original" else \
        (start if refit is not None else sparsegpt_sweep(W, Hinv, block_size)[0])
    scale = weight_qparams_ref(source * headroom, args, scale_dtype)[0]
    Wq, losses = sparsegpt_sweep(start, Hinv, block_size, scale, keep)
    if refit is not None:        # the sweep's losses are against its start, not W
        losses = _dampened_loss_rows(W, Wq, Hinv)
    return _unpermuted(_to_quantized(Wq, scale, args, scale_dtype), perm), losses


def _dampened_loss_rows(W: torch.Tensor, Wq: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    # (w - wq) H (w - wq)^T per row under the dampened H = (U^T U)^-1: ||(W - Wq) U^-1||^2
    E = torch.linalg.solve_triangular(U, W - Wq, upper=True, left=False)
    return E.square().sum(1)


def undampened_loss_rows(losses: torch.Tensor, W: torch.Tensor, Wq: torch.Tensor,
                         inv: InverseHessian) -> torch.Tensor:
    """Per row (w - wq) H (w - wq)^T under the undampened H (what kernels.hessian.output_error
    computes) from the sweep's dampened losses, with no matmul: H_damped = H + damp * I on
    the live inputs, and dead inputs are zero in both."""
    D = W.float().masked_fill(inv.dead, 0.0) - Wq.float()
    return losses - inv.damp * D.square().sum(1)


def _unpermuted(qw: QuantizedWeight, perm: torch.Tensor | None) -> QuantizedWeight:
    # whole groups of 4 moved: the 2:4 pattern is the same on the original columns
    if perm is None:
        return qw
    return dataclasses.replace(qw, q=qw.q[:, torch.argsort(perm)])


def magnitude_24(W: torch.Tensor, *, args: QuantArgs = FP8_CHANNEL,
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Baseline: keep the 2 largest |w| of every 4 inputs, then fp8 round-to-nearest."""
    _check(W, None, args, 4)
    scale_dtype = scale_dtype or W.dtype
    W = W.float()
    Wq = torch.where(keep_2_of_4(W.abs()), W, torch.zeros_like(W))
    return _to_quantized(Wq, None, args, scale_dtype)


def _check(W, H, args, block_size):
    out, cols = W.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs in-features divisible by 4, this layer has {cols}: "
                         "leave it dense (add it to the scheme's ignore list)")
    if H is not None and H.shape != (cols, cols):
        raise ValueError(f"Hessian must be [{cols}, {cols}] for a weight [{out}, {cols}], "
                         f"got {list(H.shape)}")
    if block_size <= 0 or block_size % 4:
        raise ValueError(f"block size must be a positive multiple of 4, got {block_size}")
    if not (args.type == "float" and args.num_bits == 8 and args.strategy == "channel"):
        raise ValueError("SparseGPT 2:4 here stores fp8 e4m3 per-channel weights "
                         f"(scheme W8A8_FP8_24), got {args}")
    if not all_finite(W):
        raise ValueError("NaN or Inf in the weight: the model is broken before compression")


def _to_quantized(Wq, scale, args, scale_dtype) -> QuantizedWeight:
    """The 2:4 weights Wq as fp8 codes under `scale` (in joint mode Wq is already on its grid,
    so this only re-expresses it), or with scale=None rounded to nearest under their own
    per-channel scale (kernels.quant.quantize_weight: the fused kernel on a GPU)."""
    if scale is None:
        q, scale, _ = quantize_weight(Wq, args, scale_dtype)
    else:
        q, scale = quantize_ref(Wq, scale, None, args), scale.to(scale_dtype)
    qw = QuantizedWeight(q, scale, None, args)
    if not qw.is_24_sparse():
        raise RuntimeError("internal error: SparseGPT produced weights that are not 2:4 sparse")
    return qw
