"""compress(): model + data -> calibration pipeline -> algorithm -> kernels -> checkpoint.

Reads top to bottom. Each algorithm lives in its own file; this one only wires them.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from torch import nn

from .schemes import Scheme, get_scheme
from .recipe import Options
from .loop.targets import check_group_sizes
from .report import dir_size, format_report, peak_memory, profile_table, profiling, save_json, timed

STREAM_MODES = ("auto", "on", "off")
_D = Options()          # the defaults, written once (options.py)


def all_target_linears(model: nn.Module, scheme: Scheme) -> dict[str, nn.Linear]:
    """Every Linear in the decoder layers that the scheme quantizes, by full name."""
    from .loop.targets import find_decoder_layers, target_linears
    layers, prefix = find_decoder_layers(model)
    out = {}
    for i, layer in enumerate(layers):
        out.update(target_linears(layer, f"{prefix}.{i}", None, scheme.ignore))
    if not out:
        raise ValueError("the model has no Linear layers to quantize in its decoder layers "
                         f"(ignore list: {list(scheme.ignore)})")
    return out


def check_finite(model: nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"NaN or Inf in the model's weights ({', '.join(bad[:5])}"
                         f"{'...' if len(bad) > 5 else ''}): the model is broken before "
                         "compression; re-download or re-convert it")


def compress(model="smollm2-135m", scheme="W8A8_FP8", out=None, *, method=_D.method,
             dataset=_D.dataset, num_samples=_D.num_samples, seq_len=_D.seq_len,
             group_size=None, symmetric=None, ignore=None, damp=_D.damp,
             block_size=_D.block_size, actorder=_D.actorder, clip=_D.clip,
             smoothquant=_D.smoothquant, refit=_D.refit, sequential=_D.sequential,
             permute=_D.permute, sparse_format="dense",
             eval_dataset="canterbury+code", eval_windows=16, eval_seq_len=512, evaluate_quality=True, device=None,
             overwrite=False, cache_dir=None, seed=_D.seed, progress=True, json_path=None,
             partial_last_group=_D.partial_last_group, resume_dir=None, spill_dir=None,
             print_report=False, dtype="auto", act_sim="vllm", stream="auto",
             max_shard_bytes=None) -> dict:
    """Compress `model` (a built-in name, a local HF directory, or a loaded model with
    `tokenizer` attached as model.tokenizer) with `scheme`, write a compressed-tensors
    checkpoint to `out` (if given) and return a report dict.

    resume_dir: save each finished decoder layer's state there and, on a rerun with the same
    inputs, restore finished layers instead of recomputing them (resume.py).
    spill_dir: keep the cached calibration activations in files there instead of in memory.
    actorder: GPTQ's activation order, "static" (default, as llm-compressor: columns swept by
    decreasing Hessian diagonal, groups and scales on the original columns, no g_idx) or None
    ("none"); the checkpoint records it for GPTQ-quantized weights (null for other methods).
    SparseGPT takes it too: "static" sweeps its 2:4 groups of 4 columns by decreasing sum of
    H_ii (compressed-tensors has no field for that; the report says it).
    refit: SparseGPT only, off by default: after a float sweep chooses the 2:4 mask, refit
    the kept weights to the least-squares optimum under H + refit * mean(diag H) * I, then
    round them to fp8 on that mask (sparsegpt.py; README, "2:4 sparse + FP8").
    permute: SparseGPT, on by default (None): the inputs of down_proj and o_proj reordered
    (with gate/up's and v_proj's rows; the model's function unchanged, the checkpoint saved
    in that order) so that each 2:4 group holds channels of every rank of H_jj * |W_:j|^2.
    sequential: SparseGPT, off by default: each Linear group's Hessian from the layer with the
    groups called before it already compressed (up to 4 extra partial passes per layer).
    clip: the clipping search of 4-bit group scales, AWQ's and GPTQ's (each group's range shrunk
    to minimise its output error on the calibration data; SmolLM2 W4A16 g64 GPTQ: mean KL
    0.217 -> 0.128 on held-out text, README).
    dtype: auto (the model's own, from its config.json; bfloat16 if it names none), bfloat16,
    float16 or float32: the dtype the model is loaded (or, passed loaded, cast) in, and so that
    of the checkpoint's unquantized tensors and scales. A loaded model is left as is by auto.
    act_sim: how the scheme's dynamic activation quantization is simulated while measuring
    quality, "vllm" (its kernels' rounding) or "compressed-tensors" (its fake quantization).
    stream: auto (default), on or off. Streaming (stream.py) keeps one decoder layer in memory
    at a time, from the input shards to the output shards, evaluation included; auto streams a
    model directory whenever it can (safetensors with the model's tensor names) and says in
    the report's notes when it could not; a loaded model is never streamed.
    max_shard_bytes: the checkpoint's shard size (default checkpoint.MAX_SHARD_BYTES, 1 GiB;
    written to disk as it fills, never held in memory).
    Under torchrun (an initialised process group) GPTQ runs over the ranks (distributed.py)."""
    from . import checkpoint
    from . import data
    from .loop import distributed
    from . import quality as evaluate
    from . import models

    t_start = time.perf_counter()
    scheme = get_scheme(scheme, group_size=group_size, symmetric=symmetric, ignore=ignore)
    # every option checked here, before any loading; what the report and resume record
    opts = Options(method=method, dataset=dataset, num_samples=num_samples, seq_len=seq_len,
                   seed=seed, damp=damp, block_size=block_size, actorder=actorder, clip=clip,
                   smoothquant=smoothquant, refit=refit, sequential=sequential, permute=permute,
                   partial_last_group=partial_last_group).resolved(scheme)
    evaluate.check_act_sim(act_sim)
    stream = {True: "on", False: "off"}.get(stream, stream)
    if stream not in STREAM_MODES:
        raise ValueError(f"stream={stream!r}: choose one of {', '.join(STREAM_MODES)}")
    if dtype != "auto":
        models.resolve_dtype(dtype)          # a bad value fails here, before any loading
    if out is not None and Path(out).exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out "
                              "or pass --overwrite (it is replaced only once the new one is complete)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(opts.seed)

    report = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
              "scheme": scheme.name, "method": opts.method, "device": str(device),
              "notes": [], "options": dict(opts.as_dict(), group_size=scheme.weights.group_size,
                                           stream=stream)}
    with timed(report, "load"):
        src = None                               # a stream.Stream when streaming
        if isinstance(model, (str, Path)):
            path = models.model_path(model, cache_dir)
            torch_dtype, why = models.resolve_dtype(dtype, path)
            src = _open_stream(path, torch_dtype, stream, report)
            if src is not None:
                model, tokenizer = src.model, models.load_tokenizer(path)
                models.check_has_linear_layers(model)
            else:
                model, tokenizer = models.load_model(path, dtype=torch_dtype)
        else:
            if stream == "on":
                raise ValueError("stream=on needs a model directory, not a loaded model")
            tokenizer = getattr(model, "tokenizer", None)
            torch_dtype, why = model.dtype, "auto: the dtype of the model passed in"
            if dtype != "auto":
                torch_dtype, why = models.resolve_dtype(dtype)
                model.to(torch_dtype)
        report["streamed"] = src is not None
        report["dtype"] = {"dtype": str(torch_dtype).removeprefix("torch."), "why": why}
        if "names no dtype" in why:
            report["notes"].append("the model's config.json names no dtype: loaded in bfloat16 "
                                   "(pass --dtype to choose)")
        model.eval()
        if src is None:
            check_finite(model)                  # streamed: each layer as it is read
        linears = all_target_linears(model, scheme)
        check_group_sizes(model, scheme, None, scheme.ignore, opts.partial_last_group)
        if src is not None and (evaluate_quality or not opts.data_free):
            # embeddings for the capture; lm_head only for the evaluation's logits
            src.load_rest(lm_head=evaluate_quality)
    report["original_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if not opts.data_free and not distributed.active():
        from .loop.stream import check_memory
        plan = report["memory_plan"] = check_memory(model, opts.num_samples * opts.seq_len,
                                                    src is not None, spill_dir)
        avail = plan["available"]
        if src is not None and avail is not None and avail < report["original_bytes"]:
            from .loop.stream import map_large_allocations
            map_large_allocations()
            report["notes"].append(
                "the model is larger than the memory available: large blocks are mapped and "
                "returned when freed, so the peak stays flat in depth (solves 1.2-1.5x slower)")

    from .loop.distributed import barrier, is_main
    writer = contextlib.nullcontext()
    if src is not None and out is not None:     # layers are written as they finish
        writer = src.writer = checkpoint.CheckpointWriter(
            out, scheme, overwrite=overwrite, sparse_format=sparse_format,
            actorder=opts.checkpoint_actorder,
            max_shard_bytes=max_shard_bytes)
    with writer:
        # held-out text, one set of windows per source ("canterbury+code" -> two), and the
        # uncompressed model's distributions on them for KL (streamed: layer by layer)
        evals = {}
        if evaluate_quality:
            with timed(report, "eval_before"):
                windows = {src_name: data.eval_windows(tokenizer, src_name, eval_windows,
                                                       eval_seq_len, cache_dir=cache_dir)
                           for src_name in eval_dataset.split("+")}
                if src is not None:
                    src.evaluation = evaluate.LayerwiseEval(
                        model, windows, device, act_args=scheme.input_activations,
                        ignore=scheme.ignore, act_sim=act_sim)
                else:
                    evals = {k: (w, evaluate.reference(model, w, progress=progress))
                             for k, w in windows.items()}

        with timed(report, "compress"), profiling() as prof:
            batches = None
            if not opts.data_free:
                batches = data.calibration_batches(
                    tokenizer, opts.dataset, opts.num_samples, opts.seq_len, seed=opts.seed,
                    cache_dir=cache_dir,
                    max_positions=getattr(model.config, "max_position_embeddings", None))
            qweights, layer_info = _run_method(
                model, scheme, opts, linears, batches, device, progress=progress,
                resume_dir=resume_dir, spill_dir=spill_dir, stream=src)
        report["layers"] = layer_info
        # a streamed evaluation ran inside the layer loop: its seconds are not compression's
        eval_s = prof.pop("eval", [0.0])[0]
        report["seconds"]["compress"] = round(report["seconds"]["compress"] - eval_s, 3)
        # where the compress step's time went (report.step), "other" the rest
        report["profile"] = {k: {"seconds": round(t, 3), "calls": c}
                             for k, t, c in profile_table(prof, report["seconds"]["compress"])}

        if evaluate_quality:
            with timed(report, "eval_after"):
                quality = {"windows": eval_windows, "seq_len": eval_seq_len,
                           "act_sim": evaluate.describe_act_sim(scheme.input_activations,
                                                                act_sim)}
                if src is not None:
                    quality.update(src.evaluation.result(progress=progress))
                for src_name, (w, ref) in evals.items():
                    after = evaluate.evaluate(model, w, ref=ref,
                                              act_args=scheme.input_activations,
                                              ignore=scheme.ignore, progress=progress,
                                              act_sim=act_sim)
                    quality[src_name] = {"ppl_before": ref.ppl, "ppl": after["ppl"],
                                         "kl": after["kl"]}
            report["seconds"]["eval_after"] = round(report["seconds"]["eval_after"] + eval_s, 3)
            report["quality"] = quality

        if out is not None and is_main():     # under torchrun only rank 0 writes
            with timed(report, "save"):
                if src is not None:
                    path = src.write_rest(tokenizer)
                else:
                    path = checkpoint.save_checkpoint(model, tokenizer, qweights, scheme, out,
                                                      overwrite=overwrite,
                                                      sparse_format=sparse_format,
                                                      actorder=opts.checkpoint_actorder,
                                                      max_shard_bytes=max_shard_bytes)
            report["out"] = str(path)
            report["size_bytes"] = dir_size(path)
    barrier()
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    report["memory"] = peak_memory(device)
    if json_path and is_main():
        save_json(report, json_path)
    elif out is not None and is_main():
        save_json(report, Path(out).parent / (Path(out).name + ".report.json"))
    if print_report:
        print(format_report(report))
    return report


def _open_stream(path, torch_dtype, stream, report):
    """A stream.Stream over the model directory, or None (the whole model is loaded):
    stream "auto" streams whatever can be (safetensors whose names match the model's; not
    under torchrun), "on" insists, "off" never streams."""
    from .loop import distributed
    from .loop.stream import NotStreamable, Stream

    if stream == "off":
        return None
    if distributed.active():
        if stream == "on":
            raise ValueError("stream=on is not supported under torchrun: pass stream=off")
        return None
    try:
        return Stream(path, torch_dtype)
    except NotStreamable as e:
        if stream == "on":
            raise
        report["notes"].append(f"the whole model was loaded, not streamed: {e}")
        return None


def _run_method(model, scheme, opts: Options, linears, batches, device, *, progress,
                resume_dir=None, spill_dir=None, stream=None):
    """One algorithm over the model; each writes dequantized weights back into the model.
    Returns (qweights by full Linear name, per-Linear info); streamed, the qweights went to
    the stream's writer layer by layer and none are returned."""
    from functools import partial

    from .methods import awq
    from .methods import gptq
    from .loop import sequential as pipeline
    from .methods import rtn
    from .methods import smoothquant as sq
    from .methods import sparsegpt
    from .loop import targets

    method = opts.method
    data_free = {"rtn": lambda lin: rtn.quantize_linears_rtn(lin, scheme, device,
                                                             opts.partial_last_group),
                 "magnitude": lambda lin: sparsegpt.magnitude_linears(lin, scheme, device)}
    if method in data_free and stream is None:
        return data_free[method](linears)
    if method in data_free:                      # streamed: one layer at a time, no data
        if method == "magnitude":
            sparsegpt.check_24_shapes(linears)   # before any layer is written
        infos = {}
        for i, layer in enumerate(stream.layers):
            lp = f"{stream.prefix}.{i}"
            stream.load(i, layer, lp)
            layer_linears = targets.target_linears(layer, lp, None, scheme.ignore)
            qw, info = data_free[method](layer_linears)
            infos.update(info)
            stream.done(i, layer, lp, qw)
        return {}, infos
    from .loop import distributed
    from .loop import resume
    wrap = None
    if resume_dir is not None:   # per-layer state; finished layers are restored, not redone
        fp = resume.fingerprint(model, scheme, batches, opts.as_dict())
        state = resume.ResumeState(resume_dir, fp, write=distributed.is_main())
        wrap = lambda fn: resume.resumable(fn, state)  # noqa: E731
    if distributed.active():     # torchrun: batches split over ranks, Hessians all-reduced
        return distributed.run_method(model, batches, scheme, opts, device, progress=progress,
                                      wrap=wrap, spill_dir=spill_dir)
    layer_fn = {
        "gptq": partial(gptq.gptq_layer, **opts.gptq()),
        "awq": partial(awq.awq, clip=opts.clip),
        "awq+gptq": partial(awq.awq, gptq=opts.gptq()),
        "sparsegpt": partial(sparsegpt.sparsegpt_method, **opts.sparsegpt()),
    }[method]
    if opts.smoothquant is not None:
        layer_fn = pipeline.chain(partial(sq.smoothquant_layer, alpha=opts.smoothquant),
                                  layer_fn)
    if wrap is not None:
        layer_fn = wrap(layer_fn)
    res = pipeline.compress_sequential(model, batches, scheme, layer_fn, device=device,
                                       partial_last_group=opts.partial_last_group,
                                       progress=progress, spill_dir=spill_dir, stream=stream)
    return res.qweights, res.infos


def load_checkpoint_dequantized(path, dtype=torch.bfloat16):
    """A compressed-tensors checkpoint (ours or llm-compressor's) loaded by transformers with
    its weights decompressed to `dtype`; returns (model, activation QuantArgs or None, ignore)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from .checkpoint import quant_args_from_dict, read_quantization_config

    qc = read_quantization_config(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    model.eval()
    groups = list(qc.get("config_groups", {}).values())
    acts = groups[0].get("input_activations") if groups else None
    return model, (quant_args_from_dict(acts) if acts else None), tuple(qc.get("ignore") or ())


def evaluate_checkpoint(checkpoint, base_model="smollm2-135m", *, eval_dataset="canterbury+code",
                        eval_windows=16, eval_seq_len=512, device=None, cache_dir=None,
                        progress=True, dtype="auto", act_sim="vllm") -> dict:
    """Perplexity and KL (against `base_model`) of a saved checkpoint on held-out text, with
    the checkpoint's dynamic activation quantization simulated by the `act_sim` convention.
    Both models run in `dtype` (auto: the base model's own, see models.resolve_dtype)."""
    from . import data
    from . import quality as evaluate
    from . import models

    evaluate.check_act_sim(act_sim)
    path = models.model_path(base_model, cache_dir)
    torch_dtype, _ = models.resolve_dtype(dtype, path)
    base, tokenizer = models.load_model(path, dtype=torch_dtype)
    sets = {}
    for src in eval_dataset.split("+"):
        w = data.eval_windows(tokenizer, src, eval_windows, eval_seq_len, cache_dir=cache_dir)
        sets[src] = (w, evaluate.reference(base, w, progress=progress))
    del base
    model, act_args, ignore = load_checkpoint_dequantized(checkpoint, dtype=torch_dtype)
    out = {"checkpoint": str(checkpoint), "base_model": str(base_model),
           "dtype": str(torch_dtype).removeprefix("torch."), "windows": eval_windows,
           "seq_len": eval_seq_len, "act_sim": evaluate.describe_act_sim(act_args, act_sim)}
    for src, (w, ref) in sets.items():
        r = evaluate.evaluate(model, w, ref=ref, act_args=act_args, ignore=ignore,
                              progress=progress, act_sim=act_sim)
        out[src] = {"ppl_before": ref.ppl, "ppl": r["ppl"], "kl": r["kl"]}
    return out
