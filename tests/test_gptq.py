"""GPTQ against a direct column-by-column OBS reference, and its edge cases."""
import pytest
import torch

from tritonpress.methods.gptq import gptq_quantize, inverse_cholesky
from tritonpress.kernels.gptq_sweep import sweep_block_ref as _sweep_block_ref
from tritonpress.methods.rtn import expand, group_index, group_qparams, rtn_quantize
from tritonpress.kernels.quant import dequantize_ref, quantize_ref, quantize_weight_ref
from tritonpress.schemes import get_scheme

SCHEMES = [("W4A16", 24), ("W4A16_ASYM", 24), ("W8A8_INT8", None), ("W8A8_FP8", None)]


def _args(name, group=None):
    return get_scheme(name, group_size=group).weights


def correlated_hessian(cols, n=1500, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(n, cols, generator=g) @ A + 0.2 * torch.randn(n, cols, generator=g)
    X[:, 3] *= 20   # an outlier channel, as real activations have
    return 2 / n * X.T @ X


def obs_reference(W, H, args, damp=0.01, actorder=False, dynamic=False):
    """Unblocked OBS in float64: quantize column i, update all later columns with the
    explicit inverse, then remove column i from the inverse (OBQ's formula, no Cholesky)."""
    W = W.double().clone()
    rows, cols = W.shape
    gidx = group_index(cols, args)
    scale, zp = group_qparams(W.float(), args, torch.float32, gidx)
    perm = torch.argsort(H.diagonal(), descending=True) if actorder else torch.arange(cols)
    W, H, gcol = W[:, perm], H.double()[perm][:, perm], gidx[perm]
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(cols, dtype=H.dtype))
    seen = set()
    for i in range(cols):
        g = int(gcol[i])
        if dynamic and g not in seen:
            s, z = group_qparams(W[:, gcol == g].float(), args, torch.float32,
                                 torch.zeros(int((gcol == g).sum()), dtype=torch.long))
            scale[:, g:g + 1], seen = s, seen | {g}
            if zp is not None:
                zp[:, g:g + 1] = z
        w = W[:, i:i + 1].float()
        z = None if zp is None else zp[:, g:g + 1]
        q = dequantize_ref(quantize_ref(w, scale[:, g:g + 1], z, args), scale[:, g:g + 1], z)
        err = (W[:, i] - q[:, 0].double()) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None]
        W[:, i] = q[:, 0].double()
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]
    return W[:, torch.argsort(perm)].float()


def out_err(W, Q, H):
    E = W.float() - Q.float()
    return float((E @ H * E).sum())


@pytest.mark.parametrize("name,group", SCHEMES)
@pytest.mark.parametrize("actorder,scales", [(None, "static"), ("static", "static"),
                                             (None, "dynamic"), ("static", "dynamic")])
def test_blocked_sweep_matches_unblocked_obs(name, group, actorder, scales):
    # 120 columns: not a multiple of the 32-column block; groups of 24 straddle blocks
    args = _args(name, group)
    W = torch.randn(37, 120)
    H = correlated_hessian(120)
    qw, Q, info = gptq_quantize(W, H, args, torch.float32, block_size=32, actorder=actorder,
                                group_scales=scales)
    ref = obs_reference(W, H, args, actorder=bool(actorder), dynamic=scales == "dynamic")
    # dynamic scales come from float64 vs float32 weights: equal up to an ulp, not bit-exact
    same = torch.isclose(Q, ref, rtol=1e-4, atol=1e-7).float().mean()
    assert same > 0.97, f"only {same:.3f} of the values agree with the OBS reference"
    assert out_err(W, Q, H) == pytest.approx(out_err(W, ref, H), rel=0.02)
    assert torch.equal(qw.dequantize(), Q)            # the integers returned are the ones chosen
    assert info["fallback"] is None and info["dampening"] == 0.01


@pytest.mark.parametrize("name,group", SCHEMES)
def test_gptq_output_error_below_rtn(name, group):
    args = _args(name, group)
    W = torch.randn(64, 144)
    H = correlated_hessian(144, seed=1)
    _, rtn = rtn_quantize(W, args, torch.float32)
    for scales in ("static", "dynamic"):
        _, Q, info = gptq_quantize(W, H, args, torch.float32, group_scales=scales)
        assert out_err(W, Q, H) < 0.8 * out_err(W, rtn, H)
        assert info["output_err"] == pytest.approx(out_err(W, Q, H), rel=1e-4)


def test_sweep_block_contract():
    # the pieces the fused kernel must return, checked on one block by hand
    args = _args("W4A16", 8)
    W1 = torch.randn(5, 8)
    U = torch.linalg.cholesky(torch.linalg.inv(correlated_hessian(8)), upper=True)
    scale = torch.full((5, 8), 0.3)
    Q1, Err1, L1 = _sweep_block_ref(W1.clone(), U, scale, None, args)
    w0 = W1[:, 0]
    q0 = torch.clamp(torch.round(w0 / 0.3), -8, 7) * 0.3
    assert torch.allclose(Q1[:, 0], q0)
    assert torch.allclose(Err1[:, 0], (w0 - q0) / U[0, 0])
    assert torch.allclose(L1[:, 0], (w0 - q0) ** 2 / U[0, 0] ** 2)
    w1 = W1[:, 1] - Err1[:, 0] * U[0, 1]    # column 1 sees column 0's error
    assert torch.allclose(Q1[:, 1], torch.clamp(torch.round(w1 / 0.3), -8, 7) * 0.3)


@pytest.mark.parametrize("name,group", SCHEMES)
def test_actorder_keeps_original_columns_and_groups(name, group):
    # With a diagonal Hessian nothing propagates: GPTQ in any order must give RTN exactly,
    # in the original column order, with the original group scales.
    args = _args(name, group)
    W = torch.randn(24, 120)
    H = torch.diag(torch.rand(120) + 0.1)
    rq, rdeq = rtn_quantize(W, args, torch.bfloat16)
    qw, Q, _ = gptq_quantize(W, H, args, torch.bfloat16, actorder="static", group_scales="static")
    assert torch.equal(qw.q.float(), rq.q.float()) and torch.equal(Q, rdeq)
    assert torch.equal(qw.scale, rq.scale) and qw.scale.dtype == torch.bfloat16
    # correlated: still plain group-wise scales on the original groups, decoding to Q
    H = correlated_hessian(120)
    qw, Q, _ = gptq_quantize(W, H, args, torch.bfloat16, actorder="static")
    assert torch.equal(qw.scale, rq.scale)
    assert torch.equal(qw.dequantize(), Q)


@pytest.mark.parametrize("name,group", SCHEMES)
def test_static_actorder_values_lie_on_the_original_groups_grids(name, group):
    # A correlated Hessian whose diagonal order interleaves the groups: every dequantized value
    # of group g is scale_g * (q - zp_g) with the scale and zero point computed from the
    # ORIGINAL weights' group g (before any update), in the original column positions.
    args = _args(name, group)
    rows, cols = 16, 120
    W = torch.randn(rows, cols)
    H = correlated_hessian(cols)
    d = torch.rand(cols, generator=torch.Generator().manual_seed(1)) * 4 + 0.1
    H = H * torch.outer(d, d).sqrt()              # diagonal order unrelated to column order
    perm = torch.argsort(H.diagonal(), descending=True)
    assert not torch.equal(perm, torch.arange(cols))
    qw, Q, info = gptq_quantize(W, H, args, torch.float32, actorder="static")
    assert info["actorder"] == "static" and info["fallback"] is None
    gidx = group_index(cols, args)
    scale, zp = group_qparams(W, args, torch.float32, gidx)
    assert torch.equal(qw.scale, scale)
    assert (qw.zero_point is None) == (zp is None)
    s, z = expand(scale, gidx, rows), expand(zp, gidx, rows)
    q = quantize_ref(Q, s, z, args)
    assert torch.equal(dequantize_ref(q, s, z), Q)            # on the grid of its own group
    assert q.float().min() >= args.qmin and q.float().max() <= args.qmax
    assert torch.equal(qw.dequantize(torch.float32), Q)
    # the order did run: not the in-order result
    _, Q0, info0 = gptq_quantize(W, H, args, torch.float32, actorder=None)
    assert info0["actorder"] is None and not torch.equal(Q, Q0)


def test_actorder_spellings_and_bad_values():
    from tritonpress.methods.gptq import check_actorder
    for v in ("static", "STATIC", "desc", True):
        assert check_actorder(v) == "static"
    for v in (None, "none", "None", False):
        assert check_actorder(v) is None
    W, H, args = torch.randn(4, 48), correlated_hessian(48), _args("W4A16", 24)
    for bad in ("group", "dynamic", "weight", "asc", 1.0):
        with pytest.raises(ValueError, match=r"'static'.*None/'none'"):
            gptq_quantize(W, H, args, torch.float32, actorder=bad)


def test_rtn_matches_reference_quantizer():
    for name, group in [("W4A16", 32), ("W4A16_ASYM", 32), ("W8A8_INT8", None), ("W8A8_FP8", None)]:
        args = _args(name, group)
        W = torch.randn(16, 96, dtype=torch.bfloat16)
        qw, deq = rtn_quantize(W, args)
        q, s, z = quantize_weight_ref(W, args)
        assert torch.equal(qw.q.float(), q.float()) and torch.equal(qw.scale, s)
        assert (z is None) == (qw.zero_point is None)
        assert torch.equal(qw.dequantize(), deq)


def test_dead_columns_are_zero():
    W = torch.randn(10, 64)
    H = correlated_hessian(64)
    H[5, :] = 0
    H[:, 5] = 0
    qw, Q, info = gptq_quantize(W, H, _args("W4A16", 16), torch.float32)
    assert info["dead_columns"] == 1
    assert (Q[:, 5] == 0).all() and (qw.q[:, 5] == 0).all()


def test_non_pd_hessian_raises_dampening_then_falls_back():
    W = torch.randn(8, 32)
    H = -torch.eye(32)                      # negative definite: only a big damp fixes it
    _, Q, info = gptq_quantize(W, H, _args("W8A8_INT8"), torch.float32)
    assert info["dampening_failed"] == pytest.approx([0.01, 0.1, 1.0])
    assert info["dampening"] == pytest.approx(10.0) and info["fallback"] is None
    _, Q, info = gptq_quantize(W, H, _args("W8A8_INT8"), torch.float32, max_damp=1.0)
    assert info["fallback"] == "rtn" and info["dampening"] is None
    assert torch.equal(Q, rtn_quantize(W, _args("W8A8_INT8"), torch.float32)[1])
    # singular (rank 1) PSD Hessian with no dampening: raised until it factors
    x = torch.randn(32, 1)
    U, frac, failed = inverse_cholesky(x @ x.T, damp=0.0)
    assert U is None or failed  # 0 never works on a rank-1 matrix
    U, frac, failed = inverse_cholesky(x @ x.T, damp=1e-12)
    assert frac is not None and frac > 1e-12 and failed
    # NaN in H: straight to RTN
    H = correlated_hessian(32)
    H[0, 1] = float("nan")
    assert gptq_quantize(W, H, _args("W8A8_INT8"), torch.float32)[2]["fallback"] == "rtn"


def test_partial_last_group():
    args = _args("W4A16", 32)
    W = torch.randn(12, 100)
    with pytest.raises(ValueError, match="partial_last_group"):
        gptq_quantize(W, correlated_hessian(100), args, torch.float32)
    qw, Q, info = gptq_quantize(W, correlated_hessian(100), args, torch.float32,
                                partial_last_group=True)
    assert qw.scale.shape == (12, 4)
    gidx = group_index(100, args, True)
    assert torch.equal(dequantize_ref(qw.q, expand(qw.scale, gidx, 12), None), Q)


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM"])
def test_clip_search_scales_are_shrunk_ranges_and_lower_the_layer_error(name):
    # An outlier weight on a quiet input (column 5 of X is scaled down) in every group 0:
    # clipping it costs little output error and refines the rest of the group.
    args = _args(name, 24)
    W = torch.randn(40, 120) * 0.1
    W[:, 5] = 1.5
    H = correlated_hessian(120, seed=2)
    H[5, :] *= 1e-3
    H[:, 5] *= 1e-3
    qw0, Q0, info0 = gptq_quantize(W, H, args, torch.float32, actorder="static")
    qw, Q, info = gptq_quantize(W, H, args, torch.float32, actorder="static", clip=True)
    full_scale, _ = group_qparams(W, args, torch.float32, group_index(120, args))
    assert (qw.scale <= full_scale * (1 + 1e-6)).all()        # ranges only ever shrink
    assert 0 < info["clipped_groups"] <= 1
    assert torch.equal(qw.dequantize(), Q)
    assert out_err(W, Q, H) < out_err(W, Q0, H)
    _, _, info_chan = gptq_quantize(W, H, _args("W8A8_INT8"), torch.float32, clip=True)
    assert "clipped_groups" not in info_chan                  # per channel: nothing to search


@pytest.mark.parametrize("name,group", [("W4A16", 24), ("W8A8_INT8", None)])
def test_stacked_solve_gives_each_weight_its_own_result(name, group):
    # Linears sharing a Hessian (q/k/v) are solved as one stack: rows never interact, so each
    # gets what a solve of its own gives (up to the summation order of the trailing matmuls).
    from tritonpress.methods.gptq import gptq_quantize_stacked
    args = _args(name, group)
    H = correlated_hessian(48)
    ws = [torch.randn(r, 48) for r in (16, 7, 9)]
    stacked = gptq_quantize_stacked(ws, H, args, torch.float32, actorder="static", clip=True)
    for w, (qw, deq, info) in zip(ws, stacked):
        qw1, deq1, info1 = gptq_quantize(w, H, args, torch.float32, actorder="static", clip=True)
        assert qw.q.shape == w.shape and qw.q.untyped_storage().nbytes() == qw.q.numel()
        assert (qw.q != qw1.q).float().mean() < 0.01
        torch.testing.assert_close(deq, deq1, rtol=0, atol=float(qw1.scale.max()) * 1.01)
        assert info["loss"] == pytest.approx(info1["loss"], rel=0.05)
        assert info["output_err"] == pytest.approx(info1["output_err"], rel=0.05)


def test_report_output_error_estimated_from_spaced_rows():
    # beyond 256 rows the report's output error comes from 256 evenly spaced rows, scaled
    from tritonpress.methods.gptq import _losses
    W = torch.randn(2000, 96)
    Q = W + 0.05 * torch.randn_like(W)
    H = correlated_hessian(96, seed=2)
    exact = _losses(W, Q, H, max_rows=4096)
    est = _losses(W, Q, H)
    assert exact["output_err"] == pytest.approx(out_err(W, Q, H), rel=1e-4)
    assert est["output_err"] == pytest.approx(exact["output_err"], rel=0.15)
    assert est["output_rel_err"] == pytest.approx(exact["output_rel_err"], rel=0.15)
    assert est["output_err"] != exact["output_err"]          # it did sample


def test_clip_search_options_are_checked_and_change_the_choice():
    # clip_damp adds damp * mean(diag H) * ||e||^2 to each group's output error: the outlier
    # weight on the quiet input (as above) costs weight error now, so fewer groups clip it;
    # clip_min bounds the shrink (1.0: the full range, as without the search).
    from tritonpress.methods.gptq import GPTQ, gptq_quantize_stacked
    from tritonpress.methods.gptq_batched import gptq_quantize_batched
    from tritonpress.methods.rtn import clip_search, hessian_blocks
    for bad in (dict(clip_damp=-0.1), dict(clip_damp=float("nan")), dict(clip_damp="0.1"),
                dict(clip_min=0.5), dict(clip_min=1.2), dict(clip_min=None)):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            GPTQ(**bad)
    with pytest.raises(ValueError, match="integer grids only"):
        GPTQ(clip_damp=0.1).check(get_scheme("NVFP4A16"))
    GPTQ().check(get_scheme("NVFP4A16"))                        # the defaults pass
    GPTQ(clip_damp=0.1, clip_min=0.8).check(get_scheme("W4A16"))

    args = _args("W4A16", 24)
    W = torch.randn(40, 120) * 0.1
    W[:, 5] = 1.5
    H = correlated_hessian(120, seed=2)
    H[5, :] *= 1e-3
    H[:, 5] *= 1e-3
    hb = hessian_blocks(H, 24)
    eye = torch.eye(24)
    for d in (0.1, 3.0):        # the dampened criterion is the search on dampened blocks
        damped = hb + d * H.diagonal().mean() * eye
        for a, b in zip(clip_search(W, hb, args, torch.float32, damp=d),
                        clip_search(W, damped, args, torch.float32)):
            assert torch.equal(a, b)
    run = lambda **o: gptq_quantize(W, H, args, torch.float32, actorder="static", clip=True, **o)
    qw0, _, info0 = run()
    qw1, _, info1 = run(clip_damp=3.0)
    assert info1["clipped_groups"] < info0["clipped_groups"]
    assert not torch.equal(qw1.scale[:, 0], qw0.scale[:, 0])  # the outlier's group
    qw2, _, info2 = run(clip_min=0.8)
    shrink = qw2.scale / group_qparams(W, args, torch.float32, group_index(120, args))[0]
    assert shrink.min() >= 0.8 - 1e-6 and shrink.min() < 0.95   # clipped, not below 0.8
    qw3, Q3, info3 = run(clip_min=1.0)
    qw4, Q4, _ = gptq_quantize(W, H, args, torch.float32, actorder="static")
    assert info3["clipped_groups"] == 0 and torch.equal(Q3, Q4)
    # the batched (MoE experts) solve takes the same options
    (qb, _, _), = gptq_quantize_batched([[W]], [H], args, torch.float32, actorder="static",
                                        clip=True, clip_damp=3.0, clip_min=0.8)[0]
    (qs, _, _), = gptq_quantize_stacked([W], H, args, torch.float32, actorder="static",
                                        clip=True, clip_damp=3.0, clip_min=0.8)
    assert torch.equal(qb.scale, qs.scale)
