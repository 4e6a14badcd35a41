"""Sequential layer-by-layer calibration for decoder-only transformers models: the loop.

How it runs (any model whose decoder layers targets.find_decoder_layers finds: Llama, OPT,
GPT-NeoX, Mixture-of-Experts with experts.py's Linears...; nothing else is hard-coded):
  1. activations.py: ``capture_layer_inputs`` records what layer 0 is called with (hidden
     states) and every layer's keyword arguments, running only the embeddings.
  2. For each layer in order, on the compute device (one decoder layer there at a time; with a
     ``stream``, the only one in memory at all): targets.py picks its Linears;
     ``qweights, infos = method_fn(layer_idx, layer, prefix, inputs, ctx)`` collects what it
     needs with hooks.py (``collect_hessians``, ``LinearInputHooks``, ``capture_module_io``),
     compresses the Linears in ``ctx.linears`` and writes their dequantized weights back into
     the layer; then the batches go through the compressed layer to give the next layer's
     inputs.

Interface:

  compress_sequential(model, batches, scheme, method_fn, device=None, targets=None,
                      ignore=None, offload=True, partial_last_group=False,
                      progress=True, spill_dir=None, keep_final=False, stream=None,
                      hessians=None)  # None: hooks.collect_hessians
      -> SequentialResult(qweights, infos, final, seconds_per_layer)
  method_fn(layer_idx: int, layer: nn.Module, prefix: str, inputs: LayerInputs | None,
            ctx: LayerContext) -> (dict[full_name, QuantizedWeight], dict[full_name, dict])
      a method object (recipe.Method) or ``recipe_fn([SmoothQuant(0.8), GPTQ()])``; prefix is
      the layer's full module name ("model.layers.3"); full names are prefix + "." + the
      Linear's name inside the layer. With batches=None (data-free recipes) nothing is
      captured or propagated and inputs is None.
  LayerContext: scheme, device, layer_idx, prefix, linears (dict full_name -> nn.Linear
      to compress in this layer), scale_dtype, partial_last_group, and hessians(layer,
      linears, inputs) -> {full name: HessianStats}: the plain accumulation, or under torchrun
      the all-reduced one (distributed.py): the one place a run over ranks differs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from ..models import all_finite
from ..schemes import Scheme
from .activations import DiskTensors, LayerInputs, capture_layer_inputs
from .attention import faster_cpu_attention
from ..checkpoint.qweight import QuantizedWeight
from .hooks import collect_hessians
from .targets import check_group_sizes, find_decoder_layers, target_linears

MethodFn = Callable[..., tuple[dict[str, QuantizedWeight], dict[str, dict]]]


@dataclass
class LayerContext:
    scheme: Scheme
    device: torch.device
    layer_idx: int
    prefix: str
    linears: dict[str, nn.Linear]
    scale_dtype: torch.dtype
    partial_last_group: bool = False
    hessians: Callable = collect_hessians


@dataclass
class SequentialResult:
    qweights: dict[str, QuantizedWeight]
    infos: dict[str, dict]
    final: LayerInputs | None   # hidden states after the last (compressed) layer (keep_final)
    seconds_per_layer: list[float]


def recipe_fn(recipe) -> MethodFn:
    """One layer function for a recipe: the methods before the last rescale the layer
    (SmoothQuant, AWQ's scales), the last quantizes it; infos merged per Linear."""
    *before, last = recipe

    def run(layer_idx, layer, prefix, inputs, ctx):
        infos: dict[str, dict] = {}
        for m in before:
            for k, v in m.rescale(layer_idx, layer, prefix, inputs, ctx).items():
                infos.setdefault(k, {}).update(v)
        qweights, info = last(layer_idx, layer, prefix, inputs, ctx)
        for k, v in info.items():
            infos.setdefault(k, {}).update(v)
        return qweights, infos
    run.__name__ = "+".join(m.name for m in recipe)
    return run


@torch.no_grad()
def compress_sequential(model: nn.Module, batches: Iterable, scheme: Scheme, method_fn: MethodFn,
                        device=None, targets: Iterable[str] | None = None,
                        ignore: Iterable[str] | None = None, offload: bool = True,
                        partial_last_group: bool = False,
                        progress: bool = True, spill_dir=None,
                        keep_final: bool = False, stream=None,
                        hessians: Callable | None = None) -> SequentialResult:
    """Calibrate `model` layer by layer with `method_fn` (see the module docstring).

    device: where each decoder layer computes (default: the first parameter's device).
    offload: keep cached hidden states on CPU between layers (else on `device`).
    spill_dir: keep them in files in that folder instead (DiskTensors; memory-mapped reads).
    keep_final: also run the batches through the last compressed layer, for result.final
    (else None: nothing after the last layer needs them, and the pass costs a layer forward).
    stream: a stream.Stream whose load(i, layer, prefix) fills layer i's weights before its turn
    and done(i, layer, prefix, qweights) takes them after (writes, frees); the result's
    qweights are then empty (the writer has them).
    Layers go back to where they were after their turn; the model is changed in place."""
    import time

    from tqdm.auto import tqdm

    layers, prefix = find_decoder_layers(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    storage = torch.device("cpu") if offload else device
    ignore = tuple(scheme.ignore) + tuple(ignore or ())
    check_group_sizes(model, scheme, targets, ignore, partial_last_group)

    data_free = batches is None
    # the calibration passes' attention (not the streamed evaluation's): loop/attention.py
    fast_attention = faster_cpu_attention if device.type == "cpu" else contextlib.nullcontext
    inputs, kwargs = (None, None) if data_free else \
        _layer0_inputs(model, list(batches), device, storage, spill_dir)

    qweights, infos, times = {}, {}, []
    name = getattr(method_fn, "__name__", getattr(method_fn, "name", "compress"))
    bar = tqdm(range(len(layers)), desc=name, disable=not progress, unit="layer")
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i]
        lp = f"{prefix}.{i}"
        if stream is not None:
            stream.load(i, layer, lp)
        home = next(layer.parameters()).device
        if not data_free:          # data-free methods move one weight at a time
            layer.to(device)
        linears = target_linears(layer, lp, targets, ignore)
        # scales are stored in the weights' dtype (bf16 model -> bf16 scales)
        scale_dtype = next(iter(linears.values())).weight.dtype if linears else \
            next(layer.parameters()).dtype
        ctx = LayerContext(scheme, device, i, lp, linears, scale_dtype, partial_last_group,
                           hessians or collect_hessians)
        with fast_attention():
            qw, info = method_fn(i, layer, lp, inputs, ctx)
        if stream is None:
            qweights.update(qw)
        for k, v in info.items():
            infos.setdefault(k, {}).update(v)
        prev = None if data_free else inputs.hidden
        if not data_free and (i + 1 < len(layers) or keep_final):
            try:
                with fast_attention():
                    out = inputs.run(layer)
            except FloatingPointError as e:
                raise FloatingPointError(
                    f"decoder layer {lp} after compression: {e}. The activations overflow: "
                    "compute in a wider dtype (float32 instead of float16), check the weights, "
                    "or leave this layer's Linears out (ignore=...)") from None
            inputs = inputs.with_hidden(out, kwargs[i + 1] if i + 1 < len(layers) else kwargs[i])
        else:
            inputs = None          # nothing reads the last layer's outputs
        if isinstance(prev, DiskTensors):
            prev.close()           # this layer's inputs are done with: free the disk now
        if stream is not None:
            stream.done(i, layer, lp, qw)
        else:
            layer.to(home)
        times.append(time.perf_counter() - t0)
        bar.set_postfix(layer=i, s=f"{times[-1]:.1f}")
    return SequentialResult(qweights, infos, inputs, times)


def _layer0_inputs(model, batches, device, storage, spill_dir):
    """What the first decoder layer is called with, for every calibration batch, and every
    layer's keyword arguments."""
    if not batches:
        raise ValueError("no calibration batches")
    hidden, kwargs, masks = capture_layer_inputs(model, batches, device, storage)
    for j, h in enumerate(hidden):
        if not all_finite(h):
            raise FloatingPointError(f"NaN or Inf in the embeddings' output on calibration batch "
                                     f"{j}: check the embedding weights and the token ids")
    if spill_dir is not None:
        hidden = DiskTensors(spill_dir, hidden)
    return LayerInputs(hidden, kwargs[0], masks, device, storage, spill_dir=spill_dir), kwargs
