"""Weight-only GEMM: y = x @ W^T with int4 (or int8) weights and bf16/fp16/fp32 activations.

W = (q - z) * s, q integers in [-2^(b-1), 2^(b-1) - 1] with one scale s (and zero point z
for the asymmetric form) per group of `group_size` consecutive input features.

Layout (converted once at load time from the checkpoint's packing). compressed-tensors
pack-quantized stores int32 [out, in/8], element k at bits 4k, value + 8: rows of W. A GEMM
tile wants the input dimension K outer and the output dimension N contiguous, so we store

    words  int32 [ceil(K / P), N]    P = 32 / bits values per word; word i of column n holds
                                     k = i*P + j at bits j*bits, as the unsigned value q + 2^(b-1)
    scale  [ngroups, N]              checkpoint dtype
    zero   int32 [ngroups, N] | None the unsigned zero, z + 2^(b-1); None means 2^(b-1)

so a [BLOCK_K, BLOCK_N] tile reads BLOCK_K/P coalesced rows of words, and W = (u - zero) * s
with u the unsigned nibble.

Two launch shapes of one kernel:
  M <= 16  split-K GEMV: BLOCK_M = 16, the K loop split over SPLIT_K programs per N tile,
           partial sums added atomically into an fp32 buffer (weight bandwidth is the cost,
           so enough programs must stream it: N/BLOCK_N alone is too few at N = 4096).
  M > 16   tiled tensor-core GEMM with grouped tile order for L2 reuse.
When a K tile lies inside one group (group_size % BLOCK_K == 0) the kernel multiplies the
integers (u - zero), exact in bf16, and applies the scale to the tile's partial sum; else it
dequantizes element-wise before the dot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .dispatch import fits_gpu, interpreting
from .primitives import tune_bench
from .gemm_w8a8 import grouped_tile


@dataclass
class WNA16Weight:
    words: torch.Tensor            # int32 [ceil(K / (32 // bits)), N]
    scale: torch.Tensor            # [ngroups, N]
    zero: torch.Tensor | None      # int32 [ngroups, N]: zero point + 2^(bits-1)
    in_features: int
    out_features: int
    group_size: int                # K for per-channel scales
    bits: int

    @property
    def per_word(self) -> int:
        return 32 // self.bits


def pack_wna16(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               bits: int = 4) -> WNA16Weight:
    """Repack integer weights q [N, K] (values in the signed range) with scale/zero point
    [N, ngroups] into the kernel layout."""
    if bits not in (4, 8):
        raise ValueError(f"weight-only GEMM supports 4- or 8-bit integers, not {bits}-bit")
    n, k = q.shape
    ngroups = scale.shape[1] if scale.dim() == 2 else 1
    if scale.shape[0] != n or k % ngroups:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit weight {tuple(q.shape)}: "
                         "expected [out, ngroups] with in_features a multiple of ngroups")
    offset = 1 << (bits - 1)
    per_word = 32 // bits
    u = (q.to(torch.int64) + offset).t()                       # [K, N], unsigned
    if u.min() < 0 or u.max() >= 2 * offset:
        raise ValueError(f"weight integers outside the signed {bits}-bit range")
    u = torch.nn.functional.pad(u, (0, 0, 0, (-k) % per_word))
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (u.reshape(-1, per_word, n) << shifts[None, :, None]).sum(1)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    zero = None
    if zero_point is not None:
        zero = (zero_point.reshape(n, ngroups).to(torch.int32) + offset).t().contiguous()
    return WNA16Weight(words.contiguous(), scale.reshape(n, ngroups).t().contiguous(), zero,
                       k, n, k // ngroups, bits)


def unpack_wna16(w: WNA16Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """(unsigned integers [K, N] int32, dequantized W^T [K, N] fp32) from the kernel layout."""
    shifts = torch.arange(w.per_word, device=w.words.device, dtype=torch.int32) * w.bits
    mask = (1 << w.bits) - 1
    u = ((w.words[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, w.out_features)
    u = u[:w.in_features]
    zero = w.zero if w.zero is not None else torch.full_like(w.scale, 1 << (w.bits - 1),
                                                             dtype=torch.int32)
    rep = w.group_size
    wt = (u - zero.repeat_interleave(rep, 0)).float() * w.scale.float().repeat_interleave(rep, 0)
    return u, wt


# ----------------------------------------------------------------------------- reference

def wna16_ref(x: torch.Tensor, w: WNA16Weight) -> torch.Tensor:
    """Dequantize, then an fp32 matmul; x [..., K] -> [..., N] in x's dtype."""
    _, wt = unpack_wna16(w)
    return (x.float() @ wt).to(x.dtype)


# ----------------------------------------------------------------------------- Triton

@triton.jit
def _wna16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_KEY, stride_xm, stride_ym,
                  GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                  ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    OFFSET: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    SCALE_PER_TILE: tl.constexpr = GROUP_SIZE % BLOCK_K == 0

    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # this program's share of the K tiles
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = tl.program_id(1) * per_split
    t1 = min(t0 + per_split, k_tiles)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(t0, t1):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # each word is loaded by the PER_WORD rows it holds (L1 hits), then shifted per row:
        # cheaper than reshaping a [BLOCK_K / PER_WORD, PER_WORD, BLOCK_N] unpack on a GPU
        words = tl.load(w_ptr + (offs_k // PER_WORD)[:, None] * N + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0)
        u = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & MASK
        if UPCAST:       # interpreter: no bf16 arithmetic, dot in fp32
            x = x.to(tl.float32)
        if SCALE_PER_TILE:
            g = (t * BLOCK_K) // GROUP_SIZE
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=OFFSET)
            else:
                z = OFFSET
            wq = (u - z).to(x.dtype)                           # small integers: exact
            acc += tl.dot(x, wq) * s[None, :]
        else:
            g = offs_k // GROUP_SIZE
            gmask = mask_k[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=gmask, other=OFFSET)
            else:
                z = OFFSET
            wd = ((u - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)
            acc = tl.dot(x, wd, acc)

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _prune(configs, named_args, **kwargs):
    # prefer K tiles inside one group (scale applied per tile) when any config allows it
    g = named_args.get("GROUP_SIZE", kwargs.get("GROUP_SIZE"))
    configs = [c for c in configs if g % c.kwargs["BLOCK_K"] == 0] or configs
    # per stage: the x tile and the int32 word tile (each word loaded for each of its rows);
    # more than 64 accumulators per thread spill beside the unpacked weights (measured)
    x = named_args["x_ptr"].element_size()
    need = lambda c: c.num_stages * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] * x  # noqa: E731
                                                           + c.kwargs["BLOCK_N"] * 4)
    return fits_gpu(configs, need, 64)


def _cfg(bm, bn, bk, split, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8),
                         num_warps=warps, num_stages=stages)


# Small M: weight streaming. Enough (N tile, K split) programs to cover 132 SMs several times.
GEMV_CONFIGS = [_cfg(16, bn, bk, sk, 4, 4)
                for bn, bk in ((32, 128), (64, 128), (128, 64), (64, 64)) for sk in (1, 2, 4)] + \
    [_cfg(16, 64, 128, 8, 4, 4), _cfg(16, 32, 128, 8, 4, 4)]
# Large M: tensor-core tiles; _prune keeps those that fit the GPU (the 2- and 3-stage ones are
# for the 99 KB of shared memory of sm_86/sm_89).
GEMM_CONFIGS = [
    _cfg(128, 128, 64, 1, 8, 3), _cfg(64, 256, 64, 1, 8, 3), _cfg(64, 128, 64, 1, 4, 4),
    _cfg(128, 64, 64, 1, 4, 4), _cfg(64, 64, 128, 1, 4, 4), _cfg(32, 64, 128, 1, 4, 4),
    _cfg(128, 128, 64, 1, 8, 2), _cfg(64, 128, 64, 1, 4, 2), _cfg(64, 64, 64, 1, 4, 3),
    _cfg(32, 64, 128, 1, 4, 2),
]


_gemv_tuned = triton.autotune(GEMV_CONFIGS, key=["M_KEY", "N", "K", "GROUP_SIZE"],
                              prune_configs_by={"early_config_prune": _prune},
                              reset_to_zero=["y_ptr"], do_bench=tune_bench,
                              cache_results=True)(_wna16_kernel)
_gemm_tuned = triton.autotune(GEMM_CONFIGS, key=["M_KEY", "N", "K", "GROUP_SIZE"],
                              prune_configs_by={"early_config_prune": _prune},
                              do_bench=tune_bench, cache_results=True)(_wna16_kernel)

# Fixed configs for the interpreter (it cannot time candidates): big blocks, few programs.
INTERPRET_GEMV = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, GROUP_M=8)
INTERPRET_GEMM = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=1, GROUP_M=8)


def wna16_gemm(x: torch.Tensor, w: WNA16Weight, splitk: bool | None = None,
               config: dict | None = None) -> torch.Tensor:
    """Triton launcher: x [..., K] -> [..., N] in x's dtype. splitk=None picks by M (<= 16:
    split-K GEMV); config fixes the block sizes (tests), else they are autotuned on a GPU."""
    k, n = w.in_features, w.out_features
    if x.shape[-1] != k:
        raise ValueError(f"activation has {x.shape[-1]} features, weight expects {k}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if splitk is None:
        splitk = m <= 16
    y = torch.zeros(m, n, device=x.device, dtype=torch.float32) if splitk else \
        torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    args = (x2, w.words, w.scale, w.zero if w.zero is not None else w.words, y, m, n, k,
            triton.next_power_of_2(m), x2.stride(0), y.stride(0))
    consts = dict(GROUP_SIZE=w.group_size, BITS=w.bits, HAS_ZERO=w.zero is not None,
                  ATOMIC=splitk, UPCAST=not x.is_cuda)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
                meta["SPLIT_K"])

    if config is None and interpreting() and not x.is_cuda:
        config = INTERPRET_GEMV if splitk else INTERPRET_GEMM
    if config is not None:
        if not splitk and config.get("SPLIT_K", 1) != 1:
            raise ValueError("SPLIT_K > 1 needs the split-K (atomic) launch")
        _wna16_kernel[grid](*args, **consts, **config)
    elif splitk:
        _gemv_tuned[grid](*args, **consts)
    else:
        _gemm_tuned[grid](*args, **consts)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
