"""Resume a sequential compression from the last finished decoder layer.

After a layer's method has run, `resumable` saves into the resume folder, atomically (temp
file, fsync, rename), one file per layer: the layer's tensors the method changed (compressed
Linear weights; norms rescaled by SmoothQuant/AWQ), its QuantizedWeights and infos. On a rerun
with the same folder, finished layers load that state instead of calibrating; the pipeline
then replays the batches through the restored layer, which recomputes the next layer's inputs
exactly (the forward is deterministic), so the result equals an uninterrupted run's.

A manifest pins what the state belongs to (model config and weights' shapes, scheme, method and
options, calibration tokens); a folder from another run is refused, never mixed in.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def fingerprint(model, scheme, batches, options: dict) -> dict:
    """What a resume folder's state depends on (options: the recipe and the run's options);
    compared key by key on resume."""
    h = hashlib.sha256()
    for b in batches or []:
        ids = b if isinstance(b, torch.Tensor) else b["input_ids"]
        h.update(ids.cpu().numpy().tobytes())
        mask = None if isinstance(b, torch.Tensor) else b.get("attention_mask")
        if mask is not None:
            h.update(mask.cpu().numpy().tobytes())
    cfg = getattr(model, "config", None)
    cfg = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    shapes = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype))
                                  for n, p in model.named_parameters()]).encode()).hexdigest()
    return {"model_config": hashlib.sha256(cfg.encode()).hexdigest(), "parameters": shapes,
            "scheme": repr(scheme),
            "options": json.dumps(options, sort_keys=True, default=str),
            "calibration": h.hexdigest()}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumeState:
    """Per-layer state in `folder` for the run described by `fp` (see fingerprint).
    `resumed`: the indices of the layers this run restored instead of computing (for the
    report: len(state.resumed) layers resumed)."""

    def __init__(self, folder, fp: dict, write: bool = True):
        self.folder, self.write = Path(folder), write
        self.resumed: list[int] = []
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
            if diff:
                raise ValueError(f"resume folder {self.folder} holds the state of a different run "
                                 f"(differs in: {', '.join(diff)}): pass the same model, scheme, "
                                 "method, options and data as before, or another --resume-dir "
                                 "(or delete this one to start over)")
        elif write:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic_write(manifest, lambda f: f.write(json.dumps(fp, indent=1).encode()))

    def path(self, i: int) -> Path:
        return self.folder / f"layer_{i:04d}.pt"

    def done(self, i: int) -> bool:
        return self.path(i).exists()

    def save(self, i: int, changed: dict, qweights: dict, infos: dict) -> None:
        if self.write:
            state = {"changed": changed, "qweights": qweights, "infos": infos}
            _atomic_write(self.path(i), lambda f: torch.save(state, f))

    def load(self, i: int) -> dict:
        return torch.load(self.path(i), map_location="cpu", weights_only=False)


def resumable(method_fn, state: ResumeState):
    """Wrap a pipeline method function: finished layers are restored from `state`, the others
    run `method_fn` and are saved once it returns."""
    def run(layer_idx, layer, prefix, inputs, ctx):
        sd = layer.state_dict(keep_vars=False)
        if state.done(layer_idx):
            s = state.load(layer_idx)
            with torch.no_grad():
                for k, v in s["changed"].items():
                    sd[k].copy_(v)
            for name, qw in s["qweights"].items():     # NVFP4's calibrated activation scale,
                if qw.input_global_scale is not None:  # which the evaluation simulates with
                    ctx.linears[name].input_global_scale = qw.input_global_scale
            state.resumed.append(layer_idx)
            return s["qweights"], s["infos"]
        before = {k: v.detach().clone() for k, v in sd.items()}
        qw, info = method_fn(layer_idx, layer, prefix, inputs, ctx)
        after = layer.state_dict(keep_vars=False)
        changed = {k: v.detach().cpu().clone() for k, v in after.items()
                   if v.shape != before[k].shape or not torch.equal(v, before[k])}
        state.save(layer_idx, changed, qw, info)
        return qw, info
    run.__name__ = getattr(method_fn, "__name__", getattr(getattr(method_fn, "func", None),
                                                          "__name__", "compress"))
    return run
