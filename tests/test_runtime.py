"""load_compressed: a compressed-tensors checkpoint runs inside transformers and gives the
logits of the dequantized model (weights replaced by their dequantized values, activations
fake-quantized per token), through the torch references and the Triton kernels.

Checkpoints are written here the way llm-compressor lays them out, packing with
compressed-tensors' own pack_to_int32 (an implementation independent of ours), and also by
tritonpress's checkpoint writer.
"""
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from tritonpress.kernels import gemm
from tritonpress.kernels.quant import (FP8_MAX, dequantize_ref, quantize_per_token_ref,
                                       quantize_per_token_vllm, quantize_ref,
                                       quantize_weight_ref)
from tritonpress.quality import fake_quant_per_token, simulate_activation_quant
from tritonpress.runtime import CompressedLinear, load_compressed
from tritonpress.schemes import PRESETS, QuantArgs

pack_to_int32 = pytest.importorskip(
    "compressed_tensors.compressors.pack_quantized.helpers").pack_to_int32


def _tiny_llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                      max_position_embeddings=128, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).float().eval()
    for p in model.parameters():      # HF's init (std 0.02) makes logits nearly flat
        p.data.normal_(0, 0.2)
    return model


def _args_json(a: QuantArgs | None):
    if a is None:
        return None
    return {"num_bits": a.num_bits, "type": a.type, "symmetric": a.symmetric,
            "strategy": a.strategy, "group_size": a.group_size, "dynamic": a.dynamic,
            "block_structure": None, "actorder": None, "observer": "minmax",
            "observer_kwargs": {}}


FP8_STATIC = (QuantArgs(8, "float", True, "tensor"), QuantArgs(8, "float", True, "tensor"))
SCHEMES = {   # name -> (weight args, activation args, format, 2:4)
    "W4A16": (QuantArgs(4, "int", True, "group", 32), None, "pack-quantized", False),
    "W4A16_ASYM": (QuantArgs(4, "int", False, "group", 32), None, "pack-quantized", False),
    "W8A16_CHAN": (QuantArgs(8, "int", True, "channel"), None, "pack-quantized", False),
    "W8A8_INT8": (*[getattr(PRESETS["W8A8_INT8"], a) for a in ("weights", "input_activations")],
                  "int-quantized", False),
    "FP8_DYNAMIC": (*[getattr(PRESETS["W8A8_FP8"], a) for a in ("weights", "input_activations")],
                    "float-quantized", False),
    "FP8_STATIC": (*FP8_STATIC, "float-quantized", False),
    "FP8_24": (*[getattr(PRESETS["W8A8_FP8"], a) for a in ("weights", "input_activations")],
               "float-quantized", True),
}


def _quantize(model, wargs, sparse24):
    """name -> (q, scale, zp) for every Linear but lm_head (llm-compressor's default ignore)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head":
            w = m.weight.detach().float()
            if sparse24:    # keep the 2 largest of every 4
                g = w.reshape(w.shape[0], -1, 4)
                drop = g.abs().argsort(-1)[..., :2]
                w = g.scatter(-1, drop, 0.0).reshape_as(w)
            if wargs.strategy == "tensor":    # one scale for the whole weight
                scale = (w.abs().max() / FP8_MAX).reshape(1, 1)
                q = quantize_ref(w, scale.expand(w.shape[0], 1), None, wargs)
                out[name] = (q, scale, None)
            else:
                out[name] = quantize_weight_ref(w, wargs, torch.float32)
    return out


def _write(model, scheme, path):
    """A checkpoint laid out as llm-compressor writes it; returns (qweights, input scales)."""
    wargs, act, fmt, sparse24 = SCHEMES[scheme]
    qws = _quantize(model, wargs, sparse24)
    sd = {k: v for k, v in model.state_dict().items()
          if not any(k.startswith(n + ".") for n in qws)}
    input_scales = {}
    for name, (q, s, zp) in qws.items():
        sd[f"{name}.weight_scale"] = s.reshape(1) if wargs.strategy == "tensor" else s
        if fmt == "pack-quantized":
            sd[f"{name}.weight_packed"] = pack_to_int32(q, wargs.num_bits)
            sd[f"{name}.weight_shape"] = torch.tensor(list(q.shape))
            if zp is not None:
                sd[f"{name}.weight_zero_point"] = pack_to_int32(zp, wargs.num_bits, packed_dim=0)
        else:
            sd[f"{name}.weight"] = q
        if act is not None and not act.dynamic:   # static: calibrated on some random inputs
            input_scales[name] = torch.tensor([3.0 / FP8_MAX])
            sd[f"{name}.input_scale"] = input_scales[name]
    model.save_pretrained(path, state_dict=sd)
    cfg = json.loads((path / "config.json").read_text())
    group = {"targets": ["Linear"], "weights": _args_json(wargs),
             "input_activations": _args_json(act), "output_activations": None, "format": fmt}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": group}, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "sparsity_config": {"format": "dense", "sparsity_structure": "2:4",
                            "targets": ["Linear"], "ignore": ["lm_head"]} if sparse24 else {}}
    (path / "config.json").write_text(json.dumps(cfg))
    return qws, input_scales


ROUNDING = {"vllm": quantize_per_token_vllm, "compressed-tensors": quantize_per_token_ref}


def _dequantized(model, qws, act, input_scales, act_sim="vllm"):
    """The model the runtime must match: dequantized weights, fake-quantized activations
    (dynamic ones rounded by the act_sim convention)."""
    ref = copy.deepcopy(model)
    for name, (q, s, zp) in qws.items():
        lin = ref.get_submodule(name)
        lin.weight.data = dequantize_ref(q, s.expand(q.shape[0], -1), zp, torch.float32)
        if act is None:
            continue

        def fake_quant(mod, inputs, name=name):
            x = inputs[0]
            if name in input_scales:
                x2 = x.reshape(-1, x.shape[-1])
                s = input_scales[name].reshape(1, 1).expand(x2.shape[0], 1)
                xq = quantize_ref(x2, s, None, act).float() * s
                return (xq.reshape(x.shape).to(x.dtype),)
            xq, sx = ROUNDING[act_sim](x, act)
            return ((xq.float() * sx).to(x.dtype),)
        lin.register_forward_pre_hook(fake_quant)
    return ref


def _ids(batch=2, seq=6):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))


# every scheme with the runtime's default rounding (vLLM's); the dynamic W8A8 ones also
# with compressed-tensors'
ROUNDED = [(s, "vllm") for s in SCHEMES] + [
    (s, "compressed-tensors") for s, (_, act, _, _) in SCHEMES.items() if act and act.dynamic]


@pytest.mark.parametrize("scheme,act_sim", ROUNDED, ids=[f"{s}-{a}" for s, a in ROUNDED])
def test_runtime_matches_dequantized_model(tmp_path, monkeypatch, scheme, act_sim):
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "torch")
    model = _tiny_llama()
    qws, input_scales = _write(model, scheme, tmp_path)
    rt, tok = load_compressed(str(tmp_path), act_sim=act_sim)
    assert tok is None
    kinds = {m.weight_c.kind for m in rt.modules() if isinstance(m, CompressedLinear)}
    assert sum(isinstance(m, CompressedLinear) for m in rt.modules()) == len(qws) == 14
    assert type(rt.lm_head) is nn.Linear
    expect_kind = {"pack-quantized": "wna16", "int-quantized": "int8"}.get(SCHEMES[scheme][2])
    assert kinds == {expect_kind or ("fp8_24" if SCHEMES[scheme][3] else "fp8")}

    ref = _dequantized(model, qws, SCHEMES[scheme][1], input_scales, act_sim)
    ids = _ids()
    with torch.no_grad():
        got, want = rt(ids).logits, ref(ids).logits
    assert got.shape == (2, 6, 256)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # and it is not trivially the unquantized model
    assert (want - model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", ["W8A8_INT8", "FP8_DYNAMIC"])
def test_runtime_rounds_activations_as_the_evaluation_does(tmp_path, monkeypatch, scheme):
    # what compress() reports (quality, act_sim="vllm") is what load_compressed runs: the same
    # per-token rounding bit for bit, and so the evaluation's logits
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "torch")
    model = _tiny_llama()
    qws, _ = _write(model, scheme, tmp_path)
    act = SCHEMES[scheme][1]
    rt, _ = load_compressed(str(tmp_path))
    x = torch.randn(7, 64) * torch.logspace(-4, 2, 7)[:, None]
    x[3] = 0
    xq, sx = gemm.quantize_activations(x, rt.get_submodule("model.layers.0.mlp.up_proj").weight_c)
    x_hat = (xq.float() * sx).to(x.dtype)
    assert torch.equal(x_hat, fake_quant_per_token(x, act, act_sim="vllm"))
    assert not torch.equal(x_hat, fake_quant_per_token(x, act, act_sim="compressed-tensors"))
    ref = _dequantized(model, qws, None, {})          # weights only; activations by quality
    ids = _ids()
    with torch.no_grad(), simulate_activation_quant(ref, act, act_sim="vllm") as hooked:
        want = ref(ids).logits
    with torch.no_grad():
        got = rt(ids).logits
    assert hooked == len(qws)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "W8A8_INT8", "FP8_24"])
def test_runtime_triton_kernels_and_generate(tmp_path, monkeypatch, scheme):
    model = _tiny_llama(tie=True)
    qws, input_scales = _write(model, scheme, tmp_path)
    rt, _ = load_compressed(str(tmp_path))
    ids = _ids(1, 5)
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "torch")
    with torch.no_grad():
        want = rt(ids).logits
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "triton")
    with torch.no_grad():
        got = rt(ids).logits
    # with quantized activations a last-bit difference in one layer can move one value across
    # a rounding boundary of the next layer's quantizer: one quantization step, not a bug
    tol = 1e-3 if SCHEMES[scheme][1] is None else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    out = rt.generate(ids, max_new_tokens=3, do_sample=False)
    ref = _dequantized(model, qws, SCHEMES[scheme][1], input_scales)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=3, do_sample=False))


def test_runtime_reads_tritonpress_checkpoints(tmp_path, monkeypatch):
    checkpoint = pytest.importorskip("tritonpress.checkpoint")
    from tritonpress.checkpoint.qweight import QuantizedWeight
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "torch")
    model = _tiny_llama()
    for scheme, sparse_format in (("W4A16_ASYM", "dense"), ("FP8_24", "sparse-24-bitmask")):
        wargs, act, _, sparse24 = SCHEMES[scheme]
        qws = _quantize(model, wargs, sparse24)
        qweights = {n: QuantizedWeight(q, s, zp, wargs) for n, (q, s, zp) in qws.items()}
        preset = PRESETS["W4A16_ASYM" if scheme == "W4A16_ASYM" else "W8A8_FP8_24"]
        preset = dataclasses.replace(preset, weights=wargs)
        out = checkpoint.save_checkpoint(model, None, qweights, preset, tmp_path / scheme,
                                         sparse_format=sparse_format)
        rt, _ = load_compressed(str(out))
        ids = _ids()
        with torch.no_grad():
            got = rt(ids).logits
            want = _dequantized(model, qws, act, {})(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_runtime_rejects_what_it_cannot_run(tmp_path):
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="compressed-tensors"):
        load_compressed(str(tmp_path / "plain"))
    _write(model, "W4A16", tmp_path / "w4")
    cfg = json.loads((tmp_path / "w4" / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (tmp_path / "w4" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="3-bit"):
        load_compressed(str(tmp_path / "w4"))
