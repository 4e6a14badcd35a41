"""AWQ grid search: output error of every scale candidate, without quantized weight copies.

For a Linear W [N, K], activations X [T, K] and candidate scales s_c [K], AWQ compares the float
output Y = X W^T with the output of the scaled, quantized layer (X diag(1/s)) Q(W diag(s))^T:

    err(c) = sum || X diag(1/s_c) Q(W diag(s_c))^T - X W^T ||^2
           = sum || X D_c^T ||^2,     D_c = Q(W diag(s_c)) diag(1/s_c) - W

The second form is what the kernel computes: each program takes a weight tile, scales it,
fake-quantizes it group-wise in registers (qparams from the tile's own group min/max, the scale
rounded to its storage dtype first, as `kernels.quant` does), forms D_c and multiplies it
against an activation tile on tensor cores. Nothing the size of W is written per candidate,
Y is never stored, and the difference is taken in fp32 weight space instead of as a
cancellation of two large outputs. One K step is one quantization group.

Grid: (candidate, n tile, m tile) with the candidate fastest, so the programs that read the same
X and W tiles run together and share them through L2. Each program writes its partial sum;
torch adds them (deterministic, unlike float atomics).

`awq_grid_errors_ref` computes the first form literally (Y once, candidates' quantized weights
with `kernels.quant`'s qparams), in token chunks to bound memory, or through X^T X when tokens
outnumber in-features (cheaper on the CPU; same sum). `awq_grid_errors` dispatches:
Triton on CUDA tensors, the reference on CPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..schemes import QuantArgs
from . import fp4
from .dispatch import use_triton, interpreting
from .hessian import output_error
from .primitives import qparams, rne
from .quant import dequantize_ref, quantize_ref, weight_qparams_ref


def _check(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, args: QuantArgs):
    if x.dim() != 2 or w.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"expected x [T, K], w [N, K], scales [C, K]; got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}, {tuple(scales.shape)}")
    if not (x.shape[1] == w.shape[1] == scales.shape[1]):
        raise ValueError(f"in-features disagree: x {x.shape[1]}, w {w.shape[1]}, "
                         f"scales {scales.shape[1]}")
    if not args.is_fp4 and (args.type != "int" or args.strategy != "group"
                            or not args.group_size):
        raise ValueError(f"AWQ search needs group-wise int or fp4 weights, got {args}")
    if w.shape[1] % args.group_size:
        raise ValueError(f"in-features {w.shape[1]} not a multiple of group size "
                         f"{args.group_size}: pick a group size dividing it")


# ----------------------------------------------------------------------------- reference

def fake_quant_ref(w: torch.Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of w [N, K] (fp32 out), by `kernels.quant` (fp4:
    `kernels.fp4`, NVFP4's global scale from w itself, as the scaled weights would get it)."""
    if args.is_fp4:
        return fp4.dequantize_fp4_ref(*fp4.quantize_fp4_ref(w, args), args)
    scale, zp = weight_qparams_ref(w, args, scale_dtype)
    return dequantize_ref(quantize_ref(w, scale, zp, args), scale, zp)


def awq_grid_errors_ref(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, args: QuantArgs,
                        scale_dtype: torch.dtype = torch.bfloat16, chunk_tokens: int = 4096,
                        form: str = "auto") -> torch.Tensor:
    """err [C] fp32: sum of squared output errors per candidate (definition in module doc).

    form "direct": the definition, token chunk by chunk, Y = X W^T computed once;
    "gram": sum_n D_n (X^T X) D_n^T with D = Q(W diag(s)) diag(1/s) - W, the same sum in
    N K^2 instead of T N K per candidate; "auto" takes gram when tokens outnumber in-features
    (the CPU path)."""
    _check(x, w, scales, args)
    if form == "auto":
        form = "gram" if x.shape[0] > x.shape[1] else "direct"
    if form not in ("direct", "gram"):
        raise ValueError(f"form={form!r}: use 'auto', 'direct' or 'gram'")
    wf = w.float()
    errs = torch.zeros(scales.shape[0], dtype=torch.float64, device=x.device)
    if form == "gram":
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        for t0 in range(0, x.shape[0], chunk_tokens):
            xc = x[t0:t0 + chunk_tokens].float()
            H.addmm_(xc.T, xc)
        for c, s in enumerate(scales.float()):
            D = fake_quant_ref(wf * s, args, scale_dtype) / s - wf
            errs[c] = float(output_error(D, H, dim=None))
        return errs.float()
    y = x.float() @ wf.T                           # float output, computed once
    for c, s in enumerate(scales.float()):
        wq = fake_quant_ref(wf * s, args, scale_dtype)
        for t0 in range(0, x.shape[0], chunk_tokens):
            xs = x[t0:t0 + chunk_tokens].float() / s
            errs[c] += float((xs @ wq.T - y[t0:t0 + chunk_tokens]).pow(2).sum())
    return errs.float()


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _awq_err_kernel(x_ptr, w_ptr, s_ptr, part_ptr, T, N, K,
                    stride_xt, stride_wn, stride_sc,
                    qmin, qmax, eps,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SYMMETRIC: tl.constexpr, SCALE_DTYPE: tl.constexpr,
                    DOT_DTYPE: tl.constexpr):
    c = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    m_ok = rm < T
    n_ok = rn < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xt + rk[None, :]
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    s_ptrs = s_ptr + c * stride_sc + rk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, GROUP):
        w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0).to(tl.float32)
        s = tl.load(s_ptrs + k0)
        ws = w * s[None, :]
        # qparams of each row's group, exactly as kernels.quant.qparams_from_minmax
        div = (qmax - qmin) / 2 if SYMMETRIC else qmax - qmin
        scale, zp = qparams(tl.min(ws, axis=1), tl.max(ws, axis=1), div, qmin, qmax, eps,
                            SYMMETRIC, SCALE_DTYPE)
        q = rne(tl.div_rn(ws, scale[:, None]))
        if SYMMETRIC:
            q = tl.minimum(tl.maximum(q, qmin), qmax)
            dq = q * scale[:, None]
        else:
            q = tl.minimum(tl.maximum(q + zp[:, None], qmin), qmax)
            dq = (q - zp[:, None]) * scale[:, None]
        d = dq / s[None, :] - w                      # [BLOCK_N, GROUP] weight-space error
        x = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0).to(DOT_DTYPE)
        acc += tl.dot(x, tl.trans(d.to(DOT_DTYPE)))
    # masked rows/cols hold zeros: x rows are 0, and a zero weight row quantizes exactly
    part = tl.sum(tl.sum(acc * acc, axis=1), axis=0)
    pid = (c * tl.num_programs(1) + pid_n) * tl.num_programs(2) + pid_m
    tl.store(part_ptr + pid, part)


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _gpu_config(group: int, x_bytes: int, w_bytes: int, smem: int = 140 * 1024):
    """(BLOCK_M, BLOCK_N, warps, stages). The weight tile is re-quantized for every m tile, so
    a tall BLOCK_M amortizes that ALU work over more tensor-core work; the pipelined x and w
    tiles must fit in shared memory on an A100 (164 KB) as well as an H100 (228 KB)."""
    bm, bn, stages = 128, (128 if group <= 64 else 64), 3
    per_stage = lambda: (bm * x_bytes + bn * w_bytes) * group
    while per_stage() * stages > smem and stages > 2:
        stages -= 1
    while per_stage() * stages > smem and bm > 32:
        bm //= 2
    return bm, bn, 8 if bm * bn >= 128 * 64 or x_bytes == 4 else 4, stages


def awq_grid_errors_triton(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor,
                           args: QuantArgs, scale_dtype: torch.dtype = torch.bfloat16,
                           block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    _check(x, w, scales, args)
    g = args.group_size
    if g < 16 or g & (g - 1):
        raise ValueError(f"the Triton AWQ search needs a power-of-two group size >= 16, got {g}; "
                         "use TRITONPRESS_BACKEND=torch for other group sizes")
    if scale_dtype not in _TL_DTYPES:
        raise ValueError(f"scale dtype {scale_dtype} not supported (bf16, fp16, fp32)")
    x = x.contiguous()
    w = w.contiguous()
    scales = scales.float().contiguous()
    T, K = x.shape
    N = w.shape[0]
    C = scales.shape[0]
    interp = interpreting() and not x.is_cuda
    # The interpreter multiplies bf16 wrongly: run the dot in fp32 there. On a GPU the dot takes
    # the activations' dtype (bf16/fp16 tensor cores); fp32 inputs get tf32.
    dot_dtype = tl.float32 if interp or x.dtype == torch.float32 else _TL_DTYPES[x.dtype]
    bm, bn, warps, stages = (128, 64, 4, 1) if interp else _gpu_config(g, x.element_size(),
                                                                        w.element_size())
    block_m, block_n = block_m or bm, block_n or bn
    grid = (C, triton.cdiv(N, block_n), triton.cdiv(T, block_m))
    part = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=x.device)
    _awq_err_kernel[grid](
        x, w, scales, part, T, N, K,
        x.stride(0), w.stride(0), scales.stride(0),
        float(args.qmin), float(args.qmax), float(torch.finfo(scale_dtype).eps),
        GROUP=g, BLOCK_M=block_m, BLOCK_N=block_n, SYMMETRIC=args.symmetric,
        SCALE_DTYPE=_TL_DTYPES[scale_dtype], DOT_DTYPE=dot_dtype,
        num_warps=warps, num_stages=stages)
    return part.view(C, -1).double().sum(1).float()


def awq_grid_errors(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, args: QuantArgs,
                    scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """err [C] fp32 per candidate scale row of `scales` [C, K]; Triton on CUDA, torch on CPU
    (and for the fp4 grids, which the kernel does not quantize to)."""
    g = args.group_size or 0
    if use_triton(x, w, scales) and g >= 16 and not g & (g - 1) and not args.is_fp4:
        return awq_grid_errors_triton(x, w, scales, args, scale_dtype)
    return awq_grid_errors_ref(x, w, scales, args, scale_dtype)
