"""The sequential calibration pipeline on a tiny random Llama, and SmoothQuant."""

import pytest
import torch

from tritonpress.loop import hooks
from tritonpress.methods.gptq import GPTQ
from helpers import tiny_llama
from tritonpress.loop.activations import LayerInputs, capture_layer_inputs
from tritonpress.loop.hooks import capture_module_io, collect_hessians
from tritonpress.loop.sequential import compress_sequential, recipe_fn
from tritonpress.loop.targets import find_decoder_layers, target_linears
from tritonpress.methods.rtn import RTN
from tritonpress.methods.smoothquant import SmoothQuant
from tritonpress.schemes import get_scheme

from helpers import Identity

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300)
    return m


def make_batches(seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0                                        # left padding in one row
    return [{"input_ids": ids, "attention_mask": mask},
            {"input_ids": torch.randint(2, vocab, (1, 17), generator=g)}]


def layer_inputs(model, batches, idx=0):
    hidden, kwargs, masks = capture_layer_inputs(model, batches, CPU, CPU)
    inputs = LayerInputs(hidden, kwargs[0], masks, CPU, CPU)
    layers, prefix = find_decoder_layers(model)
    for i in range(idx):
        inputs = inputs.with_hidden(inputs.run(layers[i]), kwargs[i + 1])
    return inputs, layers[idx], f"{prefix}.{idx}"


def test_identity_method_reproduces_the_forward(model):
    batches = make_batches()
    res = compress_sequential(model, batches, get_scheme("W8A8_INT8"), Identity(),
                              progress=False, keep_final=True)
    assert res.qweights == {} and len(res.seconds_per_layer) == 2
    with torch.no_grad():
        for b, h in zip(batches, res.final.hidden):
            ref = model.model(**b).last_hidden_state
            torch.testing.assert_close(model.model.norm(h), ref, rtol=0, atol=0)


def test_shared_hessians_computed_once(model, monkeypatch):
    calls = []
    real = hooks.accumulate_hessian
    monkeypatch.setattr(hooks, "accumulate_hessian",
                        lambda H, x, n, mask=None: calls.append(x.shape) or real(H, x, n, mask))
    batches = make_batches()
    inputs, layer, prefix = layer_inputs(model, batches)
    linears = target_linears(layer, prefix, None, ())
    hs = collect_hessians(layer, linears, inputs)
    a = prefix + ".self_attn."
    m = prefix + ".mlp."
    assert hs[a + "q_proj"] is hs[a + "k_proj"] is hs[a + "v_proj"]
    assert hs[m + "gate_proj"] is hs[m + "up_proj"]
    assert len({id(h) for h in hs.values()}) == 4          # qkv, o, gate/up, down
    assert len(calls) == 4 * len(batches)                  # each accumulated once per batch
    # and it is 2/n sum x x^T over the real tokens
    io = capture_module_io(layer, {"q": layer.self_attn.q_proj}, inputs)
    x = torch.cat([hooks.tokens_of(xi, mi) for (xi, _), mi in zip(io["q"], inputs.token_masks)])
    assert hs[a + "q_proj"].n == x.shape[0] == 24 + 17 + 17
    torch.testing.assert_close(hs[a + "q_proj"].H, 2 / x.shape[0] * x.T @ x)


def test_padding_tokens_do_not_change_the_hessian(model):
    b1 = make_batches()
    b2 = make_batches()
    b2[0]["input_ids"][1, :7] = 1 + b2[0]["input_ids"][1, :7] % 50   # only masked tokens differ
    h1 = collect_hessians(*_args(model, b1))
    h2 = collect_hessians(*_args(model, b2))
    for name in h1:
        torch.testing.assert_close(h1[name].H, h2[name].H, rtol=1e-5, atol=1e-6)
    # while changing a real token does change it
    b2[0]["input_ids"][1, 10] += 1
    h3 = collect_hessians(*_args(model, b2))
    assert not torch.allclose(h1[next(iter(h1))].H, h3[next(iter(h3))].H)


def _args(model, batches, idx=1):
    inputs, layer, prefix = layer_inputs(model, batches, idx)
    return layer, target_linears(layer, prefix, None, ()), inputs


def test_gptq_pipeline_writes_back_what_it_returns():
    m, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300)
    batches = make_batches()
    scheme = get_scheme("W4A16", group_size=32)
    res = compress_sequential(m, batches, scheme, GPTQ(actorder="static"),
                              progress=False)
    assert len(res.qweights) == 14
    mods = dict(m.named_modules())
    for name, qw in res.qweights.items():
        torch.testing.assert_close(mods[name].weight.data, qw.dequantize(torch.float32),
                                   rtol=0, atol=0)
        info = res.infos[name]
        assert info["fallback"] is None and info["tokens"] == 58
    assert res.infos["model.layers.0.self_attn.k_proj"]["hessian_shared_with"] == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_gptq_beats_rtn_on_the_layer_outputs():
    batches = make_batches() + make_batches(1)
    scheme = get_scheme("W4A16", group_size=16)
    ref, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300)
    out = {}
    for name, fn in [("rtn", RTN()), ("gptq", GPTQ()), ("none", Identity())]:
        m, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300)
        out[name] = compress_sequential(m, batches, scheme, fn, progress=False,
                                        keep_final=True).final.hidden
    err = {k: sum(float((h - r).pow(2).sum()) for h, r in zip(v, out["none"]))
           for k, v in out.items() if k != "none"}
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_group_size_not_dividing_in_features(model):
    scheme = get_scheme("W4A16", group_size=64)          # intermediate 160 = 2.5 groups
    with pytest.raises(ValueError, match=r"down_proj.*partial_last_group") as e:
        compress_sequential(model, make_batches(), scheme, Identity(), progress=False)
    assert "ignore=['down_proj']" in str(e.value)
    m, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300)
    res = compress_sequential(m, make_batches(), scheme, GPTQ(), partial_last_group=True,
                              progress=False)
    assert res.qweights["model.layers.1.mlp.down_proj"].scale.shape == (64, 3)
    res = compress_sequential(m, make_batches(), scheme, RTN(), ignore=["down_proj"],
                              progress=False)
    assert not any("down_proj" in k for k in res.qweights)


def test_smoothquant_is_a_no_op_in_float():
    m, _ = tiny_llama(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=300)
    with torch.no_grad():   # outlier channels, so the scales are far from 1
        m.model.embed_tokens.weight[:, 5] *= 30
        m.model.layers[0].mlp.up_proj.weight[:, 7] *= 10
    batches = make_batches()
    with torch.no_grad():
        before = [m(**b).logits for b in batches]
    norm_before = m.model.layers[0].input_layernorm.weight.clone()
    res = compress_sequential(m, batches, get_scheme("W8A8_INT8"),
                              recipe_fn([SmoothQuant(0.5), Identity()]),
                              progress=False)
    info = res.infos["model.layers.0.self_attn.q_proj"]["smoothquant"]
    assert info["norm"] == "model.layers.0.input_layernorm"
    assert res.infos["model.layers.1.mlp.up_proj"]["smoothquant"]["norm"] == \
        "model.layers.1.post_attention_layernorm"
    assert "model.layers.0.self_attn.o_proj" not in res.infos     # o_proj reads no norm
    assert info["scale_max"] / info["scale_min"] > 2
    assert not torch.allclose(norm_before, m.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        for b, y in zip(batches, before):
            torch.testing.assert_close(m(**b).logits, y, rtol=1e-4, atol=1e-4)


def test_statistics_pass_stops_after_the_last_linear_input(model):
    # From the second batch on, the pass ends once down_proj has its input: down_proj itself
    # (and what follows it) runs only on the first batch; the Hessians are those of a full pass.
    batches = make_batches() + make_batches(seed=1)
    inputs, layer, prefix = layer_inputs(model, batches)
    linears = target_linears(layer, prefix, None, ())
    ran = []
    h = layer.mlp.down_proj.register_forward_hook(lambda *_: ran.append(1))
    try:
        early = collect_hessians(layer, linears, inputs)
        assert len(ran) == 1
        full = {}
        per_input = hooks.LinearInputHooks(linears, lambda lead, x, m: full.setdefault(
            lead, []).append(hooks.tokens_of(x, m)), stop_early=False)
        with per_input:
            inputs.run(layer, keep=False, before_batch=per_input.new_batch)
        assert len(ran) == 1 + len(batches)
    finally:
        h.remove()
    for lead, xs in full.items():
        x = torch.cat(xs).float()
        torch.testing.assert_close(early[lead].H, 2 / x.shape[0] * x.T @ x)


def test_last_layer_is_not_propagated_unless_asked(model):
    calls = []
    layers, _ = find_decoder_layers(model)
    h = layers[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        res = compress_sequential(model, make_batches(), get_scheme("W8A8_INT8"), Identity(),
                                  progress=False)
        assert res.final is None and calls == []     # Identity runs no pass itself
        res = compress_sequential(model, make_batches(), get_scheme("W8A8_INT8"), Identity(),
                                  progress=False, keep_final=True)
        assert len(res.final) == 2 and len(calls) == 2
    finally:
        h.remove()
