"""Quantization schemes as users know them, in compressed-tensors terms.

A scheme says how weights are stored and how activations are quantized at inference.
Presets follow llm-compressor's names; its aliases are accepted too.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantArgs:
    """One tensor's quantization, mirroring compressed-tensors' QuantizationArgs."""
    num_bits: int
    type: str               # "int" or "float" (8 bits: e4m3; 4 bits: e2m1)
    symmetric: bool
    strategy: str           # "group", "channel", "tensor", "tensor_group" (group scales under
                            # a global one: NVFP4), "block" (weights) or "token" (activations)
    group_size: int | None = None
    dynamic: bool | str = False           # "local": group scales dynamic, global one static
    block_structure: tuple[int, int] | None = None   # strategy "block": [rows, cols]
    scale_dtype: str | None = None        # stored scale dtype: "float8_e4m3fn" (NVFP4),
                                          # "uint8" (MX e8m0 exponents); None: the model's

    @property
    def qmin(self) -> float:
        return -self.qmax if self.type == "float" else float(-(2 ** (self.num_bits - 1)))

    @property
    def qmax(self) -> float:
        if self.type == "float":
            return 6.0 if self.num_bits == 4 else 448.0
        return float(2 ** (self.num_bits - 1) - 1)

    @property
    def is_fp4(self) -> bool:
        return self.type == "float" and self.num_bits == 4

    @property
    def is_mx(self) -> bool:
        """MX scales (power-of-two e8m0 exponents, uint8), as compressed-tensors tells them."""
        return self.type == "float" and self.scale_dtype == "uint8" and self.group_size == 32


@dataclass(frozen=True)
class Scheme:
    name: str
    weights: QuantArgs
    input_activations: QuantArgs | None = None
    sparsity_24: bool = False
    ignore: tuple[str, ...] = ("lm_head",)


_INT4_SYM = QuantArgs(4, "int", True, "group", 128)
_INT4_ASYM = QuantArgs(4, "int", False, "group", 128)
_INT8_CHAN = QuantArgs(8, "int", True, "channel")
_FP8_CHAN = QuantArgs(8, "float", True, "channel")
_INT8_TOKEN = QuantArgs(8, "int", True, "token", dynamic=True)
_FP8_TOKEN = QuantArgs(8, "float", True, "token", dynamic=True)

# compressed-tensors 0.19's newer presets, field for field
_FP8_BLOCK = QuantArgs(8, "float", True, "block", block_structure=(128, 128))
_FP8_GROUP128 = QuantArgs(8, "float", True, "group", 128, dynamic=True)
_NVFP4 = QuantArgs(4, "float", True, "tensor_group", 16, scale_dtype="float8_e4m3fn")
_NVFP4_ACT = QuantArgs(4, "float", True, "tensor_group", 16, dynamic="local",
                       scale_dtype="float8_e4m3fn")     # group scales dynamic, global static
_MXFP4 = QuantArgs(4, "float", True, "group", 32, scale_dtype="uint8")
_MXFP4_ACT = QuantArgs(4, "float", True, "group", 32, dynamic=True, scale_dtype="uint8")

PRESETS: dict[str, Scheme] = {
    "W4A16": Scheme("W4A16", _INT4_SYM),
    "W4A16_ASYM": Scheme("W4A16_ASYM", _INT4_ASYM),
    "W8A8_INT8": Scheme("W8A8_INT8", _INT8_CHAN, _INT8_TOKEN),
    "W8A8_FP8": Scheme("W8A8_FP8", _FP8_CHAN, _FP8_TOKEN),
    "W8A8_FP8_24": Scheme("W8A8_FP8_24", _FP8_CHAN, _FP8_TOKEN, sparsity_24=True),
    "FP8_BLOCK": Scheme("FP8_BLOCK", _FP8_BLOCK, _FP8_GROUP128),
    "NVFP4A16": Scheme("NVFP4A16", _NVFP4),
    "NVFP4": Scheme("NVFP4", _NVFP4, _NVFP4_ACT),
    "MXFP4A16": Scheme("MXFP4A16", _MXFP4),
    "MXFP4": Scheme("MXFP4", _MXFP4, _MXFP4_ACT),
    "W4A8": Scheme("W4A8", _INT4_SYM, _INT8_TOKEN),
    "W4AFP8": Scheme("W4AFP8", _INT4_SYM, _FP8_TOKEN),
}
ALIASES = {"W8A8": "W8A8_INT8", "FP8_DYNAMIC": "W8A8_FP8", "FP8": "W8A8_FP8",
           "INT8": "W8A8_INT8", "W4A16_SYM": "W4A16", "2:4_FP8": "W8A8_FP8_24"}


# how a scheme's dynamic per-token activation quantization is simulated (kernels/quant.py):
# as vLLM's kernels round (int8 scale absmax / 127), or compressed-tensors' fake quantization
# (absmax / 127.5)
ACT_SIMS = ("vllm", "compressed-tensors")


def get_scheme(name: str | Scheme, group_size: int | None = None, symmetric: bool | None = None,
               ignore: list[str] | tuple[str, ...] | None = None) -> Scheme:
    """Look up a preset by name (or alias) and apply the user's overrides."""
    if isinstance(name, Scheme):
        scheme = name
    elif not isinstance(name, str):
        raise TypeError(f"scheme={name!r} ({type(name).__name__}): pass a scheme name such as "
                        f"'W4A16' (one of {', '.join(PRESETS)}) or a Scheme")
    else:
        key = name.strip().upper().replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in PRESETS:
            choices = ", ".join(list(PRESETS) + list(ALIASES))
            raise ValueError(f"unknown scheme {name!r}: choose one of {choices}")
        scheme = PRESETS[key]
    w = scheme.weights
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            raise TypeError(f"group_size={group_size!r} ({type(group_size).__name__}): pass a "
                            "whole number of input columns per scale, e.g. 64 or 128")
        if w.strategy != "group" or w.type != "int":
            what = (f"per {w.strategy}" if w.type == "int" else
                    f"in {w.type}{w.num_bits} with the format's fixed groups")
            raise ValueError(f"scheme {scheme.name} quantizes weights {what}; "
                             "--group-size applies only to W4A16, W4A8 and W4AFP8")
        if group_size <= 0:
            raise ValueError(f"group size must be positive, got {group_size}")
        w = dataclasses.replace(w, group_size=group_size)
    if symmetric is not None:
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric={symmetric!r}: pass True, False or None (the scheme's)")
        if w.type == "float" and not symmetric:
            raise ValueError(f"{w.type}{w.num_bits} weights are symmetric only")
        w = dataclasses.replace(w, symmetric=symmetric)
    scheme = dataclasses.replace(scheme, weights=w)
    if ignore is not None:
        if isinstance(ignore, str) or not all(isinstance(i, str) for i in ignore):
            raise TypeError(f"ignore={ignore!r}: pass a list of module names or 're:' patterns, "
                            "e.g. ['lm_head']")
        scheme = dataclasses.replace(scheme, ignore=tuple(ignore))
    return scheme


def matches(name: str, patterns: Iterable[str], module=None) -> bool:
    """The one name matcher for targets and ignore lists (compressed-tensors' rules, which
    vLLM and llm-compressor follow, plus dotted suffixes): a pattern matches a module's full
    name if it is "re:<regex>" that re.match-es it, the name itself, a dotted suffix of it
    ("lm_head", "mlp.down_proj"), or (given the module) the name of a class it derives from
    ("Linear")."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
        elif module is not None and any(c.__name__ == p for c in type(module).__mro__):
            return True
    return False
