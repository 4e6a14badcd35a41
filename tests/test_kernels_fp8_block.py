"""FP8 block quantization: the Triton kernel against the torch reference (bit for bit, in the
interpreter on CPU), the reference against the definition, and the activation group quantizer.
Shapes are odd on purpose: partial blocks at the bottom and right edges."""
import pytest
import torch

from tritonpress.kernels import fp8_block as fb

SHAPES = [((300, 200), (128, 128)), ((129, 257), (128, 128)), ((70, 50), (32, 16))]


def _bytes(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block", SHAPES)
def test_kernel_matches_reference_bit_for_bit(device, shape, block, scale_dtype):
    w = (torch.randn(shape, device=device) * 3).to(torch.bfloat16)
    w[:block[0], :block[1]] = 0                       # a zero block: the eps scale
    w[-1, -1] = 1000.0                                # saturating amax in the corner block
    q, s = fb.quantize_fp8_block_ref(w, block, scale_dtype)
    q2, s2 = fb.quantize_fp8_block_triton(w, block, scale_dtype)
    assert s.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    assert s.dtype == s2.dtype == scale_dtype and q2.dtype == torch.float8_e4m3fn
    assert torch.equal(s, s2)
    assert torch.equal(_bytes(q), _bytes(q2))
    assert s[0, 0].item() == torch.finfo(scale_dtype).eps


def test_reference_follows_the_definition():
    # each block's scale from its own values only (the padding of partial blocks is zero),
    # its largest value maps to +-448, and dequantization is within half an e4m3 step
    w = torch.randn(150, 140) * 2
    q, s = fb.quantize_fp8_block_ref(w)
    for i, j in ((0, 0), (1, 0), (0, 1), (1, 1)):
        blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
        assert s[i, j].item() == pytest.approx(blk.abs().max().item() / 448, rel=1e-6)
        qb = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
        assert qb.abs().max().item() == 448.0
    d = fb.dequantize_fp8_block_ref(q, s)
    step = s.repeat_interleave(128, 0)[:150].repeat_interleave(128, 1)[:, :140] * 32  # at 448
    assert ((d - w).abs() <= step / 2 + 1e-6).all()
    assert (d - w).abs().max() > 0


def test_dispatcher_checks_input():
    with pytest.raises(ValueError, match="2-D float"):
        fb.quantize_fp8_block(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="block"):
        fb.quantize_fp8_block(torch.randn(4, 4), (0, 128))
    with pytest.raises(ValueError, match="scale dtype"):
        fb.quantize_fp8_block(torch.randn(4, 4), scale_dtype=torch.int8)
    q, s = fb.quantize_fp8_block(torch.randn(5, 7))
    assert q.shape == (5, 7) and s.shape == (1, 1)


@pytest.mark.parametrize("act_sim", ["compressed-tensors", "vllm"])
def test_activation_groups(act_sim):
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    x[0, 0, :128] = 0
    q, s = fb.quantize_fp8_groups(x, 128, act_sim)
    assert q.shape == x.shape and s.shape == (3, 5, 2) and s.dtype == torch.float32
    g = x.float().reshape(3, 5, 2, 128)
    torch.testing.assert_close(s[..., 1], g[..., 1, :].abs().amax(-1) / 448)
    xd = (q.float().reshape(3, 5, 2, 128) * s[..., None]).reshape(x.shape)
    assert ((xd - x.float()).abs() <= s.repeat_interleave(128, -1) * 16 + 1e-6).all()
    assert q[0, 0, :128].float().abs().max() == 0
    with pytest.raises(ValueError, match="multiple of the activation group"):
        fb.quantize_fp8_groups(torch.randn(2, 100), 128, act_sim)


def test_activation_groups_kernel_matches_reference(device, monkeypatch):
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    x = torch.randn(7, 384, device=device) * 5
    q, s = fb.quantize_fp8_groups(x, 128)
    q2, s2 = fb.quantize_fp8_groups_ref(x, 128)
    assert torch.equal(s, s2) and torch.equal(_bytes(q), _bytes(q2))
