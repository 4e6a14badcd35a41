"""Run a compressed-tensors checkpoint inside transformers on tritonpress's GEMMs.

    model, tokenizer = load_compressed("out/llama-W4A16", device="cuda")
    model.generate(...)

Reads config.json's quantization_config and the safetensors itself (the format is the one
llm-compressor writes; nothing of the writer's code is needed): every Linear a config group
targets becomes a CompressedLinear that keeps the compressed weight in its kernel layout and
calls kernels.gemm.linear; activations are quantized per token as the group's
input_activations say. Formats: float-quantized (fp8), int-quantized (int8), pack-quantized
(int4/int8 words, with or without packed zero points); 2:4 sparse fp8 stored dense or as
sparse-24-bitmask. The rest of the model loads as usual.

The compressed weights live where `device` says; move the model by loading it again, not with
model.to() (their tensors are not module parameters, so fp8/int8 data cannot be cast by it).
"""
from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from .kernels import gemm
from .kernels.gemm_sparse24 import is_24_sparse
from .schemes import QuantArgs, matches


class CompressedLinear(nn.Module):
    """A Linear whose weight stays compressed; forward runs the dispatched GEMM."""

    def __init__(self, weight: gemm.GemmWeight, bias: torch.Tensor | None):
        super().__init__()
        self.weight_c = weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight_c, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.weight_c.kind}")


# ----------------------------------------------------------------------------- the config

def read_quantization_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path}/config.json has no compressed-tensors quantization_config; "
                         "is this a compressed checkpoint?")
    return qc


def quant_args(d: dict | None) -> QuantArgs | None:
    """compressed-tensors QuantizationArgs (JSON) -> QuantArgs (checkpoint.quant_args_from_dict)."""
    from .checkpoint import quant_args_from_dict
    return None if d is None else quant_args_from_dict(d)


def _targeted(name, module, targets, ignore) -> bool:
    return matches(name, targets, module) and not matches(name, ignore or (), module)


# ----------------------------------------------------------------------------- tensors

class _Tensors:
    """Lazy access to the checkpoint's safetensors (one file or an index of shards)."""

    def __init__(self, path: str):
        from safetensors import safe_open
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        self.handles = [safe_open(os.path.join(path, f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def __contains__(self, key):
        return key in self.where

    def get(self, key):
        return self.where[key].get_tensor(key)

    def keys(self):
        return self.where.keys()


def unpack_words(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """pack-quantized int32 words [rows, ceil(cols*bits/32)] -> int8 [rows, cols] (signed)."""
    if 32 % bits:
        raise NotImplementedError(f"{bits}-bit pack-quantized weights are not supported "
                                  "(values straddle int32 words); use 4 or 8 bits")
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def unpack_bitmask_24(compressed: torch.Tensor, bitmask: torch.Tensor,
                     shape: tuple[int, int]) -> torch.Tensor:
    """sparse-24-bitmask -> dense [out, in]: bitmask bit j of byte k marks column 8k+j kept,
    the kept values listed row-major in `compressed`."""
    shifts = torch.arange(8, dtype=torch.int32)
    keep = ((bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(shape[0], -1)
    keep = keep[:, :shape[1]].bool()
    raw = compressed.view(torch.uint8) if compressed.element_size() == 1 else compressed
    dense = torch.zeros(shape, dtype=raw.dtype)
    dense[keep] = raw.reshape(-1)
    return dense.view(compressed.dtype)


def read_linear(t: _Tensors, name: str, wargs: QuantArgs):
    """(q [N, K] int8 or fp8, scale, zero point [N, ngroups] | None) of one Linear."""
    scale = t.get(f"{name}.weight_scale")
    zp = t.get(f"{name}.weight_zero_point") if f"{name}.weight_zero_point" in t else None
    if f"{name}.weight_packed" in t:                              # pack-quantized
        n, k = (int(v) for v in t.get(f"{name}.weight_shape").tolist())
        q = unpack_words(t.get(f"{name}.weight_packed"), k, wargs.num_bits)
        if zp is not None:                                        # packed along the out dim
            zp = unpack_words(zp.t().contiguous(), n, wargs.num_bits).t().contiguous()
        return q, scale, zp
    if f"{name}.compressed" in t:                                 # legacy sparse-24-bitmask
        shape = tuple(int(v) for v in t.get(f"{name}.shape").flatten().tolist())
        q = unpack_bitmask_24(t.get(f"{name}.compressed"), t.get(f"{name}.bitmask"), shape)
    else:                                                         # int- / float-quantized
        q = t.get(f"{name}.weight")
    if q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"{name}.weight is {q.dtype}: expected int8 or float8_e4m3fn values "
                        "in a compressed checkpoint")
    return q, scale, zp


# ----------------------------------------------------------------------------- loading

def _empty_model(config, dtype):
    from transformers import AutoModelForCausalLM
    try:
        from transformers.initialization import no_init_weights      # transformers 5
    except ImportError:                                              # pragma: no cover
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():   # every weight is overwritten from the checkpoint
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_compressed(path: str, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """(model, tokenizer) of a compressed-tensors checkpoint; tokenizer is None if absent."""
    from transformers import AutoConfig
    qc = read_quantization_config(path)
    if qc.get("kv_cache_scheme"):
        warnings.warn("kv_cache_scheme is ignored: the KV cache runs unquantized")
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format", "dense") not in ("dense", "sparse-24-bitmask"):
        raise NotImplementedError(f"sparsity format {sparsity['format']!r} is not supported: "
                                  "use dense or sparse-24-bitmask")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # ours to apply, not transformers' quantizer
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) \
        or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _empty_model(config, dtype)
    tensors = _Tensors(path)
    device = torch.device(device)

    groups = list((qc.get("config_groups") or {}).values())
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        group = next((g for g in groups
                      if _targeted(name, module, g.get("targets", []), qc.get("ignore"))), None)
        stored = f"{name}.weight_scale" in tensors
        if group is None:
            if stored:
                raise ValueError(f"{name} has a weight_scale but no config group targets it")
            continue
        if not stored:
            raise ValueError(f"config targets {name} but the checkpoint has no "
                             f"{name}.weight_scale")
        wargs, act = quant_args(group.get("weights")), quant_args(group.get("input_activations"))
        q, scale, zp = read_linear(tensors, name, wargs)
        declared = sparsity.get("sparsity_structure") == "2:4" and \
            _targeted(name, module, sparsity.get("targets", []), sparsity.get("ignore"))
        # 2:4 runs the sparse kernel whether the config says so or the fp8 values show it
        sparse24 = act is not None and q.dtype == torch.float8_e4m3fn and \
            (declared or is_24_sparse(q))
        isc = tensors.get(f"{name}.input_scale") if f"{name}.input_scale" in tensors else None
        if tuple(q.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: stored weight {tuple(q.shape)} but the model expects "
                             f"{(module.out_features, module.in_features)}")
        to = (lambda v: None if v is None else v.to(device))
        w = gemm.prepare(to(q), to(scale), to(zp), wargs, act,
                         sparse24=sparse24, input_scale=to(isc))
        bias = tensors.get(f"{name}.bias").to(device, dtype) if module.bias is not None else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                CompressedLinear(w, bias))
        replaced.append(name)

    # everything else: embeddings, norms, unquantized Linears (lm_head), biases done above
    prefixes = tuple(f"{n}." for n in replaced)
    rest = {k: tensors.get(k) for k in tensors.keys() if not k.startswith(prefixes)}
    result = model.load_state_dict(rest, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint tensors the model does not have: "
                         f"{result.unexpected_keys[:5]}")
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if getattr(config, "tie_word_embeddings", False) or \
            getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if not k.startswith("lm_head.")]
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing[:5]}")
    model.to(device).eval()
    return model, _tokenizer(path)


def _tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, f)) for f in names):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
