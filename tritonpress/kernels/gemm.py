"""Which GEMM runs a compressed Linear: one table, read top to bottom, first match wins.

  kind     what is stored                      activations
  -------  ----------------------------------  --------------------------------------
  wna16    int4/int8 weights, group scales     bf16/fp16 as they come
  int8     int8 weights, channel scales        int8, dynamic per token (or static)
  fp8      fp8 e4m3 weights, channel scales    fp8, dynamic per token (or static)
  fp8_24   the same, 2:4 sparse                fp8, dynamic per token (or static)
  w8a16    fp8 weights, channel scales         bf16/fp16 as they come
  fp8_block fp8 weights, 128x128 block scales  fp8, dynamic per token and group of 128
  fp4_a16  NVFP4/MXFP4 packed e2m1, group      bf16/fp16 as they come
           scales (+ NVFP4 global scale)
  fp4_w4a4 the same                            the same format, dynamic group scales (NVFP4:
                                               under a static input global scale)
  w4a8     int4 weights, group scales          int8, dynamic per token (or static)
  w4afp8   int4 weights, group scales          fp8, dynamic per token (or static)

CPU tensors run the torch reference of each kind (dequantize, fp32 matmul); CUDA tensors
the first row of TABLE below whose kind, compute capability and batch rows M match.

TRITONPRESS_GEMM_BACKEND forces a choice (tests): auto (default: TRITONPRESS_BACKEND decides
between the table and the reference), torch, triton (the table, also on CPU tensors under
TRITON_INTERPRET=1), or one kernel name from the table. The interpreter counts as sm90 without
cuSPARSELt. Unsupported combinations fail naming the compute capability they need.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..schemes import QuantArgs
from . import fp4, fp8_block, quant
from .dispatch import capability, interpreting, use_triton
from .gemm_fp4 import fp4_a16_gemm, fp4_a16_ref, fp4_w4a4_gemm, fp4_w4a4_ref
from .gemm_fp8_block import fp8_block_a16_gemm, fp8_block_a16_ref, fp8_block_gemm, fp8_block_ref
from .gemm_sparse24 import (Sparse24Weight, compress_24, cslt_available, is_24_sparse,
                            shape_supported, sparse24_fp8_gemm)
from .gemm_w4a16 import WNA16Weight, pack_wna16, wna16_gemm, wna16_ref
from .gemm_w4a8 import w4a8_gemm, w4a8_ref
from .gemm_w8a8 import fp8_gemm, int8_gemm, scaled_mm_ref, w8a16_gemm, w8a16_ref

ANY = (1, None)
TABLE = [
    # kind      needs sm   M range     kernel
    ("wna16",   (8, 0),    (1, 16),    "wna16_splitk"),   # weight streaming, split over K
    ("wna16",   (8, 0),    (17, None), "wna16_tiled"),    # tensor-core tiles
    ("int8",    (8, 0),    ANY,        "int8"),           # int8 tensor cores, int32 acc
    ("fp8_24",  (9, 0),    ANY,        "sparse24_fp8"),   # cuSPARSELt, when it can take it
    ("fp8_24",  (8, 9),    ANY,        "fp8"),            # same values, dense
    ("fp8",     (8, 9),    ANY,        "fp8"),            # fp8 tensor cores
    ("fp8",     (8, 0),    ANY,        "w8a16"),          # Ampere: weight-only, as vLLM does
    ("fp8_24",  (8, 0),    ANY,        "w8a16"),
    ("w8a16",   (8, 0),    ANY,        "w8a16"),
    ("fp8_block", (8, 9),  ANY,        "fp8_block"),      # fp8 dot, block scales per K tile
    ("fp8_block", (8, 0),  ANY,        "fp8_block_a16"),  # Ampere: weight-only
    ("fp4_a16", (8, 0),    ANY,        "fp4_a16"),        # e2m1 decoded in registers
    ("fp4_w4a4", (10, 0),  ANY,        "fp4_scaled_dot"), # Blackwell MX MMA (MXFP4 only)
    ("fp4_w4a4", (8, 0),   ANY,        "fp4_w4a4"),       # both sides decoded, bf16 dot
    ("w4a8",    (8, 0),    ANY,        "w4a8"),           # int8 dot, group scale per K tile
    ("w4afp8",  (8, 9),    ANY,        "w4afp8"),         # fp8 dot, group scale per K tile
    ("w4afp8",  (8, 0),    (1, 16),    "wna16_splitk"),   # Ampere: weight-only
    ("w4afp8",  (8, 0),    (17, None), "wna16_tiled"),
]
INTERPRETER_CAPABILITY = (9, 0)


@dataclass
class GemmWeight:
    """A Linear's compressed weight in the layout its kernels read."""
    kind: str
    out_features: int
    in_features: int
    q: torch.Tensor | None = None            # int8 / float8_e4m3fn [N, K]
    scale: torch.Tensor | None = None        # fp32 [N]
    wna16: WNA16Weight | None = None
    act: QuantArgs | None = None             # activation quantization (int8, fp8 kinds)
    input_scale: torch.Tensor | None = None  # static per-tensor activation scale, fp32 [1]
    sparse: Sparse24Weight | None = None     # cuSPARSELt copy, made on first use
    act_sim: str = "compressed-tensors"      # rounding of dynamic per-token activations
    args: QuantArgs | None = None            # the weight's quantization (fp4, fp8_block)
    packed: torch.Tensor | None = None       # fp4: uint8 [N, K / 2], two e2m1 codes a byte
    global_scale: torch.Tensor | None = None        # NVFP4 weight global scale, fp32 [1]
    input_global_scale: torch.Tensor | None = None  # NVFP4 activation global scale, fp32 [1]
    block: tuple[int, int] | None = None     # fp8_block: (rows, cols) of a scale's block


def prepare(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
            args: QuantArgs, act: QuantArgs | None = None, sparse24: bool = False,
            input_scale: torch.Tensor | None = None,
            act_sim: str = "compressed-tensors", *,
            global_scale: torch.Tensor | None = None,
            input_global_scale: torch.Tensor | None = None) -> GemmWeight:
    """From a quantized weight (compressed-tensors conventions) and the activation scheme to
    the kernel's layout:
      int / fp8 per channel or group  q [N, K] int8 or fp8 values, scale/zero point
                                      [N, ngroups]
      fp8 block (args.strategy "block")  q fp8 [N, K], scale [ceil(N/bh), ceil(K/bw)]
                                      (args.block_structure), act fp8 groups of bw
      fp4 (args.is_fp4)               q uint8 e2m1 codes [N, K] (as QuantizedWeight holds
                                      them) or packed [N, K / 2]; scale [N, K / group]
                                      float8_e4m3fn (NVFP4) or uint8 e8m0 (MXFP4);
                                      global_scale: NVFP4's weight global scale, fp32 [1];
                                      act: the same fp4 format (W4A4) with
                                      input_global_scale (NVFP4, static, fp32 [1]) or None
      int4 group with 8-bit act       W4A8 (int8 act) / W4AFP8 (fp8 act)
    act_sim: how dynamic per-token (and fp8 token-group) activations are rounded."""
    if args.type == "float" and args.num_bits == 4:
        return _prepare_fp4(q, scale, args, act, global_scale, input_global_scale)
    if args.strategy == "block":
        return _prepare_fp8_block(q, scale, args, act, act_sim)
    n, k = q.shape
    scale = scale.reshape(n, -1) if scale.numel() != 1 else scale.reshape(1, 1).expand(n, 1)
    if act is not None:
        _check_act(act, args, input_scale)
    if args.type == "int" and act is None:
        return GemmWeight("wna16", n, k, wna16=pack_wna16(q, scale, zero_point, args.num_bits))
    if args.type == "int" and args.num_bits == 4:
        if act.type == "int" and act.num_bits != 8:
            raise NotImplementedError(f"int4 weights with {act.num_bits}-bit activations: "
                                      "W4A8 and W4AFP8 are supported")
        isc = None if input_scale is None else input_scale.reshape(1).float()
        return GemmWeight("w4a8" if act.type == "int" else "w4afp8", n, k, act=act,
                          wna16=pack_wna16(q, scale, zero_point, 4), input_scale=isc,
                          act_sim=quant.check_act_sim(act_sim))
    if scale.shape[1] != 1:
        raise NotImplementedError(f"{args.num_bits}-bit {args.type} weights with per-group "
                                  "scales are supported for weight-only int schemes only; "
                                  "use per-channel scales")
    if zero_point is not None and bool((zero_point != 0).any()):
        raise NotImplementedError("asymmetric 8-bit weights are supported for weight-only "
                                  "int schemes only; quantize W8A8 weights symmetrically")
    scale = scale.reshape(n).float().contiguous()
    isc = None if input_scale is None else input_scale.reshape(1).float()
    if args.type == "int":
        if args.num_bits != 8 or act.type != "int":
            raise NotImplementedError(f"int{args.num_bits} weights with {act.type}"
                                      f"{act.num_bits} activations: only W8A8 int8 is supported")
        return GemmWeight("int8", n, k, q=q.to(torch.int8).contiguous(), scale=scale, act=act,
                          input_scale=isc, act_sim=quant.check_act_sim(act_sim))
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"float weights must be float8_e4m3fn, got {q.dtype}")
    if act is None:
        return GemmWeight("w8a16", n, k, q=q.contiguous(), scale=scale)
    if act.type != "float":
        raise NotImplementedError("fp8 weights with int activations are not supported")
    if sparse24 and not is_24_sparse(q):
        raise ValueError("weight was declared 2:4 sparse but some group of 4 inputs has more "
                         "than two nonzeros")
    return GemmWeight("fp8_24" if sparse24 else "fp8", n, k, q=q.contiguous(), scale=scale,
                      act=act, input_scale=isc, act_sim=quant.check_act_sim(act_sim))


def _prepare_fp8_block(q, scale, args, act, act_sim) -> GemmWeight:
    n, k = q.shape
    block = tuple(args.block_structure or fp8_block.BLOCK)
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"FP8 block weights must be float8_e4m3fn, got {q.dtype}")
    if block[1] != 128:
        raise NotImplementedError(f"block {block}: the block GEMM tiles K by 128 columns; "
                                  "FP8_BLOCK's 128 x 128 blocks are supported")
    nb = (-(-n // block[0]), -(-k // block[1]))
    if tuple(scale.shape) != nb:
        raise ValueError(f"block scales {tuple(scale.shape)} do not fit weight {(n, k)} in "
                         f"blocks of {block}: expected {nb}")
    if act is not None and (act.type != "float" or act.num_bits != 8 or not act.dynamic
                            or act.strategy != "group" or act.group_size != block[1]):
        raise NotImplementedError(f"FP8 block weights run with fp8 dynamic activations in "
                                  f"groups of {block[1]} (FP8_BLOCK) or none, got {act}")
    if act is not None and k % block[1]:
        raise ValueError(f"{k} input features are not a multiple of the activation group "
                         f"{block[1]}")
    return GemmWeight("fp8_block", n, k, q=q.contiguous(), scale=scale.float().contiguous(),
                      act=act, act_sim=quant.check_act_sim(act_sim), args=args, block=block)


def _prepare_fp4(q, scale, args, act, global_scale, input_global_scale) -> GemmWeight:
    fp4.check_fp4_args(args)
    n, ng = scale.shape
    k = ng * args.group_size
    if q.dtype != torch.uint8 or q.shape[0] != n or q.shape[1] not in (k, k // 2):
        raise ValueError(f"fp4 weight must be uint8 codes [N, K] or packed [N, K / 2] with "
                         f"K = {ng} groups x {args.group_size}, got {tuple(q.shape)} {q.dtype}")
    packed = fp4.pack_fp4_ref(q) if q.shape[1] == k else q
    if args.is_mx:
        if scale.dtype != torch.uint8:
            raise TypeError(f"MXFP4 scales are uint8 e8m0 exponents, got {scale.dtype}")
        global_scale = None
    elif scale.dtype != torch.float8_e4m3fn or global_scale is None:
        raise ValueError("NVFP4 weights need float8_e4m3fn group scales and their global "
                         "scale (weight_global_scale): pass global_scale=")
    kind = "fp4_a16"
    if act is not None:
        if not act.is_fp4 or act.group_size != args.group_size or act.is_mx != args.is_mx:
            raise NotImplementedError(f"fp4 weights run with activations of the same fp4 "
                                      f"format (W4A4) or none (A16), got {act}")
        if not act.is_mx and input_global_scale is None:
            raise ValueError("NVFP4 activations need their calibrated global scale "
                             "(input_global_scale): pass input_global_scale=")
        kind = "fp4_w4a4"
    gsc = (lambda t: None if t is None else t.reshape(1).float())
    return GemmWeight(kind, n, k, scale=scale.contiguous(), act=act, args=args,
                      packed=packed.contiguous(), global_scale=gsc(global_scale),
                      input_global_scale=gsc(input_global_scale) if act is not None else None)


def _check_act(act: QuantArgs, w: QuantArgs, input_scale):
    if act.num_bits != 8 or not act.symmetric:
        raise NotImplementedError(f"activations must be symmetric 8-bit, got {act}")
    if act.dynamic and act.strategy not in ("token", "tensor"):
        raise NotImplementedError(f"dynamic activation strategy {act.strategy!r}: "
                                  "use 'token'")
    if not act.dynamic and (act.strategy != "tensor" or input_scale is None):
        raise NotImplementedError("static activation quantization needs a per-tensor "
                                  "input_scale")


# ----------------------------------------------------------------------------- activations

def quantize_activations(x: torch.Tensor, w: GemmWeight):
    """x [M, K] -> (q, scale [M, 1] fp32) as the weight's activation scheme says."""
    if w.input_scale is not None:                      # static, one scale for all tokens
        s = w.input_scale.to(x.device).reshape(1, 1).expand(x.shape[0], 1)
        return quant.quantize_ref(x, s, None, w.act), s
    if w.act.strategy == "tensor":                     # dynamic, one scale per call
        amax = x.float().abs().amax().reshape(1, 1)
        s, _ = quant.qparams_from_minmax(-amax, amax, w.act)
        s = s.expand(x.shape[0], 1)
        return quant.quantize_ref(x, s, None, w.act), s
    return quant.quantize_per_token(x, w.act, w.act_sim)


# ----------------------------------------------------------------------------- kernels

def quantize_fp4_activations(x: torch.Tensor, w: GemmWeight):
    """x [M, K] -> (packed uint8 [M, K / 2], stored scales [M, K / group], global scale or
    None) in the weight's fp4 format: each token's groups scaled from their own values
    (compressed-tensors' dynamic 'local' scales), NVFP4 under the static input global scale."""
    return fp4.quantize_fp4(x, w.act, w.input_global_scale)


def gemm_ref(x: torch.Tensor, w: GemmWeight) -> torch.Tensor:
    """Torch reference of every kind (also the CPU path): dequantize, fp32 matmul."""
    if w.kind == "wna16":
        return wna16_ref(x, w.wna16)
    if w.kind == "w8a16":
        return w8a16_ref(x, w.q, w.scale)
    if w.kind == "fp8_block":
        if w.act is None:
            return fp8_block_a16_ref(x, w.q, w.scale, w.block)
        xq, sx = fp8_block.quantize_fp8_groups(x, w.block[1], w.act_sim)
        return fp8_block_ref(xq, sx, w.q, w.scale, x.dtype, w.block)
    if w.kind == "fp4_a16":
        return fp4_a16_ref(x, w.packed, w.scale, w.global_scale, w.args)
    if w.kind == "fp4_w4a4":
        xp, xs, xg = quantize_fp4_activations(x, w)
        return fp4_w4a4_ref(xp, xs, xg, w.packed, w.scale, w.global_scale, w.args, x.dtype)
    xq, sx = quantize_activations(x, w)
    if w.kind in ("w4a8", "w4afp8"):
        return w4a8_ref(xq, sx, w.wna16, x.dtype)
    return scaled_mm_ref(xq, sx, w.q, w.scale, x.dtype)


def _int8(x, w):
    xq, sx = quantize_activations(x, w)
    return int8_gemm(xq, sx, w.q, w.scale, x.dtype)


def _fp8(x, w):
    xq, sx = quantize_activations(x, w)
    return fp8_gemm(xq, sx, w.q, w.scale, x.dtype)


def _sparse24(x, w):
    if w.sparse is None:
        w.sparse = compress_24(w.q, w.scale)
    xq, sx = quantize_activations(x, w)
    return sparse24_fp8_gemm(xq, sx, w.sparse, x.dtype)


def _fp8_block(x, w):
    if w.act is None:
        return fp8_block_a16_gemm(x, w.q, w.scale, w.block)
    xq, sx = fp8_block.quantize_fp8_groups(x, w.block[1], w.act_sim)
    return fp8_block_gemm(xq, sx, w.q, w.scale, x.dtype, w.block)


def _fp4_w4a4(x, w, dot_scaled=False):
    xp, xs, xg = quantize_fp4_activations(x, w)
    return fp4_w4a4_gemm(xp, xs, xg, w.packed, w.scale, w.global_scale, w.args, x.dtype,
                         dot_scaled=dot_scaled)


def _w4a8(x, w):
    xq, sx = quantize_activations(x, w)
    return w4a8_gemm(xq, sx, w.wna16, x.dtype)


KERNELS = {
    "torch": gemm_ref,
    "wna16_splitk": lambda x, w: wna16_gemm(x, w.wna16, splitk=True),
    "wna16_tiled": lambda x, w: wna16_gemm(x, w.wna16, splitk=False),
    "int8": _int8,
    "fp8": _fp8,
    "sparse24_fp8": _sparse24,
    "w8a16": lambda x, w: w8a16_gemm(x, w.q, w.scale),
    "fp8_block": _fp8_block,
    # Ampere: the activations stay 16-bit, the weight's fp8 bytes are decoded in registers
    "fp8_block_a16": lambda x, w: fp8_block_a16_gemm(x, w.q, w.scale, w.block),
    "fp4_a16": lambda x, w: fp4_a16_gemm(x, w.packed, w.scale, w.global_scale, w.args),
    "fp4_w4a4": _fp4_w4a4,
    "fp4_scaled_dot": lambda x, w: _fp4_w4a4(x, w, dot_scaled=True),
    "w4a8": _w4a8,
    "w4afp8": _w4a8,
}


def _sparse24_usable(w: GemmWeight, x: torch.Tensor) -> bool:
    return x.is_cuda and cslt_available() and shape_supported(w.out_features, w.in_features)


def _usable(name: str, w: GemmWeight, x: torch.Tensor) -> bool:
    """Conditions beyond the table's columns."""
    if name == "sparse24_fp8":
        return _sparse24_usable(w, x)
    if name == "fp4_scaled_dot":       # tl.dot_scaled takes e8m0 scales
        return w.args.is_mx
    return True


def choose_kernel(w: GemmWeight, x: torch.Tensor) -> str:
    """The kernel name for this weight and these activations [M, K] (see the table)."""
    forced = os.environ.get("TRITONPRESS_GEMM_BACKEND", "auto").lower()
    if forced != "auto" and forced not in KERNELS and forced != "triton":
        raise ValueError(f"TRITONPRESS_GEMM_BACKEND={forced!r}: use auto, triton or one of "
                         f"{', '.join(KERNELS)}")
    if forced == "torch" or (forced == "auto" and not use_triton(x)):
        return "torch"
    if not x.is_cuda and not interpreting():
        raise RuntimeError(f"TRITONPRESS_GEMM_BACKEND={forced} on CPU tensors needs "
                           "TRITON_INTERPRET=1 set before tritonpress is imported")
    cap = capability(x.device) if x.is_cuda else INTERPRETER_CAPABILITY
    rows = [r for r in TABLE if r[0] == w.kind]
    if not rows:
        raise ValueError(f"unknown GEMM kind {w.kind!r}")
    if forced not in ("auto", "triton"):
        serving = [r for r in rows if r[3] == forced]
        if not serving:
            raise ValueError(f"kernel {forced!r} cannot run {w.kind} weights; it serves "
                             f"{sorted({r[0] for r in TABLE if r[3] == forced})}")
        need = min(r[1] for r in serving)
        if cap < need:
            raise RuntimeError(f"kernel {forced!r} needs compute capability "
                               f"{need[0]}.{need[1]}+, this device is {cap[0]}.{cap[1]}")
        if forced == "sparse24_fp8" and not _sparse24_usable(w, x):
            raise RuntimeError("kernel 'sparse24_fp8' needs CUDA tensors, a torch built with "
                               "cuSPARSELt and weight dims that are multiples of 32")
        if not _usable(forced, w, x):
            raise RuntimeError(f"kernel {forced!r} cannot run this weight: tl.dot_scaled "
                               "takes MXFP4 (e8m0 scales); NVFP4 runs 'fp4_w4a4'")
        return forced
    m = x.shape[0]
    for kind, need, (lo, hi), name in rows:
        if cap < need or m < lo or (hi is not None and m > hi):
            continue
        if not _usable(name, w, x):
            continue
        return name
    need = min(r[1] for r in rows)
    raise RuntimeError(f"{w.kind} GEMM needs compute capability {need[0]}.{need[1]}+, this "
                       f"device is {cap[0]}.{cap[1]}; set TRITONPRESS_GEMM_BACKEND=torch to "
                       "run the (slow) reference")


def linear(x: torch.Tensor, w: GemmWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) for x [..., K], in x's dtype."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {w.in_features}")
    x2 = x.reshape(-1, w.in_features)
    y = KERNELS[choose_kernel(w, x2)](x2, w) if x2.shape[0] else \
        x2.new_empty(0, w.out_features)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.out_features)
