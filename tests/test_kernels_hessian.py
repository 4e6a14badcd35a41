"""The Triton Hessian kernel (interpreter on CPU) against the fp32 torch reference."""
import pytest
import torch

from tritonpress.kernels import hessian
from tritonpress.kernels.hessian import xtx_accumulate, xtx_accumulate_ref, xtx_accumulate_triton


def _sym(n):
    a = torch.randn(n, n)
    return a + a.t()


def _close(got, want, x, mask=None, alpha=1.0):
    """Within fp32 summation error: a bound scaled by sum_t |x_ti| |x_tj| (per entry)."""
    xa = x.reshape(-1, x.shape[-1]).float().abs()
    if mask is not None:
        xa = xa[mask.reshape(-1).bool()]
    bound = 1e-5 * abs(alpha) * (xa.t() @ xa) + 1e-5 * want.abs() + 1e-6
    err = (got - want).abs()
    worst = (err / bound).max()
    assert bool((err <= bound).all()), f"max err {err.max():.3g}, worst ratio {worst:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_odd_shape_matches_reference(dtype):
    x = (torch.randn(77, 200) * 3).to(dtype)
    H0 = _sym(200)
    got = xtx_accumulate_triton(H0.clone(), x)
    want = xtx_accumulate_ref(H0.clone(), x)
    _close(got, want, x)


def test_mask_skips_tokens_in_3d_batch():
    x = torch.randn(3, 29, 200, dtype=torch.bfloat16)
    mask = (torch.rand(3, 29) > 0.4).long()
    mask[1] = 0  # a fully padded sample
    got = xtx_accumulate_triton(torch.zeros(200, 200), x, mask)
    want = xtx_accumulate_ref(torch.zeros(200, 200), x, mask)
    _close(got, want, x, mask)
    # The masked rows really are left out: a different fill of them changes nothing.
    x2 = x.clone()
    x2[mask == 0] = 1e3
    got2 = xtx_accumulate_triton(torch.zeros(200, 200), x2, mask)
    assert torch.equal(got, got2)


def test_mirror_fills_lower_triangle_and_rescale_is_fused():
    # Odd size over several 32-tiles: the lower-triangle tiles come only from the mirror store.
    x = torch.randn(50, 131, dtype=torch.bfloat16)
    H0 = _sym(131)
    got = xtx_accumulate_triton(H0.clone(), x, alpha=0.3, beta=0.7, block=32, block_k=16)
    want = xtx_accumulate_ref(H0.clone(), x, alpha=0.3, beta=0.7)
    _close(got, want, x, alpha=0.3)
    assert torch.equal(got, got.t())


def test_running_normalisation_equals_scaled_raw_sum():
    # GPTQ's running 2/n scaling over batches equals the raw sum scaled once at the end.
    batches = [torch.randn(n, 96, dtype=torch.bfloat16) for n in (40, 17, 33)]
    H_run, seen = torch.zeros(96, 96), 0
    H_raw = torch.zeros(96, 96)
    for x in batches:
        n_new = seen + x.shape[0]
        xtx_accumulate_triton(H_run, x, alpha=2.0 / n_new, beta=seen / n_new)
        xtx_accumulate_triton(H_raw, x)
        seen = n_new
    H_raw *= 2.0 / seen
    torch.testing.assert_close(H_run, H_raw, rtol=1e-5, atol=1e-6)
    allx = torch.cat(batches)
    _close(H_raw, xtx_accumulate_ref(torch.zeros(96, 96), allx, alpha=2.0 / seen), allx,
           alpha=2.0 / seen)


@pytest.mark.parametrize("n", [7, 131, 300])
def test_reference_panels_are_symmetric_and_exact(n):
    # The CPU path multiplies upper-triangle row panels and mirrors them: exactly symmetric,
    # and as accurate as one fp32 matmul (over sizes that give 1, 3 and 4 panels), for bf16
    # activations (bf16 products, fp32 sums) and fp32 ones alike.
    x = (torch.randn(3, 41, n) * 3).to(torch.bfloat16)
    mask = torch.rand(3, 41) > 0.2
    H0 = _sym(n)
    got = xtx_accumulate_ref(H0.clone(), x, mask, alpha=0.5, beta=0.25)
    xm = x.double()[mask]
    want = (0.25 * H0.double() + 0.5 * xm.t() @ xm).float()
    _close(got, want, x, mask, alpha=0.5)
    assert torch.equal(got, got.t())
    # bf16 activations took the bf16-products path: still fp32-accurate (above), and the
    # global matmul setting it uses is put back
    flag = torch.backends.mkldnn.matmul
    before = flag.fp32_precision
    H = xtx_accumulate_ref(H0.clone(), x.float(), mask, alpha=0.5, beta=0.25)
    _close(H, want, x, mask, alpha=0.5)
    assert flag.fp32_precision == before


def test_all_masked_only_rescales():
    x = torch.randn(10, 70, dtype=torch.bfloat16)
    H0 = _sym(70)
    got = xtx_accumulate_triton(H0.clone(), x, torch.zeros(10), beta=0.5)
    torch.testing.assert_close(got, H0 * 0.5)


def test_dispatch_cpu_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITONPRESS_BACKEND", "auto")
    called = []
    monkeypatch.setattr(hessian, "xtx_accumulate_triton", lambda *a, **k: called.append(1))
    x = torch.randn(5, 8)
    H = xtx_accumulate(torch.zeros(8, 8), x)
    assert not called
    torch.testing.assert_close(H, x.t() @ x)


def test_bad_inputs_name_the_problem():
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="fp32"):
        xtx_accumulate(torch.zeros(8, 8, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="features"):
        xtx_accumulate(torch.zeros(9, 9), x)
    with pytest.raises(ValueError, match="attention_mask"):
        xtx_accumulate(torch.zeros(8, 8), x, torch.ones(5))


def test_pipeline_contract_running_mean(monkeypatch):
    # accumulate_hessian(H, x, n_seen) -> n: H = 2/n sum x x^T, as loop/hooks.py expects.
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    xs = [torch.randn(2, 13, 40, dtype=torch.bfloat16), torch.randn(9, 40, dtype=torch.bfloat16)]
    masks = [torch.tensor([[1] * 10 + [0] * 3, [1] * 13]), None]
    H, n = torch.zeros(40, 40), 0
    for x, m in zip(xs, masks):
        n = hessian.accumulate_hessian(H, x, n, m)
    assert n == 23 + 9
    allx = torch.cat([xs[0][masks[0].bool()], xs[1]]).float()
    torch.testing.assert_close(H, 2 / n * allx.t() @ allx, rtol=1e-5, atol=1e-5)
