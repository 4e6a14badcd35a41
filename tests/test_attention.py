"""loop/attention.py: the calibration passes' blocked causal attention on a CPU against an fp32
reference and torch's own kernel, and the transformers slot it takes only in the plain case."""
import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama
from tritonpress.loop.attention import blocked_causal_attention, faster_cpu_attention


@pytest.mark.parametrize("b,hq,hk,L,d", [(2, 9, 3, 77, 64), (1, 4, 4, 130, 32), (3, 8, 2, 64, 16),
                                         (1, 2, 1, 2, 8)])
def test_blocked_attention_is_as_close_to_fp32_as_torchs_kernel(b, hq, hk, L, d):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(b, h, L, d, generator=g).bfloat16() for h in (hq, hk, hk))
    rep = lambda t: t.float().repeat_interleave(hq // hk, 1)  # noqa: E731
    ref = F.scaled_dot_product_attention(q.float(), rep(k), rep(v), is_causal=True)
    ours = blocked_causal_attention(q, k, v, d ** -0.5)
    torch_bf16 = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert ours.dtype == torch.bfloat16 and ours.shape == (b, hq, L, d)
    err, theirs = (ours.float() - ref).abs().max(), (torch_bf16.float() - ref).abs().max()
    assert err <= 2 * theirs + 2e-3, (float(err), float(theirs))


def test_the_model_uses_it_inside_only_and_the_rest_goes_to_sdpa(monkeypatch):
    from tritonpress.loop import attention
    model, _ = tiny_llama(seed=0)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 250, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0                                      # a padded batch carries a mask
    calls = []
    monkeypatch.setattr(attention, "blocked_causal_attention",
                        lambda *a, **k: calls.append(1) or blocked_causal_attention(*a, **k))
    with torch.no_grad():
        before = model(ids).logits.float()
        padded_sdpa = model(ids, attention_mask=mask).logits
        with faster_cpu_attention():
            inside = model(ids).logits.float()
            n = len(calls)
            padded = model(ids, attention_mask=mask).logits
        after = model(ids).logits.float()
    assert n > 0 and len(calls) == n                     # used unmasked, not with the mask
    assert torch.equal(padded, padded_sdpa)              # that went to transformers' sdpa
    assert torch.equal(before, after)                    # the slot is given back
    torch.testing.assert_close(inside, before, atol=0.05, rtol=0.02)
