"""Sequential layer-by-layer calibration for decoder-only transformers models.

How it runs (any model whose decoder layers are in ``model.model.layers``; nothing about the
architecture is hard-coded):
  1. ``capture_layer_inputs`` runs the calibration batches through the embeddings only: every
     decoder layer is swapped for a catcher that records what it is called with (hidden states
     for layer 0, the keyword arguments - attention mask, position embeddings, ... - for every
     layer, since sliding-window models give layers different masks); the last catcher raises
     to stop the forward. No decoder layer runs.
  2. For each layer in order, on the compute device (one decoder layer there at a time):
     ``qweights, infos = method_fn(layer_idx, layer, prefix, inputs, ctx)`` collects what it needs with
     hooks (``collect_hessians``, ``LinearInputHooks``, ``capture_module_io``), compresses the
     Linears in ``ctx.linears`` and writes their dequantized weights back into the layer;
     then the batches go through the compressed layer to give the next layer's inputs.

Public interface (stable; other methods plug in here):

  compress_sequential(model, batches, scheme, method_fn, device=None, targets=None,
                      ignore=None, offload=True, partial_last_group=False, options=None,
                      progress=True) -> SequentialResult(qweights, infos, reports, final)
  method_fn(layer_idx: int, layer: nn.Module, prefix: str, inputs: LayerInputs,
            ctx: LayerContext) -> (dict[full_name, QuantizedWeight], dict[full_name, dict])
      prefix is the layer's full module name ("model.layers.3"); full names are
      prefix + "." + the Linear's name inside the layer. Methods with options are bound with
      functools.partial; ``chain(fn1, fn2)`` runs several on one layer (SmoothQuant, then GPTQ).
  LayerInputs: .hidden (list of [b, s, d] per batch), .kwargs, .token_masks ([b, s] bool, True
      for real tokens, None where no padding), .device, .run(layer) -> list of outputs,
      .num_tokens, len().  While run() is going, .current_mask is the batch's mask on device.
  LayerContext: scheme, device, layer_idx, prefix, linears (dict full_name -> nn.Linear
      to compress in this layer), scale_dtype, partial_last_group, options (dict).
  accumulate_hessian(H, x, n_seen, mask=None) -> n_seen + real tokens: running mean
      H = 2/n sum x x^T (fp32) over tokens whose mask is nonzero (kernels/hessian.py).
  LinearInputHooks / run_with_linear_inputs(layer, linears, inputs, fn): fn(leader, x, mask)
      once per distinct Linear input per batch; tokens_of(x, mask) -> [real tokens, in].
  collect_hessians(linears, inputs) -> dict[full_name, HessianStats]: one shared HessianStats
      object (.H, .n) per distinct input tensor (q/k/v; gate/up), padding left out.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..schemes import Scheme, matches
from .qweight import QuantizedWeight
from .report import step

MethodFn = Callable[..., tuple[dict[str, QuantizedWeight], dict[str, dict]]]


# ----------------------------------------------------------------------------- layer inputs

@dataclass
class LayerInputs:
    """The calibration batches as one decoder layer sees them."""
    hidden: list[torch.Tensor]                 # per batch [b, s, d], on the storage device
    kwargs: list[dict[str, Any]]               # per batch keyword arguments of the layer call
    token_masks: list[torch.Tensor | None]     # per batch [b, s] bool (True = real token)
    device: torch.device                       # where the layer computes
    storage: torch.device                      # where hidden states are kept between layers
    current_mask: torch.Tensor | None = field(default=None, repr=False)
    spill_dir: str | None = None               # keep hidden states in files there (DiskTensors)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_tokens(self) -> int:
        return sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
                   for h, m in zip(self.hidden, self.token_masks))

    def batch(self, i: int) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor | None]:
        """Batch i on the compute device: (hidden, kwargs, mask)."""
        m = self.token_masks[i]
        return (self.hidden[i].to(self.device), _to(self.kwargs[i], self.device),
                None if m is None else m.to(self.device))

    @torch.no_grad()
    def run(self, layer: nn.Module, keep: bool = True, label: str | None = None
            ) -> list[torch.Tensor]:
        """Replay every batch through `layer`; outputs (hidden states) kept on the storage
        device, or dropped when keep=False: a statistics pass, which a hook may end early on a
        batch by raising StopLayer once it has what it needs. `label`: the profile step."""
        outs = [] if self.spill_dir is None or not keep else DiskTensors(self.spill_dir)
        with step(label or ("propagate" if keep else "statistics pass"), self.device):
            try:
                for i in range(len(self)):
                    h, kw, self.current_mask = self.batch(i)
                    try:
                        y = layer(h, **kw)
                    except StopLayer:
                        if keep:
                            raise
                        continue
                    if isinstance(y, (tuple, list)):   # older transformers return (hidden, ...)
                        y = y[0]
                    if keep:
                        _check_finite(y, i)
                        outs.append(y.to(self.storage))
            finally:
                self.current_mask = None
        return outs

    def with_hidden(self, hidden: list[torch.Tensor], kwargs: list[dict] | None = None):
        return LayerInputs(hidden, self.kwargs if kwargs is None else kwargs,
                           self.token_masks, self.device, self.storage, spill_dir=self.spill_dir)


class DiskTensors(Sequence):
    """A list of tensors kept in files under `folder` (torch.save), read back memory-mapped on
    access: cached activations spill to disk instead of RAM. Files go when the list does."""

    def __init__(self, folder, tensors: Iterable[torch.Tensor] = ()):
        import tempfile
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="activations-", dir=folder))
        self.paths: list[Path] = []
        for t in tensors:
            self.append(t)

    def append(self, t: torch.Tensor) -> None:
        p = self.dir / f"{len(self.paths)}.pt"
        torch.save(t.detach().cpu().contiguous(), p)
        self.paths.append(p)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return torch.load(self.paths[i], mmap=True, weights_only=True)

    def __len__(self) -> int:
        return len(self.paths)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.paths = []

    __del__ = close


class StopLayer(Exception):
    """Raised by a hook to end a statistics pass through a layer on the current batch."""


def _check_finite(y: torch.Tensor, i: int) -> None:
    lo, hi = y.aminmax()           # NaN propagates; one pass over y, no boolean temporary
    if not (torch.isfinite(lo) and torch.isfinite(hi)):
        raise FloatingPointError(f"NaN or Inf in the layer's output on calibration batch {i}")


def _to(obj, device):
    """Move tensors inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


# ----------------------------------------------------------------------------- capture

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


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer i during capture: records its call, passes hidden through."""

    def __init__(self, idx: int, last: bool, record: Callable):
        super().__init__()
        self.idx, self.last, self.record = idx, last, record

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ValueError("decoder layer called with extra positional arguments; "
                             "only (hidden_states, **kwargs) calls are supported")
        self.record(self.idx, hidden_states, kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


def _batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    else:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    return ids, mask


@contextmanager
def _non_layer_modules_on(model: nn.Module, layers: nn.ModuleList, device: torch.device):
    """Embeddings, rotary tables, norms on `device` for the capture; back where they were after."""
    inside = {id(t) for t in list(layers.parameters()) + list(layers.buffers())}
    moved = []
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            # meta: not loaded by a stream (an lm_head no one computes with)
            if id(p) not in inside and p.device != device and p.device.type != "meta":
                moved.append((p, p.data))
                p.data = p.data.to(device)
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and id(b) not in inside and b.device != device:
                moved.append((mod, name, b))
                mod._buffers[name] = b.to(device)
    try:
        yield
    finally:
        for m in moved:
            if len(m) == 2:
                m[0].data = m[1]
            else:
                m[0]._buffers[m[1]] = m[2]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Iterable, device, storage
                         ) -> tuple[list[torch.Tensor], list[list[dict]], list]:
    """Hidden states entering layer 0 and every layer's call kwargs, per batch.

    Returns (hidden [per batch], kwargs [per layer][per batch], token masks [per batch])."""
    with step("capture", device):
        return _capture(model, batches, device, storage)


def _capture(model, batches, device, storage):
    layers, _ = find_decoder_layers(model)
    n = len(layers)
    hidden, masks = [], []
    kwargs: list[list[dict]] = [[] for _ in range(n)]
    memo: dict[int, Any] = {}

    def keep(obj):
        # the same mask / rotary tensors are shared by many layers: store them once
        if isinstance(obj, torch.Tensor):
            if id(obj) not in memo:
                memo[id(obj)] = (obj, obj.to(storage))
            return memo[id(obj)][1]
        if isinstance(obj, dict):
            return {k: keep(v) for k, v in obj.items()}
        if isinstance(obj, (tuple, list)):
            return type(obj)(keep(v) for v in obj)
        return obj

    def record(idx, h, kw):
        if idx == 0:
            hidden.append(h.to(storage))
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
        kwargs[idx].append(keep(kw))

    originals = list(layers)
    for i in range(n):
        layers[i] = _Catcher(i, i == n - 1, record)
    try:
        with _non_layer_modules_on(model, layers, device):
            for batch in batches:
                ids, mask = _batch_tensors(batch)
                memo.clear()
                try:
                    model(input_ids=ids.to(device),
                          attention_mask=None if mask is None else mask.to(device),
                          use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the forward did not reach the last decoder layer")
                masks.append(None if mask is None or bool(mask.all()) else mask.bool().to(storage))
    finally:
        for i in range(n):
            layers[i] = originals[i]
    return hidden, kwargs, masks


# ----------------------------------------------------------------------------- targets

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


# ----------------------------------------------------------------------------- hooks

class LinearInputHooks:
    """Forward pre-hooks on Linears that hand each DISTINCT input tensor to `fn` once.

    fn(leader: str, x, mask) gets the raw input (usually [b, s, in]) and the batch's token mask
    ([b, s] bool, True = real token; None = no padding); `tokens_of(x, mask)` gives the
    [real tokens, in] rows. Linears called on
    the same tensor object in one forward (q/k/v; gate/up) form a group led by the first one
    called; `groups` maps leader -> members after the first batch. Use as a context manager
    around `inputs.run(layer, keep=False)`.

    stop_early: from the second batch on, raise StopLayer once every Linear has been called as
    often as on the first batch, so the rest of the layer (down_proj's matmul, the residual)
    is not computed for nothing. Only when the first batch called every Linear: a layer that
    routes tokens (MoE experts) may call different ones per batch, and then runs whole.
    """

    def __init__(self, linears: dict[str, nn.Module], inputs: LayerInputs,
                 fn: Callable, stop_early: bool = True):
        self.linears, self.inputs, self.fn = linears, inputs, fn
        self.leader_of: dict[str, str] = {}
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}
        self._handles = []
        self.stop_early = stop_early
        self._batches = 0
        self._calls: dict[str, int] = {}          # this batch's calls per Linear
        self._first: dict[str, int] | None = None  # the first batch's

    @property
    def groups(self) -> dict[str, list[str]]:
        g: dict[str, list[str]] = {}
        for name, lead in self.leader_of.items():
            g.setdefault(lead, []).append(name)
        return g

    def _hook(self, name):
        def hook(mod, args):
            x = args[0]
            key = id(x)
            if key in self._seen and self._seen[key][0] is x:
                lead = self._seen[key][1]
            else:
                lead = name
                self._seen[key] = (x, name)
                self.fn(name, x, _mask_for(x, self.inputs.current_mask))
            prev = self.leader_of.setdefault(name, lead)
            if prev != lead:
                raise RuntimeError(f"{name} shared its input with {prev} on one batch and "
                                   f"with {lead} on another")
            self._calls[name] = self._calls.get(name, 0) + 1
            if self._first is not None and self._calls == self._first:
                raise StopLayer
        return hook

    def __enter__(self):
        for name, mod in self.linears.items():
            self._handles.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def new_batch(self):
        if self._batches == 1 and self.stop_early and len(self._calls) == len(self.linears):
            self._first = dict(self._calls)
        self._batches += 1
        self._seen.clear()
        self._calls = {}

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()


def _mask_for(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    if x.shape[:-1] != mask.shape:
        raise RuntimeError(f"a Linear input of shape {tuple(x.shape)} does not line up with the "
                           f"token mask {tuple(mask.shape)}: padding cannot be left out")
    return mask


def tokens_of(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[b, s, d] activations -> [real tokens, d], padding (mask False) left out."""
    return x.reshape(-1, x.shape[-1]) if mask is None else x[mask]


def run_with_linear_inputs(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs,
                           fn: Callable) -> dict[str, list[str]]:
    """Replay the batches through `layer`, calling fn(leader, x, mask) once per distinct Linear
    input per batch (see LinearInputHooks); returns the groups (leader -> members)."""
    hooks = LinearInputHooks(linears, inputs, fn)
    layer_hook = layer.register_forward_pre_hook(lambda *_: hooks.new_batch())
    try:
        with hooks:
            inputs.run(layer, keep=False)
    finally:
        layer_hook.remove()
    return hooks.groups


@torch.no_grad()
def capture_module_io(layer: nn.Module, modules: dict[str, nn.Module], inputs: LayerInputs,
                      outputs: bool = False, storage=None) -> dict[str, list]:
    """Per batch, the positional input 0 (and output, if asked) of chosen modules:
    {name: [(x, y or None), ...]} kept on `storage` (default inputs.storage)."""
    storage = inputs.storage if storage is None else storage
    got: dict[str, list] = {n: [] for n in modules}
    handles = []
    for name, mod in modules.items():
        def hook(mod, args, out, name=name):
            y = out[0] if isinstance(out, (tuple, list)) else out
            got[name].append((args[0].to(storage), y.to(storage) if outputs else None))
        handles.append(mod.register_forward_hook(hook))
    try:
        inputs.run(layer, keep=False)
    finally:
        for h in handles:
            h.remove()
    return got


# ----------------------------------------------------------------------------- Hessians

def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, n_seen: int,
                       mask: torch.Tensor | None = None) -> int:
    """H [in, in] fp32 holds 2/n_seen * sum x x^T over n_seen tokens; fold in the tokens of x
    ([tokens, in] or [b, s, in]; with `mask` only the real ones) and return the new count.
    kernels/hessian.py: the fused Triton kernel on CUDA, its torch reference elsewhere."""
    from ..kernels.hessian import accumulate_hessian as accumulate
    with step("hessian", H.device):
        return accumulate(H, x, n_seen, mask)


@dataclass
class HessianStats:
    H: torch.Tensor       # [in, in] fp32, 2/n sum x x^T
    n: int = 0            # tokens seen
    members: list[str] = field(default_factory=list)   # Linears reading this input


def collect_hessians(layer: nn.Module, linears: dict[str, nn.Module], inputs: LayerInputs
                     ) -> dict[str, HessianStats]:
    """One Hessian per distinct Linear input (shared object for q/k/v and gate/up)."""
    stats: dict[str, HessianStats] = {}

    def add(lead, x, mask):
        if lead not in stats:
            stats[lead] = HessianStats(torch.zeros(x.shape[-1], x.shape[-1],
                                                   dtype=torch.float32, device=x.device))
        s = stats[lead]
        s.n = accumulate_hessian(s.H, x, s.n, mask)

    groups = run_with_linear_inputs(layer, linears, inputs, add)
    out = {}
    for lead, members in groups.items():
        stats[lead].members = members
        for m in members:
            out[m] = stats[lead]
    return out


# ----------------------------------------------------------------------------- the loop

@dataclass
class LayerContext:
    scheme: Scheme
    device: torch.device
    layer_idx: int
    prefix: str
    linears: dict[str, nn.Linear]
    scale_dtype: torch.dtype
    partial_last_group: bool = False
    options: dict = field(default_factory=dict)


@dataclass
class SequentialResult:
    qweights: dict[str, QuantizedWeight]
    infos: dict[str, dict]
    final: LayerInputs | None   # hidden states after the last (compressed) layer (keep_final)
    seconds_per_layer: list[float]


def chain(*fns: MethodFn) -> MethodFn:
    """Run several method functions on each layer in order; results merged (later wins)."""
    def run(layer_idx, layer, prefix, inputs, ctx):
        qw, info = {}, {}
        for fn in fns:
            q, i = fn(layer_idx, layer, prefix, inputs, ctx)
            qw.update(q)
            for k, v in i.items():
                info.setdefault(k, {}).update(v)
        return qw, info
    run.__name__ = "+".join(getattr(f, "__name__", getattr(getattr(f, "func", None), "__name__",
                                                              "fn")) for f in fns)
    return run


@torch.no_grad()
def compress_sequential(model: nn.Module, batches: Iterable, scheme: Scheme, method_fn: MethodFn,
                        device=None, targets: Iterable[str] | None = None,
                        ignore: Iterable[str] | None = None, offload: bool = True,
                        partial_last_group: bool = False, options: dict | None = None,
                        progress: bool = True, spill_dir=None,
                        keep_final: bool = False, stream=None) -> SequentialResult:
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

    batches = list(batches)
    if not batches:
        raise ValueError("no calibration batches")
    hidden, kwargs, masks = capture_layer_inputs(model, batches, device, storage)
    for j, h in enumerate(hidden):
        if not torch.isfinite(h).all():
            raise FloatingPointError(f"NaN or Inf in the embeddings' output on calibration batch "
                                     f"{j}: check the embedding weights and the token ids")
    if spill_dir is not None:
        hidden = DiskTensors(spill_dir, hidden)
    inputs = LayerInputs(hidden, kwargs[0], masks, device, storage, spill_dir=spill_dir)

    qweights, infos, times = {}, {}, []
    name = getattr(method_fn, "__name__", getattr(getattr(method_fn, "func", None), "__name__",
                                                  "compress"))
    bar = tqdm(range(len(layers)), desc=name, disable=not progress, unit="layer")
    for i in bar:
        t0 = time.perf_counter()
        layer = layers[i]
        lp = f"{prefix}.{i}"
        if stream is not None:
            stream.load(i, layer, lp)
        home = next(layer.parameters()).device
        layer.to(device)
        linears = target_linears(layer, lp, targets, ignore)
        # scales are stored in the weights' dtype (bf16 model -> bf16 scales)
        scale_dtype = next(iter(linears.values())).weight.dtype if linears else \
            next(layer.parameters()).dtype
        ctx = LayerContext(scheme, device, i, lp, linears, scale_dtype, partial_last_group,
                           dict(options or {}))
        qw, info = method_fn(i, layer, lp, inputs, ctx)
        if stream is None:
            qweights.update(qw)
        for k, v in info.items():
            infos.setdefault(k, {}).update(v)
        prev = inputs.hidden
        if i + 1 < len(layers) or keep_final:
            try:
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


def identity_method(layer_idx, layer, prefix, inputs, ctx):
    """Compresses nothing: the pipeline then reproduces the model's forward (a test oracle)."""
    return {}, {}

