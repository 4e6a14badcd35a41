"""The fused 2:4 in-block sweep (Triton, interpreter on CPU) against its torch reference."""
import pytest
import torch
import triton
import triton.language as tl

from tritonpress.kernels.quant import fp8_round_ref
from tritonpress.kernels.primitives import e4m3_round
from tritonpress.kernels.sparse24 import (keep_2_of_4, prune24_block, prune24_block_ref,
                                          prune24_block_triton)


def _hinv(n, tokens=256):
    """Upper Cholesky factor of a dampened, correlated H^-1."""
    X = torch.randn(tokens, n) @ (torch.randn(n, n) / n ** 0.5) + 0.3 * torch.randn(tokens, n)
    H = X.T @ X / tokens
    H += 0.01 * H.diagonal().mean() * torch.eye(n)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def _fp8_scale(W):
    return (W.abs().amax(1, keepdim=True) / 448).bfloat16().float()


def test_keep_2_of_4_ties_go_to_lower_column():
    s = torch.tensor([[1., 1., 1., 1., 0., 3., 3., 2., 5., 0., 0., 0.]])
    keep = keep_2_of_4(s)
    assert keep.tolist() == [[True, True, False, False, False, True, True, False,
                              True, True, False, False]]
    r = torch.randn(50, 40).round()  # many ties
    assert (keep_2_of_4(r).reshape(50, 10, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("quant", [False, True])
def test_kernel_matches_reference_odd_rows(quant):
    rows, n = 37, 64                      # rows not a multiple of the row tile
    W = torch.randn(rows, n)
    Hinv = _hinv(n)
    scale = _fp8_scale(W) if quant else None
    Qr, Er = prune24_block_ref(W, Hinv, scale)
    Qt, Et = prune24_block_triton(W, Hinv, scale)
    # same operations in the same order: the interpreter reproduces the reference bit for bit
    assert torch.equal(Qr == 0, Qt == 0)
    torch.testing.assert_close(Qt, Qr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(Et, Er, rtol=1e-5, atol=1e-6)
    assert (Qt.reshape(rows, n // 4, 4) != 0).sum(-1).le(2).all()
    if quant:
        assert torch.equal(fp8_round_ref(Qt / scale) * scale, Qt)  # on the fp8 grid


def test_kernel_fixed_mask_matches_reference_and_keeps_the_mask():
    """With `keep` given, the sweep only rounds and compensates: exactly keep's pattern."""
    rows, n = 29, 44
    W = torch.randn(rows, n)
    Hinv = _hinv(n)
    keep = keep_2_of_4(torch.rand(rows, n))
    scale = _fp8_scale(W) * 2
    Qr, Er = prune24_block_ref(W, Hinv, scale, keep)
    Qt, Et = prune24_block_triton(W, Hinv, scale, keep, block_m=8)
    assert torch.equal(Qr != 0, keep & (Qr != 0)) and (Qr != 0).sum() > 0.95 * keep.sum()
    assert torch.equal(Qr == 0, Qt == 0)
    torch.testing.assert_close(Qt, Qr, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(Et, Er, rtol=1e-5, atol=1e-6)
    # a mask equal to the one the sweep picks itself gives the same sweep
    Q0, _ = prune24_block_ref(W, Hinv, scale)
    Q1, _ = prune24_block_ref(W, Hinv, scale, Q0 != 0)
    assert torch.equal(Q0, Q1)


def test_kernel_partial_block_and_strided_input():
    """A last block narrower than the tile (n=20 in a 32-wide tile), read from a column slice."""
    rows, n = 21, 20
    full = torch.randn(rows, 52)
    W = full[:, 8:8 + n]                  # non-contiguous view, as the sweep passes it
    Hinv = _hinv(n)
    Qr, Er = prune24_block_ref(W, Hinv)
    Qt, Et = prune24_block_triton(W, Hinv, block_m=8)
    assert torch.equal(Qr == 0, Qt == 0)
    torch.testing.assert_close(Qt, Qr, rtol=1e-6, atol=1e-7)


def test_block_sweep_reduces_error_vs_plain_pruning():
    """Inside one block, the error feedback lowers the layer loss below masking alone."""
    rows, n = 16, 32
    X = torch.randn(512, n) @ (torch.randn(n, n) / n ** 0.5)
    H = X.T @ X / 512 + 0.01 * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = torch.randn(rows, n)
    Q, _ = prune24_block(W, Hinv)
    plain = torch.where(keep_2_of_4(W ** 2 / Hinv.diagonal() ** 2), W, 0.0)
    loss = lambda Wq: float((((W - Wq) @ H) * (W - Wq)).sum())  # noqa: E731
    assert loss(Q) < 0.8 * loss(plain)


def test_bad_block_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        prune24_block(torch.randn(4, 6), torch.eye(6))
    with pytest.raises(ValueError, match="per output channel"):
        prune24_block(torch.randn(4, 8), torch.eye(8), torch.ones(8, 1))
    with pytest.raises(ValueError, match="keep must be"):
        prune24_block(torch.randn(4, 8), torch.eye(8), None, torch.ones(4, 4, dtype=bool))


@triton.jit
def _round_kernel(X, Y, N, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    m = o < N
    tl.store(Y + o, e4m3_round(tl.load(X + o, mask=m)), mask=m)


def test_fp8_round_matches_torch_cast():
    x = torch.cat([torch.randn(20000) * 10 ** torch.empty(20000).uniform_(-4, 3),
                   torch.linspace(-500, 500, 8001),             # saturation and big values
                   torch.arange(-600, 600) * 2.0 ** -11,         # subnormal grid and its ties
                   fp8_round_ref(torch.randn(4000) * 50) * (1 + 2.0 ** -4)])  # exact ties
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 16384),)](x, y, x.numel(), B=16384)
    assert torch.equal(y, fp8_round_ref(x))
    assert torch.equal(torch.signbit(y), torch.signbit(fp8_round_ref(x)))   # -0 stays -0


def test_full_sweep_triton_vs_torch(monkeypatch, quant=True):
    """The whole blocked sweep (3 blocks of 64, trailing matmuls) on both backends."""
    from tritonpress.methods.sparsegpt_solve import sparsegpt_sweep
    out, n = 37, 192
    W = torch.randn(out, n)
    Hinv = _hinv(n, tokens=512)
    scale = _fp8_scale(W) if quant else None
    monkeypatch.setenv("TRITONPRESS_BACKEND", "torch")
    Qr, lr = sparsegpt_sweep(W, Hinv, 64, scale)
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    Qt, lt = sparsegpt_sweep(W, Hinv, 64, scale)
    assert torch.equal(Qr == 0, Qt == 0)
    torch.testing.assert_close(Qt, Qr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=0)
