"""Which modules a run works on: the decoder layers, the Linears to compress in each (the
scheme's targets minus its ignore list, by ``schemes.matches``), and the group-size check."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..schemes import Scheme, matches


def find_decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers and their full module name prefix."""
    for path in ("model.layers", "model.language_model.layers", "model.decoder.layers"):
        mod = model
        for part in path.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if isinstance(mod, nn.ModuleList):
            return mod, path
    raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers; "
                     "this pipeline handles decoder-only transformers models laid out like Llama")


def target_linears(layer: nn.Module, prefix: str, targets: Iterable[str] | None,
                   ignore: Iterable[str]) -> dict[str, nn.Linear]:
    """Linears of one layer to compress: all of them (targets None / "Linear") or those
    matching `targets`, minus those matching `ignore`; keyed by full name."""
    targets = None if targets is None else list(targets)
    out = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        full = f"{prefix}.{name}"
        if targets is not None and not matches(full, targets, mod):    # "Linear": all
            continue
        if matches(full, ignore):
            continue
        out[full] = mod
    return out


def check_group_sizes(model: nn.Module, scheme: Scheme, targets, ignore,
                      partial_last_group: bool = False) -> None:
    """Group quantization needs in-features divisible by the group size: say which layers don't."""
    w = scheme.weights
    if w.strategy != "group" or partial_last_group:
        return
    layers, prefix = find_decoder_layers(model)
    bad = {}
    for i, layer in enumerate(layers):
        for name, lin in target_linears(layer, f"{prefix}.{i}", targets, ignore).items():
            if lin.in_features % w.group_size:
                bad[name] = lin.in_features
    if bad:
        shown = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        suffixes = sorted({k.split(".")[-1] for k in bad})
        raise ValueError(
            f"group size {w.group_size} does not divide the in-features of {len(bad)} Linears: "
            f"{shown}{more}. Choose a group size dividing them, or leave them unquantized "
            f"(ignore={suffixes}), or pass partial_last_group=True (the last group is shorter; "
            "not every inference kernel accepts that)")
