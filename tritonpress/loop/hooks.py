"""Hooks that show a method what each Linear of a decoder layer reads: its inputs per batch
(``LinearInputHooks``, ``run_with_linear_inputs``), a module's inputs and outputs
(``capture_module_io``) and the Hessians X^T X of the Linears' inputs (``collect_hessians``:
one per distinct input, so q/k/v and gate/up share one), padding tokens left out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .activations import LayerInputs, StopLayer
from .experts import statistics_pass
from ..report import step


class LinearInputHooks:
    """Forward pre-hooks on Linears that hand each DISTINCT input tensor to `fn` once.

    fn(leader: str, x, mask) gets the raw input (usually [b, s, in]) and the batch's token mask
    ([b, s] bool, True = real token; None = no padding); `tokens_of(x, mask)` gives the
    [real tokens, in] rows. Linears called on
    the same tensor object in one forward (q/k/v; gate/up) form a group led by the first one
    called; `groups` maps leader -> members after the first batch. Use as a context manager
    around `inputs.run(layer, keep=False, before_batch=hooks.new_batch)`.

    stop_early: from the second batch on, raise StopLayer once every Linear has been called as
    often as on the first batch, so the rest of the layer (down_proj's matmul, the residual)
    is not computed for nothing. Only when the first batch called every Linear: a layer that
    routes tokens (MoE experts) may call different ones per batch, and then runs whole.
    """

    def __init__(self, linears: dict[str, nn.Module], fn: Callable, stop_early: bool = True):
        self.linears, self.fn = linears, fn
        self.mask: torch.Tensor | None = None   # the current batch's token mask
        self.leader_of: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = []
        self.stop_early = stop_early
        self._batches = 0
        self._calls: dict[str, int] = {}          # this batch's calls per Linear
        self._first: dict[str, int] | None = None  # the first batch's

    @property
    def groups(self) -> dict[str, list[str]]:
        g: dict[str, list[str]] = {}
        for name, lead in self.leader_of.items():
            g.setdefault(lead, []).append(name)
        return g

    def _hook(self, name):
        def hook(mod, args):
            x = args[0]
            key = id(x)
            if key in self._seen and self._seen[key][0] is x:
                lead = self._seen[key][1]
            else:
                lead = name
                self._seen[key] = (x, name)
                self.fn(name, x, _mask_for(x, self.mask))
            prev = self.leader_of.setdefault(name, lead)
            if prev != lead:
                raise RuntimeError(f"{name} shared its input with {prev} on one batch and "
                                   f"with {lead} on another")
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._first is not None and self._calls == self._first:
                raise StopLayer
        return hook

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def new_batch(self, mask: torch.Tensor | None):
        self.mask = mask
        if self._batches == 1 and self.stop_early and len(self._calls) == len(self.linears):
            self._first = dict(self._calls)
        self._batches += 1
        self._seen.clear()
        self._calls = {}

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()
        self.mask = None


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if x.shape[:-1] != mask.shape:
        raise RuntimeError(f"a Linear input of shape {tuple(x.shape)} does not line up with the "
                           f"token mask {tuple(mask.shape)}: padding cannot be left out")
    return mask


def tokens_of(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[b, s, d] activations -> [real tokens, d], padding (mask False) left out."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def run_with_linear_inputs(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs,
                           fn: Callable) -> dict[str, list[str]]:
    """Replay the batches through `layer`, calling fn(leader, x, mask) once per distinct Linear
    input per batch (see LinearInputHooks); returns the groups (leader -> members)."""
    hooks = LinearInputHooks(linears, fn)
    with hooks, statistics_pass(layer):     # nothing reads the outputs: MoE blocks skip work
        inputs.run(layer, keep=False, before_batch=hooks.new_batch)
    return hooks.groups


def linear_groups(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs
                  ) -> list[list[str]]:
    """The Linears grouped by shared input (q/k/v, gate/up), groups in the order the forward
    calls them, from the first calibration batch alone."""
    first = LayerInputs([inputs.hidden[0]], inputs.kwargs[:1], inputs.token_masks[:1],
                        inputs.device, inputs.storage)
    return list(run_with_linear_inputs(layer, linears, first, lambda *a: None).values())


@torch.no_grad()
def capture_module_io(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs,
                      outputs: bool = False, storage=None) -> dict[str, list]:
    """Per batch, the positional input 0 (and output, if asked) of chosen modules:
    {name: [(x, y or None), ...]} kept on `storage` (default inputs.storage)."""
    storage = inputs.storage if storage is None else storage
    got: dict[str, list] = {n: [] for n in modules}
    handles = []
    for name, mod in modules.items():
        def hook(mod, args, out, name=name):
            y = out[0] if isinstance(out, (tuple, list)) else out
            got[name].append((args[0].to(storage), y.to(storage) if outputs else None))
        handles.append(mod.register_forward_hook(hook))
    try:
        inputs.run(layer, keep=False)
    finally:
        for h in handles:
            h.remove()
    return got


# ----------------------------------------------------------------------------- Hessians

def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n_seen: int,
                       mask: torch.Tensor | None = None) -> int:
    """H [in, in] fp32 holds 2/n_seen * sum x x^T over n_seen tokens; fold in the tokens of x
    ([tokens, in] or [b, s, in]; with `mask` only the real ones) and return the new count.
    kernels/hessian.py: the fused Triton kernel on CUDA, its torch reference elsewhere."""
    from ..kernels.hessian import accumulate_hessian as accumulate
    with step("hessian", H.device):
        return accumulate(H, x, n_seen, mask)


@dataclass
class HessianStats:
    H: torch.Tensor       # [in, in] fp32, 2/n sum x x^T
    n: int = 0            # tokens seen
    members: list[str] = field(default_factory=list)   # Linears reading this input
    amax: torch.Tensor | None = None    # max |x| over the tokens seen, in the inputs' dtype
                                        # (NVFP4's static activation global scale)


def amax_abs(x: torch.Tensor) -> torch.Tensor:
    """max |x| in one read of x (no |x| copy)."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi)


def collect_hessians(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs
                     ) -> dict[str, HessianStats]:
    """One Hessian per distinct Linear input (shared object for q/k/v and gate/up)."""
    stats: dict[str, HessianStats] = {}

    def add(lead, x, mask):
        if lead not in stats:
            stats[lead] = HessianStats(torch.zeros(x.shape[-1], x.shape[-1],
                                                   dtype=torch.float32, device=x.device))
        s = stats[lead]
        s.n = accumulate_hessian(s.H, x, s.n, mask)
        a = amax_abs(tokens_of(x, mask)) if x.numel() else None
        if a is not None:
            s.amax = a if s.amax is None else torch.maximum(s.amax, a)

    groups = run_with_linear_inputs(layer, linears, inputs, add)
    out = {}
    for lead, members in groups.items():
        stats[lead].members = members
        for m in members:
            out[m] = stats[lead]
    return out
