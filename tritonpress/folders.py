"""What a model or checkpoint folder must hold, checked before any work.

Every broken input is found from the files' headers alone (never the tensor data: a 70B
model's headers are a few MB): a ValueError naming the file and the fix.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path


class MissingFileError(ValueError, FileNotFoundError):
    """A file the directory needs is not there (a ValueError like every bad input here; a
    FileNotFoundError too, for callers that catch that)."""


SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
RESAVE = "re-download or re-copy it, or save the model again with model.save_pretrained(dir)"
# bytes per element of each safetensors dtype (F4 packs two per byte: left unchecked)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4,
                "U64": 8, "I64": 8, "F64": 8, "C64": 8}
_MAX_HEADER = 100 << 20          # the safetensors format's own limit


def check_model_dir(path: str | os.PathLike) -> Path:
    """A Hugging Face model directory that loads: config.json (a JSON object naming its
    model_type) and weights (safetensors, sharded by an index or not, or pytorch .bin) whose
    headers are whole. Returns the path; ValueError naming the file and the fix otherwise."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"{path} is not a directory: point at a Hugging Face model "
                               "directory (config.json + weights + tokenizer files)")
    read_config(path)
    check_weights(path)
    return path


def check_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A compressed-tensors checkpoint that tritonpress eval can load: config.json with a
    quantization_config of quant_method compressed-tensors, and safetensors whose headers are
    whole. Returns the path; ValueError naming the file and the fix otherwise."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingFileError(f"checkpoint {path} is not a directory: pass the folder "
                               "tritonpress compress wrote (--out)")
    from .checkpoint.reader import read_quantization_config
    read_quantization_config(path)
    if not check_weights(path, safetensors_only=True):
        raise MissingFileError(f"checkpoint {path} has no *.safetensors files: compressed-tensors "
                               "checkpoints are safetensors; pass the folder tritonpress "
                               "compress wrote, and copy all of it")
    return path


def read_config(path: Path) -> dict:
    """config.json of a model directory as a dict; ValueError naming it if missing or broken."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise MissingFileError(f"{path} has no config.json: point at a Hugging Face model "
                               "directory (config.json + weights + tokenizer files)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): {RESAVE}") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ValueError(f"{file} names no model_type, so transformers cannot tell which model "
                         f"it describes: {RESAVE}")
    return config


def check_weights(path: Path, safetensors_only: bool = False) -> list[Path]:
    """The weight files of a model directory, checked from their headers: an index's shards
    all there and holding the tensors it names, every safetensors file whole. Returns the
    files; ValueError (MissingFileError if none) naming the file and the fix."""
    path = Path(path)
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        return _check_index(index, check_safetensors)
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        check_safetensors(f)
    if files or safetensors_only:
        return files
    if (path / BIN_INDEX).is_file():
        return _check_index(path / BIN_INDEX, _check_bin)
    files = sorted(path.glob("*.bin"))
    for f in files:
        _check_bin(f)
    if not files:
        raise MissingFileError(
            f"{path} has a config.json but no weights (no *.safetensors, {SAFETENSORS_INDEX}, "
            "*.bin): the weights were not saved or not copied; save them with "
            "model.save_pretrained(dir), or copy the *.safetensors files beside config.json")
    return files


def check_safetensors(file: str | os.PathLike) -> dict[str, dict]:
    """The header of one safetensors file ({tensor name: {dtype, shape, data_offsets}}),
    checked against the file's size without reading any tensor data; ValueError naming the
    file if it is truncated or corrupt."""
    import math

    file = Path(file)
    size = file.stat().st_size
    broken = f"{file} is truncated or corrupt"
    fix = f"{RESAVE} (a copy or download cut short leaves a file like this)"
    if size < 8:
        raise ValueError(f"{broken}: {size} bytes, shorter than the 8-byte header length: {fix}")
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{broken}: its header says {n} bytes of JSON follow, the file has "
                             f"{size - 8}: {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{broken}: its header is not JSON ({e}): {fix}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{broken}: its header is not a JSON object: {fix}")
    header.pop("__metadata__", None)
    data = size - 8 - n
    end_max = 0
    for name, t in header.items():
        try:
            begin, end = (int(v) for v in t["data_offsets"])
            shape = [int(d) for d in t["shape"]]
            dtype = str(t["dtype"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{broken}: tensor {name!r} has no valid dtype, shape and "
                             f"data_offsets in the header: {fix}") from None
        if not 0 <= begin <= end or end > data:
            raise ValueError(f"{broken}: tensor {name!r} lies at bytes {begin}..{end} of the "
                             f"data, which holds {data} bytes: {fix}")
        width = _DTYPE_BYTES.get(dtype)
        if width is not None and end - begin != math.prod(shape) * width:
            raise ValueError(f"{broken}: tensor {name!r} ({dtype} {shape}) needs "
                             f"{math.prod(shape) * width} bytes, the header gives it "
                             f"{end - begin}: {fix}")
        end_max = max(end_max, end)
    if end_max != data:
        raise ValueError(f"{broken}: {data} bytes of tensor data where the header accounts for "
                         f"{end_max}: {fix}")
    return header


def _check_bin(file: Path) -> None:
    """A pytorch .bin file: a zip archive (torch.save since 1.6) must have its central
    directory, which sits at the end (only that is read); older pickles are not checked."""
    import zipfile
    size = file.stat().st_size
    with open(file, "rb") as f:
        magic = f.read(2)
    if size == 0 or (magic == b"PK" and not zipfile.is_zipfile(file)):
        raise ValueError(f"{file} is truncated or corrupt ({size} bytes): {RESAVE}")


def _check_index(index: Path, check) -> list[Path]:
    """An index (model.safetensors.index.json, pytorch_model.bin.index.json): its shards are
    there, checked by `check`, and (safetensors) hold the tensors it names."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid index (JSON with a weight_map of tensor name "
                         f"-> shard file; {type(e).__name__}): {RESAVE}") from None
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(str(shard), []).append(name)
    if not shards:
        raise ValueError(f"{index} names no tensors: {RESAVE}")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise MissingFileError(
            f"{index} names shard{'s' if len(missing) > 1 else ''} {', '.join(missing)}, not in "
            f"{index.parent}: copy every shard the index lists (a download or copy is "
            "incomplete), or save the model again with model.save_pretrained(dir)")
    files = []
    for shard, names in shards.items():
        file = index.parent / shard
        header = check(file)
        if header is not None:
            absent = [n for n in names if n not in header]
            if absent:
                more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
                raise ValueError(f"{index} places {', '.join(absent[:3])}{more} in {file}, "
                                 f"which does not hold {'them' if len(absent) > 1 else 'it'}: "
                                 f"the index and the shards come from different saves; {RESAVE}")
        files.append(file)
    return files


