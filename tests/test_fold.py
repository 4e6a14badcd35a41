"""Folding scales into norms (fold.py), through AWQ's apply_scales and SmoothQuant's smooth:
w * x norms (Llama RMSNorm, LayerNorm with bias) and (1 + w) * x norms (Gemma, Gemma3)."""

import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from conftest import scale_through_awq_mappings
from tritonpress.methods.awq import apply_scales
from tritonpress.methods.fold import divide_norm_output
from tritonpress.loop.sequential import compress_sequential, recipe_fn
from tritonpress.methods.smoothquant import SmoothQuant, smooth
from tritonpress.schemes import get_scheme

from helpers import Identity

K = 64
NORMS = {"llama": lambda: LlamaRMSNorm(K), "gemma": lambda: GemmaRMSNorm(K),
         "gemma3": lambda: Gemma3RMSNorm(K), "layernorm": lambda: nn.LayerNorm(K)}


def _block(kind, dtype=torch.float32, seed=0):
    """(norm, [Linears reading its output]) with random affine parameters and loud channels."""
    g = torch.Generator().manual_seed(seed)
    norm = NORMS[kind]()
    with torch.no_grad():
        if kind.startswith("gemma"):        # (1 + w): w around 0, a few loud channels
            norm.weight.copy_(torch.randn(K, generator=g) * 0.3)
            norm.weight[::9] = 4.0
        else:
            norm.weight.copy_(1 + torch.randn(K, generator=g) * 0.3)
            norm.weight[::9] = 5.0
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(K, generator=g) * 0.2)
    lins = [nn.Linear(K, n, bias=False) for n in (48, 32)]
    for lin in lins:
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
    return norm.to(dtype), [lin.to(dtype) for lin in lins]


def _out(norm, lins, x):
    with torch.no_grad():
        h = norm(x)
        return torch.cat([lin(h) for lin in lins], -1).float()


def _x(dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 10, K, generator=g) * 2).to(dtype)


def _fold(path, norm, lins, x, seed=2):
    if path == "awq":
        s = torch.rand(K, generator=torch.Generator().manual_seed(seed)) * 3 + 0.3
        apply_scales(norm, lins, s)
    else:
        with torch.no_grad():
            act_max = norm(x).abs().flatten(0, -2).amax(0).float()
        s = smooth(norm, lins, act_max, alpha=0.5)
    assert float(s.max() / s.min()) > 2          # scales far from 1: a real test
    return s


@pytest.mark.parametrize("path", ["awq", "smoothquant"])
@pytest.mark.parametrize("kind", list(NORMS))
def test_folding_into_norm_keeps_the_output_fp32(kind, path):
    norm, lins = _block(kind)
    x = _x()
    before = _out(norm, lins, x)
    w0 = norm.weight.detach().clone()
    s = _fold(path, norm, lins, x)
    torch.testing.assert_close(_out(norm, lins, x), before, rtol=1e-5, atol=1e-5)
    if kind.startswith("gemma"):     # the (1 + w) form: w -> (1 + w) / s - 1, not w / s
        torch.testing.assert_close(norm.weight.detach(), (1 + w0) / s - 1, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["awq", "smoothquant"])
@pytest.mark.parametrize("kind", list(NORMS))
def test_folding_into_norm_keeps_the_output_bf16(kind, path):
    norm, lins = _block(kind, torch.bfloat16)
    x = _x(torch.bfloat16)
    before = _out(norm, lins, x)
    _fold(path, norm, lins, x)
    after = _out(norm, lins, x)
    # bf16 rounding of the folded weights (~2^-8 relative each): a few percent of the range
    torch.testing.assert_close(after, before, rtol=0, atol=0.03 * float(before.abs().max()))
    assert float((after - before).pow(2).mean().sqrt()) < 0.01 * float(before.abs().max())


def test_weight_times_x_fold_is_the_plain_division_bitwise():
    """For w * x norms the parameters written are (p.float() / s).to(p.dtype), as AWQ and
    SmoothQuant wrote them before fold.py: checkpoints of Llama models do not change."""
    for kind in ("llama", "layernorm"):
        norm, _ = _block(kind, torch.bfloat16)
        s = torch.rand(K, generator=torch.Generator().manual_seed(4)) * 3 + 0.3
        params = {n: p.detach().clone() for n, p in norm.named_parameters()}
        divide_norm_output(norm, s)
        for n, p in norm.named_parameters():
            assert p.dtype == torch.bfloat16
            assert torch.equal(p, (params[n].float() / s).to(torch.bfloat16)), (kind, n)


def test_plain_division_on_a_gemma_norm_is_wrong():
    """What AWQ's apply_scales did before fold.py (w / s on any norm): on Gemma's (1 + w) * x
    it changes the layer's output; the fold tests above catch it."""
    norm, lins = _block("gemma")
    x = _x()
    before = _out(norm, lins, x)
    s = torch.rand(K, generator=torch.Generator().manual_seed(2)) * 3 + 0.3
    with torch.no_grad():
        norm.weight.copy_(norm.weight / s)
        for lin in lins:
            lin.weight.copy_(lin.weight * s)
    assert not torch.allclose(_out(norm, lins, x), before, rtol=1e-2, atol=1e-2)


class _WeightInsideNorm(nn.Module):
    """Scales before normalising: dividing the weight by s does not divide the output."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(K) + 0.5)
        self.bias = nn.Parameter(torch.randn(K) * 0.1)

    def forward(self, x):
        h = x * self.weight
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) + self.bias


class _GatedNorm(nn.Module):
    """A norm whose forward wants a second tensor (as Qwen3-Next's gated RMSNorm)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(K))

    def forward(self, x, gate):
        return self.weight * x * torch.sigmoid(gate)


@pytest.mark.parametrize("path", ["awq", "smoothquant"])
@pytest.mark.parametrize("make", [_WeightInsideNorm, _GatedNorm])
def test_not_affine_norm_raises_and_changes_nothing(make, path):
    torch.manual_seed(0)
    norm = make()
    lins = [nn.Linear(K, 16, bias=False)]
    tensors = list(norm.parameters()) + [lins[0].weight]
    ptrs = [t.data_ptr() for t in tensors]
    saved = [t.detach().clone() for t in tensors]
    s = torch.rand(K) * 3 + 0.3
    with pytest.raises(ValueError, match="not an affine norm"):
        if path == "awq":
            apply_scales(norm, lins, s)
        else:
            smooth(norm, lins, torch.rand(K) * 10, alpha=0.5)
    for t, p, v in zip(tensors, ptrs, saved):
        assert t.data_ptr() == p and t.dtype == v.dtype and torch.equal(t, v)


def _tiny_gemma(seed=0):
    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    model = GemmaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():     # trained-looking (1 + w) norms: w not 0, a few loud channels
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.randn(64, generator=g) * 0.3)
                norm.weight[::11] = 6.0
    return model


def _ids(seed=1):
    return torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_awq_scaling_a_gemma_model_is_a_float_noop():
    model = _tiny_gemma()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    for smoothed, _ in scale_through_awq_mappings(model, torch.Generator().manual_seed(3)):
        assert smoothed == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                            "mlp.up_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_smoothquant_on_a_gemma_model_is_a_float_noop():
    model = _tiny_gemma()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    norm0 = model.model.layers[0].input_layernorm.weight.detach().clone()
    res = compress_sequential(model, [{"input_ids": ids}], get_scheme("W8A8_INT8"),
                              recipe_fn([SmoothQuant(0.5), Identity()]),
                              progress=False)
    info = res.infos["model.layers.0.self_attn.q_proj"]["smoothquant"]
    assert info["norm"] == "model.layers.0.input_layernorm"
    assert info["scale_max"] / info["scale_min"] > 2
    assert not torch.allclose(norm0, model.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_awq_on_a_gemma3_layer_smooths_the_norm_that_feeds_the_mlp():
    # Gemma 3's post_attention_layernorm norms the attention output; gate/up read
    # pre_feedforward_layernorm: scaling through the former would change the model.
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           head_dim=16, sliding_window=16)
    model = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.pre_feedforward_layernorm):
                norm.weight.copy_(torch.randn(64, generator=g) * 0.3)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    for smoothed, skipped in scale_through_awq_mappings(model, g):
        assert smoothed == ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm",
                            "mlp.up_proj"]
        assert "already smoothed" in skipped["post_attention_layernorm"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
