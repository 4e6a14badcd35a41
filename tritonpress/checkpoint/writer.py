"""Writing a compressed-tensors checkpoint that vLLM loads (the layout: format.py).

The integers and fp8 values are written exactly as the algorithm chose them: nothing here
quantizes. The directory appears only when complete (temp dir beside it, fsync, rename).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from ..schemes import Scheme
from .format import (ACTORDERS, SPARSE_FORMATS, compressed_tensors_for, quantization_config,
                     weight_format)
from .qweight import QuantizedWeight

MAX_SHARD_BYTES = 1 << 30      # output shard size (on disk; no shard is held in memory)


# ----------------------------------------------------------------------------- checks

def _check_qweight(name: str, m, qw: QuantizedWeight, scheme: Scheme, fmt: str,
                   sparse_format: str) -> None:
    if not isinstance(m, torch.nn.Linear):
        raise ValueError(f"{name!r} is not a Linear module of the model; quantized weights are "
                         "keyed by the Linear's full module name")
    if tuple(qw.q.shape) != tuple(m.weight.shape):
        raise ValueError(f"{name}: quantized weight is {tuple(qw.q.shape)} but the layer is "
                         f"{tuple(m.weight.shape)}")
    if qw.args != scheme.weights:
        raise ValueError(f"{name}: quantized with {qw.args}, but the scheme says {scheme.weights}")
    a = qw.args
    want = torch.uint8 if a.is_fp4 else torch.float8_e4m3fn if a.type == "float" else torch.int8
    if qw.q.dtype != want:
        raise ValueError(f"{name}: values are {qw.q.dtype}, expected {want}")
    grouped = a.strategy in ("group", "tensor_group")
    ngroups = qw.q.shape[1] // a.group_size if grouped else 1
    if grouped and qw.q.shape[1] % a.group_size:
        raise ValueError(f"{name}: {qw.q.shape[1]} input features are not a multiple of "
                         f"group size {a.group_size}")
    want_shape = (qw.q.shape[0], ngroups)
    if a.strategy == "block":
        (bh, bw), (o, i) = a.block_structure, qw.q.shape
        want_shape = (-(-o // bh), -(-i // bw))
    if tuple(qw.scale.shape) != want_shape:
        raise ValueError(f"{name}: scale is {tuple(qw.scale.shape)}, expected {want_shape}")
    if a.strategy == "tensor_group" and qw.global_scale is None:
        raise ValueError(f"{name}: NVFP4 weights need their global scale (weight_global_scale)")
    if qw.args.symmetric and qw.zero_point is not None:
        raise ValueError(f"{name}: zero point given for a symmetric scheme")
    if not qw.args.symmetric and qw.zero_point is None:
        raise ValueError(f"{name}: zero point missing for an asymmetric scheme")
    if sparse_format == "sparse-24-bitmask":
        if fmt == "pack-quantized":
            raise ValueError("sparse-24-bitmask stores 8-bit weights only; "
                             "use sparse_format='dense' for packed schemes")
        if not qw.is_24_sparse():
            raise ValueError(f"{name} is not 2:4 sparse (some group of 4 input weights has "
                             "more than two nonzeros); use sparse_format='dense'")


def tied_aliases(model) -> dict[str, str]:
    """Tensor names that share a parameter with an earlier one (a tied lm_head), to the name
    they share it with: saved once, under the first name, as save_pretrained does."""
    first, out = {}, {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[n] = first[id(p)]
        else:
            first[id(p)] = n
    return out


# ----------------------------------------------------------------------------- writing

def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)                       # safetensors' Rust writer raises its own error type
        if "No space left on device" in text or "StorageFull" in text or "os error 28" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


# safetensors' dtype names, in the order of its Dtype enum: save_file lays tensors out by that
# order, descending, then by name; _write_shard does the same so the bytes are save_file's
_ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8",
              torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
              torch.float8_e8m0fnu: "F8_E8M0", torch.int16: "I16", torch.uint16: "U16",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
              torch.uint32: "U32", torch.float32: "F32", torch.complex64: "C64",
              torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_ST_RANK = {d: i for i, d in enumerate(_ST_DTYPES)}
_COPY_CHUNK = 16 << 20


def _write_shard(entries: list[tuple], data: Path, path: Path) -> None:
    """Write the safetensors file `path` holding `entries` (name, dtype, shape, offset, nbytes),
    whose bytes lie at `offset` in the raw file `data`: the bytes safetensors.torch.save_file
    writes for those tensors (header JSON in layout order, padded with spaces to 8 bytes), but
    copied a chunk at a time, where save_file first serialises every tensor in memory."""
    order = sorted(entries, key=lambda e: (-_ST_RANK[e[1]], e[0]))
    header, end = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _, n in order:
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [end, end + n]}
        end += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(data, "rb") as src, open(path, "wb") as dst:
        dst.write(struct.pack("<Q", len(head)) + head)
        for *_, start, n in order:
            while n:
                chunk = os.pread(src.fileno(), min(n, _COPY_CHUNK), start)
                dst.write(chunk)
                start, n = start + len(chunk), n - len(chunk)


class CheckpointWriter:
    """A compressed-tensors checkpoint written a module at a time into a temporary folder
    beside `out_dir`, renamed into place by finish() only: a failed or interrupted run leaves
    nothing (use it as a context manager). The in-memory path writes every decoder layer and
    then the rest of the model through it; the streaming path (stream.py) each decoder layer
    as soon as it is compressed. Both feed it the same tensors in the same order, so both
    write the same bytes. Each tensor goes to disk when added (memory: none held), into a
    raw file that becomes a shard once it holds `max_shard_bytes` (disk: the checkpoint plus
    one shard); one shard is named model.safetensors, several
    model-0000i-of-0000n.safetensors with model.safetensors.index.json, as save_pretrained
    names them."""

    def __init__(self, out_dir, scheme: Scheme, *, overwrite: bool = False,
                 sparse_format: str = "dense", actorder: str | None = None,
                 max_shard_bytes: int | None = None):
        if sparse_format not in SPARSE_FORMATS:
            raise ValueError(f"unknown sparse format {sparse_format!r}: choose one of "
                             f"{SPARSE_FORMATS}")
        if actorder not in ACTORDERS:
            raise ValueError(f"actorder={actorder!r}: the checkpoint records None or 'static'")
        self.out_dir = Path(out_dir).expanduser().absolute()
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; pass --overwrite "
                                  "(overwrite=True) to replace it")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise FileExistsError(f"{self.out_dir} exists and is not a directory")
        self.scheme, self.overwrite, self.actorder = scheme, overwrite, actorder
        self.sparse_format, self.fmt = sparse_format, weight_format(scheme)
        self.max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
        self.written: set[str] = set()         # tensor names already on disk
        self.quantized: set[str] = set()       # Linear names written compressed
        self.zeros = self.total = 0            # for the bitmask format's global_sparsity
        self.entries: list[tuple] = []         # the open shard's tensors, in its raw file
        self.data = None                        # that raw file, open for appending
        self.data_bytes = 0
        self.shards: list[tuple[Path, list[str], int]] = []
        self.rename = None     # Mixture-of-Experts: in-memory -> original checkpoint names
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-",
                                         dir=self.out_dir.parent))
        os.chmod(self.tmp, 0o777 & ~_umask())   # mkdtemp's 0700 would hide it from other users

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.data is not None:
            self.data.close()
        if exc is not None:                     # KeyboardInterrupt too: never a partial dir
            shutil.rmtree(self.tmp, ignore_errors=True)
            if _is_disk_full(exc):
                raise OSError(errno.ENOSPC, f"ran out of disk space writing the checkpoint to "
                              f"{self.out_dir}; nothing was written") from exc
        return False

    def add(self, module, prefix: str, qweights: dict[str, QuantizedWeight],
            skip: dict[str, str] | None = None) -> None:
        """Buffer `module`'s tensors (its state dict, named prefix + key) with the Linears in
        `qweights` (full names) replaced by their compressed tensors; names in `skip` (tied
        aliases) and names already written are left out."""
        pre = f"{prefix}." if prefix else ""
        sd = module.state_dict(prefix=pre)
        mine = {n: qw for n, qw in qweights.items()
                if n.startswith(pre) and f"{n}.weight" in sd and f"{n}.weight" not in self.written}
        for name, qw in mine.items():
            m = module.get_submodule(name[len(pre):])
            _check_qweight(name, m, qw, self.scheme, self.fmt, self.sparse_format)
        if skip:
            for alias, first in skip.items():
                if alias.removesuffix(".weight") in mine:
                    raise ValueError(f"{alias.removesuffix('.weight')} shares its weight with "
                                     f"{first} and cannot be quantized alone; keep it in the "
                                     "scheme's ignore list")
        for name, qw in mine.items():
            t = sd.pop(f"{name}.weight")
            if self.sparse_format == "sparse-24-bitmask":
                self._count(qw.q)
            sd.update(compressed_tensors_for(name, qw, self.fmt, t.dtype, self.sparse_format))
            self.quantized.add(name)
        for k, t in sd.items():
            if k in self.written or (skip and k in skip):
                continue
            if t.device.type == "meta":
                raise RuntimeError(f"{k} has no data (a streamed layer released before it was "
                                   "written)")
            if self.sparse_format == "sparse-24-bitmask" and k.rsplit(".", 1)[0] not in mine:
                self._count(t)
            self._append(k, t.detach())
            self.written.add(k)
        self.written.update(f"{n}.weight" for n in mine)   # stored compressed
        if self.data_bytes >= self.max_shard_bytes:
            self._flush()

    def names_of(self, model) -> None:
        """Mixture-of-Experts: per-expert tensors named as the model's original checkpoints
        name them (loop/experts.checkpoint_names); called before the first add (a streamed
        run: when the writer is made)."""
        from ..loop import experts
        if experts.moe_blocks(model):
            self.rename = experts.checkpoint_names(model)

    def _append(self, name: str, t: torch.Tensor) -> None:
        if self.rename is not None:
            name = self.rename(name)
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{name} is {t.dtype}, which safetensors cannot store")
        if self.data is None:
            self.data = open(self.tmp / f".shard-{len(self.shards)}.raw", "wb")
        n = t.numel() * t.element_size()
        self.entries.append((name, t.dtype, tuple(t.shape), self.data_bytes, n))
        if n:                                   # safetensors stores little-endian
            assert sys.byteorder == "little"
            self.data.write(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.data_bytes += n

    def _count(self, t: torch.Tensor) -> None:
        self.zeros += int((t.float() == 0).sum())
        self.total += t.numel()

    def _flush(self) -> None:
        if not self.entries:
            return
        raw = Path(self.data.name)
        self.data.close()
        free = shutil.disk_usage(self.tmp).free
        if self.data_bytes > free:
            raise OSError(errno.ENOSPC, f"not enough disk space for the checkpoint at "
                          f"{self.out_dir}: the next shard needs {self.data_bytes / 1e9:.2f} "
                          f"GB, {free / 1e9:.2f} GB free")
        path = self.tmp / f".shard-{len(self.shards)}.safetensors"
        _write_shard(self.entries, raw, path)
        raw.unlink()
        self.shards.append((path, [e[0] for e in self.entries], self.data_bytes))
        self.entries, self.data, self.data_bytes = [], None, 0

    def finish(self, model, tokenizer=None, qweights: dict | None = None) -> Path:
        """Write what is left of `model` (embeddings, norms, lm_head: every tensor not written
        yet; those of Linears in `qweights` compressed), the config with its
        quantization_config and the tokenizer; rename into place."""
        from ..loop import experts
        self.names_of(model)
        aliases = tied_aliases(model)
        self.add(model, "", qweights or {}, skip=aliases)
        self._flush()
        n = len(self.shards)
        weight_map, total = {}, 0
        for i, (path, names, nbytes) in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(path, self.tmp / final)
            total += nbytes
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")
        # every Linear left unquantized, and the routers beside experts (llm-compressor's)
        ignore = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and k not in self.quantized]
        ignore += [k for k in experts.router_names(model) if k not in ignore]
        if self.rename is not None:
            ignore = [self.rename(k) for k in ignore]
        sparsity = None
        if self.sparse_format == "sparse-24-bitmask":
            sparsity = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                        "targets": ["Linear"], "ignore": list(ignore),
                        "global_sparsity": self.zeros / max(self.total, 1)}
        # the config as save_pretrained writes it (its dtype and architectures set first)
        model.config.dtype = str(model.dtype).removeprefix("torch.")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(self.tmp)
        if getattr(model, "can_generate", lambda: False)():
            model.generation_config.save_pretrained(self.tmp)
        cfg_path = self.tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"] = quantization_config(self.scheme, ignore, sparsity,
                                                         self.actorder)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(self.tmp)
        _fsync_tree(self.tmp)
        _commit(self.tmp, self.out_dir, self.overwrite)
        return self.out_dir


def save_checkpoint(model, tokenizer, qweights: dict[str, QuantizedWeight], scheme: Scheme,
                    out_dir, overwrite: bool = False, sparse_format: str = "dense",
                    actorder: str | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a Hugging Face model directory in compressed-tensors format; return its path.

    `actorder` is recorded in the weights' quantization args: "static" when GPTQ swept the
    columns in activation order (the groups stay on the original columns, so nothing else in
    the checkpoint changes), None otherwise.

    `sparse_format="sparse-24-bitmask"` stores 2:4-sparse 8-bit weights compressed (loaded by
    vLLM <= 0.19 through compressed-tensors <= 0.14); the default keeps the zeros in the
    ordinary float/int-quantized form every vLLM loads.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("the model was loaded already quantized; load the original model")
    if not qweights:
        raise ValueError("no quantized weights to save")
    modules = dict(model.named_modules())
    for name in qweights:
        if not isinstance(modules.get(name), torch.nn.Linear):
            raise ValueError(f"{name!r} is not a Linear module of the model; quantized weights "
                             "are keyed by the Linear's full module name")
    from ..loop.targets import find_decoder_layers
    try:
        layers, prefix = find_decoder_layers(model)
    except ValueError:
        layers, prefix = [], ""
    aliases = tied_aliases(model)
    with CheckpointWriter(out_dir, scheme, overwrite=overwrite, sparse_format=sparse_format,
                          actorder=actorder, max_shard_bytes=max_shard_bytes) as w:
        w.names_of(model)
        for i, layer in enumerate(layers):      # the order the streaming path writes in
            w.add(layer, f"{prefix}.{i}", qweights, skip=aliases)
        return w.finish(model, tokenizer, qweights)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _commit(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished temp dir into place; an existing dir is replaced only now."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while writing; pass --overwrite "
                                  "(overwrite=True) to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        old.rmdir()
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
