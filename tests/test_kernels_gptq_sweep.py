"""The fused GPTQ sweep (Triton interpreter on CPU) against methods/gptq.py's torch path."""
import pytest
import torch

from tritonpress.methods.gptq import gptq_quantize, inverse_cholesky
from tritonpress.kernels.gptq_sweep import sweep_block_ref as _sweep_block_ref
from tritonpress.methods import gptq_solve
from tritonpress.kernels.gptq_sweep import (sweep_block_ref, sweep_block_triton,
                                            trailing_update_ref, trailing_update_triton)
from tritonpress.methods.gptq_solve import (gptq_sweep, inverse_cholesky_factor,
                                            inverse_hessian_factor, solve_in_order)
from tritonpress.kernels.quant import quantize_ref, weight_qparams_ref
from tritonpress.schemes import QuantArgs

INT4_SYM = QuantArgs(4, "int", True, "group", 32)
INT4_ASYM = QuantArgs(4, "int", False, "group", 32)
INT8_CHAN = QuantArgs(8, "int", True, "channel")
FP8_CHAN = QuantArgs(8, "float", True, "channel")
ALL = [INT4_SYM, INT4_ASYM, INT8_CHAN, FP8_CHAN]


def _hessian(n, tokens=400):
    """2/n X^T X of correlated activations with a few large channels (LLM-like)."""
    X = torch.randn(tokens, n) @ torch.randn(n, n) * n ** -0.5 + 0.5 * torch.randn(tokens, n)
    X[:, :3] *= 8
    return 2 * X.t() @ X / tokens


def _factor(H, frac=0.01):
    return inverse_hessian_factor(H + frac * H.diagonal().mean() * torch.eye(H.shape[0]))[0]


def _expanded(W, args):
    s, z = weight_qparams_ref(W, args, torch.bfloat16)
    rep = W.shape[1] // s.shape[1]
    ex = lambda p: None if p is None else p.repeat_interleave(rep, 1).contiguous()  # noqa: E731
    return ex(s), ex(z)


@pytest.mark.parametrize("args", ALL, ids=["int4sym", "int4asym", "int8chan", "fp8chan"])
def test_block_sweep_bit_identical_to_gptq_reference(args):
    # Odd row count, and a block of 48 columns (padded to 64 in the kernel).
    rows, n = 37, 48 if args.strategy == "channel" else 64
    W = torch.randn(rows, n)
    U = _factor(_hessian(n))
    s1, z1 = _expanded(W, args)
    got = sweep_block_triton(W, U, s1, z1, args, block_m=16)
    want = _sweep_block_ref(W.clone(), U, s1, z1, args)
    for name, g, w in zip(("Q1", "Err1", "Losses1"), got, want):
        assert torch.equal(g, w), f"{name} differs: max {(g - w).abs().max():.3g}"
    # and the values chosen are on the grid: re-quantizing them changes nothing
    q = quantize_ref(got[0], s1, z1, args)
    assert torch.equal(got[0], (q.float() - (0 if z1 is None else z1)) * s1)


@pytest.mark.parametrize("args,mode", [(INT4_SYM, "static"), (INT4_ASYM, "dynamic"),
                                       (INT8_CHAN, "static"), (FP8_CHAN, "static")],
                         ids=["int4sym-static", "int4asym-dynamic", "int8chan", "fp8chan"])
def test_layer_solve_matches_gptq_quantize(args, mode):
    # out 37, in 192, block 64, group 32; two super-blocks of 128 columns exercise both levels
    # of the lazy update. Same choices as gptq_solve.py's block loop up to fp reassociation in the
    # trailing GEMM: assert >99% identical integers and the loss within 1e-3 relative.
    rows, n = 37, 192
    W = torch.randn(rows, n) * 0.05
    H = _hessian(n)
    qw, Q_ref, info = gptq_quantize(W, H, args, torch.bfloat16, block_size=64, group_scales=mode)
    U, frac, _ = inverse_cholesky(H.clone())
    s, z = (None, None) if mode == "dynamic" else weight_qparams_ref(W, args, torch.bfloat16)
    Q, scale, zp, losses = solve_in_order(W, U, args, s, z, triton=True,
                                          scale_dtype=torch.bfloat16, block_size=64, outer=128,
                                          block_m=32)
    same = (Q == Q_ref).float().mean().item()
    assert same > 0.99, f"only {same:.4f} of the values agree"
    assert abs(losses.sum().item() - info["loss"]) <= 1e-3 * info["loss"]
    assert torch.equal(scale.to(torch.bfloat16), qw.scale)
    if zp is not None:
        assert torch.equal(zp.to(torch.int8), qw.zero_point)


def test_solve_triton_matches_its_torch_reference_with_partial_block():
    # 200 columns: the last block has 8 columns; dynamic asymmetric groups of 8.
    args = QuantArgs(4, "int", False, "group", 8)
    W = torch.randn(21, 200)
    U = _factor(_hessian(200))
    got = solve_in_order(W, U, args, triton=True, block_size=64, outer=128, block_m=32)
    want = solve_in_order(W, U, args, triton=False, block_size=64, outer=128)
    assert (got[0] == want[0]).float().mean() > 0.99
    torch.testing.assert_close(got[3], want[3], rtol=1e-4, atol=1e-6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_stacked_rows_solve_like_separate_layers():
    # q/k/v share the Hessian: sweeping cat([Wq, Wk]) gives each its own solution.
    n = 128
    U = _factor(_hessian(n))
    Wa, Wb = torch.randn(24, n), torch.randn(13, n)
    both = solve_in_order(torch.cat([Wa, Wb]), U, INT4_SYM, triton=False, block_size=64,
                          outer=64)
    a = solve_in_order(Wa, U, INT4_SYM, triton=False, block_size=64, outer=64)
    b = solve_in_order(Wb, U, INT4_SYM, triton=False, block_size=64, outer=64)
    assert torch.equal(both[0], torch.cat([a[0], b[0]]))
    torch.testing.assert_close(both[3], torch.cat([a[3], b[3]]))


def test_inverse_factor_matches_three_step_route():
    n = 150
    H = _hessian(n) + 0.01 * torch.eye(n)
    U, info = inverse_hessian_factor(H)
    assert info == 0
    assert torch.equal(U, U.triu())
    U3 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    torch.testing.assert_close(U, U3, rtol=1e-3, atol=1e-4 * U3.abs().max().item())
    torch.testing.assert_close(U.double().t() @ U.double() @ H.double(),
                               torch.eye(n, dtype=torch.float64), atol=1e-3, rtol=0)
    bad = -torch.eye(4)
    assert inverse_hessian_factor(bad)[0] is None
    # the inverse factor by halves (recursing down to 32-column leaves), batched, one of the
    # batch not positive definite: only its info is nonzero
    L = torch.linalg.cholesky(H)
    Hs = torch.stack([H, H - 2 * torch.eye(n) * H.diagonal().max(), 2 * H])
    Linv, info = inverse_cholesky_factor(Hs, leaf=32)
    assert info.tolist()[0] == 0 and info.tolist()[1] != 0 and info.tolist()[2] == 0
    assert torch.equal(Linv[0], Linv[0].tril())
    torch.testing.assert_close(Linv[0] @ L, torch.eye(n), atol=1e-4, rtol=0)
    torch.testing.assert_close(Linv[2] @ (L * 2 ** 0.5), torch.eye(n), atol=1e-4, rtol=0)


def test_trailing_update_kernel_and_precision_emulation():
    C, A, B = torch.randn(70, 90), torch.randn(70, 40), torch.randn(40, 90)
    want = C - A @ B
    torch.testing.assert_close(trailing_update_triton(C.clone(), A, B), want, rtol=1e-5,
                               atol=1e-4)
    # the tf32 emulation really rounds, tf32x3 recovers fp32 accuracy
    e_tf32 = (trailing_update_ref(C.clone(), A, B, "tf32") - want).abs().max()
    e_x3 = (trailing_update_ref(C.clone(), A, B, "tf32x3") - want).abs().max()
    assert e_tf32 > 1e-3 and e_x3 < 1e-4


def test_dispatch_and_bad_inputs(monkeypatch):
    monkeypatch.setenv("TRITONPRESS_BACKEND", "auto")
    for name in ("sweep_block_triton", "trailing_update_triton"):
        monkeypatch.setattr(gptq_solve, name, lambda *a, **k: pytest.fail("Triton on CPU"))
    W, U = torch.randn(5, 16), torch.eye(16)
    s1, z1 = _expanded(W, INT8_CHAN)
    s, z = weight_qparams_ref(W, INT8_CHAN, torch.bfloat16)
    gptq_sweep(W.clone(), U, INT8_CHAN, s, z, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="expanded"):
        sweep_block_ref(W, U, s1[:, :1], None, INT8_CHAN)
    with pytest.raises(ValueError, match="Hinv"):
        sweep_block_ref(W, torch.eye(8), s1, None, INT8_CHAN)
    with pytest.raises(ValueError, match="divide block_size"):
        solve_in_order(W, U, QuantArgs(4, "int", True, "group", 16), triton=False, block_size=8,
                       outer=8)
    with pytest.raises(ValueError, match="per-channel"):
        solve_in_order(W, U, INT8_CHAN, triton=False)
    with pytest.raises(ValueError, match="zero point"):
        solve_in_order(W, U, INT4_ASYM.__class__(4, "int", False, "group", 16),
                       torch.ones(5, 1), None, triton=False, block_size=16, outer=16)


@pytest.mark.parametrize("args", [INT4_SYM, INT4_ASYM, INT8_CHAN],
                         ids=["int4sym", "int4asym", "int8chan"])
def test_fused_solve_under_static_actorder_matches_the_torch_loop(args, monkeypatch):
    # gptq_quantize hands the fused solve one (original-group) scale per swept column.
    rows, n = 29, 192
    W = torch.randn(rows, n) * 0.05
    H = _hessian(n)
    H.diagonal().mul_(torch.rand(n) * 4 + 0.5)     # a diagonal out of order: a real permutation
    monkeypatch.setenv("TRITONPRESS_BACKEND", "torch")
    qw_ref, Q_ref, info_ref = gptq_quantize(W, H, args, torch.bfloat16, block_size=64,
                                            actorder="static")
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    qw, Q, info = gptq_quantize(W, H, args, torch.bfloat16, block_size=64, actorder="static")
    assert (qw.q == qw_ref.q).float().mean() > 0.99
    assert abs(info["loss"] - info_ref["loss"]) <= 1e-3 * info_ref["loss"]
    assert torch.equal(qw.scale, qw_ref.scale)


@pytest.mark.parametrize("args", ALL, ids=["int4sym", "int4asym", "int8chan", "fp8chan"])
def test_batched_sweep_kernel_is_each_experts_sweep_bit_for_bit(args, device):
    """The expert index as a grid dimension: one launch for E problems, each with its own
    weights, Hinv and expanded qparams, gives what the batched torch step (and so each
    problem's own sweep_block_ref) gives, bit for bit."""
    from tritonpress.kernels.gptq_sweep import sweep_block_triton_batched
    torch.manual_seed(5)
    E, rows, B = 3, 37, 40
    W = torch.randn(E, rows, B, device=device)
    U = torch.stack([_factor(_hessian(B)) for _ in range(E)]).to(device)
    S = torch.rand(E, rows, B, device=device) * 0.2 + 0.05
    Z = None if args.symmetric else torch.randint(-3, 4, (E, rows, B), device=device).float()
    want = gptq_solve.sweep_block_batched(W.clone(), U, S, Z, args)
    got = sweep_block_triton_batched(W.clone(), U, S, Z, args, block_m=16)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    one = _sweep_block_ref(W[1].clone(), U[1], S[1], None if Z is None else Z[1], args)
    assert torch.equal(got[0][1], one[0]) and torch.equal(got[1][1], one[1])


@pytest.mark.parametrize("args", ALL, ids=["int4sym", "int4asym", "int8chan", "fp8chan"])
def test_torch_sweep_sub_blocks_are_the_whole_blocks_sums_regrouped(args, monkeypatch):
    # gptq_solve.SUB_BLOCK columns at a time inside each block, the rest of the block updated
    # by one matmul per sub-block: the same sums as the column-by-column block, to fp32
    # rounding (a value may land on the other side of a rounding boundary, rarely)
    rows, n = 45, 256
    W, H = torch.randn(rows, n), _hessian(n)
    U = _factor(H)
    s, z = weight_qparams_ref(W, args, torch.bfloat16)
    gcol = torch.arange(n) // (args.group_size if args.strategy == "group" else n)
    out = {}
    for sub in (16, 7, 128):                      # 7: sub-blocks that do not divide the block
        monkeypatch.setattr(gptq_solve, "SUB_BLOCK", sub)
        out[sub] = gptq_sweep(W.clone(), U, args, s.clone(), None if z is None else z.clone(),
                              gcol, block_size=64)
    for sub in (16, 7):
        Q, _, _, losses = out[sub]
        assert (Q != out[128][0]).float().mean() < 0.01
        torch.testing.assert_close(losses, out[128][3], rtol=0.02, atol=1e-6)
    # batched (experts) the same way: each expert's result is its own sweep's
    Ws, Us = torch.stack([W, W.flip(0)]), torch.stack([U, U])
    Ss = torch.stack([s, s.flip(0)])
    Zs = None if z is None else torch.stack([z, z.flip(0)])
    monkeypatch.setattr(gptq_solve, "SUB_BLOCK", 16)
    Qb = gptq_solve.gptq_sweep_batched(Ws.clone(), Us, args, Ss.clone(),
                                       None if Zs is None else Zs.clone(), gcol.expand(2, -1),
                                       dynamic=False, scale_dtype=torch.bfloat16,
                                       block_size=64)[0]
    assert torch.equal(Qb[0], out[16][0])
    assert (Qb[1].flip(0) != out[16][0]).float().mean() < 0.01
