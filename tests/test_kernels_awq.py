"""The fused AWQ grid-search kernel against its torch reference (Triton interpreter on CPU)."""
import pytest
import torch

from tritonpress.kernels.awq_search import (awq_grid_errors, awq_grid_errors_ref,
                                            awq_grid_errors_triton)
from tritonpress.kernels.quant import quantize_weight_ref, dequantize_ref
from tritonpress.schemes import QuantArgs

# fp32 everywhere in the interpreter; only the summation order differs from the reference
RTOL = 1e-4


def _case(T=67, N=40, K=192, C=5, dtype=torch.float32, outliers=True):
    x = torch.randn(T, K)
    if outliers:
        x[:, ::37] *= 15.0                       # a few loud channels, as AWQ expects
    w = torch.randn(N, K) * 0.05
    s = torch.rand(C, K) * 1.5 + 0.25
    s[0] = 1.0                                   # r = 0: plain round-to-nearest
    return x.to(dtype), w.to(dtype), s


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_reference_odd_shapes(symmetric, scale_dtype):
    x, w, s = _case()
    args = QuantArgs(4, "int", symmetric, "group", 64)
    ref = awq_grid_errors_ref(x, w, s, args, scale_dtype, form="direct")
    got = awq_grid_errors_triton(x, w, s, args, scale_dtype)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)


def test_kernel_small_blocks_mask_partial_tiles():
    # several m and n tiles, the last of each partial
    x, w, s = _case(C=3)
    args = QuantArgs(4, "int", False, "group", 64)
    ref = awq_grid_errors_ref(x, w, s, args, torch.bfloat16)
    got = awq_grid_errors_triton(x, w, s, args, torch.bfloat16, block_m=32, block_n=16)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)


def test_kernel_bf16_inputs_group_32():
    x, w, s = _case(T=45, N=24, K=96, C=3, dtype=torch.bfloat16)
    args = QuantArgs(4, "int", False, "group", 32)
    ref = awq_grid_errors_ref(x, w, s, args, torch.bfloat16)
    got = awq_grid_errors_triton(x, w, s, args, torch.bfloat16, block_m=32, block_n=16)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)


def test_unit_scales_give_the_rtn_error():
    x, w, s = _case(C=2)
    args = QuantArgs(4, "int", False, "group", 64)
    q, scale, zp = quantize_weight_ref(w, args, torch.bfloat16)
    rtn = (x @ (dequantize_ref(q, scale, zp) - w).T).pow(2).sum()
    got = awq_grid_errors_triton(x, w, s, args, torch.bfloat16)
    torch.testing.assert_close(got[0], rtn, rtol=RTOL, atol=0)
    assert got[1] != got[0]


def test_activation_aware_scales_beat_rtn_on_outlier_channels():
    # scales that favour the loud channels lower the output error: the point of AWQ
    x, w, _ = _case(T=256, C=1)
    args = QuantArgs(4, "int", False, "group", 64)
    xm = x.abs().mean(0)
    s = torch.stack([torch.ones_like(xm), xm.pow(0.5) / (xm.pow(0.5).max() * xm.pow(0.5).min()).sqrt()])
    e = awq_grid_errors_triton(x, w, s, args, torch.bfloat16)
    assert e[1] < 0.8 * e[0]


def test_reference_matches_kernels_quant_and_its_other_forms():
    x, w, s = _case(T=300, C=3)
    args = QuantArgs(4, "int", False, "group", 64)
    want = []
    for si in s:   # quantize_weight_ref is the project's RTN: the search must agree with it
        q, sc, zp = quantize_weight_ref(w * si, args, torch.bfloat16)
        want.append(((x / si) @ dequantize_ref(q, sc, zp).T - x @ w.T).pow(2).sum())
    want = torch.stack(want)
    for form, chunk in (("direct", 64), ("gram", 128), ("auto", 4096)):
        got = awq_grid_errors_ref(x, w, s, args, torch.bfloat16, chunk_tokens=chunk, form=form)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=0)


def test_dispatch_uses_reference_on_cpu_and_bad_inputs_are_named():
    x, w, s = _case(C=2)
    args = QuantArgs(4, "int", False, "group", 64)
    torch.testing.assert_close(awq_grid_errors(x, w, s, args),
                               awq_grid_errors_ref(x, w, s, args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of group size"):
        awq_grid_errors_ref(x, w, s, QuantArgs(4, "int", False, "group", 128))
    with pytest.raises(ValueError, match="in-features disagree"):
        awq_grid_errors_ref(x[:, :128], w, s, args)
    with pytest.raises(ValueError, match="power-of-two"):
        awq_grid_errors_triton(x, w, s, QuantArgs(4, "int", False, "group", 48))
