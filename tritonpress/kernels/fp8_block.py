"""FP8 block quantization (compressed-tensors' BLOCK strategy, DeepSeek-V3 style): fp8 e4m3
weights with one scale per block of 128 x 128 (rows x columns), and the per token-group fp8
quantization of activations that goes with it.

compressed-tensors 0.19, exactly:
  the weight is zero-padded to whole blocks (calculate_block_padding), so a partial block at
  the bottom or right edge is quantized from its own values (padding never raises an amax);
  scale[i, j] = amax(block i, j) / 448, rounded to the scale dtype; a zero block gets the
  scale dtype's eps (as every symmetric scale in quant.qparams_from_minmax);
  q = e4m3(clamp(w / scale, -448, 448)), round to nearest even; the padding is cut off again:
  q [O, I], scale [ceil(O / 128), ceil(I / 128)].
As everywhere in tritonpress the division is done in fp32 with the scale already rounded to
its storage dtype (compressed-tensors divides in the weight's dtype: a bf16 quotient can be
one e4m3 step apart from ours where bf16 rounding lands on an e4m3 tie).

This file: the torch references (also the CPU path), the fused Triton kernel (one program per
block: amax, scale, e4m3 rounding, store), and the dispatching `quantize_fp8_block`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from .dispatch import use_triton
from .primitives import e4m3_byte, e4m3_round, qparams
from .quant import FP8_DTYPE, FP8_MAX, qparams_from_minmax, quantize_weight

BLOCK = (128, 128)
_FP8 = QuantArgs(8, "float", True, "tensor")
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- references

def _padded_blocks(x: torch.Tensor, block) -> torch.Tensor:
    """[O, I] -> zero-padded [O / bh, bh, I / bw, bw] fp32 (a copy)."""
    bh, bw = block
    rows, cols = x.shape
    x = torch.nn.functional.pad(x.float(), (0, (-cols) % bw, 0, (-rows) % bh))
    return x.reshape(x.shape[0] // bh, bh, x.shape[1] // bw, bw)


def quantize_fp8_block_ref(w: torch.Tensor, block=BLOCK, scale_dtype: torch.dtype = torch.float32):
    """w [O, I] -> (q float8_e4m3fn [O, I], scale [ceil(O / bh), ceil(I / bw)] scale_dtype)."""
    rows, cols = w.shape
    xb = _padded_blocks(w, block)
    amax = xb.abs().amax(dim=(1, 3))
    scale, _ = qparams_from_minmax(-amax, amax, _FP8, scale_dtype)       # amax / 448, eps
    y = xb.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = y.to(FP8_DTYPE).reshape(xb.shape[0] * xb.shape[1], -1)[:rows, :cols]
    return q.contiguous(), scale.to(scale_dtype)


def dequantize_fp8_block_ref(q: torch.Tensor, scale: torch.Tensor, block=BLOCK,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_fp8_block_ref: q [O, I] * its block's scale, in dtype."""
    rows, cols = q.shape
    bh, bw = block
    s = scale.float().repeat_interleave(bh, 0)[:rows].repeat_interleave(bw, 1)[:, :cols]
    return (q.float() * s).to(dtype)


def quantize_fp8_groups_ref(x: torch.Tensor, group_size: int = 128, act_sim: str = "compressed-tensors"):
    """Dynamic fp8 activation quantization per token and group of group_size features
    (FP8_BLOCK's input_activations): x [..., K] -> (q fp8 [..., K], scale fp32 [..., K / g]).
      compressed-tensors: scale = amax / 448, fp32 eps for a zero group (quant.py's rule);
      vllm (per_token_group_quant_fp8): scale = max(amax, 1e-10) / 448."""
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"{k} input features are not a multiple of the activation group "
                         f"size {group_size} (compressed-tensors and vLLM both need it)")
    g = x.reshape(-1, k // group_size, group_size).float()
    amax = g.abs().amax(-1)
    if act_sim == "vllm":
        scale = amax.clamp(min=1e-10) / FP8_MAX
    else:
        scale, _ = qparams_from_minmax(-amax, amax, _FP8, torch.float32)
    q = (g / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], k // group_size)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _fp8_block_kernel(w_ptr, q_ptr, s_ptr, rows, cols, stride_w, stride_q, n_col_blocks, eps,
                      BH: tl.constexpr, BW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """One program per block: its amax, the scale (rounded to s_ptr's dtype), the e4m3 bytes.
    PH x PW is the block padded to powers of two; outside the matrix reads 0 (no effect on
    the amax, as compressed-tensors' zero padding)."""
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    r = bi * BH + tl.arange(0, PH)
    c = bj * BW + tl.arange(0, PW)
    ok = ((r < rows) & (tl.arange(0, PH) < BH))[:, None] & \
        ((c < cols) & (tl.arange(0, PW) < BW))[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(w_ptr + r64[:, None] * stride_w + c[None, :], mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    SCALE_DTYPE: tl.constexpr = s_ptr.dtype.element_ty
    s, _ = qparams(-amax, amax, 448.0, -448.0, 448.0, eps, True, SCALE_DTYPE)
    q = e4m3_byte(e4m3_round(tl.div_rn(x, s)))
    tl.store(q_ptr + r64[:, None] * stride_q + c[None, :], q.to(tl.uint8), mask=ok)
    tl.store(s_ptr + bi * n_col_blocks + bj, s.to(SCALE_DTYPE))


def quantize_fp8_block_triton(w: torch.Tensor, block=BLOCK, scale_dtype: torch.dtype = torch.float32):
    rows, cols = w.shape
    bh, bw = block
    if w.stride(1) != 1:
        w = w.contiguous()
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=w.device)
    nb = (triton.cdiv(rows, bh), triton.cdiv(cols, bw))
    scale = torch.empty(nb, dtype=scale_dtype, device=w.device)
    if rows and cols:
        ph, pw = triton.next_power_of_2(bh), triton.next_power_of_2(bw)
        # 128 x 128 fp32 values over 8 warps: 64 per thread, no spills (compile test)
        _fp8_block_kernel[nb](w, q.view(torch.uint8), scale, rows, cols, w.stride(0),
                              q.stride(0), nb[1], torch.finfo(scale_dtype).eps,
                              BH=bh, BW=bw, PH=ph, PW=pw,
                              num_warps=max(4, min(16, ph * pw // 2048)))
    return q, scale


# ----------------------------------------------------------------------------- dispatch

def _check(w: torch.Tensor, block, scale_dtype) -> tuple[int, int]:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in], got {tuple(w.shape)} "
                         f"{w.dtype}")
    block = tuple(int(b) for b in block)
    if len(block) != 2 or min(block) <= 0:
        raise ValueError(f"block must be (rows, cols), both positive, got {block}")
    if block[0] * block[1] > 256 * 256:
        raise ValueError(f"block {block} is larger than one program can hold: use at most "
                         "256 x 256 (FP8_BLOCK is 128 x 128)")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale dtype {scale_dtype}: use float32, bfloat16 or float16")
    return block


def quantize_fp8_block(w: torch.Tensor, block=BLOCK, scale_dtype: torch.dtype = torch.float32):
    """Round-to-nearest FP8_BLOCK weight quantization: w [O, I] ->
    (q float8_e4m3fn [O, I], scale [ceil(O / bh), ceil(I / bw)] in scale_dtype).
    Triton on CUDA tensors, quantize_fp8_block_ref elsewhere."""
    block = _check(w, block, scale_dtype)
    if use_triton(w):
        return quantize_fp8_block_triton(w, block, scale_dtype)
    return quantize_fp8_block_ref(w, block, scale_dtype)


def quantize_fp8_groups(x: torch.Tensor, group_size: int = 128,
                        act_sim: str = "compressed-tensors"):
    """quantize_fp8_groups_ref; the compressed-tensors rounding runs quant_triton's group
    kernel on CUDA tensors (the same rule as the reference, bit for bit)."""
    if act_sim != "vllm" and use_triton(x):
        k = x.shape[-1]
        if k % group_size:
            return quantize_fp8_groups_ref(x, group_size, act_sim)    # raises the error
        q, s, _ = quantize_weight(x.reshape(-1, k),
                                  QuantArgs(8, "float", True, "group", group_size), torch.float32)
        return q.reshape(x.shape), s.reshape(*x.shape[:-1], k // group_size)
    return quantize_fp8_groups_ref(x, group_size, act_sim)
