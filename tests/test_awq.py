"""AWQ on a tiny Llama: mappings, the float no-op of scaling, the search, the pipeline method."""
import copy

import pytest
import torch
from conftest import scale_through_awq_mappings

from tritonpress.methods.awq import (AWQ, apply_scales, collect_input_stats,
                                      find_mappings, quantize_linear, search_scales)
from helpers import tiny_llama
from tritonpress.loop.activations import LayerInputs, capture_layer_inputs
from tritonpress.loop.sequential import compress_sequential, recipe_fn
from tritonpress.methods.gptq import GPTQ
from tritonpress.loop.targets import find_decoder_layers
from tritonpress.methods.rtn import RTN, clip_search, group_gram, hessian_blocks
from tritonpress.kernels.quant import dequantize_ref, qparams_from_minmax, quantize_ref
from tritonpress.schemes import QuantArgs, get_scheme

SCHEME = get_scheme("W4A16_ASYM", group_size=32)


def _model(kv_heads=2):
    model, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=kv_heads)
    # a few loud channels, as trained LLMs have: the case AWQ is for
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[::13] = 8.0
            layer.post_attention_layernorm.weight[::11] = 8.0
    return model


def _batches(n=4, seq=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, seq), generator=g) for _ in range(n)]


def _layer0_inputs(model, batches):
    hidden, kwargs, masks = capture_layer_inputs(model, batches, "cpu", "cpu")
    return LayerInputs(hidden, kwargs[0], masks, torch.device("cpu"), torch.device("cpu"))


def test_mappings_found_from_structure():
    layer = find_decoder_layers(_model(kv_heads=2))[0][0]
    found, skipped = find_mappings(layer)
    assert [(m.smooth, m.balance) for m in found] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",))]
    assert "out-features 32 != balance in-features 64" in skipped["self_attn.v_proj"]

    layer = find_decoder_layers(_model(kv_heads=4))[0][0]       # no GQA: v -> o allowed
    found, skipped = find_mappings(layer)
    assert ("self_attn.v_proj", ("self_attn.o_proj",)) in [(m.smooth, m.balance) for m in found]
    assert not skipped
    found, _ = find_mappings(layer, [("self_attn.v_proj", ["o_proj"])])   # explicit
    assert [(m.smooth, m.balance) for m in found] == [("self_attn.v_proj", ("self_attn.o_proj",))]


def test_applying_scales_is_a_float_noop():
    model = _model(kv_heads=4)
    ids = torch.cat(_batches(2))
    with torch.no_grad():
        before = model(ids).logits
    for smoothed, _ in scale_through_awq_mappings(model, torch.Generator().manual_seed(3)):
        assert len(smoothed) == 4
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight,
                           _model(kv_heads=4).model.layers[0].self_attn.q_proj.weight)


@torch.no_grad()
def test_search_loss_not_above_rtn_and_measured_error_agrees():
    model = _model()
    inputs = _layer0_inputs(model, _batches())
    layer = model.model.layers[0]
    lin = {f"l.{n}": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = collect_input_stats(layer, lin, inputs, search_tokens=10**6)   # all tokens
    balance = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    x = stats["l.self_attn.q_proj"].x
    assert x.shape[0] == 4 * 48
    w0 = [b.weight.detach().clone() for b in balance]
    args = SCHEME.weights
    s, ratio, errs, rtn_err = search_scales(stats["l.self_attn.q_proj"].mean, x, w0, args,
                                            torch.float32, 20, duo_scaling=True)
    assert errs.shape == (20,) and ratio is not None and errs.min() < 0.9 * rtn_err
    _, _, errs_plain, rtn_plain = search_scales(stats["l.self_attn.q_proj"].mean, x, w0, args,
                                                torch.float32, 20, duo_scaling=False)
    torch.testing.assert_close(rtn_plain, float(errs_plain[0]), rtol=1e-6, atol=0)  # r=0: s=1

    # independently: quantize the scaled layers, run them as Linears on the tokens
    apply_scales(layer.input_layernorm, balance, s)
    err_awq = 0.0
    for b, w in zip(balance, w0):
        quantize_linear(b, args, torch.float32)
        err_awq += float((b(x / s) - x @ w.T).pow(2).sum())
    rtn = 0.0
    for w in w0:
        sc, zp = qparams_from_minmax(w.view(w.shape[0], -1, 32).amin(-1),
                                     w.view(w.shape[0], -1, 32).amax(-1), args)
        rtn += (x @ (dequantize_ref(quantize_ref(w, sc, zp, args), sc, zp) - w).T).pow(2).sum()
    torch.testing.assert_close(err_awq, float(errs.min()), rtol=1e-4, atol=0)
    torch.testing.assert_close(float(rtn), rtn_err, rtol=1e-4, atol=0)
    assert err_awq < rtn


def test_clip_search_matches_brute_force_per_group():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=g) * 0.1
    w[:, 5] = 0.9                  # an outlier weight in every row, on a quiet input channel:
    x = torch.randn(50, 64, generator=g)
    x[:, 5] *= 0.01                # clipping it costs little and refines the rest of the group
    args = QuantArgs(4, "int", False, "group", 32)
    shrinks = (1.0, 0.9, 0.8, 0.7, 0.6)
    lo, hi, f = clip_search(w, group_gram(x, 32), args, torch.float32, shrinks, chunk_rows=3)
    for r in range(8):
        for gi in range(2):
            cols = slice(gi * 32, gi * 32 + 32)
            wg, xg = w[r:r + 1, cols], x[:, cols]
            errs = []
            for sh in shrinks:
                sc, zp = qparams_from_minmax(wg.amin(1, True) * sh, wg.amax(1, True) * sh, args)
                d = dequantize_ref(quantize_ref(wg, sc, zp, args), sc, zp) - wg
                errs.append(float((xg @ d.T).pow(2).sum()))
            assert f[r, gi] == shrinks[min(range(len(shrinks)), key=errs.__getitem__)]
    assert (f[:, 0] < 1).any()                    # the outlier group gets clipped somewhere
    torch.testing.assert_close(hi, w.view(8, 2, 32).amax(-1) * f)
    # GPTQ's Hessian blocks are the same blocks: x^T x's diagonal g x g blocks
    torch.testing.assert_close(hessian_blocks(x.t() @ x, 32), group_gram(x, 32))


def _logit_mse(model, ref, ids):
    with torch.no_grad():
        return float((model(ids).logits - ref).pow(2).mean())


def test_awq_method_end_to_end_beats_rtn():
    model = _model()
    ids = torch.cat(_batches(2, seed=9))          # held out
    with torch.no_grad():
        ref = model(ids).logits
    results = {}
    for name, fn in [("rtn", RTN()), ("awq", AWQ(clip=False)), ("awq_clip", AWQ()),
                     ("awq_gptq", recipe_fn([AWQ(), GPTQ()]))]:
        m = copy.deepcopy(model)
        res = compress_sequential(m, _batches(), SCHEME, fn, progress=False)
        results[name] = _logit_mse(m, ref, ids)
        if name != "rtn":
            assert len(res.qweights) == 14
            for full, qw in res.qweights.items():
                assert qw.q.dtype == torch.int8 and qw.zero_point is not None
                assert int(qw.q.min()) >= -8 and int(qw.q.max()) <= 7
                assert qw.scale.shape == (qw.q.shape[0], qw.q.shape[1] // 32)
                torch.testing.assert_close(m.get_submodule(full).weight,
                                           qw.dequantize(torch.float32))
            assert res.infos["model.layers.0.self_attn.q_proj"]["ratio"] is not None
    assert results["awq"] < 0.9 * results["rtn"], results
    assert results["awq_clip"] < results["awq"], results
    assert results["awq_gptq"] < results["awq"], results


def test_triton_search_in_the_method_picks_the_torch_ratios(monkeypatch):
    model = _model()
    ratios = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("TRITONPRESS_BACKEND", backend)
        m = copy.deepcopy(model)
        res = compress_sequential(m, _batches(2, seq=32), SCHEME,
                                  AWQ(n_grid=8), progress=False)
        ratios[backend] = {k: v["ratio"] for k, v in res.infos.items() if "smooth" in v}
    assert ratios["torch"] == ratios["triton"] and len(ratios["torch"]) == 12


def test_bad_group_size_is_named():
    model = _model()
    with pytest.raises(ValueError, match="group size"):
        compress_sequential(model, _batches(1), get_scheme("W4A16_ASYM", group_size=48), AWQ(),
                            progress=False)


@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16"])
def test_awq_on_the_fp4_grids_beats_rtn_and_writes_the_format(name):
    """AWQ's search on the weight-only fp4 formats (the candidates fake-quantized by
    kernels.fp4), then the fp4 scale search under the scaled inputs' X^T X blocks: lower
    output error than RTN, codes and scales as the format stores them, NVFP4's global scale
    shared by q/k/v; before GPTQ it only scales."""
    scheme = get_scheme(name)
    model = _model()
    ids = torch.cat(_batches(2, seed=9))
    with torch.no_grad():
        ref = model(ids).logits
    results = {}
    for label, fn in [("rtn", RTN()), ("awq", AWQ()), ("awq_gptq", recipe_fn([AWQ(), GPTQ()]))]:
        m = copy.deepcopy(model)
        res = compress_sequential(m, _batches(), scheme, fn, progress=False)
        results[label] = _logit_mse(m, ref, ids)
        assert len(res.qweights) == 14
        for full, qw in res.qweights.items():
            assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
            assert qw.scale.shape == (qw.q.shape[0], qw.q.shape[1] // scheme.weights.group_size)
            torch.testing.assert_close(m.get_submodule(full).weight.float(),
                                       qw.dequantize(torch.float32))
        if label != "rtn":
            assert res.infos["model.layers.0.self_attn.q_proj"]["ratio"] is not None
    if name == "NVFP4A16":
        q, k = (res.qweights[f"model.layers.0.self_attn.{p}_proj"] for p in "qk")
        assert torch.equal(q.global_scale, k.global_scale)
    assert results["awq"] < results["rtn"], results
    assert results["awq_gptq"] < results["rtn"], results
    with pytest.raises(ValueError, match="NVFP4A16, MXFP4A16"):
        AWQ().check(get_scheme("NVFP4"))
