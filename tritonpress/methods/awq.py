"""AWQ: activation-aware weight quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"), as a per-layer method of the pipeline.

A few input channels carry large activations; their weights matter most. AWQ scales them up
before rounding and folds the inverse scale into the layer that produces those activations,
so the float model is unchanged and the important weights lose less to rounding:

    y = x W^T = (x / s) (W diag(s))^T,   x / s  folded into the smoothing layer (a norm's
                                          weight, or the previous Linear's output rows)

Per mapping (smoothing layer -> balance Linears reading its output), in one decoder layer:
  1. statistics: x_mean = mean |x| per input channel over all calibration tokens; a random
     subsample X of the tokens for the search;
  2. scale search over a grid r = 0, 1/n, ..., (n-1)/n:
         s = x_mean^r                        (duo scaling: x_mean^r / w_mean^(1-r))
         s = s / sqrt(max(s) min(s))
         err(r) = sum_balance || X diag(1/s) Q(W diag(s))^T - X W^T ||^2
     evaluated by a fused kernel (kernels/awq_search.py), plus s = 1 (round-to-nearest);
  3. apply the best s: smoothing layer / s, balance Linears' input columns * s.
Then every Linear is quantized (int4 groups) after the original AWQ's clipping search
(llm-compressor has none): per group, the shrink f of [min, max] minimising
|| X_g (Q_f(W_g) - W_g)^T ||^2. Defaults measured (plain x_mean^r with clipping): docs/results.md.
`AWQ()` is the method object; `awq_scale` (steps 1-3) and `awq` (all) its per-layer steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import fp4
from ..kernels.awq_search import awq_grid_errors
from ..kernels.quant import dequantize_ref, qparams_from_minmax, quantize_ref
from ..schemes import QuantArgs, matches
from .fold import divide_norm_output
from ..checkpoint.qweight import QuantizedWeight
from ..recipe import Method, check_int, check_type
from ..report import step
from .rtn import clip_search, fp4_scale_search, group_gram, nvfp4_global_scales

# Llama-family mappings as (smoothing layer, balance layers) attribute names; resolved per layer
DEFAULT_MAPPINGS = (
    ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
    ("v_proj", ("o_proj",)),
    # Gemma 2/3 norm the MLP input with pre_feedforward_layernorm (their post_attention_layernorm
    # norms the attention output); Llama-style layers have only post_attention_layernorm
    ("pre_feedforward_layernorm", ("gate_proj", "up_proj")),
    ("post_attention_layernorm", ("gate_proj", "up_proj")),
    ("up_proj", ("down_proj",)),
)
# outputs that meet in softmax(q k^T): a per-output error is the wrong target for clipping
CLIP_SKIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class AWQMapping:
    smooth: str                     # module name inside the decoder layer
    balance: tuple[str, ...]        # Linear names inside the decoder layer


def find_mappings(layer: nn.Module, patterns=DEFAULT_MAPPINGS
                  ) -> tuple[list[AWQMapping], dict[str, str]]:
    """Resolve (smooth, balance) name patterns in one decoder layer: ([mappings], {skipped
    smoothing layer: why}). A pattern is an attribute name ("v_proj") or a dotted path inside
    the layer ("self_attn.v_proj"). Balance layers are looked up in the smallest enclosing
    module that holds any (siblings first), so experts pair with their own up/down."""
    modules = dict(layer.named_modules())
    found, skipped = [], {}
    for smooth_pat, balance_pats in patterns:
        balance_pats = (balance_pats,) if isinstance(balance_pats, str) else tuple(balance_pats)
        for sname, smod in modules.items():
            if not sname or not matches(sname, (smooth_pat,)):
                continue
            scope = sname
            balance = []
            while scope and not balance:
                scope = scope.rpartition(".")[0]
                balance = [n for n in modules if (not scope or n.startswith(scope + "."))
                           and n != sname and matches(n, balance_pats)]
            if not balance:
                skipped[sname] = f"no {'/'.join(balance_pats)} found next to it"
                continue
            why = _incompatible(smod, [modules[b] for b in balance])
            taken = [m.smooth for m in found if set(m.balance) & set(balance)]
            if taken:       # the first pattern that reaches a balance group smooths it
                why = f"{'/'.join(balance)} already smoothed by {taken[0]}"
            if why:
                skipped[sname] = why
                continue
            found.append(AWQMapping(sname, tuple(balance)))
    return found, skipped


def _incompatible(smooth: nn.Module, balance: list[nn.Module]) -> str | None:
    if not all(isinstance(b, nn.Linear) for b in balance):
        return "balance layers must be nn.Linear"
    ins = {b.in_features for b in balance}
    if len(ins) != 1:
        return f"balance layers disagree on in-features {sorted(ins)}"
    k = ins.pop()
    if isinstance(smooth, nn.Linear):
        if smooth.out_features != k:   # e.g. v_proj -> o_proj under grouped-query attention
            return f"out-features {smooth.out_features} != balance in-features {k}"
        return None
    w = getattr(smooth, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() != k:
        return f"not a Linear or a norm with a [{k}] weight"
    return None


# ----------------------------------------------------------------------------- 2. search

def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratios: torch.Tensor
                     ) -> torch.Tensor:
    """[C, K] scales, one row per ratio: x_mean^r (/ w_mean^(1-r) with duo scaling),
    normalised by sqrt(max * min) so the scales stay centred around 1."""
    r = ratios.view(-1, 1).to(x_mean.device, torch.float32)
    x = x_mean.float().view(1, -1)
    if w_mean is None:
        s = x.pow(r).clamp(min=1e-4)
    else:
        s = (x.pow(r) / (w_mean.float().view(1, -1).pow(1 - r) + 1e-4)).clamp(min=1e-4)
    return s / (s.amax(1, keepdim=True) * s.amin(1, keepdim=True)).sqrt()


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Duo scaling's w_mean [K]: |w| relative to its group's max, averaged over all rows."""
    total, rows = 0.0, 0
    for w in weights:       # one Linear at a time: no concatenated fp32 copy
        g = w.float().abs().view(-1, group_size)
        g = g / (g.amax(1, keepdim=True) + 1e-6)
        total = total + g.view(w.shape).sum(0)
        rows += w.shape[0]
    return total / rows


@step("awq search")
def search_scales(x_mean: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                  args: QuantArgs, scale_dtype: torch.dtype, n_grid: int = 20,
                  duo_scaling: bool = False
                  ) -> tuple[torch.Tensor, float | None, torch.Tensor, float]:
    """Best scales for the balance weights [N_i, K] reading activations x [T, K]:
    (scales [K] fp32, best ratio or None when no candidate beats round-to-nearest,
    errors over the grid [n_grid], round-to-nearest error).

    With duo scaling r = 0 is a weight-only scaling, not s = 1, so s = 1 is added as an extra
    candidate: the result is never worse than round-to-nearest on the sampled tokens."""
    ratios = torch.arange(n_grid, dtype=torch.float32) / n_grid
    w_mean = weight_mean(weights, args.group_size) if duo_scaling else None
    S = candidate_scales(x_mean, w_mean, ratios)
    if duo_scaling:
        S = torch.cat([torch.ones_like(S[:1]), S])
    # the balance weights read the same x: one stacked call (rows are independent), so the
    # CPU path's X^T X is formed once per mapping and the GPU kernel launched once
    errs = awq_grid_errors(x, torch.cat(weights) if len(weights) > 1 else weights[0], S, args,
                           scale_dtype).double().cpu()
    rtn = float(errs[0])
    if duo_scaling:
        S, errs = S[1:], errs[1:]
    best = int(torch.argmin(errs))
    if not errs[best] < rtn:
        return torch.ones_like(S[0]), None, errs.float(), rtn
    return S[best], float(ratios[best]), errs.float(), rtn


@torch.no_grad()
def apply_scales(smooth: nn.Module, balance: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold s into the layers: smooth's output / s (rows of a Linear; a norm's affine
    parameters, w * x or Gemma's (1 + w) * x: fold.divide_norm_output), balance Linears' input
    columns * s. A float no-op on the model's output."""
    s = s.float().to(smooth.weight.device)
    if isinstance(smooth, nn.Linear):
        w = smooth.weight
        w.copy_((w.float() / s.view(-1, 1)).to(w.dtype))
        if smooth.bias is not None:
            smooth.bias.copy_((smooth.bias.float() / s).to(smooth.bias.dtype))
    else:
        divide_norm_output(smooth, s, hint="leave it out of the AWQ mappings")
    for lin in balance:
        lin.weight.copy_((lin.weight.float() * s.to(lin.weight.device)).to(lin.weight.dtype))


# ----------------------------------------------------------------------------- 4. clip, quantize

@torch.no_grad()
@step("quantize")
def quantize_linear(lin: nn.Linear, args: QuantArgs, scale_dtype: torch.dtype,
                    lo: torch.Tensor | None = None, hi: torch.Tensor | None = None,
                    storage=None) -> QuantizedWeight:
    """Quantize lin.weight group-wise (min/max, or the given clipped range), write the
    dequantized values back, return the integers."""
    w = lin.weight.float()
    if lo is None:
        g = w.view(w.shape[0], -1, args.group_size)
        lo, hi = g.amin(-1), g.amax(-1)
    scale, zp = qparams_from_minmax(lo, hi, args, scale_dtype)
    q = quantize_ref(w, scale, zp, args)
    lin.weight.copy_(dequantize_ref(q, scale, zp, lin.weight.dtype))
    storage = storage or q.device
    return QuantizedWeight(q.to(storage), scale.to(scale_dtype).to(storage),
                           None if zp is None else zp.to(torch.int8).to(storage), args)


# ----------------------------------------------------------------------------- 1. statistics

class _InputStats:
    """Per distinct Linear input: sum |x| per channel over all tokens, and a token sample."""

    def __init__(self, picks: list[torch.Tensor]):
        self.picks = picks             # per batch: indices of the sampled real tokens
        self.abs_sum = None
        self.n = 0
        self.samples: list[torch.Tensor] = []

    def add(self, x2d: torch.Tensor):
        b = len(self.samples)
        s = x2d.abs().sum(0, dtype=torch.float32)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += x2d.shape[0]
        self.samples.append(x2d[self.picks[b].to(x2d.device)])

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.samples) if len(self.samples) > 1 else self.samples[0]


def _token_picks(inputs, total: int, seed: int) -> list[torch.Tensor]:
    """Sampled real-token indices per batch, proportional to each batch's token count."""
    gen = torch.Generator().manual_seed(seed)
    counts = [int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
              for h, m in zip(inputs.hidden, inputs.token_masks)]
    all_tokens = sum(counts)
    picks = []
    for c in counts:
        k = c if total >= all_tokens else max(1, round(total * c / all_tokens))
        picks.append(torch.randperm(c, generator=gen)[:k].sort().values)
    return picks


def collect_input_stats(layer: nn.Module, linears: dict[str, nn.Linear], inputs,
                        search_tokens: int, seed: int = 0) -> dict[str, _InputStats]:
    """One replay of the batches; {Linear full name: stats of its input} (shared objects for
    Linears reading the same tensor, e.g. q/k/v)."""
    from ..loop.hooks import run_with_linear_inputs, tokens_of

    picks = _token_picks(inputs, search_tokens, seed)
    stats: dict[str, _InputStats] = {}

    def add(lead, x, mask):
        stats.setdefault(lead, _InputStats(picks)).add(tokens_of(x, mask))

    groups = run_with_linear_inputs(layer, linears, inputs, add)
    return {m: stats[lead] for lead, members in groups.items() for m in members}


# ----------------------------------------------------------------------------- the method

@dataclass(frozen=True)
class AWQ(Method):
    """AWQ for the 4-bit group schemes (W4A16_ASYM by default). Alone it searches and applies
    the scales, then quantizes with the clipping search (unless clip=False); before GPTQ,
    [AWQ(), GPTQ()], it only scales and GPTQ quantizes the scaled layer.
    duo_scaling: s = x_mean^r / w_mean^(1-r) (llm-compressor's default) instead of x_mean^r;
    n_grid: the grid of r; search_tokens: tokens sampled from the calibration set for the
    searches."""
    clip: bool = True
    duo_scaling: bool = False
    n_grid: int = 20
    search_tokens: int = 8192
    rescales = True

    def __post_init__(self):
        for name in ("clip", "duo_scaling"):
            check_type(name, getattr(self, name), bool, "pass True or False")
        check_int("n_grid", self.n_grid, 1, "pass a positive number of grid points (e.g. 20)")
        check_int("search_tokens", self.search_tokens, 1, "pass a positive number of tokens")

    def check(self, scheme):
        w = scheme.weights
        if w.is_fp4 and scheme.input_activations is None:
            return                  # NVFP4A16, MXFP4A16
        if w.type != "int" or w.strategy != "group" or w.num_bits != 4:
            raise ValueError(f"AWQ is for the 4-bit group schemes (W4A16_ASYM, W4A16, W4A8, "
                             f"NVFP4A16, MXFP4A16), not {scheme.name}")

    def check_model(self, model, linears):
        """AWQ's (smoothing layer -> Linears) mappings are Llama-style module names
        (DEFAULT_MAPPINGS); in a model without them (OPT, GPT-NeoX) AWQ would only round."""
        from ..loop.targets import find_decoder_layers
        layers, prefix = find_decoder_layers(model)
        if not len(layers) or find_mappings(layers[0], DEFAULT_MAPPINGS)[0]:
            return
        wanted = "; ".join(f"{s} -> {'/'.join(b)}" for s, b in DEFAULT_MAPPINGS)
        raise ValueError(
            f"AWQ cannot run on {type(model).__name__}: it scales (smoothing layer -> Linears) "
            f"pairs found by Llama-style module names ({wanted}), and {prefix}.0 has none of "
            "them. Use GPTQ ([tritonpress.GPTQ()]), which needs no such pairs, for the same "
            "W4A16 schemes")

    @torch.no_grad()
    def rescale(self, layer_idx, layer, prefix, inputs, ctx):
        return awq_scale(layer_idx, layer, prefix, inputs, ctx, n_grid=self.n_grid,
                         duo_scaling=self.duo_scaling, search_tokens=self.search_tokens)[0]

    @torch.no_grad()
    def __call__(self, layer_idx, layer, prefix, inputs, ctx):
        return awq(layer_idx, layer, prefix, inputs, ctx, n_grid=self.n_grid,
                   duo_scaling=self.duo_scaling, clip=self.clip,
                   search_tokens=self.search_tokens)


@torch.no_grad()
def awq_scale(layer_idx, layer, prefix, inputs, ctx, *, mappings=None, n_grid: int = 20,
              duo_scaling: bool = False, search_tokens: int = 8192, seed: int = 0):
    """Steps 1-3 on one decoder layer: the statistics, the scale search and its application
    for every mapping whose balance Linears are all in ctx.linears. Returns (infos, the input
    statistics of each Linear, with the scaled inputs)."""
    args = ctx.scheme.weights                   # grouped ints: AWQ.check
    for name, lin in ctx.linears.items():
        if lin.in_features % args.group_size:
            raise ValueError(f"{name}: in-features {lin.in_features} not a multiple of group "
                             f"size {args.group_size}; choose a group size dividing it")
    found, _ = find_mappings(layer, mappings or DEFAULT_MAPPINGS)
    modules = dict(layer.named_modules())
    full = {n: f"{prefix}.{n}" for n in modules}
    infos: dict[str, dict] = {}

    stats = collect_input_stats(layer, ctx.linears, inputs, search_tokens, seed + layer_idx)
    for name in ctx.linears:
        if name not in stats:
            raise RuntimeError(f"{name} was not called during the calibration forward: "
                               "no inputs to calibrate it with (add it to ignore)")

    for m in found:
        if not all(full[b] in ctx.linears for b in m.balance):
            continue      # a balance Linear stays unquantized: nothing to protect
        st = stats[full[m.balance[0]]]
        balance = [modules[b] for b in m.balance]
        s, ratio, errs, rtn = search_scales(st.mean, st.x, [b.weight for b in balance], args,
                                            ctx.scale_dtype, n_grid, duo_scaling)
        if ratio is not None:
            apply_scales(modules[m.smooth], balance, s)
            st.samples = [x / s.to(x.device, x.dtype) for x in st.samples]
        for b in m.balance:
            infos.setdefault(full[b], {}).update(
                smooth=full[m.smooth], ratio=ratio,
                search_gain=min(float(errs.min()), rtn) / rtn if rtn > 0 else 1.0)
    return infos, stats


@torch.no_grad()
def awq(layer_idx, layer, prefix, inputs, ctx, *, mappings=None, n_grid: int = 20,
        duo_scaling: bool = False, clip: bool = True, search_tokens: int = 8192,
        seed: int = 0):
    """AWQ on one decoder layer: awq_scale, then the clipping search (unless clip=False) and
    the quantization of every Linear in ctx.linears."""
    t0 = time.perf_counter()
    infos, stats = awq_scale(layer_idx, layer, prefix, inputs, ctx, mappings=mappings,
                             n_grid=n_grid, duo_scaling=duo_scaling,
                             search_tokens=search_tokens, seed=seed)
    t_search = time.perf_counter() - t0
    args = ctx.scheme.weights
    quantize = _quantize_fp4 if args.is_fp4 else _quantize_int
    qweights, qinfos = quantize(ctx.linears, stats, args, clip, ctx.scale_dtype, inputs.storage)
    for name in ctx.linears:
        infos.setdefault(name, {}).update(qinfos[name], method="awq")
    secs = round(time.perf_counter() - t0, 4)
    for name in ctx.linears:
        infos[name].update(search_seconds=round(t_search, 4), layer_seconds=secs)
    return qweights, infos


def _clip_ranges(names, linears, stats, args, scale_dtype) -> dict[str, tuple]:
    """{name: (lo, hi, shrink)} of the clip search, one stacked search per distinct input
    (q/k/v, gate/up share their X^T X blocks; rows are independent)."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(stats[n]), []).append(n)
    out = {}
    for members in groups.values():
        w = torch.cat([linears[n].weight for n in members])
        lo, hi, f = clip_search(w, group_gram(stats[members[0]].x, args.group_size), args,
                                scale_dtype)
        row = 0
        for n in members:
            r = slice(row, row + linears[n].out_features)
            row = r.stop
            out[n] = (lo[r], hi[r], f[r])
    return out


def _quantize_int(linears, stats, args, clip, scale_dtype, storage) -> tuple[dict, dict]:
    """The integer grids: each group's range shrunk by the clipping search (_clip_ranges),
    then quantize_linear."""
    clipped = _clip_ranges([n for n in linears if clip and not matches(n, CLIP_SKIP)],
                           linears, stats, args, scale_dtype)
    qweights, infos = {}, {}
    for name, lin in linears.items():
        lo, hi, f = clipped.get(name, (None, None, None))
        infos[name] = {} if f is None else {"clip_mean_shrink": float(f.mean())}
        qweights[name] = quantize_linear(lin, args, scale_dtype, lo, hi, storage)
    return qweights, infos


def _quantize_fp4(linears, stats, args, clip, scale_dtype, storage) -> tuple[dict, dict]:
    """The fp4 grids: each group's stored scale by rtn.fp4_scale_search under the X^T X blocks
    of the scaled inputs (the format's own scale without clip, or where no candidate beats it),
    NVFP4's global scale shared by the fused Linears; the dequantized weights written back."""
    gscales = nvfp4_global_scales({n: lin.weight for n, lin in linears.items()}) \
        if args.strategy == "tensor_group" else {}
    qweights, infos = {}, {}
    for name, lin in linears.items():
        w = lin.weight
        gs = gscales.get(name)
        hb = (group_gram(stats[name].x, args.group_size)
              if clip and not matches(name, CLIP_SKIP) else None)
        stored, moved = fp4_scale_search(w, hb, args, gs)
        qw = QuantizedWeight(fp4.quantize_fp4_values_ref(w, stored, gs, args), stored, None,
                             args, gs)
        lin.weight.copy_(qw.dequantize().to(w.dtype))
        qweights[name] = qw.cpu() if torch.device(storage).type == "cpu" else qw
        infos[name] = {"clipped_groups": moved}
    return qweights, infos
