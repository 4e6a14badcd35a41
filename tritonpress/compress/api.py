"""compress(): model + data -> calibration pipeline -> algorithm -> kernels -> checkpoint.

Reads top to bottom. Each algorithm lives in its own file; this one only wires them.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..schemes import Scheme, get_scheme
from .report import dir_size, format_report, peak_memory, save_json, timed

DEFAULT_METHOD = {"W4A16": "gptq", "W4A16_ASYM": "gptq", "W8A8_INT8": "gptq",
                  "W8A8_FP8": "rtn", "W8A8_FP8_24": "sparsegpt"}
METHODS = ("rtn", "gptq", "awq", "awq+gptq", "sparsegpt", "magnitude")


def target_linears(model: nn.Module, scheme: Scheme) -> dict[str, nn.Linear]:
    """The Linear layers to quantize: every Linear in the decoder layers not in scheme.ignore."""
    layers = _decoder_layers(model)
    prefix = _layers_prefix(model)
    out = {}
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            full = f"{prefix}.{i}.{name}"
            if isinstance(mod, nn.Linear) and not _ignored(full, scheme.ignore):
                out[full] = mod
    if not out:
        raise ValueError("the model has no Linear layers to quantize in model.model.layers "
                         f"(ignore list: {list(scheme.ignore)})")
    return out


def _ignored(name: str, ignore) -> bool:
    import re
    for pat in ignore:
        if pat.startswith("re:"):
            if re.match(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat) or pat == name.split(".")[-1]:
            return True
    return False


def _decoder_layers(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"unsupported architecture {type(model).__name__}: tritonpress needs a "
                         "decoder-only model with its layers in model.model.layers "
                         "(Llama, Qwen, Mistral, Gemma...)")
    return layers


def _layers_prefix(model: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is model.model.layers:
            return name
    return "model.layers"


def check_finite(model: nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"NaN or Inf in the model's weights ({', '.join(bad[:5])}"
                         f"{'...' if len(bad) > 5 else ''}): the model is broken before "
                         "compression; re-download or re-convert it")


def check_group_size(linears: dict[str, nn.Linear], scheme: Scheme) -> None:
    w = scheme.weights
    if w.strategy != "group":
        return
    bad = [n for n, m in linears.items() if m.in_features % w.group_size]
    if bad:
        sizes = sorted({linears[n].in_features for n in bad})
        raise ValueError(
            f"group size {w.group_size} does not divide the input size of {len(bad)} layers "
            f"(in-features {sizes}; e.g. {bad[0]}): choose a group size that divides "
            f"{sizes} (--group-size), or ignore those layers (--ignore)")


def compress(model="smollm2-135m", scheme="W8A8_FP8", out=None, *, method=None,
             dataset="canterbury", num_samples=128, seq_len=512, group_size=None,
             symmetric=None, ignore=None, damp=0.01, block_size=128, actorder=False,
             smoothquant=None, sparse_format="dense", eval_dataset="canterbury+code",
             eval_windows=16, eval_seq_len=512, evaluate_quality=True, device=None,
             overwrite=False, cache_dir=None, seed=0, progress=True, json_path=None,
             print_report=False) -> dict:
    """Compress `model` (a built-in name, a local HF directory, or a loaded model with
    `tokenizer` attached as model.tokenizer) with `scheme`, write a compressed-tensors
    checkpoint to `out` (if given) and return a report dict."""
    from . import checkpoint, data, evaluate, models

    t_start = time.perf_counter()
    scheme = get_scheme(scheme, group_size=group_size, symmetric=symmetric, ignore=ignore)
    method = (method or DEFAULT_METHOD[scheme.name]).lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    _check_method(scheme, method)
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out "
                              "or pass --overwrite (it is replaced only once the new one is complete)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)

    report = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
              "scheme": scheme.name, "method": method, "device": str(device), "notes": [],
              "options": dict(group_size=scheme.weights.group_size, num_samples=num_samples,
                              seq_len=seq_len, dataset=dataset, damp=damp, actorder=actorder,
                              smoothquant=smoothquant, seed=seed)}
    with timed(report, "load"):
        if isinstance(model, (str, Path)):
            model, tokenizer = models.load_model(str(model), cache_dir=cache_dir)
        else:
            tokenizer = getattr(model, "tokenizer", None)
        model.eval()
        check_finite(model)
        linears = target_linears(model, scheme)
        check_group_size(linears, scheme)
    report["original_bytes"] = sum(p.numel() * 2 for p in model.parameters())

    windows = ref = None
    if evaluate_quality:
        with timed(report, "eval_before"):
            windows = data.eval_windows(tokenizer, eval_dataset, eval_windows, eval_seq_len)
            ref = evaluate.reference(model, windows, device=device)
            baseline = evaluate.evaluate(model, windows, ref=ref, device=device, progress=progress)

    with timed(report, "compress"):
        batches = None
        if method != "rtn" and method != "magnitude":
            batches = data.calibration_batches(tokenizer, dataset, num_samples, seq_len, seed=seed)
        qweights, layer_info = _run_method(model, scheme, method, linears, batches, device,
                                           damp=damp, block_size=block_size, actorder=actorder,
                                           smoothquant=smoothquant, progress=progress)
    report["layers"] = layer_info

    if evaluate_quality:
        with timed(report, "eval_after"):
            after = evaluate.evaluate(model, windows, ref=ref, act_args=scheme.input_activations,
                                      ignore=scheme.ignore, device=device, progress=progress)
        report["quality"] = {"eval_dataset": eval_dataset, "windows": eval_windows,
                             "seq_len": eval_seq_len, "baseline": baseline, "compressed": after}

    if out is not None:
        with timed(report, "save"):
            path = checkpoint.save_checkpoint(model, tokenizer, qweights, scheme, out,
                                              overwrite=overwrite, sparse_format=sparse_format)
        report["out"] = str(path)
        report["size_bytes"] = dir_size(path)
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    report["memory"] = peak_memory(device)
    if json_path:
        save_json(report, json_path)
    elif out is not None:
        save_json(report, Path(out).parent / (Path(out).name + ".report.json"))
    if print_report:
        print(format_report(report))
    return report


def _check_method(scheme: Scheme, method: str) -> None:
    if method in ("sparsegpt", "magnitude") and not scheme.sparsity_24:
        raise ValueError(f"method {method} prunes to 2:4: use it with scheme W8A8_FP8_24")
    if scheme.sparsity_24 and method not in ("sparsegpt", "magnitude"):
        raise ValueError("scheme W8A8_FP8_24 needs method sparsegpt (default) or magnitude")
    if method.startswith("awq") and scheme.weights.num_bits != 4:
        raise ValueError("AWQ is for W4A16 schemes (W4A16_ASYM by default)")


def _run_method(model, scheme, method, linears, batches, device, **opts):
    """Dispatch to one algorithm; each writes dequantized weights back into the model."""
    if method == "rtn":
        from .rtn import quantize_linears_rtn
        return quantize_linears_rtn(linears, scheme, device=device)
    raise NotImplementedError(method)
