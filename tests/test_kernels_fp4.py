"""The fused fp4 quantize + pack kernel (fp4_triton.py) against fp4.quantize_fp4_ref, bit for
bit (in the interpreter on CPU): NVFP4 and MXFP4, three weight dtypes, odd row counts,
several column counts, zero groups, outliers, exact ties of the e2m1 grid, a given global
scale; and the e2m1 / e8m0 decoders the fp4 GEMMs use, over every code."""
import pytest
import torch
import triton
import triton.language as tl

from tritonpress.kernels import fp4, fp4_triton
from tritonpress.schemes import PRESETS

NV, MX = PRESETS["NVFP4A16"].weights, PRESETS["MXFP4A16"].weights


def _same(a, b):
    (p, s, g), (p2, s2, g2) = a, b
    assert p2.dtype == torch.uint8 and s2.dtype == s.dtype and p2.shape == p.shape
    assert torch.equal(p, p2)
    assert torch.equal(s.view(torch.uint8), s2.view(torch.uint8))
    assert (g is None and g2 is None) or torch.equal(g, g2)


@pytest.mark.parametrize("args", [NV, MX], ids=["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_pack_matches_reference_bit_for_bit(device, args, dtype):
    for rows, cols in ((33, 64), (7, 96), (5, 480)):
        w = (torch.randn(rows, cols, device=device) * torch.rand(rows, 1, device=device) * 4)
        w[0, :32] = 0                                  # zero groups
        w[1, 3] = 100                                  # an outlier sets the global scale
        w = w.to(dtype)
        _same(fp4.quantize_fp4_ref(w, args), fp4_triton.quantize_fp4_triton(w, args))


@pytest.mark.parametrize("args", [NV, MX], ids=["nvfp4", "mxfp4"])
def test_ties_round_as_compressed_tensors(device, args):
    # each group's amax is 6, so its scale is exactly 1 (MX: exponent 127; NVFP4 with global
    # scale 1: e4m3(6 / 6)) and the values below sit exactly on the rounding thresholds
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75,
                         -2.5, -3.5, -5.0, -0.1, 6.0], device=device)
    w = ties.repeat(3, 4)
    gs = None if args.is_mx else torch.ones(1, device=device)
    ref = fp4.quantize_fp4_ref(w, args, gs)
    _same(ref, fp4_triton.quantize_fp4_triton(w, args, gs))
    codes = torch.stack((ref[0][0] & 15, ref[0][0] >> 4), -1).reshape(-1)[:16]
    # indices: 0.25 -> 0, 0.75 and 1.25 -> 2 (1.0), 1.75 and 2.5 -> 4 (2.0), 3.5 and 5 -> 6
    # (4.0); negatives with bit 3 set (-0.1 is -0: code 8); 6 -> 7
    assert codes.tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 8, 7]


def test_given_global_scale_is_used(device):
    w = torch.randn(9, 48, device=device)
    g = torch.tensor([300.0], device=device)
    _same(fp4.quantize_fp4_ref(w, NV, g), fp4_triton.quantize_fp4_triton(w, NV, g))
    assert torch.equal(fp4_triton.quantize_fp4_triton(w, NV, g)[2], g)


def test_dispatcher_runs_the_kernel(monkeypatch):
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    w = torch.randn(11, 64)
    _same(fp4.quantize_fp4_ref(w, NV), fp4.quantize_fp4(w, NV))


@triton.jit
def _decode_kernel(c_ptr, lo_ptr, hi_ptr, s_ptr):
    i = tl.arange(0, 256)
    c = tl.load(c_ptr + i)
    tl.store(lo_ptr + i, fp4_triton.e2m1_value(c & 15))
    tl.store(hi_ptr + i, fp4_triton.e2m1_value(c >> 4))
    tl.store(s_ptr + i, fp4_triton.e8m0_value(c))


def test_decoders_cover_every_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    lo, hi, s = torch.empty(256), torch.empty(256), torch.empty(256)
    _decode_kernel[(1,)](codes, lo, hi, s)
    got = torch.stack((lo, hi), -1).reshape(1, 512)
    want = fp4.unpack_fp4_ref(codes.reshape(1, 256), 512)
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    assert torch.equal(s, fp4.mx_scale(codes))
