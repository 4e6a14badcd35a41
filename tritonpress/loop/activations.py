"""The calibration activations as one decoder layer sees them, and their capture.

``capture_layer_inputs`` runs the calibration batches through the embeddings only: every
decoder layer is swapped for a catcher that records what it is called with (hidden states for
layer 0, the keyword arguments - attention mask, position embeddings, ... - for every layer,
since sliding-window models give layers different masks); the last catcher raises to stop the
forward. No decoder layer runs. ``LayerInputs`` holds the result between layers (on the CPU, or
in files: ``DiskTensors``) and replays it through a layer (``run``).
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..models import all_finite
from ..report import step
from .targets import find_decoder_layers


# ----------------------------------------------------------------------------- layer inputs

@dataclass
class LayerInputs:
    """The calibration batches as one decoder layer sees them."""
    hidden: list[torch.Tensor]                 # per batch [b, s, d], on the storage device
    kwargs: list[dict[str, Any]]               # per batch keyword arguments of the layer call
    token_masks: list[torch.Tensor | None]     # per batch [b, s] bool (True = real token)
    device: torch.device                       # where the layer computes
    storage: torch.device                      # where hidden states are kept between layers
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
    def run(self, layer: nn.Module, keep: bool = True, label: str | None = None,
            before_batch: Callable[[torch.Tensor | None], None] | None = None
            ) -> list[torch.Tensor]:
        """Replay every batch through `layer`; outputs (hidden states) kept on the storage
        device, or dropped when keep=False: a statistics pass, which a hook may end early on a
        batch by raising StopLayer once it has what it needs. `before_batch(mask)` is called
        before each batch with its token mask (hooks that leave padding out need it).
        `label`: the profile step."""
        outs = [] if self.spill_dir is None or not keep else DiskTensors(self.spill_dir)
        with step(label or ("propagate" if keep else "statistics pass"), self.device):
            for i in range(len(self)):
                h, kw, mask = self.batch(i)
                if before_batch is not None:
                    before_batch(mask)
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
    if not all_finite(y):
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
