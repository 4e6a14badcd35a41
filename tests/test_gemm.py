"""GEMM kernels vs their torch references, references vs float64, and the dispatch table.

On CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1); shapes
are odd on purpose: N = 72 and K = 200 are multiples of no block size, K is a multiple of the
group size (40) but not of BLOCK_K.
"""
import pytest
import torch

from tritonpress.kernels import fp4, fp8_block, gemm
from tritonpress.kernels.gemm_fp4 import fp4_a16_gemm, fp4_a16_ref, fp4_w4a4_gemm, fp4_w4a4_ref
from tritonpress.kernels.gemm_fp8_block import (fp8_block_a16_gemm, fp8_block_a16_ref,
                                                fp8_block_gemm, fp8_block_ref)
from tritonpress.kernels.gemm_w4a8 import w4a8_gemm, w4a8_ref
from tritonpress.kernels.gemm_sparse24 import cslt_available, is_24_sparse
from tritonpress.kernels.gemm_w4a16 import pack_wna16, unpack_wna16, wna16_gemm, wna16_ref
from tritonpress.kernels.gemm_w8a8 import (fp8_gemm, int8_gemm, scaled_mm_ref, w8a16_gemm,
                                           w8a16_ref)
from tritonpress.kernels.quant import (dequantize_ref, quantize_per_token_ref,
                                       quantize_weight_ref)
from tritonpress.schemes import PRESETS, QuantArgs

N, K = 72, 200
MS = (1, 5, 33)
# the new formats need K in whole groups (16, 32, 128): N = 200 leaves a partial 128-row block
N4, K4 = 200, 256
NV, NV_ACT = PRESETS["NVFP4"].weights, PRESETS["NVFP4"].input_activations
MX, MX_ACT = PRESETS["MXFP4"].weights, PRESETS["MXFP4"].input_activations
FP8_BLOCK_W, FP8_GROUP_ACT = PRESETS["FP8_BLOCK"].weights, PRESETS["FP8_BLOCK"].input_activations
INT8_TOKEN = PRESETS["W4A8"].input_activations
FP8_TOKEN = PRESETS["W4AFP8"].input_activations


def _close(y, ref, rel=1e-2):
    """Kernel vs reference, both rounded to a 16-bit output: ~1 ulp of the largest value."""
    y, ref = y.float(), ref.float()
    assert y.shape == ref.shape
    assert torch.isfinite(y).all()
    err = (y - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), f"max error {err} vs scale {ref.abs().max()}"


def _int_weight(bits, group, symmetric, k=K, device="cpu"):
    w = torch.randn(N, k, device=device)
    args = QuantArgs(bits, "int", symmetric, "group" if group else "channel", group)
    return quantize_weight_ref(w, args, torch.bfloat16)


# ----------------------------------------------------------------------------- W4A16

# gather path (group 40 not a multiple of BLOCK_K 32) and per-tile path (64 % 64 == 0),
# split-K over 3 programs with more K tiles than splits
WNA16_CASES = [
    (4, 40, 200, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3, GROUP_M=8)),
    (4, 64, 256, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, GROUP_M=8)),
    (8, None, 200, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, SPLIT_K=2, GROUP_M=8)),
]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,group,k,config", WNA16_CASES)
def test_wna16_kernel_matches_reference(device, symmetric, bits, group, k, config):
    q, s, zp = _int_weight(bits, group, symmetric, k, device)
    w = pack_wna16(q, s, zp, bits)
    for m in MS:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        ref = wna16_ref(x, w)
        _close(wna16_gemm(x, w, splitk=True, config=config), ref)
        tiled = dict(config, BLOCK_M=32, SPLIT_K=1)
        _close(wna16_gemm(x, w, splitk=False, config=tiled), ref)


def test_wna16_fp16_and_3d_input(device):
    q, s, zp = _int_weight(4, 40, False, device=device)
    w = pack_wna16(q, s.half(), zp)
    x = torch.randn(2, 3, K, device=device, dtype=torch.float16)
    y = wna16_gemm(x, w)
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    _close(y, wna16_ref(x, w))


@pytest.mark.parametrize("symmetric", [True, False])
def test_wna16_reference_matches_float64(symmetric):
    q, s, zp = _int_weight(4, 40, symmetric)
    w = pack_wna16(q, s, zp)
    x = torch.randn(5, K)
    exact = x.double() @ dequantize_ref(q, s, zp, torch.float64).t()
    torch.testing.assert_close(wna16_ref(x, w).double(), exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_wna16_keeps_every_integer(bits):
    # K = 36: not a multiple of 8 values per word, so the last word is half padding
    q, s, zp = _int_weight(bits, None, False, k=36)
    w = pack_wna16(q, s, zp, bits)
    u, _ = unpack_wna16(w)
    assert torch.equal(u.t(), q.int() + (1 << (bits - 1)))
    assert torch.equal(w.zero.t(), zp.int() + (1 << (bits - 1)))


def test_pack_wna16_rejects_bad_input():
    q, s, _ = _int_weight(4, 40, True)
    with pytest.raises(ValueError, match="range"):
        pack_wna16(q * 3, s, None)
    with pytest.raises(ValueError, match="does not fit"):
        pack_wna16(q, s[:, :3], None)


# ----------------------------------------------------------------------------- W8A8

@pytest.mark.parametrize("scheme", ["W8A8_INT8", "W8A8_FP8"])
def test_w8a8_kernel_matches_reference(device, scheme):
    sc = PRESETS[scheme]
    q, s, _ = quantize_weight_ref(torch.randn(N, K, device=device), sc.weights, torch.float32)
    kernel = int8_gemm if sc.weights.type == "int" else fp8_gemm
    for m in MS:
        x = torch.randn(m, K, device=device, dtype=torch.bfloat16) * 3
        xq, sx = quantize_per_token_ref(x, sc.input_activations)
        y = kernel(xq, sx, q, s, torch.bfloat16,
                   config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2))
        assert y.dtype == torch.bfloat16
        _close(y, scaled_mm_ref(xq, sx, q, s, torch.float32))


@pytest.mark.parametrize("scheme", ["W8A8_INT8", "W8A8_FP8"])
def test_w8a16_kernel_matches_reference(device, scheme):
    sc = PRESETS[scheme]
    q, s, _ = quantize_weight_ref(torch.randn(N, K, device=device), sc.weights, torch.float32)
    for m in MS:
        x = torch.randn(m, K, device=device, dtype=torch.bfloat16)
        _close(w8a16_gemm(x, q, s), w8a16_ref(x.float(), q, s))


def test_w8a16_decodes_every_fp8_code(device):
    # all 256 e4m3 bit patterns (NaNs 0x7f/0xff replaced by 0) through an identity activation:
    # y = W^T exactly, so the in-kernel integer decoding must reproduce torch's fp8 values
    codes = torch.arange(256, dtype=torch.int32)
    codes[(codes & 0x7F) == 0x7F] = 0
    b = codes.to(torch.uint8).reshape(8, 32).view(torch.float8_e4m3fn).to(device)
    eye = torch.eye(32, device=device)
    y = w8a16_gemm(eye, b, torch.ones(8, device=device))
    assert torch.equal(y.t(), b.float())


@pytest.mark.parametrize("scheme", ["W8A8_INT8", "W8A8_FP8"])
def test_w8a8_reference_matches_float64(scheme):
    sc = PRESETS[scheme]
    q, s, _ = quantize_weight_ref(torch.randn(N, K), sc.weights, torch.float32)
    xq, sx = quantize_per_token_ref(torch.randn(5, K), sc.input_activations)
    exact = (xq.double() * sx.double()) @ (q.double() * s.double()).t()
    torch.testing.assert_close(scaled_mm_ref(xq, sx, q, s, torch.float32).double(), exact,
                               rtol=1e-5, atol=1e-4)


def test_is_24_sparse():
    w = torch.randn(8, 16)
    assert not is_24_sparse(w)
    w.view(8, 4, 4)[:, :, 1:3] = 0
    assert is_24_sparse(w) and is_24_sparse(w.to(torch.float8_e4m3fn))


@pytest.mark.skipif(not (torch.cuda.is_available() and cslt_available()),
                    reason="cuSPARSELt needs a CUDA GPU")
def test_sparse24_matches_reference():
    from tritonpress.kernels.gemm_sparse24 import compress_24, sparse24_fp8_gemm
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("fp8 cuSPARSELt path is for Hopper")
    sc = PRESETS["W8A8_FP8"]
    w = torch.randn(128, 256, device="cuda")
    w.view(128, 64, 4)[:, :, ::2] = 0
    q, s, _ = quantize_weight_ref(w, sc.weights, torch.float32)
    sw = compress_24(q, s)
    for m in (1, 5, 33):
        xq, sx = quantize_per_token_ref(torch.randn(m, 256, device="cuda"),
                                        sc.input_activations)
        _close(sparse24_fp8_gemm(xq, sx, sw), scaled_mm_ref(xq, sx, q, s, torch.float32))


# ----------------------------------------------------------------------------- FP8 block

def _fp8_block_weight(device="cpu", n=N4, k=K4):
    return fp8_block.quantize_fp8_block_ref(torch.randn(n, k, device=device))


def test_fp8_block_kernel_matches_reference(device):
    wq, sw = _fp8_block_weight(device)
    for m in MS:
        x = torch.randn(m, K4, device=device, dtype=torch.bfloat16) * 3
        xq, sx = fp8_block.quantize_fp8_groups_ref(x)
        y = fp8_block_gemm(xq, sx, wq, sw, torch.bfloat16)
        assert y.dtype == torch.bfloat16
        _close(y, fp8_block_ref(xq, sx, wq, sw, torch.float32))
        _close(fp8_block_a16_gemm(x, wq, sw), fp8_block_a16_ref(x.float(), wq, sw))


def test_fp8_block_reference_matches_float64():
    wq, sw = _fp8_block_weight()
    xq, sx = fp8_block.quantize_fp8_groups_ref(torch.randn(5, K4))
    w64 = wq.double() * sw.double().repeat_interleave(128, 0)[:N4].repeat_interleave(128, 1)
    x64 = xq.double() * sx.double().repeat_interleave(128, 1)
    torch.testing.assert_close(fp8_block_ref(xq, sx, wq, sw, torch.float32).double(),
                               x64 @ w64.t(), rtol=1e-5, atol=1e-4)


def test_fp8_block_gemm_rejects_bad_input():
    wq, sw = _fp8_block_weight()
    xq, sx = fp8_block.quantize_fp8_groups_ref(torch.randn(3, K4))
    with pytest.raises(ValueError, match="block scales"):
        fp8_block_gemm(xq, sx, wq, sw[:1])
    with pytest.raises(ValueError, match="activation scales"):
        fp8_block_gemm(xq, sx[:, :1], wq, sw)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_block_gemm(xq.float(), sx, wq, sw)


# ----------------------------------------------------------------------------- FP4

def _fp4_weight(args, device="cpu"):
    return fp4.quantize_fp4_ref(torch.randn(N4, K4, device=device), args)


def _fp4_act(x, args):
    g = None if args.is_mx else fp4.nvfp4_global_scale_ref(x.float().abs().amax() * 1.5)
    return fp4.quantize_fp4_ref(x, args, g)


@pytest.mark.parametrize("args", [NV, MX], ids=["nvfp4", "mxfp4"])
def test_fp4_kernels_match_reference(device, args):
    p, s, g = _fp4_weight(args, device)
    for m in MS:
        x = torch.randn(m, K4, device=device, dtype=torch.bfloat16)
        _close(fp4_a16_gemm(x, p, s, g, args), fp4_a16_ref(x.float(), p, s, g, args))
        xp, xs, xg = _fp4_act(x, args)
        ref = fp4_w4a4_ref(xp, xs, xg, p, s, g, args, torch.float32)
        _close(fp4_w4a4_gemm(xp, xs, xg, p, s, g, args, torch.float32), ref, rel=1e-5)
        if args.is_mx:       # tl.dot_scaled (interpreted here; Blackwell MMA on sm100)
            _close(fp4_w4a4_gemm(xp, xs, xg, p, s, g, args, torch.float32, dot_scaled=True,
                                 config=dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)),
                   ref, rel=1e-5)


@pytest.mark.parametrize("args", [NV, MX], ids=["nvfp4", "mxfp4"])
def test_fp4_references_match_float64(args):
    p, s, g = _fp4_weight(args)
    x = torch.randn(5, K4)
    xp, xs, xg = _fp4_act(x, args)

    def deq(packed, scale, gs):     # e2m1 values by table, scales as the format defines them
        v = torch.tensor(fp4.E2M1_VALUES, dtype=torch.float64)
        codes = torch.stack((packed & 15, packed >> 4), -1).reshape(packed.shape[0], -1).long()
        vals = torch.where(codes >= 8, -v[codes & 7], v[codes & 7])
        if args.is_mx:
            sc = 2.0 ** (scale.double() - 127)
        else:
            sc = scale.double() / gs.double()
        return vals * sc.repeat_interleave(args.group_size, 1)
    w64 = deq(p, s, g)
    torch.testing.assert_close(fp4_a16_ref(x, p, s, g, args).double(), x.double() @ w64.t(),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fp4_w4a4_ref(xp, xs, xg, p, s, g, args, torch.float32).double(),
                               deq(xp, xs, xg) @ w64.t(), rtol=1e-5, atol=1e-4)


def test_fp4_gemm_rejects_bad_input():
    p, s, g = _fp4_weight(NV)
    with pytest.raises(ValueError, match="packed uint8"):
        fp4_a16_gemm(torch.randn(2, K4 + 32), p, s, g, NV)
    xp, xs, xg = _fp4_act(torch.randn(2, K4), NV)
    with pytest.raises(ValueError, match="dot_scaled"):
        fp4_w4a4_gemm(xp, xs, xg, p, s, g, NV, dot_scaled=True)


# ----------------------------------------------------------------------------- W4A8

@pytest.mark.parametrize("act", [INT8_TOKEN, FP8_TOKEN], ids=["int8", "fp8"])
@pytest.mark.parametrize("group,symmetric", [(64, True), (32, False), (None, True)])
def test_w4a8_kernel_matches_reference(device, act, group, symmetric):
    k = K if group is None else 192          # 3 groups of 64, 6 of 32
    q, s, zp = _int_weight(4, group, symmetric, k, device)
    w = pack_wna16(q, s, zp, 4)
    for m in MS:
        xq, sx = quantize_per_token_ref(torch.randn(m, k, device=device), act)
        _close(w4a8_gemm(xq, sx, w, torch.float32), w4a8_ref(xq, sx, w, torch.float32),
               rel=1e-5)


def test_w4a8_reference_matches_float64():
    q, s, zp = _int_weight(4, 40, False)
    w = pack_wna16(q, s, zp)
    xq, sx = quantize_per_token_ref(torch.randn(5, K), INT8_TOKEN)
    exact = (xq.double() * sx.double()) @ dequantize_ref(q, s, zp, torch.float64).t()
    torch.testing.assert_close(w4a8_ref(xq, sx, w, torch.float32).double(), exact,
                               rtol=1e-5, atol=1e-4)


def test_w4a8_rejects_groups_the_dot_cannot_tile():
    q, s, zp = _int_weight(4, 40, True)
    xq, sx = quantize_per_token_ref(torch.randn(2, K), INT8_TOKEN)
    with pytest.raises(ValueError, match="multiple of 16"):
        w4a8_gemm(xq, sx, pack_wna16(q, s, zp))


# ----------------------------------------------------------------------------- dispatch

def _weights(device="cpu"):
    """One GemmWeight of every kind, small and odd-shaped."""
    out = {}
    wt = torch.randn(N, K, device=device)
    q, s, zp = quantize_weight_ref(wt, QuantArgs(4, "int", False, "group", 40), torch.bfloat16)
    out["wna16"] = gemm.prepare(q, s, zp, QuantArgs(4, "int", False, "group", 40))
    for name in ("W8A8_INT8", "W8A8_FP8"):
        sc = PRESETS[name]
        q, s, _ = quantize_weight_ref(wt, sc.weights, torch.float32)
        out[name] = gemm.prepare(q, s, None, sc.weights, sc.input_activations)
    out["w8a16"] = gemm.prepare(q, s, None, PRESETS["W8A8_FP8"].weights, None)
    w24 = wt.clone()
    w24.view(N, K // 4, 4)[:, :, 2:] = 0
    q, s, _ = quantize_weight_ref(w24, PRESETS["W8A8_FP8"].weights, torch.float32)
    out["fp8_24"] = gemm.prepare(q, s, None, PRESETS["W8A8_FP8"].weights,
                                 PRESETS["W8A8_FP8"].input_activations, sparse24=True)
    w4 = torch.randn(N4, K4, device=device)
    q, s = fp8_block.quantize_fp8_block_ref(w4)
    out["FP8_BLOCK"] = gemm.prepare(q, s, None, FP8_BLOCK_W, FP8_GROUP_ACT)
    for name, wa, act in (("NVFP4A16", NV, None), ("MXFP4A16", MX, None), ("NVFP4", NV, NV_ACT),
                          ("MXFP4", MX, MX_ACT)):
        p, s, g = fp4.quantize_fp4_ref(w4, wa)
        codes = torch.stack((p & 15, p >> 4), -1).reshape(N4, K4)    # as QuantizedWeight holds
        out[name] = gemm.prepare(codes, s, None, wa, act, global_scale=g,
                                 input_global_scale=torch.tensor([300.0], device=device))
    for name, act, group in (("W4A8", INT8_TOKEN, 64), ("W4AFP8", FP8_TOKEN, 128)):
        wa = QuantArgs(4, "int", True, "group", group)
        q, s, zp = quantize_weight_ref(w4, wa, torch.bfloat16)
        out[name] = gemm.prepare(q, s, zp, wa, act)
    return out


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITONPRESS_GEMM_BACKEND", raising=False)
    monkeypatch.delenv("TRITONPRESS_BACKEND", raising=False)
    for w in _weights().values():
        assert gemm.choose_kernel(w, torch.randn(3, w.in_features)) == "torch"


def test_dispatch_table(monkeypatch):
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "triton")
    w = _weights()
    x1, x33 = torch.randn(1, K), torch.randn(33, K)
    assert gemm.choose_kernel(w["wna16"], x1) == "wna16_splitk"
    assert gemm.choose_kernel(w["wna16"], x33) == "wna16_tiled"
    assert gemm.choose_kernel(w["W8A8_INT8"], x33) == "int8"
    assert gemm.choose_kernel(w["W8A8_FP8"], x33) == "fp8"
    assert gemm.choose_kernel(w["fp8_24"], x1) == "fp8"          # no cuSPARSELt on CPU
    assert gemm.choose_kernel(w["w8a16"], x1) == "w8a16"
    y1, y33 = torch.randn(1, K4), torch.randn(33, K4)
    assert gemm.choose_kernel(w["FP8_BLOCK"], y33) == "fp8_block"
    assert gemm.choose_kernel(w["NVFP4A16"], y1) == "fp4_a16"
    assert gemm.choose_kernel(w["NVFP4"], y33) == "fp4_w4a4"
    assert gemm.choose_kernel(w["MXFP4"], y33) == "fp4_w4a4"
    assert gemm.choose_kernel(w["W4A8"], y33) == "w4a8"
    assert gemm.choose_kernel(w["W4AFP8"], y33) == "w4afp8"
    monkeypatch.setattr(gemm, "INTERPRETER_CAPABILITY", (10, 0))  # as on a B200
    assert gemm.choose_kernel(w["MXFP4"], y33) == "fp4_scaled_dot"
    assert gemm.choose_kernel(w["NVFP4"], y33) == "fp4_w4a4"     # e4m3 scales: emulated
    monkeypatch.setattr(gemm, "INTERPRETER_CAPABILITY", (8, 0))  # as on an A100
    assert gemm.choose_kernel(w["FP8_BLOCK"], y33) == "fp8_block_a16"
    assert gemm.choose_kernel(w["W4AFP8"], y1) == "wna16_splitk"
    assert gemm.choose_kernel(w["W4AFP8"], y33) == "wna16_tiled"
    assert gemm.choose_kernel(w["MXFP4"], y33) == "fp4_w4a4"
    assert gemm.choose_kernel(w["W4A8"], y33) == "w4a8"
    assert gemm.choose_kernel(w["W8A8_FP8"], x33) == "w8a16"
    assert gemm.choose_kernel(w["fp8_24"], x33) == "w8a16"
    assert gemm.choose_kernel(w["W8A8_INT8"], x33) == "int8"
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "fp8")
    with pytest.raises(RuntimeError, match="8.9"):
        gemm.choose_kernel(w["W8A8_FP8"], x33)
    monkeypatch.setattr(gemm, "INTERPRETER_CAPABILITY", (7, 5))  # as on a T4
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="8.0"):
        gemm.choose_kernel(w["W8A8_INT8"], x33)


def test_dispatch_rejects_bad_choices(monkeypatch):
    w = _weights()
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "int8")
    with pytest.raises(ValueError, match="cannot run"):
        gemm.choose_kernel(w["wna16"], torch.randn(3, K))
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "cublas")
    with pytest.raises(ValueError, match="TRITONPRESS_GEMM_BACKEND"):
        gemm.choose_kernel(w["wna16"], torch.randn(3, K))
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "sparse24_fp8")
    with pytest.raises(RuntimeError, match="cuSPARSELt"):
        gemm.choose_kernel(w["fp8_24"], torch.randn(3, K))


def test_prepare_rejects_unsupported():
    sc = PRESETS["W8A8_FP8"]
    q, s, _ = quantize_weight_ref(torch.randn(N, K), sc.weights, torch.float32)
    with pytest.raises(ValueError, match="2:4"):
        gemm.prepare(q, s, None, sc.weights, sc.input_activations, sparse24=True)
    g = QuantArgs(8, "int", True, "group", 40)
    q, s, _ = quantize_weight_ref(torch.randn(N, K), g, torch.float32)
    with pytest.raises(NotImplementedError, match="per-channel"):
        gemm.prepare(q, s, None, g, PRESETS["W8A8_INT8"].input_activations)


def test_prepare_rejects_bad_new_formats(monkeypatch):
    w4 = torch.randn(N4, K4)
    q, s = fp8_block.quantize_fp8_block_ref(w4)
    with pytest.raises(ValueError, match="block scales"):
        gemm.prepare(q, s[:1], None, FP8_BLOCK_W, FP8_GROUP_ACT)
    with pytest.raises(NotImplementedError, match="groups of 128"):
        gemm.prepare(q, s, None, FP8_BLOCK_W, FP8_TOKEN)
    p, s, g = fp4.quantize_fp4_ref(w4, NV)
    with pytest.raises(ValueError, match="global_scale="):
        gemm.prepare(p, s, None, NV)
    with pytest.raises(ValueError, match="input_global_scale="):
        gemm.prepare(p, s, None, NV, NV_ACT, global_scale=g)
    with pytest.raises(NotImplementedError, match="same fp4 format"):
        gemm.prepare(p, s, None, NV, MX_ACT, global_scale=g)
    with pytest.raises(ValueError, match="uint8 codes"):
        gemm.prepare(p[:, :7], s, None, NV, global_scale=g)
    w = gemm.prepare(p, s, None, NV, NV_ACT, global_scale=g, input_global_scale=g)
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "fp4_scaled_dot")
    monkeypatch.setattr(gemm, "INTERPRETER_CAPABILITY", (10, 0))
    with pytest.raises(RuntimeError, match="MXFP4"):
        gemm.choose_kernel(w, torch.randn(3, K4))


@pytest.mark.parametrize("kind", ["wna16", "W8A8_INT8", "W8A8_FP8", "w8a16", "fp8_24",
                                  "FP8_BLOCK", "NVFP4A16", "MXFP4A16", "NVFP4", "MXFP4", "W4A8",
                                  "W4AFP8"])
def test_linear_triton_matches_torch(monkeypatch, kind):
    w = _weights()[kind]
    x = torch.randn(2, 3, w.in_features, dtype=torch.bfloat16)
    bias = torch.randn(w.out_features, dtype=torch.bfloat16)
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "torch")
    ref = gemm.linear(x, w, bias)
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "triton")
    y = gemm.linear(x, w, bias)
    assert y.shape == (2, 3, w.out_features) and y.dtype == torch.bfloat16
    _close(y, ref)
