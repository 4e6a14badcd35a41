"""Triton device functions shared by the kernels: rounding and quantization parameters, each
written once, with the exact semantics of the torch references in quant.py.

Rounding is done on the fp32 bits where the Triton interpreter's casts are wrong (fp32 -> bf16
truncates, fp32 -> fp8 drops carries), so the interpreter and the GPU compute the same values.
"""
import triton
import triton.language as tl

RNE_MAGIC = tl.constexpr(12582912.0)       # 1.5 * 2**23: adding it leaves no fraction bits
E4M3_SUB_MAGIC = tl.constexpr(24576.0)     # 1.5 * 2**14: its ulp is 2**-9, the subnormal step
E4M3_MIN_NORMAL = tl.constexpr(0x3C800000)  # fp32 bits of 2**-6


@triton.jit
def rne(y):
    """Round half to even; exact for |y| < 2**22."""
    return (y + RNE_MAGIC) - RNE_MAGIC


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 -> nearest DTYPE value (half to even), returned as fp32 (fp32: unchanged)."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        x = b.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def e4m3_round(y):
    """fp32 -> nearest e4m3 value (RNE, saturating at +-448), as fp32; the sign of zero is
    kept and NaN stays NaN, as torch's cast to float8_e4m3fn."""
    c = tl.minimum(tl.maximum(y, -448.0), 448.0)
    bits = c.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    # normal range: round 23 mantissa bits to 3, half to even; a carry bumps the exponent
    normal = (a + 0x7FFFF + ((a >> 20) & 1)) & -1048576
    # subnormal range (below 2**-6): multiples of 2**-9
    af = a.to(tl.float32, bitcast=True)
    sub = ((af + E4M3_SUB_MAGIC) - E4M3_SUB_MAGIC).to(tl.int32, bitcast=True)
    r = tl.where(a < E4M3_MIN_NORMAL, sub, normal) | (bits & -2147483648)  # keep the sign
    return tl.where(y != y, y, r.to(tl.float32, bitcast=True))


@triton.jit
def e4m3_byte(r):
    """float8_e4m3fn byte (as int32) of a value already on the e4m3 grid."""
    bits = r.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    normal = (((a >> 23) - 120) << 3) | ((a >> 20) & 7)   # exponent bias 127 -> 7
    sub = (a.to(tl.float32, bitcast=True) * 512.0).to(tl.int32)
    code = tl.where(a < E4M3_MIN_NORMAL, sub, normal)
    code = tl.where(r != r, 0x7F, code)
    return code | ((bits >> 24) & 0x80)


@triton.jit
def e4m3_byte_to_f32(byte):
    """float8_e4m3fn byte -> its value in fp32 (sign | 4 exponent bits, bias 7 | 3 mantissa
    bits; exponent 0 is subnormal)."""
    b = byte.to(tl.int32) & 0xFF
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)   # rebias 7 -> 127
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)            # m * 2^-9
    return tl.where((b & 0x80) != 0, -v, v)


@triton.jit
def qparams(lo, hi, div, qmin, qmax, eps, SYMMETRIC: tl.constexpr, SCALE_DTYPE: tl.constexpr):
    """quant.qparams_from_minmax on each group's min and max: (scale, zero point), fp32.
    div is (qmax - qmin) / 2 for symmetric args, qmax - qmin for asymmetric ones."""
    lo = tl.minimum(lo, 0.0)
    hi = tl.maximum(hi, 0.0)
    if SYMMETRIC:
        s = tl.div_rn(tl.maximum(-lo, hi), div)
    else:
        s = tl.div_rn(hi - lo, div)
    s = round_to(tl.where(s == 0.0, eps, s), SCALE_DTYPE)
    if SYMMETRIC:
        zp = tl.zeros_like(s)
    else:
        zp = rne(tl.minimum(tl.maximum(qmin - tl.div_rn(lo, s), qmin), qmax))
    return s, zp


def tune_bench(fn, quantiles=None):
    """The autotuners' timing: short, so a shape is tuned in well under a second."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
