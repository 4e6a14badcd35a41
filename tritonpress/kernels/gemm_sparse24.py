"""2:4 sparse FP8 GEMM through cuSPARSELt (torch._cslt_*), Hopper only.

The weight [N, K] has at most two nonzeros in every four consecutive inputs; cuSPARSELt
stores the kept half plus 2-bit indices and runs the sparse tensor cores:

    out[N, M] = alpha[N] * (W_sparse[N, K] @ xq^T[K, M])

with alpha = the per-channel weight scale (cuSPARSELt's alpha-vector mode) and
transpose_result giving [M, N] row-major directly. The per-token activation scale is a
column scale of that product, applied after. Where cuSPARSELt or fp8 is missing, the
dispatch (kernels/gemm.py) runs the dense FP8 kernel on the same values instead.

Measured on an H200 with cuSPARSELt's default algorithm (the project's GPU anchor numbers),
2:4 fp8 was no faster than dense fp8; bench/bench_gemm.py tries the algorithm search as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# cuSPARSELt's minimum granularity for 8-bit operands: sparse rows/cols multiples of 32,
# dense operand multiples of 16 (we pad the token dimension).
SPARSE_MULTIPLE = 32
DENSE_MULTIPLE = 16


@dataclass
class Sparse24Weight:
    compressed: torch.Tensor        # cuSPARSELt's opaque buffer
    scale: torch.Tensor             # fp32 [N] per-channel weight scale (alpha vector)
    out_features: int
    in_features: int
    alg_id: int = 0                 # cuSPARSELt algorithm (0 = default; see search_algorithm)


def cslt_available() -> bool:
    """cuSPARSELt present in this torch build (never touches the driver on CPU builds)."""
    try:
        return bool(torch.backends.cusparselt.is_available())
    except Exception:
        return False


def is_24_sparse(w: torch.Tensor) -> bool:
    n, k = w.shape
    if k % 4:
        return False
    return bool(((w.reshape(n, k // 4, 4).float() != 0).sum(-1) <= 2).all())


def shape_supported(n: int, k: int) -> bool:
    return n % SPARSE_MULTIPLE == 0 and k % SPARSE_MULTIPLE == 0


def compress_24(q: torch.Tensor, scale: torch.Tensor) -> Sparse24Weight:
    """q float8_e4m3fn [N, K] on a CUDA device, 2:4 sparse; scale [N] or [N, 1]."""
    n, k = q.shape
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"2:4 fp8 GEMM takes float8_e4m3fn weights, got {q.dtype}")
    if not shape_supported(n, k):
        raise ValueError(f"cuSPARSELt needs both weight dims to be multiples of "
                         f"{SPARSE_MULTIPLE}, got {n} x {k}")
    if not is_24_sparse(q):
        raise ValueError("weight is not 2:4 sparse (more than two nonzeros in some group of 4)")
    return Sparse24Weight(torch._cslt_compress(q.contiguous()),
                          scale.reshape(-1).float().contiguous(), n, k)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[0]) % DENSE_MULTIPLE
    return torch.nn.functional.pad(x.view(torch.uint8), (0, 0, 0, pad)).view(x.dtype) \
        if pad else x


def sparse24_fp8_gemm(xq: torch.Tensor, sx: torch.Tensor, w: Sparse24Weight,
                      out_dtype: torch.dtype = torch.bfloat16, alg_id: int | None = None):
    """xq float8_e4m3fn [M, K] with per-token sx [M, 1] -> [M, N] in out_dtype."""
    m = xq.shape[0]
    xp = _pad_rows(xq.contiguous())
    y = torch._cslt_sparse_mm(w.compressed, xp.t(), alpha=w.scale, out_dtype=out_dtype,
                              transpose_result=True,
                              alg_id=w.alg_id if alg_id is None else alg_id)
    return (y[:m].float() * sx.reshape(-1, 1).float()).to(out_dtype)


def search_algorithm(w: Sparse24Weight, xq: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Let cuSPARSELt time its algorithms for this problem size; stores and returns the id."""
    xp = _pad_rows(xq.contiguous())
    alg = torch._cslt_sparse_mm_search(w.compressed, xp.t(), alpha=w.scale,
                                       out_dtype=out_dtype, transpose_result=True)
    w.alg_id = int(alg[0] if isinstance(alg, (tuple, list)) else alg)
    return w.alg_id
