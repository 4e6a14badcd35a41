"""Perplexity, KL to a reference, and simulated per-token activation quantization."""
import math

import pytest
import torch
import torch.nn.functional as F

from tritonpress.kernels.quant import quantize_per_token_vllm
from tritonpress.quality import (describe_act_sim, evaluate, fake_quant_per_token, reference,
                                 simulate_activation_quant)
from helpers import tiny_llama
from tritonpress.schemes import PRESETS, QuantArgs

INT8_TOKEN = PRESETS["W8A8_INT8"].input_activations
FP8_TOKEN = PRESETS["W8A8_FP8"].input_activations


@pytest.fixture
def tiny():
    model, _ = tiny_llama(hidden=64, intermediate=96, layers=2, seed=0)
    windows = torch.randint(2, 258, (3, 17), generator=torch.Generator().manual_seed(5))
    return model, windows


def test_ppl_is_exp_of_mean_next_token_nll(tiny):
    model, windows = tiny
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            for t in range(len(w) - 1):
                nlls.append(-F.log_softmax(logits[t].double(), -1)[w[t + 1]].item())
    out = evaluate(model, windows, progress=False)
    assert out["tokens"] == 3 * 16 and out["kl"] is None
    assert out["ppl"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    # a random model predicts roughly uniformly over its 258 tokens
    assert 150 < out["ppl"] < 450


def test_kl_against_itself_is_zero(tiny):
    model, windows = tiny
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-5)):
        ref = reference(model, windows, dtype=dtype)
        out = evaluate(model, windows, ref, progress=False)
        assert abs(out["kl"]) < tol
        assert out["ppl"] == pytest.approx(ref.ppl, rel=1e-6)


def test_kl_after_perturbation_matches_hand_computation(tiny):
    model, windows = tiny
    ref = reference(model, windows, dtype=torch.float32)
    with torch.no_grad():
        p = F.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
        model.model.layers[0].mlp.down_proj.weight.add_(torch.randn(64, 96) * 0.5)
        q = F.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    out = evaluate(model, windows, ref, progress=False)
    assert out["kl"] > 1e-4
    assert out["kl"] == pytest.approx(expected, rel=1e-4)


def test_ref_shape_mismatch_is_refused(tiny):
    model, windows = tiny
    ref = reference(model, windows[:2])
    with pytest.raises(ValueError, match="ref was computed on 2 windows"):
        evaluate(model, windows, ref, progress=False)


def test_windows_must_fit_the_model(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="vocab"):
        evaluate(model, torch.full((1, 8), 999), progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate(model, torch.ones(1, 4096, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        evaluate(model, torch.ones(2, 1, dtype=torch.long), progress=False)


def test_accepts_calibration_style_batches(tiny):
    model, windows = tiny
    batches = [{"input_ids": windows[:2], "attention_mask": torch.ones(2, 17)},
               {"input_ids": windows[2:], "attention_mask": torch.ones(1, 17)}]
    assert evaluate(model, batches, progress=False) == evaluate(model, windows, progress=False)


@pytest.mark.parametrize("args", [INT8_TOKEN, FP8_TOKEN], ids=["int8", "fp8"])
def test_fake_quant_per_token_compressed_tensors(args):
    x = torch.randn(5, 33) * torch.logspace(-2, 2, 5)[:, None]  # rows of very different scale
    xq = fake_quant_per_token(x, args, act_sim="compressed-tensors")
    amax = x.abs().amax(-1, keepdim=True)
    # scale = amax / 127.5 (int8) or amax / 448 (fp8): the largest value, +-127.5 steps, lands
    # on 127 (clamped from 128) or -128 (int8), or exactly on +-448 (fp8)
    i = x.abs().argmax(-1, keepdim=True)
    x_top, xq_top = x.gather(-1, i), xq.gather(-1, i)
    if args.type == "int":
        expected = torch.where(x_top > 0, 127.0, -128.0) * amax / 127.5
    else:
        expected = x_top
    assert torch.allclose(xq_top, expected, rtol=1e-6)
    err = (xq - x).abs() / amax
    if args.type == "int":
        assert err.max() <= 0.5 / 127.5 + 1e-6  # half a step, step = amax / 127.5
        assert ((xq / (amax / 127.5)).round() - xq / (amax / 127.5)).abs().max() < 1e-3
    else:
        assert err.max() <= 2 ** -4 + 1e-6 and err.max() > 0  # e4m3: 3 mantissa bits
    assert xq.dtype == x.dtype and not torch.equal(xq, x)


@pytest.mark.parametrize("args", [INT8_TOKEN, FP8_TOKEN], ids=["int8", "fp8"])
def test_activation_simulation_changes_outputs_and_is_removed(tiny, args):
    model, windows = tiny
    with torch.no_grad():
        before = model(input_ids=windows).logits
        with simulate_activation_quant(model, args) as hooked:
            during = model(input_ids=windows).logits
        after = model(input_ids=windows).logits
    assert hooked == 2 * 7  # q k v o gate up down per layer; lm_head never
    assert not torch.allclose(before, during)
    assert (before - during).abs().max() < 0.1 * before.abs().max()
    assert torch.equal(before, after)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_activation_simulation_on_one_linear_is_quantize_dequantize(tiny):
    model, _ = tiny
    proj = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 3, 96)
    amax = x.abs().amax(-1, keepdim=True)
    with torch.no_grad(), simulate_activation_quant(model, INT8_TOKEN,
                                                         act_sim="compressed-tensors"):
        y = proj(x)
    x_hat = torch.clamp(torch.round(x / (amax / 127.5)), -128, 127) * (amax / 127.5)
    assert torch.allclose(y, F.linear(x_hat, proj.weight), atol=1e-5)
    with torch.no_grad(), simulate_activation_quant(model, INT8_TOKEN):   # vllm by default
        y = proj(x)
    x_hat = torch.round(x * (127 / amax)) * (amax / 127)
    assert torch.allclose(y, F.linear(x_hat, proj.weight), atol=1e-5)


def test_vllm_int8_per_token_matches_hand_computation():
    # row 0: absmax 2.54 -> scale 0.02; x / scale = 127, -63.5 (ties to even: -64), 0.5 (-> 0),
    # 1.5 (-> 2), 100.4 (-> 100); compressed-tensors would use 2.54 / 127.5 instead
    x = torch.tensor([[2.54, -1.27, 0.01, 0.03, 2.008],
                      [0.0, 0.0, 0.0, 0.0, 0.0],          # all zero: q 0, scale 0, no NaN
                      [-3.0, 1.0, 0.0, 0.0, 0.0]])        # negative absmax -> -127, never -128
    q, scale = quantize_per_token_vllm(x, INT8_TOKEN)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert torch.equal(scale, x.abs().amax(-1, keepdim=True) / 127)
    assert scale[0].item() == pytest.approx(0.02, rel=1e-6) and scale[1].item() == 0
    assert q.tolist() == [[127, -64, 0, 2, 100], [0] * 5, [-127, 42, 0, 0, 0]]
    x_hat = fake_quant_per_token(x, INT8_TOKEN)
    assert torch.allclose(x_hat, q.float() * scale) and torch.isfinite(x_hat).all()
    # the two conventions differ: compressed-tensors clamps the largest value (127.5 -> 127)
    ct = fake_quant_per_token(x, INT8_TOKEN, act_sim="compressed-tensors")
    assert x_hat[0, 0] == pytest.approx(2.54, rel=1e-6) and ct[0, 0] < x_hat[0, 0]


def test_vllm_fp8_per_token_is_absmax_over_448_with_vllm_floor():
    x = torch.randn(4, 40) * torch.tensor([[1e-4], [1e-2], [1.0], [300.0]])
    q, scale = quantize_per_token_vllm(x, FP8_TOKEN)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(scale, torch.clamp(amax / 448, min=1 / (448 * 512)))
    assert q.dtype == torch.float8_e4m3fn
    assert torch.equal(q.float(), (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    # above the floor (absmax >= 1/512) it is compressed-tensors' fp8 simulation exactly
    ct, vl = (fake_quant_per_token(x[1:], FP8_TOKEN, act_sim=a)
              for a in ("compressed-tensors", "vllm"))
    assert torch.equal(ct, vl)


def test_act_sim_is_checked_and_described(tiny):
    model, windows = tiny
    with pytest.raises(ValueError, match="vllm, compressed-tensors"):
        evaluate(model, windows, act_args=INT8_TOKEN, act_sim="vLLM", progress=False)
    assert describe_act_sim(INT8_TOKEN, "vllm") == \
        "vllm: int8 per token simulated as vLLM runs it (scale = absmax / 127)"
    assert "absmax / 127.5" in describe_act_sim(INT8_TOKEN, "compressed-tensors")
    assert "absmax / 448" in describe_act_sim(FP8_TOKEN, "vllm")
    assert describe_act_sim(None, "vllm") is None


def test_activation_simulation_ignore_list_and_hooks_removed_on_error(tiny):
    model, windows = tiny
    with torch.no_grad():
        before = model(input_ids=windows).logits
        with simulate_activation_quant(model, INT8_TOKEN, ignore=["re:.*layers\\.\\d+\\..*"]) as n:
            assert n == 0
            assert torch.equal(model(input_ids=windows).logits, before)
        with pytest.raises(RuntimeError):
            with simulate_activation_quant(model, INT8_TOKEN, ignore=["down_proj"]) as n:
                assert n == 2 * 6
                raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_evaluate_with_act_args_matches_manual_simulation(tiny):
    model, windows = tiny
    ref = reference(model, windows, dtype=torch.float32)
    out = evaluate(model, windows, ref, act_args=INT8_TOKEN, progress=False)
    with simulate_activation_quant(model, INT8_TOKEN):
        manual = evaluate(model, windows, ref, progress=False)
    assert out == manual and out["kl"] > 0
    assert evaluate(model, windows, ref, progress=False)["kl"] < 1e-6  # removed afterwards


def test_only_dynamic_per_token_activations_are_simulated(tiny):
    model, windows = tiny
    with pytest.raises(ValueError, match="per token"):
        evaluate(model, windows, act_args=QuantArgs(8, "int", True, "tensor"), progress=False)
