"""Reading checkpoints back: the safetensors shards by tensor name, the quantization config,
one quantized Linear (for load_quantized_weights and the runtime alike), and the whole model
dequantized by transformers (for the evaluation of a saved checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..schemes import QuantArgs
from .format import LINEAR_SUFFIXES, decompress_linear, quant_args_from_dict
from .qweight import QuantizedWeight


class ShardReader:
    """The tensors of a safetensors checkpoint, read by name: the shards of
    model.safetensors.index.json, else model.safetensors, else every *.safetensors file.
    Each read opens the files it needs and closes them after (nothing stays mapped)."""

    def __init__(self, path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {k: self.path / f
                            for k, f in json.loads(index.read_text())["weight_map"].items()}
            return
        single = self.path / "model.safetensors"
        files = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {self.path}")
        from safetensors import safe_open
        self.file_of = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                self.file_of.update({k: f for k in h.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def keys(self):
        return self.file_of.keys()

    def read(self, names) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for f, ns in by_file.items():
            with safe_open(str(f), "pt") as h:
                for n in ns:
                    # a copy: get_tensor's tensor can be a view of the file's mapping, which a
                    # kept norm weight would hold open, its read pages counted as ours
                    # (measured: +84 MB of RSS per 2048-wide layer until the shard changed)
                    out[n] = h.get_tensor(n).clone()
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]


def read_quantization_config(path) -> dict:
    """config.json's quantization_config, which must be compressed-tensors'."""
    from ..folders import read_config          # a missing or broken config.json, named
    path = Path(path)
    qc = read_config(path).get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path / 'config.json'} has no quantization_config: {path} is not a "
                         "compressed-tensors checkpoint (an uncompressed model? compress it "
                         "first with tritonpress compress, or pass it as the base model)")
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{path / 'config.json'}: quantization_config has quant_method "
                         f"{qc.get('quant_method')!r}; tritonpress reads compressed-tensors "
                         "checkpoints (what tritonpress compress and llm-compressor write)")
    return qc


def read_linear(reader: ShardReader, name: str, args: QuantArgs) -> QuantizedWeight:
    """The QuantizedWeight (values, scale, zero point, args) of the Linear `name`, whatever
    the format stores it as (see format.decompress_linear)."""
    t = reader.read(n for n in (f"{name}.{s}" for s in LINEAR_SUFFIXES) if n in reader)
    return decompress_linear(t, name, args)


def load_quantized_weights(ckpt_dir) -> dict[str, QuantizedWeight]:
    """Read back the QuantizedWeights of a checkpoint written by save_checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    qc = read_quantization_config(ckpt_dir)
    groups = list(qc["config_groups"].values())
    if len(groups) != 1:
        raise ValueError(f"{ckpt_dir}: expected one config group, found {len(groups)}")
    args = quant_args_from_dict(groups[0]["weights"])
    reader = ShardReader(ckpt_dir)
    names = sorted(k.removesuffix(".weight_scale") for k in reader.keys()
                   if k.endswith(".weight_scale"))
    return {n: read_linear(reader, n, args) for n in names}


def load_dequantized(path, dtype=torch.bfloat16):
    """A compressed-tensors checkpoint (ours or llm-compressor's) loaded by transformers with
    its weights decompressed to `dtype`; returns (model, activation QuantArgs or None, ignore)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    qc = read_quantization_config(path)
    if _has_fused_experts(AutoConfig.from_pretrained(path)):
        # transformers fuses per-expert tensors on load and cannot fuse compressed ones:
        # tritonpress's own loader, experts as Linears, weights decompressed
        from ..runtime import load_compressed
        model, _ = load_compressed(path, dtype=dtype, dequantize=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
    model.eval()
    groups = list(qc.get("config_groups", {}).values())
    acts = groups[0].get("input_activations") if groups else None
    return model, quant_args_from_dict(acts or None), tuple(qc.get("ignore") or ())


def _has_fused_experts(config) -> bool:
    """Whether transformers builds this config's routed experts as fused 3-D parameters."""
    from transformers import AutoModelForCausalLM

    from ..loop.experts import is_fused_experts
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return any(is_fused_experts(m) for m in model.modules())
