"""compress() and evaluate(): model + data -> the layer loop -> methods -> kernels -> checkpoint.

Reads top to bottom: check every argument, load, measure the original on held-out text,
calibrate and compress layer by layer, measure again, write. Each method is its own file
(methods/); the loop is loop/sequential.py; the format is checkpoint/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

import torch
from torch import nn

from .recipe import (Calibration, Evaluation, Run, check_type, checkpoint_actorder,
                     recipe_label, resolve_recipe)
from .report import dir_size, format_report, peak_memory, profile_table, profiling, save_json, timed
from .schemes import Scheme, get_scheme, matches


def compress(model="smollm2-135m", scheme="W8A8_FP8", out=None, recipe=None, *,
             calibration: Calibration | None = Calibration(),
             evaluation: Evaluation | None = Evaluation(), run: Run = Run()) -> dict:
    """Compress `model` (a built-in name, a local Hugging Face directory, or a loaded model with
    its tokenizer attached as model.tokenizer) to `scheme` (a name, or get_scheme(name,
    group_size=, symmetric=, ignore=)) with `recipe` (a list of methods; default by scheme:
    recipe.default_recipe), write a compressed-tensors checkpoint to `out` (if given) and
    return the report (also written as JSON beside `out`).

    calibration: the calibration text (unused by data-free recipes: RTN, Magnitude);
    evaluation: held-out perplexity and KL before and after, or None to skip;
    run: device, dtype, streaming, resume and output options (recipe.Run).
    Under torchrun (an initialised process group) the Hessians are all-reduced over the ranks
    (loop/distributed.py) and rank 0 writes."""
    from . import checkpoint, data, models, quality
    from .loop import distributed, experts
    from .loop.sequential import compress_sequential, recipe_fn
    from .loop.stream import return_freed_memory

    t_start = time.perf_counter()
    # ---- every argument checked before anything is loaded
    scheme, recipe, data_free = _check_arguments(model, scheme, out, recipe, calibration,
                                                 evaluation, run)
    device = torch.device(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed = calibration.seed if calibration is not None else 0
    torch.manual_seed(seed)
    report = {"model": str(model) if isinstance(model, (str, Path)) else type(model).__name__,
              "scheme": scheme.name, "method": recipe_label(recipe), "device": str(device),
              "notes": [], "recipe": [m.as_dict() for m in recipe],
              "options": {"calibration": None if data_free else vars(calibration),
                          "group_size": scheme.weights.group_size, "stream": run.stream,
                          "actorder": getattr(recipe[-1], "actorder", None),
                          "partial_last_group": run.partial_last_group}}

    # ---- load (streamed: only the skeleton; each layer is read when its turn comes)
    with timed(report, "load"):
        model, tokenizer, src, torch_dtype = _load(model, run, report)
        model.eval()
        if src is None:                          # streamed: each layer as it is read
            models.check_finite(model.named_parameters())
        moe = experts.linearize_experts(model)   # fused experts -> one Linear per matrix
        if moe and not data_free and calibration.experts == "routed" and \
                any(m.name == "awq" for m in recipe):
            raise ValueError("AWQ scales a norm for all the experts it feeds, from every token: "
                             "on a Mixture-of-Experts model use Calibration(experts='all') "
                             "(the default), or GPTQ")
        if moe:     # routers and shared-expert gates stay 16-bit, as llm-compressor keeps them
            scheme = dataclasses.replace(scheme, ignore=tuple(scheme.ignore) + tuple(
                experts.router_names(model)))
            report["experts"] = {"blocks": len(moe), "per_block": sorted(set(moe.values())),
                                 "calibration": None if data_free else calibration.experts}
        linears = all_target_linears(model, scheme)
        report["not_quantized"] = not_quantized(model, linears, scheme)
        for m in recipe:
            m.check_model(model, linears)
        from .loop.targets import check_group_sizes
        check_group_sizes(model, scheme, None, scheme.ignore, run.partial_last_group)
        if src is not None and (evaluation is not None or not data_free):
            # embeddings for the capture; lm_head only for the evaluation's logits
            src.load_rest(lm_head=evaluation is not None)
    report["original_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if not distributed.active():
        _plan_memory(model, None if data_free else calibration, src, run, report)

    writer = contextlib.nullcontext()
    if src is not None and out is not None:     # layers are written as they finish
        writer = src.writer = checkpoint.CheckpointWriter(
            out, scheme, overwrite=run.overwrite, sparse_format=run.sparse_format,
            actorder=checkpoint_actorder(recipe), max_shard_bytes=run.max_shard_bytes)
        src.writer.names_of(model)      # MoE: the experts' stored names from the first layer
    with writer:
        # ---- the original on held-out text: one set of windows per source ("a+b" -> two)
        evals = {}
        if evaluation is not None:
            with timed(report, "eval_before"):
                windows = {name: data.eval_windows(tokenizer, name, evaluation.windows,
                                                   evaluation.seq_len, cache_dir=run.cache_dir)
                           for name in str(evaluation.dataset).split("+")}
                if src is not None:
                    src.evaluation = quality.LayerwiseEval(
                        model, windows, device, act_args=scheme.input_activations,
                        ignore=scheme.ignore, act_sim=evaluation.act_sim)
                else:
                    evals = {k: (w, quality.reference(model, w, progress=run.progress))
                             for k, w in windows.items()}

        # ---- calibrate and compress, layer by layer
        with timed(report, "compress"), profiling() as prof:
            batches = None
            if not data_free:
                batches = data.calibration_batches(
                    tokenizer, calibration.dataset, calibration.num_samples,
                    calibration.seq_len, seed=calibration.seed, cache_dir=run.cache_dir,
                    max_positions=getattr(model.config, "max_position_embeddings", None),
                    chat_template=calibration.chat_template)
            layer_fn, hessians, resumed = recipe_fn(recipe), None, None
            if distributed.active() and not data_free:   # the one difference over ranks
                batches = distributed.split_batches(batches)
                hessians = distributed.collect_hessians_allreduced
                device = distributed.local_device(device)
            if run.resume_dir is not None and not data_free:
                layer_fn, resumed = _resumable(layer_fn, model, scheme, batches, report, run)
            every = not data_free and moe and calibration.experts == "all"
            with experts.every_token(model, every):
                res = compress_sequential(
                    model, batches, scheme, layer_fn, device=device,
                    partial_last_group=run.partial_last_group,
                    progress=run.progress and distributed.is_main(), spill_dir=run.spill_dir,
                    stream=src, hessians=hessians)
        report["layers"] = res.infos
        if moe:
            report["experts"]["layers"] = experts.report(model, res.infos, data_free)
        if resumed is not None:
            report["resumed_layers"] = list(resumed.resumed)
            if resumed.resumed:
                report["notes"].append(
                    f"resumed {len(resumed.resumed)} of {len(res.seconds_per_layer)} layers "
                    f"from {run.resume_dir} (restored, not recomputed)")
        # a streamed evaluation ran inside the layer loop: its seconds are not compression's
        eval_s = prof.pop("eval", [0.0])[0]
        report["seconds"]["compress"] = round(report["seconds"]["compress"] - eval_s, 3)
        report["profile"] = {k: {"seconds": round(t, 3), "calls": c}
                             for k, t, c in profile_table(prof, report["seconds"]["compress"])}

        # ---- the compressed model on the same windows
        if evaluation is not None:
            with timed(report, "eval_after"):
                result = {"windows": evaluation.windows, "seq_len": evaluation.seq_len,
                          "act_sim": quality.describe_act_sim(scheme.input_activations,
                                                              evaluation.act_sim)}
                if src is not None:
                    result.update(src.evaluation.result(progress=run.progress))
                for name, (w, ref) in evals.items():
                    after = quality.evaluate(model, w, ref=ref, act_args=scheme.input_activations,
                                             ignore=scheme.ignore, progress=run.progress,
                                             act_sim=evaluation.act_sim)
                    result[name] = {"ppl_before": ref.ppl, "ppl": after["ppl"], "kl": after["kl"]}
            report["seconds"]["eval_after"] = round(report["seconds"]["eval_after"] + eval_s, 3)
            report["quality"] = result
            note = quality.vllm_cpu_note(scheme) if evaluation.act_sim == "vllm" else None
            if note:
                report["notes"].append(note)

        # ---- write (under torchrun only rank 0)
        if out is not None and distributed.is_main():
            with timed(report, "save"):
                if src is not None:
                    path = src.write_rest(tokenizer)
                else:
                    path = checkpoint.save_checkpoint(
                        model, tokenizer, res.qweights, scheme, out, overwrite=run.overwrite,
                        sparse_format=run.sparse_format, actorder=checkpoint_actorder(recipe),
                        max_shard_bytes=run.max_shard_bytes)
            report["out"] = str(path)
            report["size_bytes"] = dir_size(path)
            report["tensor_bytes"] = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    distributed.barrier()
    report["seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    report["memory"] = peak_memory(device)
    return_freed_memory()               # what keep_large_allocations kept
    if distributed.is_main() and (run.report_path or out is not None):
        save_json(report, run.report_path or Path(out).parent / (Path(out).name + ".report.json"))
    if run.print_report:
        print(format_report(report))
    return report


def evaluate(checkpoint, base_model="smollm2-135m", *, evaluation: Evaluation = Evaluation(),
             run: Run = Run()) -> dict:
    """Perplexity and KL (against `base_model`) of a saved compressed-tensors checkpoint (ours
    or llm-compressor's) on held-out text, with the checkpoint's dynamic activation
    quantization simulated by evaluation.act_sim. Both models run in run.dtype (auto: the
    base model's own). The checkpoint folder is checked before the base model is loaded."""
    from . import data, folders, models, quality
    from .checkpoint import load_dequantized

    check_type("checkpoint", checkpoint, (str, Path), "pass the checkpoint's folder")
    check_type("base_model", base_model, (str, Path),
               "pass the built-in name or the base model's folder")
    check_type("evaluation", evaluation, Evaluation, "pass tritonpress.Evaluation(...)")
    check_type("run", run, Run, "pass tritonpress.Run(...)")
    folders.check_checkpoint_dir(checkpoint)
    path = models.model_path(base_model, run.cache_dir)
    torch_dtype, _ = models.resolve_dtype(run.dtype, path)
    base, tokenizer = models.load_model(path, dtype=torch_dtype)
    sets = {}
    for name in str(evaluation.dataset).split("+"):
        w = data.eval_windows(tokenizer, name, evaluation.windows, evaluation.seq_len,
                              cache_dir=run.cache_dir)
        sets[name] = (w, quality.reference(base, w, progress=run.progress))
    del base
    model, act_args, ignore = load_dequantized(checkpoint, dtype=torch_dtype)
    out = {"checkpoint": str(checkpoint), "base_model": str(base_model),
           "dtype": str(torch_dtype).removeprefix("torch."), "windows": evaluation.windows,
           "seq_len": evaluation.seq_len,
           "act_sim": quality.describe_act_sim(act_args, evaluation.act_sim)}
    for name, (w, ref) in sets.items():
        r = quality.evaluate(model, w, ref=ref, act_args=act_args, ignore=ignore,
                             progress=run.progress, act_sim=evaluation.act_sim)
        out[name] = {"ppl_before": ref.ppl, "ppl": r["ppl"], "kl": r["kl"]}
    return out


# ----------------------------------------------------------------------------- the steps

def _check_arguments(model, scheme, out, recipe, calibration, evaluation, run):
    """Every argument's type and range, the recipe against the scheme, the output place:
    (Scheme, recipe, data_free). Nothing is loaded or written before this passes."""
    from .loop import distributed

    if not isinstance(model, nn.Module):
        check_type("model", model, (str, Path),
                   "pass 'smollm2-135m', a Hugging Face model folder, or a loaded model")
    check_type("scheme", scheme, (str, Scheme),
               "pass a scheme name (e.g. 'W4A16'; `tritonpress schemes` lists them) or "
               "get_scheme(name, group_size=...)")
    scheme = get_scheme(scheme)
    recipe = resolve_recipe(recipe, scheme)
    data_free = all(m.data_free for m in recipe)
    if calibration is None and not data_free:
        raise ValueError(f"recipe {recipe_label(recipe)} needs calibration data: pass "
                         "calibration=Calibration(...) (or a data-free recipe, [RTN()])")
    if calibration is not None:
        check_type("calibration", calibration, Calibration,
                   "pass tritonpress.Calibration(dataset=..., num_samples=..., seq_len=...)")
    if evaluation is not None:
        check_type("evaluation", evaluation, Evaluation,
                   "pass tritonpress.Evaluation(...), or None to skip the quality measurement")
    check_type("run", run, Run, "pass tritonpress.Run(...)")
    if isinstance(model, nn.Module) and run.stream == "on":
        raise ValueError("stream='on' needs a model folder, not a loaded model")
    if distributed.active() and not data_free and recipe_label(recipe) != "gptq":
        raise ValueError(f"recipe {recipe_label(recipe)} does not run on several processes yet: "
                         "use [GPTQ()], or run it in a single process (python, not torchrun)")
    if out is not None:
        check_out(out, run.overwrite)
    return scheme, recipe, data_free


def check_out(out, overwrite: bool) -> None:
    """The output folder can be written, in the user's own words."""
    check_type("out", out, (str, Path), "pass the checkpoint folder to write")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {out} already exists: choose another --out "
                              "or pass --overwrite (it is replaced only once the new one is "
                              "complete)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose a folder path")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, not a folder: choose a path in a "
                         "folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {parent} (permission denied): choose a "
                         "folder you can write to")


def _load(model, run: Run, report: dict):
    """(model, tokenizer, stream or None, dtype). A folder is streamed when it can be (safetensors
    with the model's tensor names; not under torchrun) unless run.stream says otherwise."""
    from . import models
    if not isinstance(model, (str, Path)):          # a loaded model
        tokenizer = getattr(model, "tokenizer", None)
        torch_dtype, why = model.dtype, "auto: the dtype of the model passed in"
        if run.dtype != "auto":
            torch_dtype, why = models.resolve_dtype(run.dtype)
            model.to(torch_dtype)
        src = None
    else:
        path = models.model_path(model, run.cache_dir)
        torch_dtype, why = models.resolve_dtype(run.dtype, path)
        src = _open_stream(path, torch_dtype, run.stream, report)
        if src is not None:
            model, tokenizer = src.model, models.load_tokenizer(path)
            models.check_has_linear_layers(model)
        else:
            model, tokenizer = models.load_model(path, dtype=torch_dtype)
    report["streamed"] = src is not None
    report["dtype"] = {"dtype": str(torch_dtype).removeprefix("torch."), "why": why}
    if "names no dtype" in why:
        report["notes"].append("the model's config.json names no dtype: loaded in bfloat16 "
                               "(pass --dtype to choose)")
    return model, tokenizer, src, torch_dtype


def _open_stream(path, torch_dtype, stream: str, report: dict):
    """A stream.Stream over the model directory, or None (the whole model is loaded)."""
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


def _plan_memory(model, calibration, src, run, report) -> None:
    """Fail early where a calibrated run cannot fit (check_memory); choose glibc's policy for
    large blocks: mapped and returned when the model is larger than the memory available,
    else kept for reuse (data-free runs too: FP8's copies of each weight)."""
    from .loop.stream import (available_memory, check_memory, keep_large_allocations,
                              map_large_allocations)
    if calibration is not None:
        plan = report["memory_plan"] = check_memory(
            model, calibration.num_samples * calibration.seq_len, src is not None, run.spill_dir)
        available = plan["available"]
    else:
        available = available_memory()
    if src is not None and available is not None and available < report["original_bytes"]:
        map_large_allocations()
        src.return_memory = True
        report["notes"].append(
            "the model is larger than the memory available: large blocks are mapped and "
            "returned when freed, so the peak stays flat in depth (solves 1.2-1.5x slower)")
    else:
        keep_large_allocations()


def _resumable(layer_fn, model, scheme, batches, report, run):
    """(layer function, its ResumeState): per-layer state in run.resume_dir; finished layers
    are restored, not redone."""
    from .loop import distributed, resume
    fp = resume.fingerprint(model, scheme, batches,
                            {"recipe": report["recipe"], **report["options"]})
    state = resume.ResumeState(run.resume_dir, fp, write=distributed.is_main())
    return resume.resumable(layer_fn, state), state


def not_quantized(model: nn.Module, linears: dict, scheme: Scheme) -> dict[str, str]:
    """Every Linear (and MoE router, which the ignore list names) the run leaves in the model's
    dtype, and why: the report names them."""
    mods = dict(model.named_modules())
    names = {n for n, m in mods.items() if isinstance(m, nn.Linear)} | \
        {n for n in scheme.ignore if n in mods}
    return {n: "ignore" if matches(n, scheme.ignore, mods[n]) else "outside the decoder layers"
            for n in sorted(names) if n not in linears}


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
