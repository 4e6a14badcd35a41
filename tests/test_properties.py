"""Property-based tests (hypothesis) of the quantization references and the checkpoint writer
on random shapes, dtypes, group sizes and symmetries (issue #9 item 6). Small example counts:
the whole file runs in well under 30 s on one core."""
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from tritonpress.checkpoint import load_quantized_weights, save_checkpoint
from tritonpress.models import random_llama
from tritonpress.checkpoint.qweight import QuantizedWeight
from tritonpress.kernels.quant import (dequantize_ref, pack_int4_ref, quantize_per_token_ref,
                                       quantize_weight_ref, unpack_int4_ref)
from tritonpress.schemes import QuantArgs, get_scheme

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def weights(draw, bits=None):
    """(w [rows, cols], QuantArgs) with cols a multiple of the group size for group schemes."""
    num_bits = draw(st.sampled_from([4, 8])) if bits is None else bits
    strategy = draw(st.sampled_from(["group", "channel"]))
    group = draw(st.sampled_from([8, 16, 32, 48, 128])) if strategy == "group" else None
    rows = draw(st.integers(1, 9))
    cols = (group or 8) * draw(st.integers(1, 3)) if strategy == "group" else draw(st.integers(1, 70))
    sym = draw(st.booleans())
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2 ** 16))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    if draw(st.booleans()):
        w[0] = 0                                   # an all-zero row: scale must stay positive
    return w, QuantArgs(num_bits, "int", sym, strategy, group)


def _expand(p, cols):
    return p.repeat_interleave(cols // p.shape[1], dim=1)


@FAST
@given(weights())
def test_int_weight_quantization_bounds_and_round_trip(case):
    w, args = case
    q, scale, zp = quantize_weight_ref(w, args, w.dtype)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == w.dtype
    assert int(q.min()) >= args.qmin and int(q.max()) <= args.qmax
    assert (scale.float() > 0).all() and torch.isfinite(scale.float()).all()
    assert (zp is None) == args.symmetric
    deq = dequantize_ref(q, scale, zp, torch.float32)
    # round-to-nearest: every value within half a step of its group's grid (plus the rounding
    # of the scale to the weights' dtype, which moves the grid by a relative ~2^-8 at most)
    s = _expand(scale.float(), w.shape[1])
    err = (deq - w.float()).abs()
    assert (err <= s * (0.5 + 2 ** -7 * (abs(args.qmin) + 1)) + 1e-6).all()
    # quantizing the dequantized values again gives the same integers
    q2 = torch.round(deq / s + (0 if zp is None else _expand(zp.float(), w.shape[1])))
    assert torch.equal(q2.clamp(args.qmin, args.qmax).to(torch.int8), q)


@FAST
@given(st.integers(1, 7), st.integers(1, 77), st.integers(0, 2 ** 16))
def test_int4_pack_unpack_round_trip(rows, cols, seed):
    q = torch.randint(-8, 8, (rows, cols), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.int8)
    packed = pack_int4_ref(q)
    assert packed.dtype == torch.int32 and packed.shape == (rows, (cols + 7) // 8)
    assert torch.equal(unpack_int4_ref(packed, cols), q)


@FAST
@given(st.integers(1, 6), st.integers(1, 50), DTYPES, st.sampled_from(["int", "float"]),
       st.integers(0, 2 ** 16))
def test_per_token_quantization_bounds(rows, cols, dtype, kind, seed):
    x = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 5).to(dtype)
    args = QuantArgs(8, kind, True, "token", None, dynamic=True)
    q, scale = quantize_per_token_ref(x, args)
    assert scale.shape == (rows, 1) and (scale > 0).all()
    qf = q.float()
    assert (qf >= args.qmin).all() and (qf <= args.qmax).all()
    rel = ((qf * scale - x.float()).abs().amax(1) / x.float().abs().amax(1).clamp_min(1e-12))
    assert (rel <= (0.5 / 127 if kind == "int" else 2 ** -4) + 1e-3).all()


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["W4A16", "W4A16_ASYM", "W8A8_INT8", "W8A8_FP8"]),
       group=st.sampled_from([16, 32]), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       inter=st.sampled_from([64, 96]), seed=st.integers(0, 100))
def test_writer_round_trips_exact_values(tmp_path_factory, scheme, group, dtype, inter, seed):
    model = random_llama(hidden=32, intermediate=inter, heads=2, kv_heads=1, layers=1, vocab=64,
                         dtype=dtype, seed=seed, tie=True)
    sch = get_scheme(scheme, group_size=group if scheme.startswith("W4") else None)
    qw = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            q, s, zp = quantize_weight_ref(m.weight.data, sch.weights, dtype)
            qw[name] = QuantizedWeight(q, s, zp, sch.weights)
    out = save_checkpoint(model, None, qw, sch, tmp_path_factory.mktemp("w") / "ckpt")
    back = load_quantized_weights(out)
    assert back.keys() == qw.keys()
    for k, v in qw.items():
        b = back[k]
        assert b.q.dtype == v.q.dtype and torch.equal(b.q.view(torch.int8), v.q.view(torch.int8))
        assert torch.equal(b.scale, v.scale)
        assert (b.zero_point is None) == (v.zero_point is None)
        if v.zero_point is not None:
            assert torch.equal(b.zero_point, v.zero_point)
