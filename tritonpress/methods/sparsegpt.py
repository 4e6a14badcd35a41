"""SparseGPT 2:4 with fp8 weights in the layer loop: the method objects (SparseGPT, and
Magnitude, its data-free baseline), one stacked solve per shared Hessian, the input channels of
down_proj and o_proj spread over the 2:4 groups (permute_inputs). The solve of one weight, and
the paper's steps, are in sparsegpt_solve.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..checkpoint.qweight import QuantizedWeight
from ..kernels.hessian import output_error
from ..recipe import Method, check_actorder, check_int, check_number, check_type
from ..report import step
from .sparsegpt_solve import (DEFAULT_ACTORDER, DEFAULT_MODE, HEADROOM, inverse_hessian_cholesky,
                              magnitude_24, sparsegpt_24, undampened_loss_rows)


@dataclass(frozen=True)
class SparseGPT(Method):
    """SparseGPT 2:4 pruning with the fp8 rounding of scheme W8A8_FP8_24 in one sweep.
    damp, block_size, actorder as GPTQ's ("static": the 2:4 groups of 4 columns swept by
    decreasing sum of H_ii); refit: a ridge > 0 (e.g. 0.1) to refit the kept weights on the
    chosen mask before the fp8 sweep (off); sequential: each Linear group's Hessian from the
    layer with the groups before it compressed (off); permute: the inputs of down_proj and
    o_proj reordered so each 2:4 group holds channels of every rank of H_jj |W_:j|^2 (on; the
    model's function unchanged). Measurements: docs/results.md."""
    damp: float = 0.01
    block_size: int = 128
    actorder: str | None = DEFAULT_ACTORDER
    refit: float | None = None
    sequential: bool = False
    permute: bool = True

    def __post_init__(self):
        check_number("damp", self.damp, 0, None,
                     "the dampening is a fraction >= 0 of the Hessian's mean diagonal (e.g. 0.01)")
        check_int("block_size", self.block_size, 1, "pass a positive number of columns (e.g. 128)")
        object.__setattr__(self, "actorder", check_actorder(self.actorder))
        if self.refit is not None:
            check_type("refit", self.refit, (int, float), "pass a ridge > 0 (e.g. 0.1) or None")
            if not self.refit > 0:
                raise ValueError(f"refit={self.refit}: SparseGPT's refit of the kept weights "
                                 "takes a ridge > 0, a fraction of the Hessian's mean diagonal "
                                 "(e.g. 0.1), or None (off)")
        for name in ("sequential", "permute"):
            check_type(name, getattr(self, name), bool, "pass True or False")

    def check(self, scheme):
        check_24_scheme(self, scheme)

    def check_model(self, model, linears):
        check_24_shapes(linears)

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return sparsegpt_method(layer_idx, layer, prefix, inputs, ctx, block_size=self.block_size,
                                damp=self.damp, actorder=self.actorder, refit=self.refit,
                                sequential=self.sequential, permute=self.permute)


@dataclass(frozen=True)
class Magnitude(Method):
    """2:4 by weight magnitude, then fp8: the data-free baseline of SparseGPT."""
    data_free = True

    def check(self, scheme):
        check_24_scheme(self, scheme)

    def check_model(self, model, linears):
        check_24_shapes(linears)

    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return magnitude_linears(ctx.linears, ctx.scheme, ctx.device)


def check_24_scheme(method, scheme) -> None:
    if not scheme.sparsity_24:
        raise ValueError(f"{type(method).__name__} prunes to 2:4: use it with scheme W8A8_FP8_24")


@torch.no_grad()
def sparsegpt_method(layer_idx, layer, prefix, inputs, ctx, *, mode: str = DEFAULT_MODE,
                     scale_from: str = "original", headroom: float = HEADROOM,
                     block_size: int = 128, damp: float = 0.01,
                     actorder: str | None = DEFAULT_ACTORDER, refit: float | None = None,
                     sequential: bool = False, permute: bool = True):
    """Per-layer method for loop.sequential.compress_sequential (options bound with
    functools.partial; SparseGPT() binds its own).

    One Hessian per distinct input. Linears sharing it (q/k/v, gate/up) share its inverse and
    are stacked along rows into one sweep (rows never interact). Dequantized weights go back
    into the layer. sequential=False: every Hessian from the layer as it was (one pass);
    True: each group's Hessian from the layer with the groups called before it already
    compressed (one more pass per group, cut short after the group's input). permute: the
    inputs of down_proj and o_proj reordered first (permute_inputs)."""
    from ..loop.hooks import linear_groups

    check_24_shapes(ctx.linears)
    if sequential:                    # each group's Hessian when its turn comes
        order, hessians = linear_groups(layer, ctx.linears, inputs), {}
    else:                             # all from one pass over the layer as it was
        hessians = ctx.hessians(layer, ctx.linears, inputs)
        order = list({id(hessians[n]): [m for m in hessians[n].members if m in ctx.linears]
                      for n in hessians}.values())
    # a Linear no calibration token reached (an expert nothing was routed to): by magnitude
    missing = {n: ctx.linears[n] for n in ctx.linears if not any(n in g for g in order)}
    qweights, infos = magnitude_linears(missing, ctx.scheme, ctx.device) if missing else ({}, {})
    for n in missing:
        infos[n].update(fallback="magnitude", tokens=0, why="no calibration tokens")

    if permute:                       # before any solve: the producers' rows move too
        consumers = {n: m for n, m in ctx.linears.items()
                     if n.endswith((".down_proj", ".o_proj"))}
        permute_inputs(layer, prefix, ctx.hessians(layer, consumers, inputs)
                       if sequential else hessians, {n: m for n, m in ctx.linears.items()
                                                     if n not in missing})
    for names in order:
        if sequential:                # the groups called before it are compressed by now
            hessians = ctx.hessians(layer, {n: ctx.linears[n] for n in names}, inputs)
        with step("sparsegpt solve"):    # the factorisation and the reported losses too
            _solve_group(names, hessians, ctx, mode, scale_from, headroom, block_size, damp,
                         check_actorder(actorder), refit, qweights, infos)
    return qweights, infos


def spread_channels(score: torch.Tensor) -> torch.Tensor:
    """A permutation of input channels for the 2:4 groups: channels ranked by `score` (their
    output energy H_jj * |W_:j|^2), the r-th into group r mod (n / 4), so every group of 4
    holds one channel of each quartile and none is made of 4 important ones (of which every
    row must lose 2)."""
    n = score.numel()
    ranked = torch.argsort(score, descending=True, stable=True)
    return ranked.reshape(4, n // 4).t().reshape(-1)


def permute_inputs(layer, prefix, hessians, compressed) -> None:
    """Reorder the input channels of down_proj (with the rows of gate/up_proj) and of o_proj
    (within each head, with the rows of v_proj; one order per KV head, shared by the query
    heads that read it) by spread_channels: the layer computes the same function. The
    consumers' Hessians in `hessians` are permuted with them. Only where the consumer and its
    producers are all in `compressed` (an ignored one would be saved unpermuted)."""
    for name, st in hessians.items():
        base, _, leaf = name.rpartition(".")
        producers = {"down_proj": ["gate_proj", "up_proj"], "o_proj": ["v_proj"]}.get(leaf)
        if not producers or not all(
                f"{base}.{p}" in compressed for p in [leaf] + producers):
            continue
        parent = layer.get_submodule(base[len(prefix) + 1:])
        cons = getattr(parent, leaf)
        W = cons.weight.data
        energy = st.H.diagonal().float() * W.float().square().sum(0).to(st.H.device)
        if leaf == "down_proj":
            perm = out = spread_channels(energy)
        else:                         # o_proj reads heads h = kv * groups + r, head_dim each
            d, g = getattr(parent, "head_dim", 0), getattr(parent, "num_key_value_groups", 0)
            if not d or not g or d % 4 or energy.numel() % (d * g):
                continue
            kv = energy.numel() // (d * g)
            pi = torch.stack([spread_channels(e) for e in energy.reshape(kv, g, d).sum(1)])
            heads = torch.arange(kv * g, device=pi.device)[:, None]
            out = (pi + d * torch.arange(kv, device=pi.device)[:, None]).reshape(-1)
            perm = (pi.repeat_interleave(g, 0) + d * heads).reshape(-1)
        st.H.copy_(st.H[perm][:, perm])
        cons.weight.data = W[:, perm.to(W.device)].contiguous()
        for p in producers:
            lin = getattr(parent, p)
            lin.weight.data = lin.weight.data[out.to(W.device)].contiguous()
            if lin.bias is not None:
                lin.bias.data = lin.bias.data[out.to(W.device)].contiguous()


def _solve_group(names, hessians, ctx, mode, scale_from, headroom, block_size, damp,
                 actorder, refit, qweights, infos) -> None:
    """One stacked SparseGPT solve of the Linears in `names` (one shared Hessian)."""
    t0 = time.perf_counter()
    st = hessians[names[0]]
    lins = [ctx.linears[n] for n in names]
    W = torch.cat([lin.weight.data for lin in lins])
    try:
        hinv = inverse_hessian_cholesky(st.H, damp, actorder)
    except ValueError:
        hinv = None
    if hinv is None:                   # no usable Hessian: the data-free baseline
        qw, losses = magnitude_24(W, args=ctx.scheme.weights,
                                  scale_dtype=ctx.scale_dtype), None
    else:
        qw, losses = sparsegpt_24(W, None if refit is None else st.H, mode=mode,
                                  scale_from=scale_from, headroom=headroom,
                                  block_size=block_size, args=ctx.scheme.weights,
                                  scale_dtype=ctx.scale_dtype, hinv=hinv, refit=refit)
    deq = qw.dequantize(torch.float32)
    err = output_error(W.float() - deq, st.H.float()) if losses is None else \
        undampened_loss_rows(losses, W, deq, hinv)
    # the scale errors are reported against; bf16 products (a few digits suffice, and fp32
    # would cost as much as the sweep)
    ref = output_error(W.float(), st.H.float(), bf16=True)
    seconds = time.perf_counter() - t0
    row = 0
    for name, lin in zip(names, lins):
        rows = slice(row, row + lin.out_features)
        row += lin.out_features
        lin.weight.data = deq[rows].to(lin.weight.dtype)
        qweights[name] = QuantizedWeight(qw.q[rows].cpu(), qw.scale[rows].cpu(), None,
                                         qw.args)
        e, r = float(err[rows].sum()), float(ref[rows].sum())
        infos[name] = {
            "method": "sparsegpt", "mode": mode, "actorder": actorder, "refit": refit,
            "tokens": st.n,
            "hessian_shared_with": [m for m in st.members if m != name],
            "fallback": None if hinv is not None else "magnitude",
            "dampening": None if hinv is None else hinv.frac,
            "loss": None if losses is None else float(losses[rows].sum()),
            "output_err": e, "output_rel_err": e / r if r > 0 else float("nan"),
            "seconds": round(seconds * lin.out_features / W.shape[0], 4)}


@torch.no_grad()
def magnitude_linears(linears: dict, scheme, device=None):
    """The data-free baseline over a model's Linears: (qweights, infos), weights written back."""
    check_24_shapes(linears)
    qweights, infos = {}, {}
    for name, lin in linears.items():
        w = lin.weight.data if device is None else lin.weight.data.to(device)
        qw = magnitude_24(w, args=scheme.weights, scale_dtype=lin.weight.dtype)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype).to(lin.weight.device))
        qweights[name] = QuantizedWeight(qw.q.cpu(), qw.scale.cpu(), None, qw.args)
        infos[name] = {"method": "magnitude"}
    return qweights, infos


def check_24_shapes(linears: dict) -> None:
    """Every Linear to prune needs in-features divisible by 4 (call before calibrating)."""
    bad = {n: m.in_features for n, m in linears.items() if m.in_features % 4}
    if bad:
        shown = ", ".join(f"{n} ({k})" for n, k in list(bad.items())[:6])
        names = sorted({n.split(".")[-1] for n in bad})
        raise ValueError(f"2:4 sparsity needs in-features divisible by 4, these Linears have "
                         f"other sizes: {shown}{' ...' if len(bad) > 6 else ''}. Leave them "
                         f"dense: ignore={names}")


