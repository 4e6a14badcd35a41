"""Mixture-of-Experts: every routed expert's matrices as nn.Linears the loop can compress.

transformers 5 keeps a layer's routed experts as fused 3-D parameters (`gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]; transposed, interleaved and with biases for gpt-oss),
in a module its `use_experts_implementation` marks with its layout (is_transposed,
is_concatenated, has_bias). `linearize_experts` replaces each such module by `LinearExperts`:
one module per expert holding gate/up/down nn.Linears named as the model's original
checkpoints name them (transformers' conversion mapping: `gate_proj`/`up_proj`/`down_proj`,
Mixtral's `w1`/`w3`/`w2`), so that hooks, methods and the checkpoint writer see ordinary
Linears, and the checkpoint holds per-expert tensors, as vLLM's MoE loaders and llm-compressor
expect. The forward is the fused module's own eager routing, expert by expert.

Calibration (`every_token`): the statistics come from the tokens routed to each expert, or
from every token through every expert (llm-compressor's default) while the layer's output
stays the routed one. Only statistics passes (`statistics_pass`, whose outputs nothing reads)
send every token everywhere, and they skip the experts' down projections' matmuls (their
inputs are what is wanted); the passes whose outputs are used (propagation, evaluation) run
the routed tokens alone. The routers and the other leaf modules beside the experts (shared-expert
gates) stay unquantized and are listed in the checkpoint's ignore (`router_names`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused-experts layout: marked by use_experts_implementation, 3-D weights."""
    down = getattr(module, "down_proj", None)
    return (hasattr(module, "is_transposed") and hasattr(module, "is_concatenated")
            and isinstance(down, torch.Tensor) and down.dim() == 3
            and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor))


def expert_names(model) -> tuple[str, str, str]:
    """(gate, up, down) Linear names of one expert in the model's original checkpoints, read
    from transformers' conversion mapping (its per-expert source patterns)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        mapping = get_checkpoint_conversion_mapping(model.config.model_type) or []
    except Exception:                   # an older transformers, or no mapping: the common names
        return DEFAULT_NAMES
    gate_up = down = None
    for conv in mapping:
        target = str(getattr(conv, "target_patterns", ""))
        sources = [str(s) for s in getattr(conv, "source_patterns", [])]
        leaves = [m.group(1) for s in sources if (m := re.search(r"experts\.\*\.(\w+)\.weight", s))]
        if "gate_up_proj" in target and len(leaves) == 2:
            gate_up = leaves
        elif "down_proj" in target and len(leaves) == 1:
            down = leaves[0]
    return (*gate_up, down) if gate_up and down else DEFAULT_NAMES


class Expert(nn.Module):
    """One expert: its gate, up and down projections (named by `names`)."""

    def __init__(self, names, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.names = names
        for n, lin in zip(names, (gate, up, down)):
            self.add_module(n, lin)

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return tuple(getattr(self, n) for n in self.names)


class LinearExperts(nn.ModuleList):
    """The fused experts of one MoE block as one Expert of nn.Linears each, with the fused
    module's forward (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])."""

    def __init__(self, fused: nn.Module, names=DEFAULT_NAMES):
        gu, dn = fused.gate_up_proj.data, fused.down_proj.data
        if fused.is_transposed:                     # [E, in, out] -> [E, out, in]
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        E, two_i = gu.shape[0], gu.shape[1]
        if fused.is_concatenated:                   # [gate; up]
            gate_w, up_w = gu[:, :two_i // 2], gu[:, two_i // 2:]
        else:                                       # gate0, up0, gate1, up1, ...
            gate_w, up_w = gu[:, 0::2], gu[:, 1::2]
        gb = ub = db = None
        if getattr(fused, "has_bias", False):
            b = fused.gate_up_proj_bias.data
            gb, ub = (b[:, :two_i // 2], b[:, two_i // 2:]) if fused.is_concatenated else \
                (b[:, 0::2], b[:, 1::2])
            db = fused.down_proj_bias.data
        experts = []
        for e in range(E):
            lins = [_linear(w[e], None if bias is None else bias[e])
                    for w, bias in ((gate_w, gb), (up_w, ub), (dn, db))]
            experts.append(Expert(names, *lins))
        super().__init__(experts)
        self.concatenated = bool(fused.is_concatenated)
        self.every_token = False        # calibration: every token through every expert
        self.statistics_only = False    # in a statistics pass: nothing reads the output
        self.routed = torch.zeros(E, dtype=torch.long)   # tokens routed to each expert
        self.tokens = 0                                   # tokens through the block
        object.__setattr__(self, "_apply_gate", fused._apply_gate)  # the activation, not a child
        for n in list(fused._parameters):           # the fused copies are not needed any more
            delattr(fused, n)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
            self.routed += mask.sum(dim=(1, 2)).to(self.routed.device)
            self.tokens += hidden_states.shape[0]
        stats = self.statistics_only
        everyone = self.every_token and stats
        for e, expert in enumerate(self):
            pos, tok = torch.where(mask[e])
            if not len(tok) and not everyone:
                continue
            gate, up, down = expert.projections()
            x = hidden_states if everyone else hidden_states[tok]
            g, u = gate(x), up(x)
            gu = torch.cat([g, u], -1) if self.concatenated else torch.stack([g, u], -1).flatten(-2)
            h = self._apply_gate(gu)
            if stats:       # the statistics hooks see down's input; its matmul is not needed
                _pre_hooks_only(down, h)
                continue
            y = down(h)
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def _pre_hooks_only(module: nn.Module, x: torch.Tensor) -> None:
    """Call `module` as far as its forward pre-hooks (what statistics hooks are), not its
    forward."""
    for hook in module._forward_pre_hooks.values():
        hook(module, (x,))


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    # a contiguous copy of its own: a slice (or, transposed, a view) of the fused tensor would
    # keep all of it alive, and run strided
    own = dict(memory_format=torch.contiguous_format)
    lin.weight = nn.Parameter(w.detach().clone(**own), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().clone(**own), requires_grad=False)
    return lin


def linearize_experts(model: nn.Module) -> dict[str, int]:
    """Replace every fused-experts module by LinearExperts, in place (parameters on the meta
    device stay there: a streamed skeleton); {module name: experts} of every LinearExperts in
    the model, those made before included."""
    names = expert_names(model)
    found = [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]
    for name, fused in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LinearExperts(fused, names))
    return {n: len(m) for n, m in moe_blocks(model).items()}


def moe_blocks(model: nn.Module) -> dict[str, LinearExperts]:
    """{name of each LinearExperts: it} (its block is the parent module)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}


def router_names(model: nn.Module) -> list[str]:
    """The leaf modules beside the experts in each MoE block (the router, a shared-expert
    gate): they stay unquantized, named in the checkpoint's ignore as llm-compressor does."""
    out = []
    for name, experts in moe_blocks(model).items():
        block = name.rpartition(".")[0]
        parent = model.get_submodule(block)
        for child, mod in parent.named_children():
            if mod is not experts and not list(mod.children()) and \
                    any(p.dim() == 2 for p in mod.parameters(recurse=False)):
                out.append(f"{block}.{child}" if block else child)
    return out


@contextmanager
def every_token(model: nn.Module, on: bool = True):
    """Within the block, every token goes through every expert (for the statistics); the
    layers' outputs stay the routed ones. The routed-token counts restart at zero."""
    experts = list(moe_blocks(model).values())
    for m in experts:
        m.every_token = on
        m.routed.zero_()
        m.tokens = 0
    try:
        yield
    finally:
        for m in experts:
            m.every_token = False


@contextmanager
def statistics_pass(module: nn.Module):
    """Within, the MoE blocks in `module` compute statistics only: every token through every
    expert when every_token is on, no down-projection matmuls, a zero output. Only for passes
    that read nothing after the MoE block (loop.hooks.run_with_linear_inputs: the block is the
    last thing in a decoder layer with Linears to compress)."""
    blocks = [m for m in module.modules() if isinstance(m, LinearExperts)]
    for m in blocks:
        m.statistics_only = True
    try:
        yield
    finally:
        for m in blocks:
            m.statistics_only = False


def checkpoint_names(model: nn.Module):
    """name -> the name the model's original checkpoints use (transformers' renamings
    reversed, e.g. Mixtral's `mlp.` -> `block_sparse_moe.`), or None where there are none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        mapping = get_checkpoint_conversion_mapping(model.config.model_type) or []
    except Exception:
        return None
    pairs = []
    for conv in mapping:
        if isinstance(conv, WeightRenaming):
            for src, dst in zip(conv.source_patterns, conv.target_patterns):
                pairs.append((str(dst), str(src)))   # loading maps src -> dst; saving reverses
    if not pairs:
        return None

    def rename(name: str) -> str:
        for dst, src in pairs:
            if re.search(re.escape(dst), name):
                name = name.replace(dst, src)
        return name
    return rename


def report(model: nn.Module, infos: dict, data_free: bool = False) -> dict:
    """Per MoE block: experts, how many were compressed by the method and how many fell back
    (too few tokens), the smallest share of the block's tokens routed to one expert, and the
    fewest tokens any expert's statistics saw."""
    out = {}
    for block, experts in moe_blocks(model).items():
        # per expert: the infos of its three Linears
        got = [[infos.get(f"{block}.{e}.{n}", {}) for n in experts[e].names]
               for e in range(len(experts))]
        fell = sum(any(i.get("fallback") for i in ex) for ex in got)
        share = experts.routed.float() / max(experts.tokens, 1)
        tokens = [i["tokens"] for ex in got for i in ex if "tokens" in i]
        out[block] = {"experts": len(experts),
                      "compressed": sum(any(ex) for ex in got) - fell,
                      "fell_back": fell,
                      "least_routed_share": None if data_free else round(float(share.min()), 4),
                      "fewest_tokens": min(tokens) if tokens else None}
    return out


def stored_names(model: nn.Module, tensors):
    """in-memory name -> the name `tensors` (a checkpoint's) stores it under: the original
    checkpoints' names (checkpoint_names), or for experts the common gate/up/down_proj names
    llm-compressor writes for every family (vLLM maps both)."""
    if not moe_blocks(model):
        return lambda name: name
    rename = checkpoint_names(model) or (lambda name: name)
    names = next(iter(moe_blocks(model).values()))[0].names
    alias = {own: common for own, common in zip(names, DEFAULT_NAMES) if own != common}

    def stored(name: str) -> str:
        s = rename(name)
        head, _, leaf = s.rpartition(".")
        if leaf in alias and ".experts." in head and not _stored(tensors, s):
            return f"{head}.{alias[leaf]}"
        return s
    return stored


def _stored(tensors, name: str) -> bool:
    """Whether `tensors` hold the Linear `name`'s weight, plain or compressed."""
    return any(f"{name}.{k}" in tensors for k in ("weight", "weight_scale", "weight_packed"))
