"""compressed-tensors 0.19's newer schemes: FP8_BLOCK, NVFP4A16, NVFP4, MXFP4A16, MXFP4, W4A8,
W4AFP8. Our fp4 references against compressed-tensors' own math bit for bit, the packing, GPTQ
on the e2m1 grid, each scheme end to end (checkpoint decompressed by transformers to exactly
our weights, config as compressed-tensors' presets), and the bad inputs refused."""
import json
import sys
from pathlib import Path

import pytest
import torch

import tritonpress as tp
from tritonpress.checkpoint import load_quantized_weights
from tritonpress.kernels import fp4
from tritonpress.schemes import PRESETS, get_scheme

sys.path.insert(0, str(Path(__file__).parent))
from helpers import tiny_llama  # noqa: E402

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`")

NEW = ("FP8_BLOCK", "NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "W4A8", "W4AFP8")
NV, MX = PRESETS["NVFP4A16"].weights, PRESETS["MXFP4A16"].weights
RUN = tp.Run(device="cpu", progress=False, overwrite=True)


# ----------------------------------------------------------------------------- references

def test_e2m1_rounding_ties_and_signs_are_compressed_tensors():
    x = torch.tensor([0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 9.0, -0.1, -0.0, 0.0,
                      -0.25, -2.5, -7.0, 0.74, 1.26])
    ours, theirs = fp4.round_e2m1_ref(x), cast_to_fp4(x.clone())
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))       # -0.0 where they have it
    assert ours[:8].tolist() == [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # ties to even
    y = torch.randn(4096) * 4
    assert torch.equal(fp4.round_e2m1_ref(y), cast_to_fp4(y.clone()))


def test_e2m1_rounding_is_the_same_for_small_and_large_tensors():
    """Up to 16K values round by bucketize, beyond by comparisons: the same values and signs,
    every float within 50 ulps of each threshold included."""
    bits = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.0, 2.5, 3.5, 4.0, 5.0, 6.0]).view(torch.int32)
    near = (bits[:, None] + torch.arange(-50, 51, dtype=torch.int32)).view(torch.float32).flatten()
    x = torch.cat([near, -near, torch.randn(4000) * 4, torch.tensor([0.0, -0.0, 1e30, -1e-30])])
    small, large = fp4.round_e2m1_ref(x), fp4.round_e2m1_ref(x.repeat(3))[:len(x)]
    assert len(x) <= 16384 < 3 * len(x)
    assert torch.equal(small, large) and torch.equal(small.signbit(), large.signbit())
    assert torch.equal(small, cast_to_fp4(x.clone()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["NVFP4A16", "MXFP4A16"])
def test_fp4_quantize_matches_compressed_tensors_bit_for_bit(name, dtype):
    """Scales (global, group), packed bytes and dequantized values equal compressed-tensors'
    calculate_qparams / generate_gparam / quantize / pack_fp4_to_uint8 / dequantize, on rows of
    very different ranges, an all-zero group and a tiny negative value (stored as -0)."""
    args = PRESETS[name].weights
    w = (torch.randn(37, 96) * torch.rand(37, 1) * 3).to(dtype)
    w[3, :32], w[4, 5] = 0, -1e-9
    ca = preset_name_to_scheme(name, ["Linear"]).weights
    g = w.unflatten(-1, (-1, args.group_size))
    gs = generate_gparam(w.amin().reshape(1), w.amax().reshape(1)) if name == "NVFP4A16" else None
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), ca, global_scale=gs)
    q_ct = quantize(w, scale, None, ca, global_scale=gs)

    packed, stored, ours_gs = fp4.quantize_fp4(w, args)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 48)
    assert stored.dtype == (torch.float8_e4m3fn if name == "NVFP4A16" else torch.uint8)
    assert torch.equal(packed, pack_fp4_to_uint8(q_ct))
    eff = scale.float() if gs is None else scale.float() / gs
    assert torch.equal(fp4.effective_scale(stored, ours_gs, args), eff)
    if gs is not None:
        assert torch.equal(ours_gs, gs)
    deq = dequantize(q_ct, scale, None, ca, global_scale=gs, dtype=torch.float32)
    assert torch.equal(fp4.dequantize_fp4_ref(packed, stored, ours_gs, args), deq)
    assert (fp4.unpack_fp4_codes(packed)[4, 5] == 8)                     # -0.0


def test_mx_exponents_round_the_mantissa_up_from_1_75():
    amax = torch.tensor([1.0, 1.7, 1.75, 3.0, 3.5, 6.0, 0.0, 2.0 ** -30])
    e = fp4.mx_exponents_ref(amax).int() - 127
    assert e.tolist() == [-2, -2, -1, -1, 0, 0, -127, -32]
    from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
    assert torch.equal(fp4.mx_exponents_ref(amax[:6]).float(), generate_mx_scales(amax[:6]))


@pytest.mark.parametrize("rows,cols", [(1, 2), (5, 34), (37, 160)])
def test_pack_unpack_round_trip_on_odd_shapes(rows, cols):
    codes = torch.randint(0, 16, (rows, cols), dtype=torch.uint8)
    packed = fp4.pack_fp4_ref(codes)
    assert packed.shape == (rows, cols // 2)
    assert torch.equal(fp4.unpack_fp4_codes(packed), codes)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0])                  # even column: low nibble
    assert torch.equal(fp4.unpack_fp4_ref(packed, cols), fp4.decode_e2m1(codes))


def test_fp4_round_trip_error_is_within_half_a_step():
    w = torch.randn(23, 64)
    for args in (NV, MX):
        packed, stored, gs = fp4.quantize_fp4(w, args)
        deq = fp4.dequantize_fp4_ref(packed, stored, gs, args)
        s = fp4.effective_scale(stored, gs, args).repeat_interleave(args.group_size, 1)
        # the largest e2m1 step is 2 (4 -> 6); values beyond 6 * s saturate
        assert ((deq - w).abs() <= torch.maximum(s, (w.abs() - 6 * s).clamp(min=0)) + 1e-6).all()


def test_bad_fp4_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="not a multiple of the fp4 group size 16"):
        fp4.quantize_fp4(torch.randn(4, 40), NV)
    with pytest.raises(ValueError, match="e2m1, symmetric"):
        fp4.quantize_fp4(torch.randn(4, 32), PRESETS["W4A16"].weights)
    with pytest.raises(ValueError, match="even number of columns"):
        fp4.pack_fp4_ref(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="fixed groups"):
        get_scheme("NVFP4", group_size=32)
    with pytest.raises(ValueError, match="symmetric only"):
        get_scheme("MXFP4A16", symmetric=False)


# ----------------------------------------------------------------------------- GPTQ on e2m1

def test_gptq_on_the_fp4_grids_beats_round_to_nearest():
    from tritonpress.kernels.hessian import output_error
    from tritonpress.methods.gptq import gptq_quantize
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ (torch.eye(64) + 0.3 * torch.randn(64, 64))
    H = 2 * x.T @ x / len(x)
    w = torch.randn(48, 64)
    for args in (NV, MX):
        qw, deq, info = gptq_quantize(w, H, args, torch.float32, clip=True)
        assert qw.q.dtype == torch.uint8 and torch.equal(qw.dequantize(), deq)
        packed, stored, gs = fp4.quantize_fp4(w, args)
        rtn = fp4.dequantize_fp4_ref(packed, stored, gs, args)
        assert output_error(deq - w, H, None) < 0.8 * output_error(rtn - w, H, None)


def test_fp4_scales_without_a_search_are_the_formats_own():
    """clip=False (no Hessian blocks): each group keeps the scale RTN would give it, whatever
    candidates the search would try (a regression: MXFP4 took the first step, e - 1)."""
    from tritonpress.methods.rtn import fp4_scale_search
    w = torch.randn(19, 64)
    for args in (NV, MX):
        _, stored, gs = fp4.quantize_fp4(w, args)
        got, moved = fp4_scale_search(w, None, args, gs, shrinks=(0.9, 1.0), mx_steps=(-1, 0))
        assert torch.equal(got.view(torch.uint8), stored.view(torch.uint8)) and moved == 0


def test_fp4_scale_search_picks_the_least_output_error_of_its_candidates():
    """Each group's stored scale is a candidate whose plain dequantized error e_g H_g e_g^T is
    the least (to fp32 rounding: the errors are computed here the obvious way)."""
    from tritonpress.methods.rtn import fp4_scale_candidates, fp4_scale_search, hessian_blocks
    torch.manual_seed(3)
    w = torch.randn(37, 64) * torch.rand(37, 1)
    X = torch.randn(200, 64) * torch.rand(64) * 3
    for args in (NV, MX):
        g = args.group_size
        hb = hessian_blocks(X.T @ X, g)
        gs = fp4.quantize_fp4(w, args)[2]
        shrinks, steps = (1.0, 0.9, 0.8, 0.7), (-1, 0, 1)
        got, moved = fp4_scale_search(w, hb, args, gs, shrinks, steps)
        wg = w.reshape(37, -1, g)
        cands = fp4_scale_candidates(wg.abs().amax(-1), args, gs, shrinks, steps)
        errs = []
        for c in cands:
            s = fp4.effective_scale(c, gs, args).unsqueeze(-1)
            e = fp4.round_e2m1_ref((wg / s).clamp(-6, 6)) * s - wg            # [rows, ng, g]
            errs.append(torch.einsum("rni,nij,rnj->rn", e, hb, e))
        errs = torch.stack(errs)                                              # [cands, rows, ng]
        chosen = torch.stack([c.view(torch.uint8) for c in cands]) == got.view(torch.uint8)
        err_got = torch.where(chosen, errs, torch.inf).amin(0)    # a candidate with its scale
        assert torch.isfinite(err_got).all()
        assert (err_got <= errs.amin(0) * (1 + 1e-5) + 1e-12).all()
        assert moved > 0                            # the search moved some groups


def test_fp4_sweep_kernel_matches_its_reference_in_the_interpreter():
    from tritonpress.kernels.gptq_sweep import sweep_block_ref, sweep_block_triton
    torch.manual_seed(1)
    W1 = torch.randn(37, 64)
    A = torch.randn(64, 64)
    U = torch.linalg.cholesky(torch.linalg.inv(A @ A.T + 64 * torch.eye(64)), upper=True)
    for args in (NV, MX):
        _, stored, gs = fp4.quantize_fp4(W1, args)
        s = fp4.effective_scale(stored, gs, args)
        ref = sweep_block_ref(W1, U, s, None, args, gdiv=args.group_size)
        got = sweep_block_triton(W1, U, s, None, args, gdiv=args.group_size)
        for a, b in zip(ref, got):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each new scheme's checkpoint of one tiny bf16 Llama (default recipe), with its report."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name in NEW:
        model, tok = tiny_llama(hidden=128, intermediate=256, layers=1, dtype=torch.bfloat16)
        model.tokenizer = tok
        ev = tp.Evaluation("canterbury", 2, 32) if name in ("NVFP4", "FP8_BLOCK", "MXFP4") else None
        report = tp.compress(model, name, root / name, calibration=tp.Calibration("canterbury", 4, 32),
                             evaluation=ev, run=RUN)
        out[name] = (root / name, report)
    return out


@pytest.mark.parametrize("name", NEW)
def test_checkpoint_decompresses_in_transformers_to_exactly_our_weights(checkpoints, name):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    path, _ = checkpoints[name]
    qws = load_quantized_weights(path)
    assert len(qws) == 7
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True))
    mods = dict(model.named_modules())
    for n, qw in qws.items():
        assert torch.equal(qw.dequantize(torch.bfloat16), mods[n].weight.data), n


@pytest.mark.parametrize("name", NEW)
def test_config_is_compressed_tensors_preset_field_for_field(checkpoints, name):
    path, _ = checkpoints[name]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    preset = preset_name_to_scheme(name, ["Linear"])
    for key in ("weights", "input_activations"):
        theirs = getattr(preset, key)
        if theirs is None:
            assert group[key] is None
            continue
        mine = QuantizationArgs(**group[key])
        skip = {"observer", "actorder"}      # what llm-compressor's modifiers fill in
        assert mine.model_dump(exclude=skip) == theirs.model_dump(exclude=skip), key
    formats = {"FP8_BLOCK": "float-quantized", "NVFP4A16": "nvfp4-pack-quantized",
               "NVFP4": "nvfp4-pack-quantized", "MXFP4A16": "mxfp4-pack-quantized",
               "MXFP4": "mxfp4-pack-quantized", "W4A8": "int-quantized",
               "W4AFP8": "int-quantized"}
    assert qc["format"] == group["format"] == formats[name]


def test_nvfp4_global_scales_shared_by_fused_linears(checkpoints):
    from safetensors.torch import load_file
    t = load_file(checkpoints["NVFP4"][0] / "model.safetensors")
    p = "model.layers.0."
    g = {n: t[f"{p}{n}.weight_global_scale"] for n in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert all(v.dtype == torch.float32 and v.shape == (1,) for v in g.values())
    assert g["self_attn.q_proj"] == g["self_attn.k_proj"] == g["self_attn.v_proj"]
    assert g["mlp.gate_proj"] == g["mlp.up_proj"]
    i = {n: t[f"{p}{n}.input_global_scale"] for n in g}
    assert i["self_attn.q_proj"] == i["self_attn.v_proj"] and i["mlp.gate_proj"] == i["mlp.up_proj"]
    assert i["self_attn.o_proj"] != i["self_attn.q_proj"]
    assert t[f"{p}mlp.down_proj.weight_packed"].shape == (128, 128)
    assert t[f"{p}mlp.down_proj.weight_scale"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.mlp.down_proj.weight_global_scale" not in load_file(
        checkpoints["MXFP4"][0] / "model.safetensors")


@pytest.mark.parametrize("name", ["NVFP4", "FP8_BLOCK", "MXFP4"])
def test_evaluate_of_the_checkpoint_gives_the_reported_kl(checkpoints, name):
    """tp.evaluate reads the checkpoint back (transformers decompresses it) and simulates the
    activations (NVFP4 with each Linear's stored input_global_scale): the KL compress reported."""
    path, report = checkpoints[name]
    model, tok = tiny_llama(hidden=128, intermediate=256, layers=1, dtype=torch.bfloat16)
    model.tokenizer = tok
    base = path.parent / "base"
    if not base.exists():
        model.save_pretrained(base)
        tok.save_pretrained(base)
    e = tp.evaluate(path, str(base), evaluation=tp.Evaluation("canterbury", 2, 32), run=RUN)
    kl = report["quality"]["canterbury"]["kl"]
    assert kl > 0 and e["canterbury"]["kl"] == pytest.approx(kl, rel=2e-2)


def test_runtime_decompresses_new_formats(checkpoints):
    from tritonpress.runtime import load_compressed
    path, _ = checkpoints["NVFP4"]
    model, _ = load_compressed(str(path), dequantize=True, dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    assert q.input_global_scale.shape == (1,)
    qw = load_quantized_weights(path)["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q.weight.data, qw.dequantize(torch.bfloat16))


@pytest.mark.parametrize("name", NEW)
def test_runtime_gemm_path_runs_new_formats(checkpoints, name):
    # weights kept compressed, the GEMMs of kernels/gemm.py (their torch references on a CPU),
    # against the decompressed model with the evaluation's activation simulation
    import contextlib
    from tritonpress.checkpoint.format import quant_args_from_dict
    from tritonpress.checkpoint.reader import read_quantization_config
    from tritonpress.quality import simulate_activation_quant
    from tritonpress.runtime import CompressedLinear, load_compressed
    path, _ = checkpoints[name]
    qc = read_quantization_config(path)
    act = quant_args_from_dict(next(iter(qc["config_groups"].values())).get("input_activations"))
    packed, _ = load_compressed(str(path), dtype=torch.float32)
    assert any(isinstance(m, CompressedLinear) for m in packed.modules())
    plain, _ = load_compressed(str(path), dequantize=True, dtype=torch.float32)
    ids = torch.randint(0, packed.config.vocab_size, (1, 12))
    sim = contextlib.nullcontext() if act is None else \
        simulate_activation_quant(plain, act, qc.get("ignore", ()), "vllm")
    with torch.no_grad(), sim:
        ref = plain(ids).logits
    with torch.no_grad():
        got = packed(ids).logits
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_bad_shapes_and_recipes_are_refused_before_anything_runs(tmp_path):
    model, tok = tiny_llama(hidden=72, intermediate=144, layers=1, heads=4, kv_heads=2)
    model.tokenizer = tok
    cal = tp.Calibration("canterbury", 2, 16)
    for name, size in (("NVFP4A16", 16), ("MXFP4A16", 32), ("FP8_BLOCK", 128), ("W4A8", 128)):
        with pytest.raises(ValueError, match=f"group size {size} does not divide"):
            tp.compress(model, name, tmp_path / name, calibration=cal, evaluation=None, run=RUN)
    with pytest.raises(ValueError, match="use GPTQ"):
        tp.compress(model, "NVFP4", tmp_path / "x", [tp.RTN()], calibration=cal, evaluation=None,
                    run=RUN)
    with pytest.raises(ValueError, match="use RTN"):
        tp.compress(model, "FP8_BLOCK", tmp_path / "y", [tp.GPTQ()], calibration=cal,
                    evaluation=None, run=RUN)
    assert not any(tmp_path.iterdir())
