"""A broken model or checkpoint directory is named, with the fix, before any work: a ValueError
from the files' headers alone (folders.check_model_dir / check_checkpoint_dir), never an
OSError or a SafetensorError from deep inside transformers."""
import json
import re
import struct
import time

import pytest
import torch

from tritonpress.folders import check_checkpoint_dir, check_model_dir
from tritonpress.models import load_model
from helpers import tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved whole and sharded (5 shards), with its tokenizer."""
    root = tmp_path_factory.mktemp("saved")
    model, tok = tiny_llama(layers=1)
    for name, shard in (("whole", "5GB"), ("sharded", "50KB")):
        model.save_pretrained(root / name, max_shard_size=shard)
        tok.save_pretrained(root / name)
    return root


def copy(saved, name, tmp_path):
    import shutil
    return shutil.copytree(saved / name, tmp_path / name)


def refused(path, *names, check=check_model_dir):
    """check(path) raises a ValueError whose message names each of `names`; returns it."""
    with pytest.raises(ValueError) as e:
        check(path)
    for n in names:
        assert str(n) in str(e.value), (n, str(e.value))
    return str(e.value)


def test_sane_directories_pass_and_load(saved):
    for name in ("whole", "sharded"):
        assert check_model_dir(saved / name) == saved / name
    model, _ = load_model(saved / "sharded", dtype=torch.float32)
    assert model.config.num_hidden_layers == 1


def test_config_missing_or_not_json(saved, tmp_path):
    d = copy(saved, "whole", tmp_path)
    (d / "config.json").write_text('{"model_type": "llama", ')
    msg = refused(d, d / "config.json", "not valid JSON", "save_pretrained")
    (d / "config.json").write_text('{"hidden_size": 64}')
    refused(d, d / "config.json", "model_type")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError):        # a ValueError that is a FileNotFoundError too
        check_model_dir(d)
    refused(d, d, "no config.json")
    assert "Traceback" not in msg


def test_no_weights(saved, tmp_path):
    d = copy(saved, "whole", tmp_path)
    (d / "model.safetensors").unlink()
    refused(d, d, "no weights", "save_pretrained")
    # load_model and compress() say the same, before loading anything
    with pytest.raises(ValueError, match="no weights"):
        load_model(d)


def test_truncated_safetensors(saved, tmp_path):
    d = copy(saved, "whole", tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])                    # the last tensor cut short
    refused(f.parent, f, "truncated or corrupt", "re-download")
    # transformers itself would raise a SafetensorError: load_model raises ours first
    with pytest.raises(ValueError, match=re.escape(str(f))):
        load_model(d)
    f.write_bytes(data[:4])                       # not even the length
    refused(d, f, "shorter than the 8-byte header length")
    f.write_bytes(data[:8 + 10])                  # the JSON header cut
    refused(d, f, "bytes of JSON follow")
    f.write_bytes(data + b"\0" * 16)              # bytes past the last tensor
    refused(d, f, "bytes of tensor data where the header accounts for")


def test_corrupt_safetensors_header(saved, tmp_path):
    d = copy(saved, "whole", tmp_path)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    bad = bytearray(data)
    bad[8:12] = b"#@!%"                           # the JSON header garbled
    f.write_bytes(bad)
    refused(d, f, "header is not JSON")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4          # a tensor overruns its size
    raw = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    refused(d, f, name, "needs")


def test_index_names_a_missing_shard(saved, tmp_path):
    d = copy(saved, "sharded", tmp_path)
    shard = sorted(d.glob("*.safetensors"))[2]
    shard.unlink()
    refused(d, d / "model.safetensors.index.json", shard.name, "copy every shard")
    with pytest.raises(ValueError, match=shard.name):
        load_model(d)


def test_index_names_a_tensor_its_shard_does_not_hold(saved, tmp_path):
    d = copy(saved, "sharded", tmp_path)
    index = d / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    wm = content["weight_map"]
    name, shard = next(iter(wm.items()))
    other = next(s for s in sorted(set(wm.values())) if s != shard)
    wm[name] = other
    index.write_text(json.dumps(content))
    refused(d, index, name, other, "different saves")
    index.write_text("{not json")
    refused(d, index, "not a valid index")


def test_truncated_shard_of_a_sharded_model(saved, tmp_path):
    d = copy(saved, "sharded", tmp_path)
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1])
    refused(d, shard, "truncated")


def test_truncated_pytorch_bin(saved, tmp_path):
    d = copy(saved, "whole", tmp_path)
    (d / "model.safetensors").unlink()
    f = d / "pytorch_model.bin"
    torch.save({"w": torch.zeros(64, 64)}, f)
    check_model_dir(d)
    f.write_bytes(f.read_bytes()[:-200])
    refused(d, f, "truncated or corrupt")


def test_only_headers_are_read(tmp_path):
    """A 'model' of 64 GiB (a sparse file: the data was never written) is checked at once:
    check_model_dir reads the headers, never the tensors."""
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rows = 1 << 20
    header = {f"model.layers.{i}.mlp.up_proj.weight":
              {"dtype": "BF16", "shape": [rows, 4096], "data_offsets": [i * rows * 8192,
                                                                      (i + 1) * rows * 8192]}
              for i in range(8)}
    raw = json.dumps(header).encode()
    f = d / "model.safetensors"
    with open(f, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + 8 * rows * 8192)
    t0 = time.perf_counter()
    check_model_dir(d)
    assert time.perf_counter() - t0 < 1.0
    assert f.stat().st_blocks * 512 < 1 << 20      # still sparse: nothing was written or read


def test_compress_refuses_a_broken_directory_before_any_work(saved, tmp_path):
    import tritonpress
    d = copy(saved, "whole", tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(f))):
        tritonpress.compress(str(d), "W8A8_FP8", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoint_dir_checks(saved, tmp_path):
    d = copy(saved, "sharded", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    refused(d, d / "config.json", "no quantization_config", check=check_checkpoint_dir)
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config={
        "quant_method": "gptq", "bits": 4})))
    refused(d, "quant_method 'gptq'", "compressed-tensors", check=check_checkpoint_dir)
    (d / "config.json").write_text(json.dumps(dict(cfg, quantization_config={
        "quant_method": "compressed-tensors", "config_groups": {}})))
    assert check_checkpoint_dir(d) == d
    shard = sorted(d.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    refused(d, shard, "truncated", check=check_checkpoint_dir)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "model.safetensors.index.json").unlink()
    refused(d, d, "no *.safetensors", check=check_checkpoint_dir)
    refused(tmp_path / "nowhere", "not a directory", check=check_checkpoint_dir)

