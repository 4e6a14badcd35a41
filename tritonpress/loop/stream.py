"""Streaming: a model compressed one decoder layer at a time, from its shards to the checkpoint.

The in-memory path loads the whole model (from_pretrained) and keeps it until the checkpoint
is written. Here the model is a skeleton whose parameters are on the meta device (no memory;
buffers such as rotary tables are real); the embeddings, final norm and lm_head are read from
the safetensors shards when something needs them, each decoder layer just before its turn,
and each layer is freed as soon as its compressed tensors are handed to the checkpoint writer
(checkpoint.CheckpointWriter, the same writer and the same order as the in-memory path, so
both write the same bytes; it holds no tensor in memory). Peak memory: the non-layer
tensors, one decoder layer and the calibration activations, whatever the depth (flat when the
model exceeds memory, see map_large_allocations).

Data-free schemes (RTN, FP8) never load the non-layer tensors into modules: after the last
layer they are read from the input shards and handed to the writer as they are.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..models import check_finite
from ..checkpoint import ShardReader, tied_aliases
from . import experts
from .targets import find_decoder_layers
from ..report import step


class NotStreamable(ValueError):
    """The model directory cannot be read layer by layer (no safetensors, other tensor names)."""


@contextmanager
def params_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random
    init); buffers are made as usual, so rotary tables and the like are real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class Stream:
    """A Hugging Face model directory as a skeleton whose tensors are loaded on demand.

    The pipeline calls load(i, layer, prefix) before decoder layer i and done(i, layer,
    prefix, qweights) after it (compress_sequential's `stream`); done hands the layer to the
    `writer` (a CheckpointWriter, if set) and to `evaluation` (evaluate.LayerwiseEval, if
    set), then frees it."""

    def __init__(self, path, dtype: torch.dtype):
        from transformers import AutoConfig, AutoModelForCausalLM

        d = Path(path)
        if not any((d / f).is_file() for f in ("model.safetensors.index.json",
                                                "model.safetensors")):
            raise NotStreamable(f"{d} has no model.safetensors(.index.json): only "
                                "safetensors checkpoints stream; re-save the model with "
                                "save_pretrained (safetensors) or pass stream=False")
        self.reader = ShardReader(path)
        config = AutoConfig.from_pretrained(path)
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model = model.eval()
        if (Path(path) / "generation_config.json").is_file():   # as from_pretrained reads it
            from transformers import GenerationConfig
            model.generation_config = GenerationConfig.from_pretrained(path)
        # Mixture-of-Experts: one Linear per expert matrix, read under the names the original
        # checkpoints (and save_pretrained) give them (Mixtral's mlp. -> block_sparse_moe.)
        self.stored = (experts.checkpoint_names(model) if experts.linearize_experts(model)
                       else None) or (lambda name: name)
        # what from_pretrained keeps in fp32: _keep_in_fp32_modules_strict under fp16/bf16,
        # _keep_in_fp32_modules under fp16
        self.fp32_modules = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) \
            if dtype in (torch.float16, torch.bfloat16) else ()
        if dtype == torch.float16:
            self.fp32_modules += tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.layers, self.prefix = find_decoder_layers(model)
        # after each layer, the heap glibc keeps goes back to the system (26 ms a layer: set by
        # compress() when the model is larger than the memory available)
        self.return_memory = False
        self.aliases = tied_aliases(model)               # a tied lm_head is read as the embeddings
        want = [k for k in model.state_dict() if k not in self.aliases]
        missing = [k for k in want if self.stored(k) not in self.reader.file_of]
        if missing:
            raise NotStreamable(
                f"{path}: the checkpoint's tensor names do not match the model's "
                f"({len(missing)} missing, e.g. {', '.join(missing[:3])}): it needs "
                "transformers' conversion on load; pass stream=False (--stream off)")
        self.writer = None
        self.evaluation = None

    def _read(self, names) -> dict[str, torch.Tensor]:
        """{in-memory name: tensor}, each read under its stored name."""
        names = list(names)
        got = self.reader.read(self.stored(n) for n in names)
        return {n: got[self.stored(n)] for n in names}

    def _materialise(self, module: nn.Module, prefix: str, skip: tuple = ()) -> None:
        """Read the module's parameters (on meta) and the persistent buffers the checkpoint
        holds (the skeleton made them with initial values: DeepSeek-V3's routing bias)."""
        pre = f"{prefix}." if prefix else ""
        local = {k: v for k, v in module.state_dict().items()
                 if (v.device.type == "meta" or self.stored(pre + k) in self.reader.file_of)
                 and pre + k not in self.aliases and not (pre + k).startswith(skip)}
        tensors = self._read(pre + k for k in local)
        check_finite(tensors.items())
        with torch.no_grad():
            for k, meta in local.items():
                t = tensors[pre + k]
                if t.is_floating_point():   # what from_pretrained(dtype=...) does
                    keep = any(m in pre + k for m in self.fp32_modules)
                    t = t.to(torch.float32 if keep else meta.dtype)
                owner, _, attr = k.rpartition(".")
                m = module.get_submodule(owner) if owner else module
                if attr in m._parameters:
                    m._parameters[attr] = nn.Parameter(t, requires_grad=False)
                else:
                    m._buffers[attr] = t

    def load_rest(self, lm_head: bool = True) -> None:
        """Embeddings, final norm and (unless lm_head=False: a run without evaluation never
        computes logits) lm_head: everything outside the decoder layers, for the capture of
        layer 0's inputs and the evaluation's logits."""
        out = self.model.get_output_embeddings()
        skip = () if lm_head or out is None else tuple(
            f"{n}." for n, m in self.model.named_modules() if m is out)
        _set_layers(self.model, self.prefix, nn.ModuleList())
        try:
            self._materialise(self.model, "", skip)
        finally:
            _set_layers(self.model, self.prefix, self.layers)
        self.model.tie_weights()

    def load(self, i: int, layer: nn.Module, prefix: str) -> None:
        self._materialise(layer, prefix)
        if self.evaluation is not None:
            self.evaluation.before(i, layer)

    def done(self, i: int, layer: nn.Module, prefix: str, qweights: dict) -> None:
        if self.evaluation is not None:
            self.evaluation.after(i, layer, prefix)
        if self.writer is not None:
            with step("write"):
                self.writer.add(layer, prefix, qweights, skip=self.aliases)
        layer.to("meta")
        if self.return_memory:
            return_freed_memory()

    def write_rest(self, tokenizer) -> Path:
        """After the last layer: the non-layer tensors (from the modules where loaded, else
        straight from the input shards, in the model's dtype; in the model's order, as the
        in-memory path writes them), the config and the tokenizer."""
        _set_layers(self.model, self.prefix, nn.ModuleList())
        try:
            sd = {k: t for k, t in self.model.state_dict().items()
                  if k not in self.aliases and k not in self.writer.written}
            read = self._read(k for k, t in sd.items() if t.device.type == "meta")
            for k, t in read.items():
                sd[k] = t.to(sd[k].dtype) if t.is_floating_point() else t
            self.writer.add(_Tensors(sd), "", {})
            del sd, read
        finally:
            _set_layers(self.model, self.prefix, self.layers)
        return self.writer.finish(self.model, tokenizer)


def map_large_allocations() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process, so that every block of 1 MiB or
    more is mapped on its own and handed back to the system when freed. glibc's default
    threshold rises (up to 32 MiB) as large blocks are freed, and a layer's solves then leave
    their temporaries of that size in heaps that fragment: the peak of a streamed run grows by
    chance from layer to layer (measured, GPTQ on a 1024-wide Llama, 16 layers: 1.04 GB, then
    1.12 GB from layer 10 on; with this, 0.83 GB at every layer). The price is a page fault
    per page of every such block (GPTQ on a 2048-wide Llama: 1.2-1.5x the seconds), so
    compress() pays it only when the model is larger than the memory available. No-op off
    glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)                          # M_MMAP_THRESHOLD


def keep_large_allocations() -> None:
    """The opposite choice, for runs with memory to spare: blocks up to 1 GiB come from the
    heap and freed memory stays there (trimmed at 2 GiB), so a layer's temporaries of tens of
    MB (an MoE layer's stacked gate/up is 57 MB in fp32) are reused instead of mapped, faulted
    in page by page and unmapped each time. glibc's default maps every block over 32 MiB and
    trims the heap at 64 MiB; an MoE layer's GPTQ solves took 1.22 s with it, 0.99 s with
    this. compress() hands the kept memory back when it ends (return_freed_memory). For the
    life of the process; no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 30)                          # M_MMAP_THRESHOLD
        libc.mallopt(-1, (1 << 31) - 1)                    # M_TRIM_THRESHOLD (an int)


def return_freed_memory() -> None:
    """Hand the heap glibc keeps after a layer's solves back to the system (measured on a
    2048-wide Llama: the RSS at each layer's start stays at 0.66 GB instead of creeping to
    1.3 GB); under a memory limit that kept heap counts as used. No-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """glibc's handle, or None elsewhere (musl, macOS, Windows)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim          # noqa: B018 (both are glibc's own)
        return libc
    except (OSError, AttributeError):
        return None


class _Tensors(nn.Module):
    """Plain named tensors behind the state_dict interface the writer reads."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.tensors = tensors

    def state_dict(self, prefix: str = "", **kwargs):
        return {prefix + k: t for k, t in self.tensors.items()}


def _set_layers(model: nn.Module, prefix: str, layers: nn.ModuleList) -> None:
    owner, _, attr = prefix.rpartition(".")
    setattr(model.get_submodule(owner), attr, layers)


# ----------------------------------------------------------------------------- memory plan

def available_memory() -> int | None:
    """Bytes this process can still use: the smaller of the machine's MemAvailable and the
    room left under its cgroup's memory limit (v1 or v2); None if neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, rel = line.split(":", 2)
            if ctrl == "memory":
                root, limit, usage = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", \
                    "memory.usage_in_bytes"
            elif ctrl == "":
                root, limit, usage = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
            else:
                continue
            # in a container the mount shows the group's own subtree: drop leading parts
            parts = [x for x in rel.split("/") if x]
            g = next((root.joinpath(*parts[k:]) for k in range(len(parts) + 1)
                      if (root.joinpath(*parts[k:]) / limit).exists()), root)
            text = (g / limit).read_text().strip() if (g / limit).exists() else "max"
            if text != "max" and int(text) < 1 << 60:
                found.append(int(text) - int((g / usage).read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(model: nn.Module, num_tokens: int, streamed: bool, spill_dir) -> dict:
    """Fail before any work when the run cannot fit: returns {need, available} in bytes, or
    raises MemoryError naming what takes the memory and the option that frees it. Counted is
    what is still to be allocated (the model, or streamed its non-layer tensors, is loaded
    already): the cached activations (a layer's inputs and outputs in the model's dtype; none
    with a spill_dir), a few copies of the largest decoder layer for the solves, and streamed
    the layer itself (the checkpoint writer holds nothing: tensors go to disk as added)."""
    layers, _ = find_decoder_layers(model)
    p = next(model.parameters())
    act = 0 if spill_dir is not None else \
        2 * num_tokens * model.config.hidden_size * p.element_size()
    layer = max((sum(t.numel() * t.element_size() for t in l.parameters()) for l in layers),
                default=0)
    weights = 4 * layer + (layer if streamed else 0)
    need, avail = act + weights, available_memory()
    if avail is not None and need > avail:
        fixes = []
        if act:
            fixes += [f"--spill-dir DIR keeps the calibration activations ({act / 1e9:.1f} GB) "
                      "on disk", "fewer --num-samples or a shorter --seq-len shrink them"]
        if not streamed:
            total = sum(t.numel() * t.element_size() for t in model.parameters())
            fixes.append(f"--stream on frees the whole model ({total / 1e9:.1f} GB) for one "
                         "decoder layer at a time (needs safetensors shards)")
        raise MemoryError(
            f"this run needs about {need / 1e9:.1f} GB more memory and {avail / 1e9:.1f} GB "
            f"are available (activations {act / 1e9:.1f} GB, layer weights and solves "
            f"{weights / 1e9:.1f} GB): " + ("; ".join(fixes) or "use a larger machine") + ".")
    return {"need": need, "available": avail}
