"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8.

For a norm whose output X feeds Linears W_1..W_k (input_layernorm -> q/k/v,
post_attention_layernorm -> gate/up), per input channel j

    s_j = max|X_j|^alpha / max_k max_i |W_k[i, j]|^(1 - alpha)
    norm output X_j -> X_j / s_j        W_k[:, j] -> W_k[:, j] * s_j

so X W^T is unchanged in exact arithmetic, while the per-token activation range shrinks.
Which norm feeds which Linears is found by tensor identity in hooks, not by module names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fold import divide_norm_output
from ..loop.activations import LayerInputs
from ..loop.hooks import run_with_linear_inputs, tokens_of
from ..recipe import Method, check_number
from ..report import step


def _is_norm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return (not isinstance(mod, nn.Linear) and not list(mod.children())
            and isinstance(w, torch.Tensor) and w.dim() == 1)


@torch.no_grad()
def smoothing_groups(layer: nn.Module, inputs: LayerInputs) -> list[dict]:
    """[{norm: name in layer, linears: [names in layer], act_max: [channels] fp32}] for every
    norm whose output is read directly by Linears, with the per-channel absmax of that output
    over the calibration tokens (padding left out)."""
    norms = {n: m for n, m in layer.named_modules() if _is_norm(m)}
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    produced: dict[int, tuple[torch.Tensor, str]] = {}
    norm_of: dict[str, str] = {}
    act_max: dict[str, torch.Tensor] = {}

    def on_norm(name):
        def hook(mod, args, out):
            produced[id(out)] = (out, name)
        return hook

    def on_input(lead, x, mask):
        hit = produced.get(id(x))
        if hit is None or hit[0] is not x:
            return
        norm_of[lead] = hit[1]
        amax = tokens_of(x, mask).abs().amax(0).float()
        act_max[lead] = amax if lead not in act_max else torch.maximum(act_max[lead], amax)

    handles = [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    handles.append(layer.register_forward_pre_hook(lambda *_: produced.clear()))
    try:
        groups = run_with_linear_inputs(layer, linears, inputs, on_input)
    finally:
        for h in handles:
            h.remove()
        produced.clear()
    return [{"norm": norm_of[lead], "linears": groups[lead], "act_max": act_max[lead]}
            for lead in groups if lead in norm_of]


@torch.no_grad()
@step("smoothquant")
def smooth(norm: nn.Module, linears: list[nn.Linear], act_max: torch.Tensor,
           alpha: float = 0.5) -> torch.Tensor:
    """Apply the smoothing scales in place; returns s [channels] (fp32)."""
    w_max = torch.stack([lin.weight.abs().amax(0).float() for lin in linears]).amax(0)
    act_max = act_max.to(w_max.device)
    s = act_max.pow(alpha) / w_max.pow(1 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s)).clamp_min(1e-5)
    divide_norm_output(norm, s, hint="run without smoothquant")
    for lin in linears:
        lin.weight.data = (lin.weight.float() * s).to(lin.weight.dtype)
    return s


@dataclass(frozen=True)
class SmoothQuant(Method):
    """SmoothQuant with strength `alpha` in [0, 1]: every norm -> Linears group of a layer
    smoothed (activation outliers moved into the weights). Quantizes nothing: it comes before
    the quantizer, [SmoothQuant(0.8), GPTQ()], for schemes that quantize activations."""
    alpha: float
    rescales = True
    quantizes = False

    def __post_init__(self):
        check_number("alpha", self.alpha, 0, 1, "SmoothQuant's strength is in [0, 1] (e.g. 0.5)")

    def check(self, scheme):
        if scheme.input_activations is None:
            raise ValueError(f"SmoothQuant moves activation outliers into the weights for "
                             f"schemes that quantize activations; {scheme.name} keeps them in "
                             "16 bits: drop SmoothQuant (or use W8A8_INT8)")

    def rescale(self, layer_idx, layer, prefix, inputs, ctx):
        infos = {}
        modules = dict(layer.named_modules())
        for g in smoothing_groups(layer, inputs):
            s = smooth(modules[g["norm"]], [modules[n] for n in g["linears"]], g["act_max"],
                       self.alpha)
            for n in g["linears"]:
                infos[f"{prefix}.{n}"] = {"smoothquant": {
                    "alpha": self.alpha, "norm": f"{prefix}.{g['norm']}",
                    "scale_min": float(s.min()), "scale_max": float(s.max())}}
        return infos
