"""SparseGPT 2:4 + fp8: exact 2:4 output, lower layer loss than magnitude pruning, the loss it
reports, bad input, and the per-layer method inside the calibration pipeline."""
import functools

import pytest
import torch

from tritonpress.kernels.hessian import output_error
from tritonpress.methods.sparsegpt import (check_24_shapes, magnitude_linears, sparsegpt_method,
                                            spread_channels)
from tritonpress.methods.sparsegpt_solve import (FP8_CHANNEL, inverse_hessian_cholesky,
                                                  magnitude_24, sparsegpt_24,
                                                  undampened_loss_rows)
from tritonpress.schemes import QuantArgs, get_scheme


def correlated_hessian(n, tokens=1024, seed=0):
    """2/T X^T X of correlated inputs with uneven scales, like a transformer's activations."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.randn(n, n, generator=g) / n ** 0.5)
    X = (X + 0.3 * torch.randn(tokens, n, generator=g)) * (0.2 + 3 * torch.rand(n, generator=g))
    return 2 * X.T @ X / tokens


def run(kind, W, H, **kw):
    if kind == "magnitude":
        return magnitude_24(W, **kw), None
    mode, _, scale_from = kind.partition(":")
    return sparsegpt_24(W, H, mode=mode, scale_from=scale_from or "original", **kw)


KINDS = ["joint", "joint:sparse", "prune_then_quantize", "magnitude"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,dtype", [((37, 64), torch.bfloat16), ((5, 132), torch.float32)])
def test_output_is_exactly_24_fp8(kind, shape, dtype):
    out, n = shape                     # 132 columns: a last block of 4 after a block of 128
    W = torch.randn(out, n).to(dtype)
    qw, _ = run(kind, W, correlated_hessian(n))
    assert qw.q.dtype == torch.float8_e4m3fn and qw.q.shape == (out, n)
    assert qw.scale.shape == (out, 1) and qw.scale.dtype == dtype and qw.zero_point is None
    nz = (qw.q.float() != 0).reshape(out, n // 4, 4).sum(-1)
    assert qw.is_24_sparse() and nz.max() <= 2
    assert (nz == 2).float().mean() > 0.99          # gaussian weights: kept ones are nonzero
    # the scale is (2x for joint) amax/448 of the weights it quantizes: the codes use the range
    assert qw.q.float().abs().amax(1).min() >= 100


@pytest.mark.parametrize("kind", ["joint", "joint:sparse", "prune_then_quantize"])
def test_sparsegpt_loss_beats_magnitude(kind):
    out, n = 64, 256
    H = correlated_hessian(n)
    W = torch.randn(out, n)
    qw, _ = run(kind, W, H)
    mag, _ = run("magnitude", W, H)
    ours = float(output_error(W - qw.dequantize(), H, dim=None))
    base = float(output_error(W - mag.dequantize(), H, dim=None))
    assert ours < 0.6 * base, (ours, base)


@pytest.mark.parametrize("kind", ["joint", "prune_then_quantize"])
def test_reported_loss_is_the_dampened_hessian_loss(kind):
    out, n = 16, 96
    H = correlated_hessian(n)
    W = torch.randn(out, n)
    qw, losses = run(kind, W, H, block_size=32)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(n)
    D = W - qw.dequantize()
    torch.testing.assert_close(losses, ((D @ Hd) * D).sum(1), rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode", ["joint", "prune_then_quantize"])
def test_undampened_loss_from_the_sweep_matches_the_matmul(mode):
    n = 64
    H = correlated_hessian(n)
    H[5, :] = H[:, 5] = 0                         # a dead input
    W = torch.randn(10, n)
    inv = inverse_hessian_cholesky(H)
    qw, losses = sparsegpt_24(W, None, mode=mode, hinv=inv)
    torch.testing.assert_close(undampened_loss_rows(losses, W, qw.dequantize(), inv),
                               output_error(W - qw.dequantize(), H), rtol=2e-3, atol=1e-4)


def test_stacked_rows_give_the_same_weights():
    """q/k/v are solved as one stacked weight: rows must not interact."""
    H = correlated_hessian(64)
    A, B = torch.randn(12, 64), torch.randn(5, 64)
    qa, la = sparsegpt_24(A, H)
    qb, lb = sparsegpt_24(B, H)
    qab, lab = sparsegpt_24(torch.cat([A, B]), H)
    assert torch.equal(qab.q.float(), torch.cat([qa.q, qb.q]).float())
    assert torch.equal(qab.scale, torch.cat([qa.scale, qb.scale]))
    torch.testing.assert_close(lab, torch.cat([la, lb]))


def test_joint_scale_has_one_binade_of_headroom_and_nothing_clips():
    out, n = 24, 64
    W = torch.randn(out, n)
    H = correlated_hessian(n)
    qw, _ = sparsegpt_24(W, H, mode="joint", scale_dtype=torch.bfloat16, actorder=None)
    assert torch.equal(qw.scale, (2 * W.abs().amax(1, keepdim=True) / 448).bfloat16())
    assert qw.q.float().abs().max() < 448                       # no code saturated
    # sweeping the groups by decreasing H_ii pushes more error into the last columns: a
    # code may saturate, rarely (its clipping error is compensated like any rounding error)
    ordered, _ = sparsegpt_24(W, H, mode="joint", scale_dtype=torch.bfloat16)
    assert (ordered.q.float().abs() == 448).float().mean() < 0.005
    plain, _ = sparsegpt_24(W, H, mode="joint", headroom=1.0, scale_dtype=torch.bfloat16,
                            actorder=None)
    assert torch.equal(plain.scale, (W.abs().amax(1, keepdim=True) / 448).bfloat16())
    assert (plain.q.float().abs() == 448).any()                 # without it, the sweep clips
    with pytest.raises(ValueError, match="headroom"):
        sparsegpt_24(W, H, headroom=0.5)


def test_dead_inputs_are_pruned_and_nothing_breaks():
    out, n = 8, 32
    H = correlated_hessian(n)
    dead = torch.tensor([1, 6, 7, 20])
    H[dead, :] = 0
    H[:, dead] = 0
    qw, loss = sparsegpt_24(torch.randn(out, n), H)
    assert (qw.q.float()[:, dead] == 0).all()
    assert torch.isfinite(qw.dequantize()).all() and (loss >= 0).all()
    inv = inverse_hessian_cholesky(H)
    assert inv.dead.nonzero().flatten().tolist() == dead.tolist() and inv.frac == 0.01


def test_magnitude_keeps_the_two_largest_of_four():
    W = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, -1.7]])
    qw = magnitude_24(W, scale_dtype=torch.float32)
    assert (qw.dequantize() != 0).tolist() == [[False, True, True, False,
                                                 False, True, False, True]]


def test_bad_input_is_rejected_with_the_fix():
    H = correlated_hessian(32)
    with pytest.raises(ValueError, match="divisible by 4.*ignore"):
        sparsegpt_24(torch.randn(4, 30), H[:30, :30])
    with pytest.raises(ValueError, match=r"Hessian must be \[32, 32\]"):
        sparsegpt_24(torch.randn(4, 32), H[:16, :16])
    with pytest.raises(ValueError, match="unknown SparseGPT mode"):
        sparsegpt_24(torch.randn(4, 32), H, mode="both")
    with pytest.raises(ValueError, match="W8A8_FP8_24"):
        sparsegpt_24(torch.randn(4, 32), H, args=QuantArgs(4, "int", True, "group", 128))
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsegpt_24(torch.randn(4, 32), H, block_size=6)
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_24(torch.full((4, 32), float("nan")), H)
    with pytest.raises(ValueError, match="not positive definite"):
        sparsegpt_24(torch.randn(4, 32), torch.full((32, 32), float("nan")))


def test_layers_that_cannot_be_24_are_named():
    lins = {"model.layers.0.mlp.down_proj": torch.nn.Linear(30, 8),
            "model.layers.0.mlp.up_proj": torch.nn.Linear(32, 8)}
    with pytest.raises(ValueError, match=r"down_proj \(30\).*ignore=\['down_proj'\]"):
        check_24_shapes(lins)
    with pytest.raises(ValueError, match="down_proj"):
        magnitude_linears(lins, get_scheme("W8A8_FP8_24"))


# ----------------------------------------------------------------------------- in the pipeline

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _compress(model, method, batches):
    from tritonpress.loop.sequential import compress_sequential
    return compress_sequential(model, batches, get_scheme("W8A8_FP8_24"), method,
                               device="cpu", progress=False)


def test_layer_method_on_tiny_llama():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 24), generator=g) for _ in range(3)]
    model = _tiny_llama()
    with torch.no_grad():
        ref = [model(b).logits for b in batches]
    res = _compress(model, functools.partial(sparsegpt_method, mode="joint"), batches)

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"}
    assert set(res.qweights) == set(linears) and len(linears) == 14
    for name, qw in res.qweights.items():
        assert qw.is_24_sparse() and qw.args == FP8_CHANNEL
        assert torch.equal(linears[name].weight.data, qw.dequantize(linears[name].weight.dtype))
    info = res.infos["model.layers.0.self_attn.k_proj"]
    assert info["fallback"] is None and info["tokens"] == 3 * 2 * 24 and info["loss"] > 0
    assert set(info["hessian_shared_with"]) == {"model.layers.0.self_attn.q_proj",
                                                "model.layers.0.self_attn.v_proj"}
    assert 0 < info["output_rel_err"] < 1

    # against the data-free baseline, on the calibration data it minimises the error on
    mag = _tiny_llama()
    magnitude_linears({n: m for n, m in mag.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head"},
                      get_scheme("W8A8_FP8_24"))
    with torch.no_grad():
        err_ours = sum(float((model(b).logits - r).square().sum()) for b, r in zip(batches, ref))
        err_mag = sum(float((mag(b).logits - r).square().sum()) for b, r in zip(batches, ref))
    assert err_ours < 0.8 * err_mag, (err_ours, err_mag)


def test_static_order_sweeps_groups_by_hessian_diagonal_and_loses_less():
    """actorder="static": whole 2:4 groups move (the pattern stays on the original groups),
    by decreasing sum of H_ii; on correlated inputs with uneven scales the loss is lower."""
    from tritonpress.methods.sparsegpt_solve import group_order
    H = torch.diag(torch.tensor([1., 1, 1, 1, 5, 0, 0, 0, 2, 2, 2, 2]))
    assert group_order(H).tolist() == [8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]
    wins = 0
    for seed in range(6):
        H = correlated_hessian(96, seed=seed)
        W = torch.randn(32, 96, generator=torch.Generator().manual_seed(seed))
        ordered, lo = sparsegpt_24(W, H)
        plain, lp = sparsegpt_24(W, H, actorder=None)
        assert ordered.is_24_sparse()
        torch.testing.assert_close(lo, output_error(W - ordered.dequantize(), H)
                                   + 0.01 * H.diagonal().mean()
                                   * (W - ordered.dequantize()).square().sum(1),
                                   rtol=1e-3, atol=1e-3)
        wins += float(lo.sum()) < float(lp.sum())
    assert wins >= 5


def test_refit_kept_reaches_the_least_squares_optimum_for_the_mask():
    """refit_kept against per-row exact solves of the masked normal equations."""
    from tritonpress.methods.sparsegpt_solve import refit_kept
    from tritonpress.kernels.sparse24 import keep_2_of_4
    n = 64
    A = correlated_hessian(n, seed=3) + 0.1 * torch.eye(n)
    W0 = torch.randn(9, n)
    keep = keep_2_of_4(torch.rand(9, n))
    got = refit_kept(W0, W0 * keep, keep, A, iters=200, tol=1e-6)
    assert torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    for i in range(9):
        S = keep[i]
        # min (w - w0) A (w - w0)^T with w = 0 off S: A_SS w_S = (w0 A)_S
        exact = torch.linalg.solve(A[S][:, S].double(), (W0[i].double() @ A.double())[S])
        torch.testing.assert_close(got[i, S].double(), exact, rtol=1e-4, atol=1e-5)


def test_refit_lowers_the_loss_keeps_the_mask_and_reports_it():
    """refit: the float sweep's mask, kept weights refit (ridge), then the fp8 sweep on that
    mask: exactly 2:4 on the fp8 grid, a lower layer loss than without on correlated inputs,
    and the reported loss is the dampened H's, as without."""
    wins = 0
    for seed in range(4):
        H = correlated_hessian(96, seed=seed)
        W = torch.randn(24, 96, generator=torch.Generator().manual_seed(seed))
        qr, lr = sparsegpt_24(W, H, refit=0.1)
        q0, l0 = sparsegpt_24(W, H)
        assert qr.is_24_sparse() and qr.q.dtype == torch.float8_e4m3fn
        D = W - qr.dequantize()
        torch.testing.assert_close(lr, ((D @ (H + 0.01 * H.diagonal().mean() * torch.eye(96)))
                                        * D).sum(1), rtol=1e-3, atol=1e-3)
        wins += output_error(W - qr.dequantize(), H, dim=None) < \
            output_error(W - q0.dequantize(), H, dim=None)
    assert wins >= 3
    for bad in (dict(refit=0.0), dict(refit=0.1, mode="prune_then_quantize")):
        with pytest.raises(ValueError, match="refit"):
            sparsegpt_24(W, H, **bad)


def test_linear_groups_are_in_call_order():
    from tritonpress.loop.activations import LayerInputs
    from tritonpress.loop.hooks import linear_groups
    model = _tiny_llama()
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    hidden = [torch.randn(2, 8, model.config.hidden_size)]
    pos = model.model.rotary_emb(hidden[0], torch.arange(8)[None])
    inputs = LayerInputs(hidden, [{"position_embeddings": pos}], [None], torch.device("cpu"),
                         torch.device("cpu"))
    assert linear_groups(layer, linears, inputs) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_spread_channels_puts_one_channel_of_each_quartile_in_every_group():
    g = torch.Generator().manual_seed(0)
    n = 40
    H, W = correlated_hessian(n), torch.randn(7, n, generator=g)
    score = H.diagonal() * W.square().sum(0)
    perm = spread_channels(score)
    assert sorted(perm.tolist()) == list(range(n))
    rank = torch.empty(n, dtype=torch.long)
    rank[torch.argsort(score, descending=True)] = torch.arange(n)
    quartiles = (rank[perm] // (n // 4)).reshape(-1, 4)
    assert (quartiles.sort(1).values == torch.arange(4)).all()


@pytest.mark.parametrize("opts", [dict(sequential=True, permute=False), dict(permute=True),
                                  dict(sequential=True, permute=True)])
def test_sequential_and_permuted_layers_stay_24_and_keep_the_function(opts):
    """sequential: each group's Hessian from the layer with the earlier groups compressed
    (the first group's is the one-pass Hessian, so q_proj comes out the same; permute moves
    only v_proj's rows of that group); permute: down_proj's and o_proj's inputs reordered with
    their producers' rows, so the uncompressed model's function is unchanged and the
    compressed one is exactly 2:4 in the permuted order it is saved in."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 24), generator=g) for _ in range(3)]
    base, model = _tiny_llama(), _tiny_llama()
    r0 = _compress(base, functools.partial(sparsegpt_method, permute=False), batches)
    res = _compress(model, functools.partial(sparsegpt_method, **opts), batches)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"}
    assert set(res.qweights) == set(linears)
    for name, qw in res.qweights.items():
        assert qw.is_24_sparse()
        assert torch.equal(linears[name].weight.data, qw.dequantize(linears[name].weight.dtype))
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(res.qweights[q].q, r0.qweights[q].q)
    down = "model.layers.1.mlp.down_proj"
    assert not torch.equal(res.qweights[down].q, r0.qweights[down].q)


def test_permute_inputs_keeps_the_layer_function():
    """down_proj's columns with gate/up's rows, o_proj's within each head with v_proj's rows
    (GQA: one order per KV head): the decoder layer's output is unchanged."""
    from tritonpress.loop.hooks import HessianStats
    from tritonpress.methods.sparsegpt import permute_inputs
    model = _tiny_llama()
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # GQA
    layer = model.model.layers[0]
    x = torch.randn(2, 8, model.config.hidden_size)
    pos = model.model.rotary_emb(x, torch.arange(8)[None])
    names = {f"model.layers.0.{n}": m for n, m in layer.named_modules()
             if isinstance(m, torch.nn.Linear)}
    before = {n: m.weight.data.clone() for n, m in names.items()}
    stats = {n: HessianStats(correlated_hessian(names[n].in_features, seed=i), 1)
             for i, n in enumerate(names) if n.endswith(("down_proj", "o_proj"))}
    H0 = {n: st.H.clone() for n, st in stats.items()}
    with torch.no_grad():
        y0 = layer(x, position_embeddings=pos)[0]
        permute_inputs(layer, "model.layers.0", stats, names)
        torch.testing.assert_close(layer(x, position_embeddings=pos)[0], y0,
                                   rtol=1e-5, atol=1e-5)
    for n in stats:
        W = names[n].weight.data
        perm = torch.tensor([next(j for j in range(W.shape[1])
                                  if torch.equal(before[n][:, j], W[:, i]))
                             for i in range(W.shape[1])])
        assert not torch.equal(perm, torch.arange(W.shape[1]))
        assert torch.equal(stats[n].H, H0[n][perm][:, perm])
    d = layer.self_attn.head_dim
    o = names["model.layers.0.self_attn.o_proj"].weight.data
    for h in range(model.config.num_attention_heads):   # o_proj's columns stay in their head
        block = before["model.layers.0.self_attn.o_proj"][:, h * d:(h + 1) * d]
        assert torch.equal(o[:, h * d:(h + 1) * d].sort(1).values, block.sort(1).values)
