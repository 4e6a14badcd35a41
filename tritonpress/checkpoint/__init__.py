"""Write (and read back) compressed-tensors checkpoints that vLLM loads.

Layout per quantized Linear `<name>` (compressed-tensors 0.19 formats):
  float-quantized   <name>.weight        float8_e4m3fn [out, in]    + <name>.weight_scale [out, 1]
  int-quantized     <name>.weight        int8 [out, in]             + <name>.weight_scale [out, 1]
  pack-quantized    <name>.weight_packed int32 [out, ceil(in/8)]    (nibble k of word j = column
                                                                    8j+k, stored as value + 8)
                    <name>.weight_scale  [out, in/group]
                    <name>.weight_shape  int64 [2]
                    <name>.weight_zero_point int32 [ceil(out/8), in/group] (asymmetric only: packed
                                                                    like the weight but along OUT)
  sparse-24-bitmask <name>.compressed    the 2 kept values of every 4, [out, in/2] (row-major order)
  (legacy, 2:4)     <name>.bitmask       uint8 [out, ceil(in/8)], bit j of byte k = column 8k+j kept
                    <name>.shape         int64 [2, 1], + <name>.weight_scale as above
Scales are stored in the model's dtype. Everything else (embeddings, norms, lm_head, biases) is
saved as the model holds it (tied aliases left out, as save_pretrained leaves them out).

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

from ..kernels import quant
from ..schemes import QuantArgs, Scheme
from .qweight import QuantizedWeight

CT_VERSION = "0.19.0"          # compressed-tensors version whose config layout we write
SPARSE_FORMATS = ("dense", "sparse-24-bitmask")
MAX_SHARD_BYTES = 1 << 30      # output shard size (on disk; no shard is held in memory)


# ----------------------------------------------------------------------------- config

ACTORDERS = (None, "static")


def _args_dict(a: QuantArgs, observer: str | None, actorder: str | None = None) -> dict:
    """QuantizationArgs as config.json holds it: the fields every compressed-tensors release
    since 0.4 knows (vLLM validates with extra="forbid" against the version it pins).
    actorder: "static" for weights GPTQ swept in activation order (what llm-compressor writes;
    compressed-tensors 0.19 reads it as an alias of "weight", no g_idx), else None."""
    return {"num_bits": a.num_bits, "type": a.type, "symmetric": a.symmetric,
            "group_size": a.group_size if a.strategy == "group" else None,
            "strategy": a.strategy, "block_structure": None, "dynamic": a.dynamic,
            "actorder": actorder, "observer": observer, "observer_kwargs": {}}


def weight_format(scheme: Scheme) -> str:
    """compressed-tensors format of the weights. Integer weight-only schemes are packed even at
    8 bits: vLLM reads int-quantized as a W8A8 format and wants activation args with it."""
    w = scheme.weights
    if w.type == "float":
        return "float-quantized"
    if scheme.input_activations is None or w.num_bits < 8:
        return "pack-quantized"
    return "int-quantized"


def quantization_config(scheme: Scheme, ignore: list[str], sparsity: dict | None = None,
                        actorder: str | None = None) -> dict:
    """The `quantization_config` entry of config.json (what compressed-tensors 0.19's
    ModelCompressor.update_config writes for a one-group model). actorder: the activation
    order the weights were GPTQ-quantized with ("static") or None (RTN, AWQ, SparseGPT, ...)."""
    if actorder not in ACTORDERS:
        raise ValueError(f"actorder={actorder!r}: the checkpoint records None or 'static'")
    fmt = weight_format(scheme)
    act = scheme.input_activations
    group = {"targets": ["Linear"],
             "weights": _args_dict(scheme.weights, "minmax", actorder),
             "input_activations": None if act is None else _args_dict(act, None),
             "output_activations": None,
             "format": fmt}
    return {"quant_method": "compressed-tensors", "version": CT_VERSION, "format": fmt,
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": sparsity or {}, "transform_config": {}}


def quant_args_from_dict(d: dict) -> QuantArgs:
    """compressed-tensors QuantizationArgs (JSON) -> QuantArgs, with its defaults: 8-bit
    symmetric int, strategy "group" when a group size is given, else "tensor". The one reader
    of quant args (checkpoint loading and the runtime)."""
    strategy = d.get("strategy") or ("group" if d.get("group_size") else "tensor")
    return QuantArgs(int(d.get("num_bits", 8)), d.get("type", "int"),
                     bool(d.get("symmetric", True)), strategy,
                     d.get("group_size") if strategy == "group" else None,
                     bool(d.get("dynamic", False)))


# ----------------------------------------------------------------------------- tensor layouts

def _pack4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols/8)]. Padding columns are stored as
    raw nibble 0 (value -8), bit for bit what compressed-tensors' pack_to_int32 writes."""
    pad = (-q.shape[1]) % 8
    if pad:
        q = torch.nn.functional.pad(q, (0, pad), value=-8)
    return quant.pack_int4(q.contiguous())


def _unpack4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    return quant.unpack_int4(packed, cols)


def _keep_mask_24(q: torch.Tensor) -> torch.Tensor:
    """Which 2 of every 4 consecutive values to store: the nonzeros, topped up with the first
    zeros of the group, so each group keeps exactly two (the bitmask format's invariant)."""
    out, cols = q.shape
    nz = (q.float() != 0).reshape(out, cols // 4, 4)
    pos = torch.arange(4, device=q.device)
    rank = (~nz).to(torch.int64) * 4 + pos                 # nonzeros first, then by position
    keep = rank.argsort(-1)[..., :2].sort(-1).values
    mask = torch.zeros_like(nz).scatter_(-1, keep, True)
    return mask.reshape(out, cols)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], little bit order (numpy packbits
    bitorder='little'): bit j of byte k is column 8k+j."""
    rows, cols = mask.shape
    m = torch.nn.functional.pad(mask.to(torch.int32), (0, (-cols) % 8)).reshape(rows, -1, 8)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=mask.device)
    return (m * weights).sum(-1).to(torch.uint8)


def unpack_bitmask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=bits.device)
    m = (bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return m.reshape(bits.shape[0], -1)[:, :cols].bool()


def sparse24_compress(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4-sparse q [out, in] -> (compressed [out, in/2] same dtype, bitmask uint8)."""
    out, cols = q.shape
    mask = _keep_mask_24(q)
    raw = q.view(torch.uint8) if q.element_size() == 1 else q   # fp8 has no masked indexing
    kept = raw.reshape(out, cols // 4, 4)[mask.reshape(out, cols // 4, 4)]
    return kept.reshape(out, cols // 2).view(q.dtype), pack_bitmask(mask)


def sparse24_decompress(compressed: torch.Tensor, bitmask: torch.Tensor,
                        shape: tuple[int, int]) -> torch.Tensor:
    mask = unpack_bitmask(bitmask, shape[1])
    raw = compressed.view(torch.uint8) if compressed.element_size() == 1 else compressed
    dense = torch.zeros(shape, dtype=raw.dtype, device=raw.device)
    dense[mask] = raw.reshape(-1)
    return dense.view(compressed.dtype)


def _storage_scale(qw: QuantizedWeight, dtype: torch.dtype, name: str) -> torch.Tensor:
    """The scale in the model's dtype; casting is allowed only when it loses nothing."""
    s = qw.scale
    if s.dtype != dtype:
        cast = s.to(dtype)
        if not torch.equal(cast.to(s.dtype), s):
            raise ValueError(f"{name}: scales are {s.dtype} but the model is {dtype} and they do "
                             f"not fit it exactly; quantize with scale_dtype={dtype}")
        s = cast
    return s


def compressed_tensors_for(name: str, qw: QuantizedWeight, fmt: str, dtype: torch.dtype,
                           sparse_format: str = "dense") -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear, keyed by full name."""
    q = qw.q.detach()
    scale = _storage_scale(qw, dtype, name).detach().contiguous()
    t = {f"{name}.weight_scale": scale}
    if fmt == "pack-quantized":
        if qw.args.num_bits != 4:
            raise ValueError(f"{name}: only 4-bit weights can be packed, got {qw.args.num_bits}")
        t[f"{name}.weight_packed"] = _pack4(q)
        t[f"{name}.weight_shape"] = torch.tensor(list(q.shape), dtype=torch.int64)
        if qw.zero_point is not None:
            t[f"{name}.weight_zero_point"] = _pack4(qw.zero_point.detach().t()).t().contiguous()
    elif sparse_format == "sparse-24-bitmask":
        compressed, bitmask = sparse24_compress(q)
        t[f"{name}.compressed"] = compressed
        t[f"{name}.bitmask"] = bitmask
        t[f"{name}.shape"] = torch.tensor(list(q.shape), dtype=torch.int64).reshape(2, 1)
    else:
        t[f"{name}.weight"] = q.contiguous()
        if qw.zero_point is not None:      # int8 asymmetric weights (vLLM has no kernel for it)
            t[f"{name}.weight_zero_point"] = qw.zero_point.detach().contiguous()
    return {k: v.cpu() for k, v in t.items()}


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
    want = torch.float8_e4m3fn if qw.args.type == "float" else torch.int8
    if qw.q.dtype != want:
        raise ValueError(f"{name}: values are {qw.q.dtype}, expected {want}")
    ngroups = 1 if qw.args.strategy != "group" else qw.q.shape[1] // qw.args.group_size
    if qw.args.strategy == "group" and qw.q.shape[1] % qw.args.group_size:
        raise ValueError(f"{name}: {qw.q.shape[1]} input features are not a multiple of "
                         f"group size {qw.args.group_size}")
    if tuple(qw.scale.shape) != (qw.q.shape[0], ngroups):
        raise ValueError(f"{name}: scale is {tuple(qw.scale.shape)}, expected "
                         f"{(qw.q.shape[0], ngroups)}")
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

    def _append(self, name: str, t: torch.Tensor) -> None:
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
        ignore = [k for k, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and k not in self.quantized]
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


# ----------------------------------------------------------------------------- reading

def read_quantization_config(ckpt_dir) -> dict:
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    if "quantization_config" not in cfg:
        raise ValueError(f"{ckpt_dir}/config.json has no quantization_config")
    return cfg["quantization_config"]


def _load_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {ckpt_dir}")
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def load_quantized_weights(ckpt_dir) -> dict[str, QuantizedWeight]:
    """Read back the QuantizedWeights of a checkpoint written by save_checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    qc = read_quantization_config(ckpt_dir)
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise ValueError(f"{ckpt_dir}: expected one config group, found {len(groups)}")
    args = quant_args_from_dict(groups[0]["weights"])
    fmt = qc["format"]
    sparse = (qc.get("sparsity_config") or {}).get("format") == "sparse-24-bitmask"
    t = _load_tensors(ckpt_dir)
    names = sorted(k[: -len(".weight_scale")] for k in t if k.endswith(".weight_scale"))
    out = {}
    for n in names:
        scale, zp = t[f"{n}.weight_scale"], t.get(f"{n}.weight_zero_point")
        if fmt == "pack-quantized":
            rows, cols = t[f"{n}.weight_shape"].tolist()
            q = _unpack4(t[f"{n}.weight_packed"], cols)
            if zp is not None:
                zp = _unpack4(zp.t().contiguous(), rows).t().contiguous()
        elif sparse and f"{n}.compressed" in t:
            shape = tuple(t[f"{n}.shape"].flatten().tolist())
            q = sparse24_decompress(t[f"{n}.compressed"], t[f"{n}.bitmask"], shape)
        else:
            q = t[f"{n}.weight"]
        out[n] = QuantizedWeight(q, scale, zp, args)
    return out
