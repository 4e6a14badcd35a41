"""Quantization kernels (Triton; the interpreter on CPU) against their torch references, bit
for bit, on odd shapes and on the values where rounding goes wrong: exact ties, zero rows,
fp8 saturation and subnormals."""
import pytest
import torch

from tritonpress.kernels import quant as Q
from tritonpress.kernels import quant_triton
from tritonpress.schemes import QuantArgs

FP8_CH = QuantArgs(8, "float", True, "channel")
INT8_CH = QuantArgs(8, "int", True, "channel")
INT4_G64 = QuantArgs(4, "int", True, "group", 64)
INT4_G64_ASYM = QuantArgs(4, "int", False, "group", 64)
INT4_G32_ASYM = QuantArgs(4, "int", False, "group", 32)
INT4_CH = QuantArgs(4, "int", True, "channel")
INT4_CH_ASYM = QuantArgs(4, "int", False, "channel")
INT8_G128_ASYM = QuantArgs(8, "int", False, "group", 128)
FP8_TOKEN = QuantArgs(8, "float", True, "token", dynamic=True)
INT8_TOKEN = QuantArgs(8, "int", True, "token", dynamic=True)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")


def _e4m3_grid() -> torch.Tensor:
    """All finite non-negative e4m3fn values, ascending."""
    v = torch.arange(0, 128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)].sort().values


def _tie_units(args: QuantArgs) -> torch.Tensor:
    """Values of x / scale that are exact ties of the quantizer's rounding."""
    if args.type == "float":
        g = _e4m3_grid()
        mid = (g[1:] + g[:-1]) / 2
        return torch.cat([mid, -mid])
    return torch.arange(args.qmin, args.qmax) + 0.5


def _hard_weight(rows: int, cols: int, args: QuantArgs, dtype, device) -> torch.Tensor:
    """Random rows of very different magnitudes, the first five built for the edge cases;
    every value is exact in dtype."""
    assert rows >= 5
    w = torch.randn(rows, cols) * torch.logspace(-3, 2, rows)[:, None]
    s = 2.0 ** -4                                   # a power of two: exact scale in any dtype
    if args.type == "float":
        amax_u = 448.0
    elif args.symmetric:
        amax_u = (args.qmax - args.qmin) / 2
    else:
        amax_u = None
    ties = _tie_units(args)
    idx = torch.arange(cols)
    # row 0: ties of x/scale, with the values that pin the scale to exactly s
    t = ties[idx % len(ties)] * s
    if amax_u is not None:
        t[0], t[1] = amax_u * s, -amax_u * s
    else:                                           # min -8s .. max 7s: scale s, zp 0
        t[0], t[1] = args.qmin * s, args.qmax * s
    w[0] = t
    # row 1: all zeros with some -0.0 (scale falls back to eps)
    w[1] = 0.0
    w[1, ::3] = -0.0
    # row 2: a wide dynamic range (fp8 subnormals and flushes to zero)
    w[2] = torch.randn(cols).sign() * 10 ** (torch.rand(cols) * 7 - 6)
    # row 3: large values
    w[3] = torch.randn(cols) * 3e3
    if args.type == "int" and not args.symmetric:
        # row 4: one-sided range, min -3s, max 12s: zero point -5, ties in between
        t = (torch.arange(cols) % 15 - 3 + 0.5) * s
        t[0], t[1] = -3 * s, 12 * s
        w[4] = t
    return w.to(dtype).to(device)


def _bits(q: torch.Tensor) -> torch.Tensor:
    q = q.cpu()
    return q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        gb, wb = _bits(g), _bits(w)
        bad = (gb != wb).nonzero()
        assert bad.numel() == 0, f"{len(bad)} mismatches, first at {bad[:3].tolist()}: " \
                                 f"{gb[tuple(bad[0])]} vs {wb[tuple(bad[0])]}"


# ----------------------------------------------------------------------------- weights

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args,shape", [
    (FP8_CH, (37, 200)), (INT8_CH, (37, 200)), (INT4_CH, (37, 200)), (INT4_CH_ASYM, (37, 203)),
    (INT4_G64, (5, 576)), (INT4_G64_ASYM, (5, 576)), (INT4_G32_ASYM, (7, 96)),
    (INT8_G128_ASYM, (6, 384)),
], ids=lambda a: f"{a.num_bits}{a.type}-{a.strategy}{a.group_size or ''}-"
                 f"{'sym' if a.symmetric else 'asym'}" if isinstance(a, QuantArgs) else None)
def test_quantize_weight_matches_reference(triton_backend, device, args, shape, dtype):
    w = _hard_weight(*shape, args, dtype, device)
    _assert_same(Q.quantize_weight(w, args), Q.quantize_weight_ref(w.cpu(), args))


@pytest.mark.parametrize("scale_dtype", DTYPES, ids=str)
def test_quantize_weight_scale_dtype_differs_from_input(triton_backend, device, scale_dtype):
    w = _hard_weight(9, 128, INT4_G64_ASYM, torch.float32, device)
    _assert_same(Q.quantize_weight(w, INT4_G64_ASYM, scale_dtype),
                 Q.quantize_weight_ref(w.cpu(), INT4_G64_ASYM, scale_dtype))


@pytest.mark.parametrize("args,shape,max_block", [
    (FP8_CH, (5, 333), 64), (INT4_CH_ASYM, (5, 333), 32), (INT4_G64_ASYM, (5, 256), 16)])
def test_long_rows_swept_in_chunks_match_reference(triton_backend, device, args, shape,
                                                   max_block):
    w = _hard_weight(*shape, args, torch.bfloat16, device)
    gs = args.group_size or shape[1]
    got = quant_triton.quantize_groups_triton(w, args, gs, torch.bfloat16, max_block=max_block)
    _assert_same(got, Q.quantize_weight_ref(w.cpu(), args))
    packed = quant_triton.quantize_groups_triton(w, args, gs, torch.bfloat16, pack=True,
                                                 max_block=max_block)
    if args.type == "int":
        _assert_same(packed, Q.quantize_pack_int4_ref(w.cpu(), args))


@pytest.mark.parametrize("args", [FP8_CH, INT8_CH, INT4_G64_ASYM], ids=["fp8", "int8", "int4"])
def test_rtn_runs_the_fused_kernel_bit_for_bit(monkeypatch, device, args):
    """rtn_quantize (the RTN method, FP8's default) quantizes through quantize_weight: the
    kernel under the Triton backend, the same bytes as the torch path."""
    from tritonpress.methods.rtn import rtn_quantize
    w = _hard_weight(9, 192, args, torch.bfloat16, device)
    monkeypatch.setenv("TRITONPRESS_BACKEND", "torch")
    qw0, deq0 = rtn_quantize(w.cpu(), args)
    calls, launch = [], quant_triton.quantize_groups_triton
    monkeypatch.setattr(quant_triton, "quantize_groups_triton",
                        lambda *a, **k: calls.append(1) or launch(*a, **k))
    monkeypatch.setenv("TRITONPRESS_BACKEND", "triton")
    qw, deq = rtn_quantize(w, args)
    assert calls == [1]
    _assert_same((qw.q, qw.scale, qw.zero_point, deq), (qw0.q, qw0.scale, qw0.zero_point, deq0))


def test_non_contiguous_weight(triton_backend, device):
    w = _hard_weight(64, 40, INT8_CH, torch.bfloat16, device).t()   # [40, 64], strided
    _assert_same(Q.quantize_weight(w, INT8_CH), Q.quantize_weight_ref(w.cpu(), INT8_CH))


# ----------------------------------------------------------------------------- activations

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("args", [FP8_TOKEN, INT8_TOKEN], ids=["fp8", "int8"])
def test_quantize_per_token_matches_reference(triton_backend, device, args, dtype):
    x = _hard_weight(21, 333, args, dtype, device)[torch.randperm(21)].reshape(3, 7, 333)
    got = Q.quantize_per_token(x, args)
    assert got[0].shape == (3, 7, 333) and got[1].shape == (3, 7, 1)
    _assert_same(got, Q.quantize_per_token_ref(x.cpu(), args))


def test_quantize_per_token_strided_rows(triton_backend, device):
    x = _hard_weight(11, 400, FP8_TOKEN, torch.bfloat16, device)[:, :333]   # row stride 400
    _assert_same(Q.quantize_per_token(x, FP8_TOKEN), Q.quantize_per_token_ref(x.cpu(), FP8_TOKEN))


# ----------------------------------------------------------------------------- fp8 rounding

def _fp8_probe_values() -> torch.Tensor:
    """Every e4m3 value, every midpoint, one fp32 ulp either side of each, saturation, junk."""
    g = _e4m3_grid()
    mid = (g[1:] + g[:-1]) / 2
    near = torch.cat([torch.nextafter(mid, torch.tensor(0.0)),
                      torch.nextafter(mid, torch.tensor(1e9))])
    big = torch.tensor([447.9, 448.0, 455.9, 464.0, 464.1, 1e6, float("inf")])
    rnd = torch.randn(20000) * 10 ** (torch.rand(20000) * 9 - 5)
    v = torch.cat([g, mid, near, big, rnd, torch.tensor([0.0, -0.0, 2.0 ** -10, 2.0 ** -20])])
    return torch.cat([v, -v])


def test_fp8_reference_is_nearest_even_saturating():
    """fp8_round_ref (torch's cast after a clamp) against the e4m3 grid computed here."""
    g = _e4m3_grid().double()
    v = _fp8_probe_values().abs()
    x = v.double().clamp(max=448.0)
    i = torch.searchsorted(g, x).clamp(1, len(g) - 1)
    lo, hi = g[i - 1], g[i]
    tie_hi = (i % 2 == 0)               # grid index parity is the mantissa's last bit
    pick_hi = (hi - x < x - lo) | ((hi - x == x - lo) & tie_hi) | (x == hi)
    expect = torch.where(pick_hi, hi, lo).float()
    got = Q.fp8_round_ref(v)
    assert torch.equal(got, expect)


def test_fp8_round_kernel_matches_torch_cast(triton_backend, device):
    x = _fp8_probe_values()
    got = Q.fp8_round(x.to(device)).cpu()
    want = Q.fp8_round_ref(x)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))   # -0.0 included
    assert torch.isnan(Q.fp8_round(torch.tensor([float("nan")], device=device))).all()


# ----------------------------------------------------------------------------- int4 packing

@pytest.mark.parametrize("shape", [(13, 333), (4, 5), (3, 8), (2, 1)])
def test_pack_unpack_match_reference_and_round_trip(triton_backend, device, shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8)
    q[0, :] = torch.tensor([-8, 7] * shape[1])[:shape[1]]
    packed = Q.pack_int4(q.to(device))
    assert packed.shape == (shape[0], (shape[1] + 7) // 8) and packed.dtype == torch.int32
    assert torch.equal(packed.cpu(), Q.pack_int4_ref(q))
    assert torch.equal(Q.unpack_int4(packed, shape[1]).cpu(), q)
    assert torch.equal(Q.unpack_int4_ref(packed.cpu(), shape[1]), q)


@pytest.mark.parametrize("args,shape", [
    (INT4_CH_ASYM, (37, 203)), (INT4_CH, (6, 333)), (INT4_G64_ASYM, (5, 576)),
    (QuantArgs(4, "int", False, "group", 12), (5, 36))])    # groups sharing a word
def test_fused_quantize_pack_matches_reference(triton_backend, device, args, shape):
    w = _hard_weight(*shape, args, torch.bfloat16, device)
    _assert_same(Q.quantize_pack_int4(w, args), Q.quantize_pack_int4_ref(w.cpu(), args))


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("args", [INT4_G64, INT4_G64_ASYM, INT8_CH, FP8_CH],
                         ids=["int4-sym", "int4-asym", "int8", "fp8"])
def test_dequantized_error_within_half_a_step(triton_backend, device, args):
    w = torch.randn(16, 192, device=device) * torch.logspace(-2, 1, 16, device=device)[:, None]
    q, scale, zp = Q.quantize_weight(w, args, torch.float32)
    w_hat = Q.dequantize_ref(q.cpu(), scale.cpu(), None if zp is None else zp.cpu())
    err = (w_hat - w.cpu()).abs()
    s = scale.cpu().float().repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    if args.type == "float":      # half an e4m3 step: 2**-4 relative, 2**-10 absolute below 2**-6
        y = (w.cpu() / s).abs()
        step = torch.where(y < 2 ** -6, torch.full_like(y, 2.0 ** -9),
                           2.0 ** (y.log2().floor() - 3))
        bound = step / 2 * s
    else:
        bound = s / 2
    assert (err <= bound * (1 + 1e-5) + w.cpu().abs() * 1e-6).all()   # + fp32 rounding
    assert err.max() > 0.3 * bound.max()      # really quantized


# ----------------------------------------------------------------------------- dispatch, errors

def test_cpu_tensors_use_the_reference_by_default(monkeypatch):
    monkeypatch.delenv("TRITONPRESS_BACKEND", raising=False)
    calls = []
    monkeypatch.setattr(quant_triton, "quantize_groups_triton", lambda *a, **k: calls.append(1))
    w = torch.randn(4, 64)
    _assert_same(Q.quantize_weight(w, INT4_G64), Q.quantize_weight_ref(w, INT4_G64))
    Q.quantize_per_token(w, INT8_TOKEN)
    assert calls == []


def test_bad_inputs_raise_clear_errors(triton_backend):
    w = torch.randn(4, 100)
    with pytest.raises(ValueError, match="multiple of group size"):
        Q.quantize_weight(w, INT4_G64)
    with pytest.raises(ValueError, match="symmetric only"):
        Q.quantize_weight(w, QuantArgs(8, "float", False, "channel"))
    with pytest.raises(ValueError, match="2-D"):
        Q.quantize_weight(w[0], INT8_CH)
    with pytest.raises(ValueError, match="do not hold 100 columns"):
        Q.unpack_int4(torch.zeros(4, 12, dtype=torch.int32), 100)
    with pytest.raises(ValueError, match="at most 4 bits"):
        Q.quantize_pack_int4(w, INT8_CH)
    with pytest.raises(ValueError, match="scale dtype"):
        Q.quantize_weight(w, INT8_CH, torch.float64)


def test_benchmark_script_runs_reduced_on_cpu(triton_backend, monkeypatch, capsys):
    import importlib.util
    import pathlib
    if torch.cuda.is_available():
        pytest.skip("the full benchmark is for a GPU session, not the test suite")
    path = pathlib.Path(__file__).parents[1] / "bench" / "bench_quant_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_quant_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr("sys.argv", ["bench_quant_kernels.py", "--shapes", "16x256"])
    bench.main()
    out = capsys.readouterr().out
    assert "no CUDA GPU" in out and "unpack int4" in out
    rows = [line for line in out.splitlines() if "16x256" in line]
    assert len(rows) == 10 and all(line.split()[-1] == "yes" for line in rows)


def test_fp8_to_float_is_torchs_conversion_for_every_code():
    from tritonpress.kernels.quant import fp8_to_float
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    got, want = fp8_to_float(codes), codes.float()
    assert got.dtype == torch.float32
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite])
    assert torch.equal(got[finite].signbit(), want[finite].signbit())     # -0.0 stays -0.0
    q = (torch.randn(37, 53) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).t()  # strided
    assert torch.equal(fp8_to_float(q), q.float())
