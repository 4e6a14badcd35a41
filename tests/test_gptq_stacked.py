"""Stacked GPTQ solves: a layer's experts (equal shapes, each its own Hessian) solved as one
batch give what each gets solved alone, for every option GPTQ takes, and a tiny MoE writes the
same checkpoint with stacking on and off."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

import tritonpress as tp
from tritonpress.methods.gptq import gptq_quantize_stacked
from tritonpress.methods.gptq_batched import gptq_quantize_batched
from tritonpress.methods.gptq_solve import inverse_cholesky, inverse_cholesky_batched
from tritonpress.schemes import get_scheme
from test_moe import TOK, text, tiny_moe  # noqa: F401  (text: the calibration-file fixture)


def _hessian(cols, n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    X[:, seed % cols] *= 10                     # an outlier channel
    return 2 / n * X.T @ X


def _experts(E, rows, cols, seed=0):
    """Per expert a gate/up-like pair of weights and its own Hessian; expert 1's Hessian is
    indefinite (positive definite only with 10x the default dampening), expert 2's has a dead
    column."""
    g = torch.Generator().manual_seed(seed)
    weights = [[torch.randn(rows, cols, generator=g) * 0.05,
                torch.randn(rows + 0, cols, generator=g) * 0.05] for _ in range(E)]
    Hs = [_hessian(cols, 3 * cols, seed + e) for e in range(E)]
    v = torch.randn(3, cols, generator=g)
    Hs[1] = v.T @ v
    Hs[1] -= 0.05 * Hs[1].diagonal().mean() * torch.eye(cols)
    Hs[2][5, :] = Hs[2][:, 5] = 0               # a dead input
    return weights, Hs


def _same(got, want, exact):
    """(QuantizedWeight, dequantized) pairs equal, or with fp32 rounding (scales an ulp apart,
    a rare integer flipped to the neighbouring level)."""
    (qg, dg), (qw, dw) = got, want
    if exact:
        assert torch.equal(qg.q, qw.q) and torch.equal(qg.scale, qw.scale)
        assert torch.equal(dg, dw)
        return
    same = qg.q == qw.q
    assert same.float().mean() > 0.99
    torch.testing.assert_close(qg.scale, qw.scale)
    torch.testing.assert_close(dg[same], dw[same])


OPTIONS = [  # (scheme, group, options, bit-identical)
    ("W4A16", 24, dict(actorder="static", clip=True), True),                # GPTQ()'s defaults
    ("W4A16", 24, dict(actorder=None, block_size=32), True),
    ("W4A16_ASYM", 24, dict(actorder="static", group_scales="dynamic"), False),
    ("W4A16_ASYM", 24, dict(actorder=None, group_scales="dynamic", block_size=48), True),
    ("W4A16", 24, dict(actorder="static", partial_last_group=True), True),  # 100 = 4 x 24 + 4
    ("W8A8_INT8", None, dict(actorder="static"), True),                     # channel
    ("W8A8_FP8", None, dict(actorder=None), True),
]


@pytest.mark.parametrize("scheme,group,options,exact", OPTIONS)
def test_batched_solve_equals_each_expert_solved_alone(scheme, group, options, exact):
    args = get_scheme(scheme, group_size=group).weights
    cols = 100 if options.get("partial_last_group") else 96
    weights, Hs = _experts(5, 21, cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gptq_quantize_batched(weights, Hs, args, torch.float32, **options)
        want = [gptq_quantize_stacked(ws, H, args, torch.float32, **options)
                for ws, H in zip(weights, Hs)]
    assert len(got) == 5
    for e, (g, w) in enumerate(zip(got, want)):
        assert len(g) == 2
        for (qg, dg, ig), (qw, dw, iw) in zip(g, w):
            _same((qg, dg), (qw, dw), exact)
            assert ig["dampening"] == iw["dampening"] and \
                ig["dampening_failed"] == iw["dampening_failed"]
            assert ig["dead_columns"] == iw["dead_columns"] and ig["batch"] == 5
            assert ig["output_err"] == pytest.approx(iw["output_err"], rel=1e-3)
    assert got[1][0][2]["dampening_failed"] and not got[0][0][2]["dampening_failed"]
    assert got[2][0][2]["dead_columns"] == 1


@pytest.mark.parametrize("options,exact", [(dict(actorder="static", clip=True), True),
                                           (dict(actorder=None, group_scales="dynamic"), False)])
def test_gpu_path_equals_each_expert_solved_alone(monkeypatch, options, exact):
    """On a GPU the batched solve sweeps all experts' blocks in one launch of the fused kernel
    (here the Triton interpreter), the trailing updates one batched matmul: what each expert's
    own solve there gives (dynamic scales: the whole-layer solve computes them in the kernel
    and updates with its own GEMM, equal to fp32 rounding)."""
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    args = get_scheme("W4A16_ASYM", group_size=16).weights
    weights, Hs = _experts(3, 5, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gptq_quantize_batched(weights, Hs, args, torch.float32, block_size=32, **options)
        want = [gptq_quantize_stacked(ws, H, args, torch.float32, block_size=32, **options)
                for ws, H in zip(weights, Hs)]
    for g, w in zip(got, want):
        for (qg, dg, _), (qw, dw, _) in zip(g, w):
            _same((qg, dg), (qw, dw), exact=exact)


def test_an_expert_that_never_factorises_falls_back_alone():
    args = get_scheme("W4A16", group_size=24).weights
    weights, Hs = _experts(3, 8, 48)
    Hs[1] = torch.full((48, 48), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gptq_quantize_batched(weights, Hs, args, torch.float32, max_damp=1.0)
        alone = gptq_quantize_stacked(weights[0], Hs[0], args, torch.float32, max_damp=1.0)
    assert got[1][0][2]["fallback"] == "rtn" and got[0][0][2]["fallback"] is None
    assert torch.equal(got[0][0][1], alone[0][1]) and torch.equal(got[0][1][1], alone[1][1])


@pytest.mark.parametrize("batched", [True, False])     # True: as on a GPU
def test_batched_inverse_factor_equals_the_single_one(batched):
    Hs = [_hessian(70, 200, s) for s in range(5)]
    Hs[2] = torch.ones(70, 70) - 0.05 * torch.eye(70)     # indefinite: needs frac 0.1
    Hs[3][0, 0] = float("nan")                              # never
    U, fracs, failed = inverse_cholesky_batched(torch.stack(Hs), 0.01, 10.0, batched)
    for e, H in enumerate(Hs):
        u, f, fl = inverse_cholesky(H.clone(), 0.01, 10.0)
        assert f == fracs[e] and fl == failed[e]
        assert (not U[e].any()) if e == 3 else torch.equal(U[e], u)
    assert failed[2] == [0.01] and fracs[2] == pytest.approx(0.1) and fracs[3] is None


@pytest.mark.parametrize("experts", ["all", "routed"])
def test_tiny_moe_checkpoint_is_the_same_stacked_or_not(tmp_path, text, experts):  # noqa: F811
    tensors = []
    for stack in (True, False):
        model = tiny_moe("qwen3_moe")
        model.tokenizer = TOK
        out = tmp_path / f"stack{stack}"
        r = tp.compress(model, tp.get_scheme("W4A16", group_size=16), out,
                        [tp.GPTQ(stack_experts=stack, min_tokens=24)],
                        calibration=tp.Calibration(text, 3, 32, experts=experts),
                        evaluation=None, run=tp.Run(device="cpu", progress=False))
        batch = [i.get("batch") for n, i in r["layers"].items() if ".experts." in n]
        assert all(b is None for b in batch) if not stack else max(b or 0 for b in batch) > 1
        if experts == "routed":           # 96 tokens over 8 experts: some fall back to RTN
            assert any(i.get("fallback") for i in r["layers"].values())
        tensors.append(load_file(out / "model.safetensors"))
    assert tensors[0].keys() == tensors[1].keys()
    for k in tensors[0]:
        assert torch.equal(tensors[0][k], tensors[1][k]), k
