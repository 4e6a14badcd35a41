"""SparseGPT 2:4 with fp8 weights (Frantar & Alistarh 2023, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot", with the N:M extension of its section 3.3).

Per Linear, from the Hessian H = 2 X^T X of its calibration inputs:
  1. dampen H (1% of its mean diagonal), zero the weights of dead inputs;
  2. Hinv = upper Cholesky factor of H^-1;
  3. sweep the columns in blocks of 128; at the start of every 4 columns, per row, keep the 2
     weights with the largest w^2 / [Hinv]_jj^2 and prune the others; the error of each
     column, err = (w - q) / [Hinv]_jj, is spread over the later columns of the block by
     rank-1 updates (kernels/sparse24.py), and over the columns right of the block by one
     matmul after it, exactly as GPTQ does for rounding errors.
fp8 (e4m3, per output channel) comes in one of two ways:
  "joint"               the kept weights are rounded to the fp8 grid inside the same sweep, so
                        the rounding error is compensated too (scale fixed before the sweep);
  "prune_then_quantize" the sweep prunes only; the 2:4 float weights are then rounded to fp8.
magnitude_24 is the data-free baseline: keep the 2 largest |w| of every 4, no update.
"""
from __future__ import annotations

import torch

from ..kernels.quant import quantize_ref, weight_qparams_ref
from ..kernels.sparse24 import keep_2_of_4, prune24_block
from ..schemes import QuantArgs
from .qweight import QuantizedWeight

FP8_CHANNEL = QuantArgs(8, "float", True, "channel")
MODES = ("joint", "prune_then_quantize")
SCALE_FROM = ("original", "sparse")
DEFAULT_MODE = "joint"


def inverse_hessian_cholesky(H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01):
    """Dampened H -> (upper Cholesky factor of H^-1, W with the dead inputs' columns zeroed)."""
    H = H.float().clone()
    W = W.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"the Hessian is not positive definite even with dampening {percdamp}: "
                         "raise the dampening (damp=0.1) or use more calibration samples")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return Hinv, W


def sparsegpt_sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int = 128,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """The blocked OBS sweep: W [out, in] fp32 -> 2:4 weights (on the fp8 grid times `scale`
    when a per-channel scale [out, 1] is given)."""
    W = W.clone()
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Q1, Err1 = prune24_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scale)
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def sparsegpt_24(W: torch.Tensor, H: torch.Tensor, *, mode: str = DEFAULT_MODE,
                 scale_from: str = "original", blocksize: int = 128, percdamp: float = 0.01,
                 args: QuantArgs = FP8_CHANNEL,
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """SparseGPT 2:4 + fp8 per-channel weights of one Linear (W [out, in], H [in, in] fp32).

    scale_from (joint mode): "original" takes the fp8 scale from the unpruned rows; "sparse"
    runs a float sweep first and takes it from the 2:4 weights it gives (twice the work)."""
    _check(W, H, args, blocksize)
    if mode not in MODES:
        raise ValueError(f"unknown SparseGPT mode {mode!r}: choose one of {', '.join(MODES)}")
    if scale_from not in SCALE_FROM:
        raise ValueError(f"scale_from={scale_from!r}: choose one of {', '.join(SCALE_FROM)}")
    scale_dtype = scale_dtype or W.dtype
    Hinv, W = inverse_hessian_cholesky(H, W, percdamp)
    if mode == "prune_then_quantize":
        Wq = sparsegpt_sweep(W, Hinv, blocksize)
        scale = weight_qparams_ref(Wq, args, scale_dtype)[0]
    else:
        source = W if scale_from == "original" else sparsegpt_sweep(W, Hinv, blocksize)
        scale = weight_qparams_ref(source, args, scale_dtype)[0]
        Wq = sparsegpt_sweep(W, Hinv, blocksize, scale)
    return _to_quantized(Wq, scale, args, scale_dtype)


def magnitude_24(W: torch.Tensor, *, args: QuantArgs = FP8_CHANNEL,
                 scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Baseline: keep the 2 largest |w| of every 4 inputs, then fp8 round-to-nearest."""
    _check(W, None, args, 4)
    scale_dtype = scale_dtype or W.dtype
    W = W.float()
    Wq = torch.where(keep_2_of_4(W.abs()), W, torch.zeros_like(W))
    scale = weight_qparams_ref(Wq, args, scale_dtype)[0]
    return _to_quantized(Wq, scale, args, scale_dtype)


def hessian_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the layer's output error summed over the calibration set
    (up to H's normalisation)."""
    D = (W.float() - Wq.float())
    return float(((D @ H.float()) * D).sum())


# ----------------------------------------------------------------------------- plumbing


def _check(W, H, args, blocksize):
    out, cols = W.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs in-features divisible by 4, this layer has {cols}: "
                         "leave it dense (add it to the scheme's ignore list)")
    if H is not None and H.shape != (cols, cols):
        raise ValueError(f"Hessian must be [{cols}, {cols}] for a weight [{out}, {cols}], "
                         f"got {list(H.shape)}")
    if blocksize <= 0 or blocksize % 4:
        raise ValueError(f"block size must be a positive multiple of 4, got {blocksize}")
    if not (args.type == "float" and args.num_bits == 8 and args.strategy == "channel"):
        raise ValueError("SparseGPT 2:4 here stores fp8 e4m3 per-channel weights "
                         f"(scheme W8A8_FP8_24), got {args}")
    if not torch.isfinite(W).all():
        raise ValueError("NaN or Inf in the weight: the model is broken before compression")


def _to_quantized(Wq, scale, args, scale_dtype) -> QuantizedWeight:
    # Wq is already on the fp8 grid in joint mode, so this only re-expresses it as codes
    q = quantize_ref(Wq, scale, None, args)
    qw = QuantizedWeight(q, scale.to(scale_dtype), None, args)
    if not qw.is_24_sparse():
        raise RuntimeError("internal error: SparseGPT produced weights that are not 2:4 sparse")
    return qw
