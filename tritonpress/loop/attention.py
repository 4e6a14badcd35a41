"""Causal self-attention for the calibration passes on a CPU, faster than torch's CPU kernel.

Every calibration pass runs each decoder layer over all calibration windows twice (statistics,
propagation), and on a CPU torch's flash-attention kernel is the slowest part of a layer: on
SmolLM2-135M (9 query heads, 3 kv heads of 64, 8 windows of 512, bf16) it took 33.5 ms a
call where the layer's matmuls at full speed would take a few. `blocked_causal_attention`
computes the same thing in query blocks of 64 rows: Q K^T of a block against the keys up to
it (bf16 products, fp32 sums: exact products as the flash kernel's), the causal mask on the
block's diagonal only, an fp32 softmax, P (bf16) V; the query heads of a kv head stacked into
one matmul (GQA without repeating K and V). 15 ms for the same call; outputs within a bf16
ulp of the flash kernel's.

`faster_cpu_attention()` puts it in transformers' "sdpa" slot for the duration of a run; it
takes only the plain case (bf16 CPU tensors, causal, no mask, no sliding window, softcap or
sinks, no cache) and hands everything else to transformers' own sdpa function.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..kernels.hessian import bf16_products

BLOCK = 64      # query rows a step (16: 24 ms, 32: 19, 48: 16, 64: 15, 128: 36 on SmolLM2)
_UNPLAIN = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias")


def blocked_causal_attention(query, key, value, scaling: float, block: int = BLOCK):
    """softmax(Q K^T * scaling, causal) V for query [b, hq, L, d], key/value [b, hk, L, d]
    (hq a multiple of hk) -> [b, hq, L, d] in the query's dtype."""
    b, hq, L, d = query.shape
    hk = key.shape[1]
    g = hq // hk
    out = torch.empty(b, hk, g, L, value.shape[-1], dtype=query.dtype, device=query.device)
    qg = query.reshape(b, hk, g, L, d)
    kf = key.float()
    with bf16_products(query.dtype == torch.bfloat16):
        for r0 in range(0, L, block):
            r1 = min(r0 + block, L)
            n = r1 - r0
            qb = qg[:, :, :, r0:r1].float().reshape(b, hk, g * n, d)
            s = torch.matmul(qb, kf[:, :, :r1].transpose(-1, -2)).view(b, hk, g, n, r1)
            s.mul_(scaling)
            s[..., r0:r1].masked_fill_(
                torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
            p = torch.softmax(s, -1).to(value.dtype)
            out[:, :, :, r0:r1] = torch.matmul(p.view(b, hk, g * n, r1),
                                               value[:, :, :r1]).view(b, hk, g, n, -1)
    return out.view(b, hq, L, -1)


def _plain(module, query, key, value, attention_mask, dropout, is_causal, kwargs) -> bool:
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and causal
            and attention_mask is None and not dropout and query.shape[2] > 1
            and query.shape[2] == key.shape[2] and query.shape[1] % key.shape[1] == 0
            and query.shape[-1] == key.shape[-1]
            and all(kwargs.get(k) is None for k in _UNPLAIN))


@contextmanager
def faster_cpu_attention():
    """Within, transformers models set to "sdpa" run blocked_causal_attention where it
    applies (see the module docstring)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:         # pragma: no cover
        yield
        return
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  is_causal=None, **kwargs):
        if not _plain(module, query, key, value, attention_mask, dropout, is_causal, kwargs):
            return sdpa(module, query, key, value, attention_mask, dropout=dropout,
                        scaling=scaling, is_causal=is_causal, **kwargs)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = blocked_causal_attention(query, key, value, scale)
        return out.transpose(1, 2).contiguous(), None

    local = ALL_ATTENTION_FUNCTIONS._local_mapping       # a local override, not the class's
    before = local.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if before is None:
            local.pop("sdpa", None)
        else:
            local["sdpa"] = before
