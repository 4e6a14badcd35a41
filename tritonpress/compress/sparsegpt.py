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

import time

import torch

from ..kernels.quant import quantize_ref, weight_qparams_ref
from ..kernels.sparse24 import keep_2_of_4, prune24_block
from ..schemes import QuantArgs
from .gptq import inverse_cholesky
from .qweight import QuantizedWeight

FP8_CHANNEL = QuantArgs(8, "float", True, "channel")
MODES = ("joint", "prune_then_quantize")
SCALE_FROM = ("original", "sparse")
DEFAULT_MODE = "joint"


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float = 0.01):
    """H [in, in] -> (upper Cholesky factor U of the dampened H^-1 (U^T U = H^-1), mask of dead
    inputs, dampening used). The dampening grows x10 while the factorization fails (as GPTQ).
    Linears sharing an input (q/k/v, gate/up) share this too."""
    H = H.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    Hinv, frac, failed = inverse_cholesky(H, percdamp)
    if Hinv is None:
        raise ValueError(f"the Hessian is not positive definite even with dampening up to "
                         f"{failed[-1] if failed else percdamp}: it holds NaN/Inf or too few "
                         "tokens; use more calibration samples")
    return Hinv, dead, frac


def sparsegpt_sweep(W: torch.Tensor, Hinv: torch.Tensor, blocksize: int = 128,
                    scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocked OBS sweep: W [out, in] fp32 -> (2:4 weights, on the fp8 grid times `scale`
    when a per-channel scale [out, 1] is given; loss).

    W - Wq = Err @ U with U = Hinv (upper, U^T U = H^-1), so the layer loss
    tr((W - Wq) H (W - Wq)^T) under the dampened H is exactly sum(Err^2)."""
    W = W.clone()
    cols = W.shape[1]
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        Q1, Err1 = prune24_block(W[:, i1:i2], Hinv[i1:i2, i1:i2], scale)
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        loss += Err1.square().sum()
    return W, loss


def sparsegpt_24(W: torch.Tensor, H: torch.Tensor | None, *, mode: str = DEFAULT_MODE,
                 scale_from: str = "original", blocksize: int = 128, percdamp: float = 0.01,
                 args: QuantArgs = FP8_CHANNEL, scale_dtype: torch.dtype | None = None,
                 hinv: tuple | None = None
                 ) -> tuple[QuantizedWeight, float]:
    """SparseGPT 2:4 + fp8 per-channel weights of one Linear (W [out, in], H [in, in] fp32)
    and the sweep's loss tr((W - Wq) H (W - Wq)^T) under the dampened H.

    scale_from (joint mode): "original" takes the fp8 scale from the unpruned rows; "sparse"
    runs a float sweep first and takes it from the 2:4 weights it gives (twice the work)."""
    _check(W, H, args, blocksize)
    if mode not in MODES:
        raise ValueError(f"unknown SparseGPT mode {mode!r}: choose one of {', '.join(MODES)}")
    if scale_from not in SCALE_FROM:
        raise ValueError(f"scale_from={scale_from!r}: choose one of {', '.join(SCALE_FROM)}")
    scale_dtype = scale_dtype or W.dtype
    Hinv, dead, _ = hinv if hinv is not None else inverse_hessian_cholesky(H, percdamp)
    W = W.float().masked_fill(dead, 0.0)     # inputs never seen: nothing to preserve
    if mode == "prune_then_quantize":
        Wq, _ = sparsegpt_sweep(W, Hinv, blocksize)
        scale = weight_qparams_ref(Wq, args, scale_dtype)[0]
        qw = _to_quantized(Wq, scale, args, scale_dtype)
        # the fp8 rounding came after the sweep: the loss of the final weights, same dampened
        # H, is ||(W - Wq) U^-1||^2
        E = torch.linalg.solve_triangular(Hinv, W - qw.dequantize(), upper=True, left=False)
        return qw, float(E.square().sum())
    source = W if scale_from == "original" else sparsegpt_sweep(W, Hinv, blocksize)[0]
    scale = weight_qparams_ref(source, args, scale_dtype)[0]
    Wq, loss = sparsegpt_sweep(W, Hinv, blocksize, scale)
    return _to_quantized(Wq, scale, args, scale_dtype), float(loss)


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


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> dict:
    """The layer's output error on the calibration data, absolute and relative to the output."""
    err = hessian_loss(W, Wq, H)
    ref = float(((W.float() @ H.float()) * W.float()).sum())
    return {"output_err": err, "output_rel_err": err / ref if ref > 0 else float("nan")}


# ----------------------------------------------------------------------------- in the pipeline


@torch.no_grad()
def sparsegpt_method(layer_idx, layer, prefix, inputs, ctx, *, mode: str = DEFAULT_MODE,
                     scale_from: str = "original", blocksize: int | None = None,
                     percdamp: float | None = None):
    """Per-layer method for pipeline.compress_sequential (bind options with functools.partial;
    block_size and damp default to ctx.options, then 128 and 0.01).

    One Hessian per distinct input, from the layer as it was (q/k/v and gate/up share one, and
    its inverse), then SparseGPT on every Linear; dequantized weights go back into the layer."""
    from .pipeline import collect_hessians

    blocksize = blocksize or ctx.options.get("block_size", 128)
    percdamp = ctx.options.get("damp", 0.01) if percdamp is None else percdamp
    hessians = collect_hessians(layer, ctx.linears, inputs)
    hinvs: dict[int, tuple | None] = {}
    qweights, infos = {}, {}
    for name, lin in ctx.linears.items():
        if name not in hessians:
            raise RuntimeError(f"{name} was not called during the calibration forward: "
                               "no Hessian to prune it with (add it to ignore)")
        st = hessians[name]
        t0 = time.perf_counter()
        info = {"method": "sparsegpt", "mode": mode, "tokens": st.n,
                "hessian_shared_with": [m for m in st.members if m != name]}
        if id(st) not in hinvs:
            try:
                hinvs[id(st)] = inverse_hessian_cholesky(st.H, percdamp)
            except ValueError:
                hinvs[id(st)] = None
        if hinvs[id(st)] is None:          # no usable Hessian: the data-free baseline
            qw, loss = magnitude_24(lin.weight.data, args=ctx.scheme.weights,
                                    scale_dtype=ctx.scale_dtype), None
            info["fallback"] = "magnitude"
        else:
            qw, loss = sparsegpt_24(lin.weight.data, None, mode=mode, scale_from=scale_from,
                                    blocksize=blocksize, args=ctx.scheme.weights,
                                    scale_dtype=ctx.scale_dtype, hinv=hinvs[id(st)])
            info.update(fallback=None, dampening=hinvs[id(st)][2])
        deq = qw.dequantize(torch.float32)
        info.update(loss=loss, seconds=round(time.perf_counter() - t0, 4),
                    **output_error(lin.weight.data, deq, st.H))
        lin.weight.data = deq.to(lin.weight.dtype)
        qweights[name] = QuantizedWeight(qw.q.cpu(), qw.scale.cpu(), None, qw.args)
        infos[name] = info
    return qweights, infos


@torch.no_grad()
def magnitude_linears(linears: dict, scheme, device=None):
    """The data-free baseline over a model's Linears: (qweights, infos), weights written back."""
    qweights, infos = {}, {}
    for name, lin in linears.items():
        w = lin.weight.data if device is None else lin.weight.data.to(device)
        qw = magnitude_24(w, args=scheme.weights, scale_dtype=lin.weight.dtype)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))
        qweights[name] = qw
        infos[name] = {"method": "magnitude"}
    return qweights, infos


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
