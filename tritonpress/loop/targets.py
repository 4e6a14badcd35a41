"""Which modules a run works on: the decoder layers, the Linears to compress in each (the
scheme's targets minus its ignore list, by ``schemes.matches``), and the group-size check."""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..schemes import Scheme, matches


SUPPORTED = ("decoder-only causal LMs laid out like Llama, OPT or GPT-NeoX: a ModuleList of "
             "decoder blocks under the base model (model.layers, model.decoder.layers, "
             "gpt_neox.layers, ...) holding nn.Linear projections")


def find_decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder layers and their full module name ("model.layers", "model.decoder.layers",
    "gpt_neox.layers", "model.language_model.layers", ...).

    The rule, no list of architectures: under the text decoder (transformers'
    ``get_decoder()``, else ``base_model``), the outermost ModuleList; if several, the first
    as long as the config's num_hidden_layers. ValueError, naming the model's class and why,
    when there is none or its blocks hold no nn.Linear (GPT-2's Conv1D)."""
    names = {id(m): n for n, m in model.named_modules()}
    root = _text_decoder(model)
    inside = names.get(id(root), "")
    found: list[tuple[str, nn.ModuleList]] = []
    for name, mod in root.named_modules(prefix=inside):
        if not isinstance(mod, nn.ModuleList):
            continue
        if any(name.startswith(f + ".") for f, _ in found):
            continue                    # nested in decoder blocks: MoE experts, ...
        found.append((name, mod))
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    same = [(n, m) for n, m in found if len(m) == n_layers]
    if not found:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers or "
                         f"elsewhere: no ModuleList of decoder blocks under "
                         f"{'model.' + inside if inside else 'the model'}. tritonpress handles "
                         f"{SUPPORTED}")
    prefix, layers = (same or found)[0]
    if not any(isinstance(m, nn.Linear) for m in layers.modules()):
        kinds = sorted({type(m).__name__ for m in layers.modules() if _is_weighted_leaf(m)})
        held = "it is empty" if not len(layers) else \
            f"{len(layers)} {type(layers[0]).__name__} holding {', '.join(kinds) or 'no weights'}"
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers or "
                         f"elsewhere that tritonpress can compress: no nn.Linear layers under "
                         f"model.{prefix} ({held}). tritonpress handles {SUPPORTED}")
    return layers, prefix


def _text_decoder(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_decoder", None)
    try:
        root = get() if callable(get) else None
    except Exception:            # some heads raise when they have no decoder
        root = None
    if not isinstance(root, nn.Module):
        root = getattr(model, "base_model", None)
    return root if isinstance(root, nn.Module) else model


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _is_weighted_leaf(mod: nn.Module) -> bool:
    return not list(mod.children()) and any(p.dim() >= 2 for p in mod.parameters(recurse=False))


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
    if w.strategy not in ("group", "tensor_group", "block") or partial_last_group:
        return
    # FP8_BLOCK: its activations are quantized in groups of the block width (vLLM needs whole ones)
    gsize = w.block_structure[1] if w.strategy == "block" else w.group_size
    layers, prefix = find_decoder_layers(model)
    bad = {}
    for i, layer in enumerate(layers):
        for name, lin in target_linears(layer, f"{prefix}.{i}", targets, ignore).items():
            if lin.in_features % gsize:
                bad[name] = lin.in_features
    if bad:
        shown = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:6])
        more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
        suffixes = sorted({k.split(".")[-1] for k in bad})
        raise ValueError(
            f"group size {gsize} does not divide the in-features of {len(bad)} Linears: "
            f"{shown}{more}. Choose a group size dividing them, or leave them unquantized "
            f"(ignore={suffixes}), or pass partial_last_group=True (the last group is shorter; "
            "not every inference kernel accepts that)")
