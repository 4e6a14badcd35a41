"""Run a compressed-tensors checkpoint inside transformers on tritonpress's GEMMs.

    model, tokenizer = load_compressed("out/llama-W4A16", device="cuda")
    model.generate(...)

Reads config.json's quantization_config and the safetensors through checkpoint.reader (the
format is the one llm-compressor writes): every Linear a config group targets becomes a
CompressedLinear that keeps the compressed weight in its kernel layout and calls
kernels.gemm.linear; activations are quantized per token as the group's input_activations
say, rounded as vLLM rounds them unless act_sim says otherwise. Formats: float-quantized (fp8), int-quantized (int8), pack-quantized
(int4/int8 words, with or without packed zero points); 2:4 sparse fp8 stored dense or as
sparse-24-bitmask. The rest of the model loads as usual.

The compressed weights live where `device` says; move the model by loading it again, not with
model.to() (their tensors are not module parameters, so fp8/int8 data cannot be cast by it).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .loop import experts
from .checkpoint import ShardReader, quant_args_from_dict, read_linear, read_quantization_config
from .kernels import gemm, quant
from .kernels.gemm_sparse24 import is_24_sparse
from .schemes import matches


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


def _targeted(name, module, targets, ignore) -> bool:
    return matches(name, targets, module) and not matches(name, ignore or (), module)


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
                    dtype: torch.dtype | None = None, act_sim: str = "vllm",
                    dequantize: bool = False):
    """(model, tokenizer) of a compressed-tensors checkpoint; tokenizer is None if absent.
    dequantize: the Linears stay nn.Linears with the weights decompressed to `dtype` (what
    the evaluation runs, activation quantization simulated by its hooks) instead of
    CompressedLinears on the GEMM kernels.
    act_sim: how dynamic per-token activations are rounded (kernels.quant.quantize_per_token):
    "vllm" as vLLM's kernels do (scale absmax / 127 for int8), or "compressed-tensors"
    (absmax / 127.5)."""
    from transformers import AutoConfig
    quant.check_act_sim(act_sim)
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
    experts.linearize_experts(model)       # MoE: one Linear per expert matrix, as stored
    tensors = ShardReader(path)
    ck = experts.stored_names(model, tensors)   # in-memory name -> stored name (MoE)
    device = torch.device(device)

    groups = list((qc.get("config_groups") or {}).values())
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        stored_name = ck(name)
        group = next((g for g in groups if _targeted(stored_name, module, g.get("targets", []),
                                                     qc.get("ignore"))), None)
        stored = f"{stored_name}.weight_scale" in tensors
        if group is None:
            if stored:
                raise ValueError(f"{name} has a weight_scale but no config group targets it")
            continue
        if not stored:
            raise ValueError(f"config targets {name} but the checkpoint has no "
                             f"{name}.weight_scale")
        act = quant_args_from_dict(group.get("input_activations"))
        qw = read_linear(tensors, stored_name, quant_args_from_dict(group.get("weights")))
        q = qw.q
        declared = sparsity.get("sparsity_structure") == "2:4" and \
            _targeted(stored_name, module, sparsity.get("targets", []), sparsity.get("ignore"))
        # 2:4 runs the sparse kernel whether the config says so or the fp8 values show it
        sparse24 = act is not None and q.dtype == torch.float8_e4m3fn and \
            (declared or is_24_sparse(q))
        isc = tensors.get(f"{stored_name}.input_scale") \
            if f"{stored_name}.input_scale" in tensors else None
        if tuple(q.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: stored weight {tuple(q.shape)} but the model expects "
                             f"{(module.out_features, module.in_features)}")
        if dequantize:
            module.weight.data = qw.dequantize(dtype)
            if qw.input_global_scale is not None:   # NVFP4: what the activation simulation reads
                module.input_global_scale = qw.input_global_scale
            if module.bias is not None:
                module.bias.data = tensors.get(f"{stored_name}.bias").to(dtype)
            replaced.append(name)
            continue
        to = (lambda v: None if v is None else v.to(device))
        w = gemm.prepare(to(q), to(qw.scale), to(qw.zero_point), qw.args, act,
                         sparse24=sparse24, input_scale=to(isc), act_sim=act_sim,
                         global_scale=to(qw.global_scale),
                         input_global_scale=to(qw.input_global_scale))
        bias = tensors.get(f"{stored_name}.bias").to(device, dtype) \
            if module.bias is not None else None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                CompressedLinear(w, bias))
        replaced.append(name)

    # everything else: embeddings, norms, unquantized Linears (lm_head), biases done above
    prefixes = tuple(f"{ck(n)}." for n in replaced)
    stored = {ck(k): k for k in model.state_dict()}
    rest = {stored.get(k, k): v for k, v in
            tensors.read(k for k in tensors.keys() if not k.startswith(prefixes)).items()}
    prefixes = tuple(f"{n}." for n in replaced)
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
