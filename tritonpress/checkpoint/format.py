"""The compressed-tensors checkpoint format: config.json's quantization_config and the tensors
of one quantized Linear, both ways (the writer and the reader share every name and layout here).

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
  float-quantized, block strategy (FP8_BLOCK): <name>.weight float8_e4m3fn [out, in]
                    + <name>.weight_scale [ceil(out/128), ceil(in/128)] (partial edge blocks)
  int-quantized, 4-bit (W4A8, W4AFP8): <name>.weight int8 [out, in] holding values in [-8, 7]
                    (compressed-tensors picks int-quantized over pack-quantized whenever
                    activations are quantized too; vLLM's W4A8 loads it so)
  nvfp4-pack-quantized <name>.weight_packed uint8 [out, in/2] (e2m1 codes, column 2j in the low
                    nibble), <name>.weight_scale float8_e4m3fn [out, in/16],
                    <name>.weight_global_scale fp32 [1], and for NVFP4 (W4A4)
                    <name>.input_global_scale fp32 [1] (from the calibration inputs' amax)
  mxfp4-pack-quantized <name>.weight_packed uint8 [out, in/2], <name>.weight_scale uint8
                    [out, in/32] (e8m0 exponents: scale 2^(e - 127))
Scales are stored in the model's dtype unless the format says otherwise. Everything else (embeddings, norms, lm_head, biases) is
saved as the model holds it (tied aliases left out, as save_pretrained leaves them out).
"""
from __future__ import annotations

import torch

from ..kernels import quant
from ..schemes import QuantArgs, Scheme
from .qweight import QuantizedWeight

CT_VERSION = "0.19.0"          # compressed-tensors version whose config layout we write
SPARSE_FORMATS = ("dense", "sparse-24-bitmask")
ACTORDERS = (None, "static")


# ----------------------------------------------------------------------------- config

def _args_dict(a: QuantArgs, observer: str | None, actorder: str | None = None,
               full: bool = False) -> dict:
    """QuantizationArgs as config.json holds it: the fields every compressed-tensors release
    since 0.4 knows (vLLM validates with extra="forbid" against the version it pins), and with
    `full` (the schemes only compressed-tensors >= 0.12 knows) also scale_dtype and zp_dtype,
    as 0.19 serialises them ("torch.uint8"; zp_dtype None when symmetric).
    actorder: "static" for weights GPTQ swept in activation order (what llm-compressor writes;
    compressed-tensors 0.19 reads it as an alias of "weight", no g_idx), else None."""
    d = {"num_bits": a.num_bits, "type": a.type, "symmetric": a.symmetric,
         "group_size": a.group_size if a.strategy in ("group", "tensor_group") else None,
         "strategy": a.strategy,
         "block_structure": None if a.block_structure is None else list(a.block_structure),
         "dynamic": a.dynamic, "actorder": actorder, "observer": observer,
         "observer_kwargs": {}}
    if full:
        d["scale_dtype"] = None if a.scale_dtype is None else f"torch.{a.scale_dtype}"
        d["zp_dtype"] = None
    return d


def needs_ct19(scheme: Scheme) -> bool:
    """Whether the scheme is one of compressed-tensors 0.19's newer presets (fp4, fp8 blocks,
    4-bit weights with 8-bit activations): its config carries every 0.19 field, as
    llm-compressor 0.14 writes it."""
    w, a = scheme.weights, scheme.input_activations
    return (w.is_fp4 or w.strategy in ("block", "tensor_group")
            or (a is not None and (a.strategy in ("group", "tensor_group")
                                   or w.num_bits < 8)))


def quant_args_from_dict(d: dict | None) -> QuantArgs | None:
    """compressed-tensors QuantizationArgs (JSON) -> QuantArgs, with its defaults: 8-bit
    symmetric int, strategy "group" when a group size is given, else "tensor"; None stays
    None (a group without input_activations). The one reader of quant args."""
    if d is None:
        return None
    strategy = d.get("strategy") or ("group" if d.get("group_size") else "tensor")
    dynamic = d.get("dynamic", False)
    block = d.get("block_structure")
    if isinstance(block, str):                  # the older "128x128" spelling
        block = [int(v) for v in block.split("x")]
    scale_dtype = d.get("scale_dtype")
    return QuantArgs(int(d.get("num_bits", 8)), d.get("type", "int"),
                     bool(d.get("symmetric", True)), strategy,
                     d.get("group_size") if strategy in ("group", "tensor_group") else None,
                     dynamic.lower() if isinstance(dynamic, str) else bool(dynamic),
                     None if block is None else tuple(int(v) for v in block),
                     None if scale_dtype is None else str(scale_dtype).removeprefix("torch."))


def weight_format(scheme: Scheme) -> str:
    """compressed-tensors format of the weights, as its infer_module_format picks it: fp4 in
    the MX or NVFP4 packing, fp8 float-quantized; integer weight-only schemes packed even at
    8 bits (vLLM reads int-quantized as a W8A8 format and wants activation args with it),
    integer weights with quantized activations int-quantized (W8A8, and 4-bit W4A8/W4AFP8:
    llm-compressor 0.14 writes those as int8 values, which vLLM's W4A8 loads)."""
    w = scheme.weights
    if w.is_fp4:
        return "mxfp4-pack-quantized" if w.is_mx else "nvfp4-pack-quantized"
    if w.type == "float":
        return "float-quantized"
    if scheme.input_activations is None:
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
    full = needs_ct19(scheme)
    # llm-compressor 0.14 names its weight observer memoryless_minmax; static activation
    # scales (NVFP4's global one) come from static_minmax over the calibration inputs
    group = {"targets": ["Linear"],
             "weights": _args_dict(scheme.weights, "memoryless_minmax" if full else "minmax",
                                   actorder, full),
             "input_activations": None if act is None else _args_dict(
                 act, "static_minmax" if act.dynamic == "local" else None, None, full),
             "output_activations": None,
             "format": fmt}
    return {"quant_method": "compressed-tensors", "version": CT_VERSION, "format": fmt,
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": sparsity or {}, "transform_config": {}}


# ----------------------------------------------------------------------------- int words

def _pack4(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, cols] in [-8, 7] -> int32 [rows, ceil(cols/8)]. Padding columns are stored as
    raw nibble 0 (value -8), bit for bit what compressed-tensors' pack_to_int32 writes."""
    pad = (-q.shape[1]) % 8
    if pad:
        q = torch.nn.functional.pad(q, (0, pad), value=-8)
    return quant.pack_int4(q.contiguous())


def unpack_words(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """pack-quantized int32 words [rows, ceil(cols*bits/32)] -> int8 [rows, cols] (signed):
    4-bit by kernels.quant.unpack_int4, 8-bit (llm-compressor's W8A16) by the same rule."""
    if 32 % bits:
        raise NotImplementedError(f"{bits}-bit pack-quantized weights are not supported "
                                  "(values straddle int32 words); use 4 or 8 bits")
    if bits == 4:
        return quant.unpack_int4(packed.to(torch.int32), cols)
    shifts = torch.arange(32 // bits, dtype=torch.int32, device=packed.device) * bits
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


# ----------------------------------------------------------------------------- 2:4 bitmask

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
    """sparse-24-bitmask -> dense [out, in]: the kept values, listed row-major in
    `compressed`, at the columns the bitmask marks; zeros elsewhere."""
    mask = unpack_bitmask(bitmask, shape[1])
    raw = compressed.view(torch.uint8) if compressed.element_size() == 1 else compressed
    dense = torch.zeros(shape, dtype=raw.dtype, device=raw.device)
    dense[mask] = raw.reshape(-1)
    return dense.view(compressed.dtype)


# ----------------------------------------------------------------------------- one Linear

def _storage_scale(qw: QuantizedWeight, dtype: torch.dtype, name: str) -> torch.Tensor:
    """The scale in the model's dtype (fp4 formats: as the format stores it); casting is
    allowed only when it loses nothing."""
    s = qw.scale
    if qw.args.is_fp4:
        want = torch.uint8 if qw.args.is_mx else torch.float8_e4m3fn
        if s.dtype != want:
            raise ValueError(f"{name}: fp4 group scales must be {want}, got {s.dtype}")
        return s
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
    if fmt in ("nvfp4-pack-quantized", "mxfp4-pack-quantized"):
        from ..kernels.fp4 import pack_fp4_ref
        t[f"{name}.weight_packed"] = pack_fp4_ref(q.contiguous())
        if fmt == "nvfp4-pack-quantized":
            t[f"{name}.weight_global_scale"] = qw.global_scale.detach().float().reshape(1)
        if qw.input_global_scale is not None:
            t[f"{name}.input_global_scale"] = qw.input_global_scale.detach().float().reshape(1)
    elif fmt == "pack-quantized":
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


def decompress_linear(t: dict[str, torch.Tensor], name: str, args: QuantArgs) -> QuantizedWeight:
    """The inverse of compressed_tensors_for, from whichever of its layouts `t` holds (and
    llm-compressor's 8-bit words): the values [out, in] (int8, or fp8), the scale and zero
    point [out, ngroups] as stored, and `args` (the config group's weights)."""
    scale, zp = t[f"{name}.weight_scale"], t.get(f"{name}.weight_zero_point")
    if args.is_fp4:                                               # nvfp4/mxfp4-pack-quantized
        from ..kernels.fp4 import unpack_fp4_codes
        packed = t[f"{name}.weight_packed"]
        if packed.dtype != torch.uint8:
            raise TypeError(f"{name}.weight_packed is {packed.dtype}: fp4 weights are packed "
                            "two per uint8")
        return QuantizedWeight(unpack_fp4_codes(packed), scale, None, args,
                               t.get(f"{name}.weight_global_scale"),
                               t.get(f"{name}.input_global_scale"))
    if f"{name}.weight_packed" in t:                              # pack-quantized
        rows, cols = (int(v) for v in t[f"{name}.weight_shape"].tolist())
        q = unpack_words(t[f"{name}.weight_packed"], cols, args.num_bits)
        if zp is not None:                                        # packed along the out dim
            zp = unpack_words(zp.t().contiguous(), rows, args.num_bits).t().contiguous()
        return QuantizedWeight(q, scale, zp, args)
    if f"{name}.compressed" in t:                                 # sparse-24-bitmask
        shape = tuple(int(v) for v in t[f"{name}.shape"].flatten().tolist())
        q = sparse24_decompress(t[f"{name}.compressed"], t[f"{name}.bitmask"], shape)
    else:                                                         # int- / float-quantized
        q = t[f"{name}.weight"]
    if q.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise TypeError(f"{name}.weight is {q.dtype}: expected int8 or float8_e4m3fn values "
                        "in a compressed checkpoint")
    return QuantizedWeight(q, scale, zp, args)


# the suffixes decompress_linear reads, for a reader to fetch one Linear's tensors at once
LINEAR_SUFFIXES = ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape",
                   "compressed", "bitmask", "shape", "weight", "weight_global_scale",
                   "input_global_scale")
