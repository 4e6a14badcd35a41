"""GPTQ Hessian accumulation: H <- beta * H + alpha * X^T X over the unmasked tokens of X.

X is [tokens, in] (or [batch, seq, in]) bf16/fp16/fp32 activations; H is an fp32 [in, in]
buffer, symmetric on entry and on exit. The Triton kernel multiplies on tensor cores (bf16 or
fp16 products are exact in fp32, accumulation is fp32), computes only the tiles i <= j of the
upper triangle and writes each tile twice, as itself and transposed (a diagonal tile keeps its
upper triangle and mirrors it). So H is complete and exactly symmetric after every call, with
half the multiply work of a full X^T X.

Masked tokens are skipped without copying X: the kernel reads token rows through an index
list (unmasked tokens first, made by a stable argsort on the GPU) and stops at the unmasked
count, which it loads from device memory -- no host synchronisation per batch.

Scaling. GPTQ normalises H by the sample count as it goes (H *= n_old/n_new; H += 2/n_new
X^T X). Each rescale rounds the whole buffer once more, and GPTQ is invariant to a constant
factor on H (dampening is relative to mean(diag H)), so the numerically better choice is the
raw sum (alpha = beta = 1) and one scale at the end; the raw sum cannot overflow fp32 for
bf16 activations in practice (|x| <= 1e4 and 1e9 tokens give 1e17, far below 3e38). Both are
supported through alpha/beta, with the rescale fused into the tile write (no extra pass).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from .dispatch import fits_gpu, interpreting, use_triton


# ----------------------------------------------------------------------------- reference

def xtx_accumulate_ref(H: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                       alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """H <- beta * H + alpha * X_m^T X_m in fp32, X_m the rows of x whose mask is nonzero; also
    the CPU path. Like the kernel it multiplies only the upper triangle, in row panels of H (a
    quarter of the rows each: 62% of the multiply work of a full X^T X; on 2 Zen 4 cores
    4096 x 1536 tokens take 69 ms instead of 108), and mirrors it, so H is exactly symmetric.

    bf16 activations multiply as bf16 with fp32 sums and fp32 output (oneDNN's bf16 "fpmath"
    for fp32 matmuls, on CPUs with bf16 units): their fp32 copies are exact in bf16, so this
    loses nothing (error 1.1e-6 of sum |x_i||x_j|, fp32's own 5e-7) and is 2x faster again
    (33 ms). Not a plain bf16 matmul: that rounds its output to bf16, and on SmolLM2's layer-0
    o_proj, whose Hessian is nearly singular, turned the smallest eigenvalue from +0.02 to -10
    times GPTQ's dampening and tripled the layer's output error. fp16/fp32 activations, not
    exact in bf16, multiply in fp32."""
    x2 = _rows(x, H)
    if mask is not None:
        x2 = x2[_mask(mask, x2).bool()]
    exact_in_bf16 = x2.dtype == torch.bfloat16
    x2 = x2.float()
    n = H.shape[0]
    step = max(64, -(-n // 4))
    with bf16_products(exact_in_bf16 and x2.device.type == "cpu"):
        for i in range(0, n, step):
            H[i:i + step, i:].addmm_(x2[:, i:i + step].t(), x2[:, i:], beta=beta, alpha=alpha)
    return _mirror_upper(H, step)


@contextlib.contextmanager
def bf16_products(on: bool):
    """fp32 CPU matmuls inside take their inputs as bf16 (exact when they came from bf16),
    summing and writing fp32; where oneDNN cannot (no bf16 units, older torch) they stay fp32."""
    flag = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not on or flag is None or not hasattr(flag, "fp32_precision"):
        yield
        return
    before = flag.fp32_precision
    flag.fp32_precision = "bf16"
    try:
        yield
    finally:
        flag.fp32_precision = before


def _mirror_upper(H: torch.Tensor, step: int) -> torch.Tensor:
    """Copy the upper triangle of H onto the lower one, panel by panel (no n x n temporaries)."""
    n = H.shape[0]
    for i in range(0, n, step):
        j = min(i + step, n)
        d = H[i:j, i:j]
        d.copy_(d.triu() + d.triu(1).t())
        H[j:, i:j] = H[i:j, j:].t()
    return H


def output_error(E: torch.Tensor, H: torch.Tensor, dim: int | None = -1,
                 bf16: bool = False) -> torch.Tensor:
    """e H e^T for each row e of a weight error E [..., rows, in] (batched over leading dims;
    dim=None: summed over all, tr(E H E^T)). With H = X^T X (up to a factor) it is the squared
    output error ||X e^T||^2 on the inputs H was accumulated from, without X. bf16: the
    product's multiplies in bf16 (a few digits, for what is only reported): tensor cores on a
    GPU, oneDNN's bf16 fpmath with fp32 sums on a CPU (256 x 1536 by 1536: 7.3 -> 3.4 ms)."""
    if bf16 and E.device.type == "cpu":
        with bf16_products(True):
            return ((E.float() @ H.float()) * E.float()).sum(dim)
    if bf16:
        return ((E.bfloat16() @ H.bfloat16()).float() * E.float()).sum(dim)
    return ((E @ H) * E).sum(dim)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _xtx_kernel(x_ptr, rows_ptr, count_ptr, h_ptr, pairs_ptr, n_feat, stride_x, stride_h,
                alpha, beta,
                BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ROWS: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # One program per upper-triangle tile (ti <= tj) of H, listed in pairs_ptr.
    pid = tl.program_id(0)
    ti = tl.load(pairs_ptr + 2 * pid)
    tj = tl.load(pairs_ptr + 2 * pid + 1)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    mi = offs_i < n_feat
    mj = offs_j < n_feat
    n_tok = tl.load(count_ptr)

    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, n_tok, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < n_tok
        if HAS_ROWS:
            r = tl.load(rows_ptr + ks, mask=km, other=0).to(tl.int64)
        else:
            r = ks.to(tl.int64)
        row = x_ptr + r[:, None] * stride_x
        a = tl.load(row + offs_i[None, :], mask=km[:, None] & mi[None, :], other=0.0)
        b = tl.load(row + offs_j[None, :], mask=km[:, None] & mj[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 wrongly; fp32 products are exact anyway
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)

    # The tile and its transpose; on a diagonal tile (ti == tj) the two stores overlap, and the
    # triangle masks keep its upper half and mirror it, so H is symmetric bit for bit whatever
    # the MMA order (off the diagonal every offs_i < offs_j and the masks are all true).
    m2 = mi[:, None] & mj[None, :]
    p = h_ptr + offs_i[:, None].to(tl.int64) * stride_h + offs_j[None, :]
    new = beta * tl.load(p, mask=m2, other=0.0) + alpha * acc
    tl.store(p, new, mask=m2 & (offs_i[:, None] <= offs_j[None, :]))
    pt = h_ptr + offs_j[:, None].to(tl.int64) * stride_h + offs_i[None, :]
    tl.store(pt, tl.trans(new), mask=mj[:, None] & mi[None, :] & (offs_j[:, None] > offs_i[None, :]))


def _configs():
    # BLOCK is fixed per input dtype (the tile-pair list depends on it); the rest is tuned.
    # K tiles of 128 spill on sm_80 under triton 3.6, 4 warps under 3.9 (tests/compile_kernels.py)
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk, w, s in [(64, 8, 3), (64, 8, 4), (32, 8, 4)]]


def _prune(configs, named_args, **kwargs):
    x, block = named_args["x_ptr"].element_size(), kwargs["BLOCK"]
    if x == 4:  # tf32x3 splits both operands in three: K tiles over 32 spill below sm_90
        configs = [c for c in configs if c.kwargs["BLOCK_K"] <= 32]
    # two pipelined [BLOCK_K, BLOCK] tiles of X per stage
    need = lambda c: c.num_stages * 2 * c.kwargs["BLOCK_K"] * block * x  # noqa: E731
    return fits_gpu(configs, need)


# Autotuning launches the kernel several times: restore H between trials (read-modify-write).
_xtx_tuned = triton.autotune(_configs(), key=["n_feat", "HAS_ROWS", "UPCAST"],
                             prune_configs_by={"early_config_prune": _prune},
                             restore_value=["h_ptr"], cache_results=True)(_xtx_kernel)
# 128 x 128 fp32 accumulator tiles for 16-bit X; fp32 X (tf32x3: each operand split in three)
# spills registers at 128 on every arch, so it gets 64 x 64 tiles (measured).
_TUNED_BLOCK = {2: 128, 4: 64}


@functools.lru_cache(maxsize=64)
def _tile_pairs(n_tiles: int, group: int, device: str) -> torch.Tensor:
    """Upper-triangle tile pairs (ti <= tj), grouped in group x group super-tiles so the
    programs running together read few distinct column strips of X (L2 reuse)."""
    pairs = []
    for gj in range(0, n_tiles, group):
        for gi in range(0, gj + 1, group):
            for tj in range(gj, min(gj + group, n_tiles)):
                for ti in range(gi, min(gi + group, n_tiles)):
                    if ti <= tj:
                        pairs.append((ti, tj))
    return torch.tensor(pairs, dtype=torch.int32, device=device).reshape(-1)


def xtx_accumulate_triton(H: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                          alpha: float = 1.0, beta: float = 1.0, block: int | None = None,
                          block_k: int | None = None) -> torch.Tensor:
    """Triton version of xtx_accumulate_ref (same contract). block/block_k fix the tiling
    (default: autotuned on GPU, 64 x 64 in the interpreter)."""
    x2 = _rows(x, H)
    n_tok, n_feat = x2.shape
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    if mask is None:
        rows = x2  # unused pointer
        count = torch.full((1,), n_tok, dtype=torch.int32, device=x2.device)
    else:
        m = _mask(mask, x2).bool()
        # unmasked tokens first, in order; no host sync (the kernel reads the count)
        rows = torch.argsort((~m).to(torch.int8), stable=True).to(torch.int32)
        count = m.sum(dtype=torch.int32).reshape(1)
    upcast = interpreting() or x2.dtype == torch.float32
    # fp32 X: tf32x3 keeps fp32 accuracy on tensor cores; bf16/fp16 X ignore the setting
    precision = "ieee" if interpreting() else ("tf32x3" if x2.dtype == torch.float32 else "tf32")
    kw = dict(HAS_ROWS=mask is not None, UPCAST=upcast, PRECISION=precision)
    tuned = block is None and not interpreting()
    block = _TUNED_BLOCK[x2.element_size()] if tuned else (block or 64)
    pairs = _tile_pairs(triton.cdiv(n_feat, block), 8, str(x2.device))
    args = (x2, rows, count, H, pairs, n_feat, x2.stride(0), H.stride(0), float(alpha), float(beta))
    grid = (pairs.numel() // 2,)
    if tuned:
        _xtx_tuned[grid](*args, BLOCK=block, **kw)
    else:
        _xtx_kernel[grid](*args, BLOCK=block, BLOCK_K=block_k or 64, **kw)
    return H


# ----------------------------------------------------------------------------- dispatch

def xtx_accumulate(H: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
                   alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """H <- beta * H + alpha * X^T X over unmasked tokens, in place; Triton on CUDA."""
    if use_triton(H, x):
        return xtx_accumulate_triton(H, x, mask, alpha, beta)
    return xtx_accumulate_ref(H, x, mask, alpha, beta)


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n_seen: int,
                       mask: torch.Tensor | None = None) -> int:
    """The layer loop's contract (loop/hooks.py accumulate_hessian): H holds
    2/n_seen * sum x x^T; fold in the tokens of x ([tokens, in] or [b, s, in]; with `mask`,
    only those whose mask is nonzero, without copying x) and return the new count. The
    running rescale is fused into the kernel's tile write."""
    t = x.reshape(-1, x.shape[-1]).shape[0] if mask is None else int(mask.reshape(-1).bool().sum())
    if t == 0:
        return n_seen
    n = n_seen + t
    xtx_accumulate(H, x, mask, alpha=2.0 / n, beta=n_seen / n)
    return n


def _rows(x: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    if H.dtype != torch.float32 or H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square fp32 matrix, got {tuple(H.shape)} {H.dtype}")
    if H.stride(1) != 1:
        raise ValueError("H must be row-contiguous (H.stride(1) == 1); pass H.contiguous()")
    if x.shape[-1] != H.shape[0]:
        raise ValueError(f"activations have {x.shape[-1]} features but H is "
                         f"{H.shape[0]} x {H.shape[0]}")
    if x.device != H.device:
        raise ValueError(f"activations on {x.device} but H on {H.device}: move one of them")
    return x.reshape(-1, x.shape[-1])


def _mask(mask: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(-1)
    if m.numel() != x2.shape[0]:
        raise ValueError(f"mask has {m.numel()} entries for {x2.shape[0]} tokens: pass the "
                         "attention_mask of the batch these activations came from")
    return m.to(x2.device)
