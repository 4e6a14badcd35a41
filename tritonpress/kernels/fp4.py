"""FP4 (e2m1) weights: NVFP4 and MXFP4 as compressed-tensors 0.19 quantizes and packs them.

The torch references (also the CPU path and the oracle of fp4_triton.py's fused kernel):

  e2m1 grid     +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; round to nearest, ties to the even code
                (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4),
                saturating at 6: compressed-tensors' cast_to_fp4 thresholds exactly
  codes         bits 0-2 the magnitude's index in the grid, bit 3 the sign (x < 0, so a
                negative value that rounds to zero is stored as -0, code 8)
  packing       two codes per uint8, the even column in the low nibble
  NVFP4         groups of 16 (strategy "tensor_group"):
                  global = 448 * 6 / amax(tensor)                fp32 [1]
                  stored = e4m3(global * amax_g / 6), 0 -> 0.125  float8_e4m3fn [rows, cols/16]
                  q      = e2m1(clamp(x / (stored / global), -6, 6))
  MXFP4         groups of 32 (strategy "group", scale dtype uint8):
                  e      = 127 + floor(log2(pow2(amax_g))) - 2, clamped to [0, 255]  uint8
                  (pow2 rounds the mantissa up to the next power of two from 1.75 on:
                  compressed-tensors' round_to_power_2), scale = 2^(e - 127), no global scale
                  q      = e2m1(clamp(x / scale, -6, 6))
  x_hat = value(q) * effective scale.
Arithmetic in amax's own dtype where compressed-tensors' observers do it (the global scale and
amax_g / 6 of a bf16 weight are bf16-rounded), fp32 everywhere else.
"""
from __future__ import annotations

import functools

import torch

from ..schemes import QuantArgs
from .dispatch import use_triton

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
FP8_MAX = 448.0
NVFP4_EPS = 0.125            # an all-zero group's stored scale (compressed-tensors' fp8 eps)
MX_BIAS = 127


# ----------------------------------------------------------------------------- e2m1 grid

def _e2m1_index(a: torch.Tensor) -> torch.Tensor:
    """|x| -> index 0..7 into E2M1_VALUES, compressed-tensors' thresholds (ties to even)."""
    return ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
            + (a > 2.5) + (a >= 3.5) + (a > 5.0))


@functools.lru_cache(maxsize=None)
def _e2m1_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid values, the thresholds of _e2m1_index for torch.bucketize: index = how many lie
    below |x|, each `>=` threshold as `>` the float just below it)."""
    b = torch.tensor((0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0), device=device)
    b[1::2] = torch.nextafter(b[1::2], torch.zeros((), device=device))
    return torch.tensor(E2M1_VALUES, device=device), b


def round_e2m1_ref(x: torch.Tensor) -> torch.Tensor:
    """Values rounded to the e2m1 grid (saturating at +-6), fp32, same shape; a negative value
    rounding to zero gives -0.0, as compressed-tensors' cast_to_fp4."""
    x = x.float()
    mag = e2m1_magnitude(x.abs())
    return torch.where(x < 0, -mag, mag)


def e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """Magnitudes a >= 0 (fp32) rounded to the e2m1 grid's, saturating at 6. Up to 16K values
    (GPTQ's sweep rounds one column at a time) one bucketize into _e2m1_index's thresholds: 50
    -> 14 us a 960-row column. Beyond, round(a / step) * step with the grid's step (0.5 below
    2, 1 below 4, 2 above: exact powers of two, and round's ties to even are the grid's):
    1.3 -> 0.65 ms for 590K values against the seven comparisons (2 CPU threads)."""
    if a.numel() <= 16384:
        table, bounds = _e2m1_tables(a.device)
        return table[torch.bucketize(a, bounds)]
    a = a.clamp(max=E2M1_MAX)
    inv = torch.exp2(1.0 - (a >= 2).float().add_((a >= 4).float()))     # 1 / step
    return (a * inv).round_().div_(inv)


def e2m1_codes_ref(x: torch.Tensor) -> torch.Tensor:
    """Values (not yet rounded) -> uint8 codes 0..15: the rounded magnitude's index, bit 3 the
    sign (x < 0)."""
    x = x.float()
    return _e2m1_index(x.abs()) | ((x < 0).to(torch.uint8) << 3)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (any shape) -> fp32 e2m1 values (code 8 gives -0.0)."""
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def pack_fp4_ref(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, cols] (cols even) -> uint8 [rows, cols/2], column 2j in the low
    nibble of byte j and column 2j+1 in the high one (compressed-tensors' pack_fp4_to_uint8)."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"fp4 packing needs an even number of columns, got {cols}")
    c = codes.reshape(rows, cols // 2, 2)
    return (c[..., 0] & 0xF) | ((c[..., 1] & 0xF) << 4)


def unpack_fp4_ref(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, cols/2] -> fp32 e2m1 values [rows, cols] (code 8 gives -0.0)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed fp4 must be uint8 [rows, cols/2], got {tuple(packed.shape)} "
                         f"{packed.dtype}")
    if packed.shape[1] * 2 != cols:
        raise ValueError(f"{packed.shape[1]} bytes per row hold {packed.shape[1] * 2} fp4 "
                         f"values, not {cols}")
    return decode_e2m1(unpack_fp4_codes(packed))


def unpack_fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols/2] -> uint8 codes [rows, cols]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------- scales

def nvfp4_global_scale_ref(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor scale 448 * 6 / amax, fp32 [1], computed in amax's dtype as
    compressed-tensors' generate_gparam (amax clamped to the dtype's tiniest normal; NaN or
    Inf -> 1)."""
    a = amax.detach().reshape(-1).abs().amax()
    a = torch.clamp(a, min=torch.finfo(a.dtype).tiny)
    g = (FP8_MAX * E2M1_MAX) / a
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).float().reshape(1)


def round_to_power_2(x: torch.Tensor) -> torch.Tensor:
    """Positive fp32 x -> a power of two: 2^floor(log2 x), or the next one up when the
    mantissa is >= 1.75 (compressed-tensors' round_to_power_2: add a quarter of the leading
    bit, keep sign and exponent)."""
    b = x.float().contiguous().view(torch.int32)
    return ((b + (1 << 21)) & ~((1 << 23) - 1)).view(torch.float32)


def mx_exponents_ref(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4 group scales as stored: uint8 e8m0 exponents 127 + floor(log2(pow2(amax))) - 2."""
    p2 = round_to_power_2(amax.float())
    e = MX_BIAS + torch.floor(torch.log2(p2)) - 2
    return torch.round(e.clamp(0, 255)).to(torch.uint8)


def mx_scale(exps: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 exponents -> fp32 scales 2^(e - 127)."""
    return torch.exp2(exps.float() - MX_BIAS)


def nvfp4_group_scales_ref(amax_g: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 group scales as stored: float8_e4m3fn e4m3(global * amax_g / 6), a zero -> 0.125.
    amax_g / 6 in amax_g's dtype (compressed-tensors' calculate_qparams)."""
    s = global_scale.float() * (amax_g / E2M1_MAX).float()
    s = s.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return torch.where(s == 0, torch.full_like(s, NVFP4_EPS), s).to(torch.float8_e4m3fn)


def effective_scale(stored_scale: torch.Tensor, global_scale: torch.Tensor | None,
                    args: QuantArgs) -> torch.Tensor:
    """The fp32 scale [rows, ngroups] a group's e2m1 values are multiplied by."""
    if args.is_mx:
        return mx_scale(stored_scale)
    s = stored_scale.float()
    return s if global_scale is None else s / global_scale.float()


def check_fp4_args(args: QuantArgs) -> None:
    if not args.is_fp4 or not args.symmetric:
        raise ValueError(f"fp4 quantization is e2m1, symmetric: got {args}")
    if args.is_mx:
        return
    if args.strategy != "tensor_group" or args.scale_dtype != "float8_e4m3fn":
        raise ValueError(f"fp4 weights take NVFP4 scales (strategy 'tensor_group', scale dtype "
                         f"float8_e4m3fn) or MX scales (group 32, uint8): got {args}")


def _groups(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """[rows, cols] -> [rows, cols/g, g]; cols must be a multiple of g."""
    check_fp4_args(args)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"expected a 2-D float tensor [rows, cols], got {tuple(w.shape)} "
                         f"{w.dtype}")
    rows, cols = w.shape
    g = args.group_size
    if cols == 0 or cols % g:
        raise ValueError(f"{cols} input features are not a multiple of the fp4 group size {g}: "
                         "ignore this layer (scheme ignore=[...]) or pad it")
    return w.reshape(rows, cols // g, g)


# ----------------------------------------------------------------------------- references

def fp4_qparams_ref(w: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None,
                    amax_g: torch.Tensor | None = None):
    """(stored scale [rows, cols/g], global scale or None) of w [rows, cols]: amax_g (default
    the groups' absolute maxima; a clip search passes shrunk ones), NVFP4's global scale from
    the whole tensor unless given (a fused q/k/v or gate/up shares one)."""
    wg = _groups(w, args)
    if amax_g is None:
        amax_g = wg.abs().amax(-1)
    if args.is_mx:
        return mx_exponents_ref(amax_g), None
    if global_scale is None:
        global_scale = nvfp4_global_scale_ref(w.abs().amax())
    return nvfp4_group_scales_ref(amax_g, global_scale), global_scale.float().reshape(1)


def quantize_fp4_values_ref(w: torch.Tensor, stored_scale: torch.Tensor,
                            global_scale: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """uint8 codes [rows, cols] of w under the given scales (unpacked)."""
    wg = _groups(w, args)
    s = effective_scale(stored_scale, global_scale, args).unsqueeze(-1)
    y = (wg.float() / s).clamp(-E2M1_MAX, E2M1_MAX)
    return e2m1_codes_ref(y).reshape(w.shape)


def quantize_fp4_ref(w: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None):
    """Round-to-nearest fp4 of w [rows, cols] -> (packed uint8 [rows, cols/2], stored scale
    [rows, cols/g] (float8_e4m3fn NVFP4, uint8 e8m0 MXFP4), global scale fp32 [1] or None)."""
    scale, gs = fp4_qparams_ref(w, args, global_scale)
    codes = quantize_fp4_values_ref(w, scale, gs, args)
    return pack_fp4_ref(codes), scale, gs


def dequantize_fp4_ref(packed: torch.Tensor, stored_scale: torch.Tensor,
                       global_scale: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """x_hat fp32 [rows, cols] = e2m1 value * effective scale of its group."""
    rows, ng = stored_scale.shape
    v = unpack_fp4_ref(packed, packed.shape[1] * 2)
    s = effective_scale(stored_scale, global_scale, args)
    return (v.reshape(rows, ng, -1) * s.unsqueeze(-1)).reshape(rows, -1)


def fake_quantize_fp4_ref(x: torch.Tensor, args: QuantArgs,
                          global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """quantize then dequantize x [..., cols] group-wise along the last dim (activations: a
    group's scale from its own values, NVFP4's global scale given), in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    scale, gs = fp4_qparams_ref(x2, args, global_scale)
    s = effective_scale(scale, gs, args).unsqueeze(-1)
    y = round_e2m1_ref((_groups(x2, args).float() / s).clamp(-E2M1_MAX, E2M1_MAX)) * s
    return y.reshape(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------- dispatch

def quantize_fp4(w: torch.Tensor, args: QuantArgs, global_scale: torch.Tensor | None = None):
    """quantize_fp4_ref's contract: the fused Triton kernel (fp4_triton.py) on CUDA tensors,
    the reference elsewhere."""
    _groups(w[:0], args)                     # the reference's errors, before any launch
    if use_triton(w):
        from .fp4_triton import quantize_fp4_triton
        return quantize_fp4_triton(w, args, global_scale)
    return quantize_fp4_ref(w, args, global_scale)
