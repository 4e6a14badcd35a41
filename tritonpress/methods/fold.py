"""Folding per-channel scales into a norm, shared by AWQ and SmoothQuant.

Both methods rewrite y = x W^T as (x / s) (W diag(s))^T and fold x / s into the norm that
produces x, by changing its affine parameters. With n(x) the normalised input, two forms:

    w * n(x) (+ b)   Llama, Qwen, Mistral RMSNorm; LayerNorm    w -> w / s,  b -> b / s
    (1 + w) * n(x)   Gemma RMSNorm                              w -> (1 + w) / s - 1

The form is told apart by running the norm once with its weight (and bias) zeroed: the output
is 0 for w * n(x), n(x) for (1 + w) * n(x). One more run with the new parameters must give the
old output / s, else the norm is not affine in its weight: ValueError, the module untouched.
These runs use fp32 copies of the parameters (the originals are put back), so the check is
tight whatever the model's dtype. The parameters written are computed in fp32 and cast once,
(w.float() / s).to(w.dtype) for w * n(x): the same ops as before this module existed.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def divide_norm_output(norm: nn.Module, s: torch.Tensor, hint: str = "") -> None:
    """Change norm's affine parameters in place so that its output is divided by s [channels].
    ValueError (parameters unchanged) if the norm is not w * n(x) (+ b) or (1 + w) * n(x)."""
    weight = norm.weight
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    s = s.float().to(weight.device)
    w32 = weight.detach().float()
    b32 = None if bias is None else bias.detach().float()
    new_w, why = _probe(norm, weight, bias, w32, b32, s)
    if why is not None:
        raise ValueError(f"{type(norm).__name__} is not an affine norm (weight * x (+ bias) or "
                         f"(1 + weight) * x): cannot fold scales into it ({why})"
                         + (f"; {hint}" if hint else ""))
    weight.copy_(new_w.to(weight.dtype))
    if bias is not None:
        bias.copy_((b32 / s).to(bias.dtype))


def _probe(norm, weight, bias, w32, b32, s):
    """(new fp32 weight, None) or (None, why not); the module's parameters are the original
    tensors again when it returns."""
    gen = torch.Generator().manual_seed(0)        # leaves the global RNG alone
    x = torch.randn(2, 4, s.numel(), generator=gen).to(weight.device)
    saved_w = weight.data
    saved_b = None if bias is None else bias.data

    def run(w, b):
        weight.data = w
        if bias is not None:
            bias.data = b
        return norm(x).float()

    try:
        before = run(w32, b32)
        plus_one = bool(run(torch.zeros_like(w32), None if b32 is None else
                            torch.zeros_like(b32)).abs().amax() > 0)
        new_w = (1 + w32) / s - 1 if plus_one else w32 / s
        after = run(new_w, None if b32 is None else b32 / s)
    except Exception as e:          # e.g. a norm whose forward wants more than one tensor
        return None, f"{type(e).__name__}: {e}"
    finally:
        weight.data = saved_w
        if bias is not None:
            bias.data = saved_b
    want = before / s
    if after.shape != want.shape or not torch.allclose(
            after, want, rtol=1e-3, atol=1e-3 * float(want.abs().amax())):
        return None, "its output / s is not reached by scaling its weight"
    return new_w, None
