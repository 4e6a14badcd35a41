"""Mixture-of-Experts: every routed expert compressed, calibrated and written as the model's
original checkpoints name it (loop/experts.py), on tiny random models of each family."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tritonpress as tp
from tritonpress.loop import experts
from tritonpress.models import byte_tokenizer
from tritonpress.runtime import load_compressed

ROOT = Path(__file__).resolve().parents[1]
TOK = byte_tokenizer()
COMMON = dict(vocab_size=len(TOK), num_hidden_layers=2, num_attention_heads=4, hidden_size=64)


def _config(family):
    import transformers as t
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=2, num_key_value_heads=2,
                                head_dim=16, tie_word_embeddings=False)
    if family == "qwen2_moe":        # a shared expert and its gate
        return t.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_experts=8,
                                num_experts_per_tok=2, num_key_value_heads=2)
    if family == "mixtral":          # w1/w3/w2 under block_sparse_moe in its checkpoints
        return t.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8,
                               num_experts_per_tok=2, num_key_value_heads=2)
    if family == "deepseek_v3":      # a dense first layer, shared experts, grouped routing
        return t.DeepseekV3Config(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                  first_k_dense_replace=1, num_key_value_heads=4,
                                  q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
    if family == "gpt_oss":          # transposed, interleaved gate/up with biases
        return t.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=8,
                              num_experts_per_tok=2, num_key_value_heads=2, head_dim=16,
                              layer_types=["full_attention"] * 2)
    raise KeyError(family)


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def tiny_moe(family, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((ROOT / "README.md").read_text() * 2)
    return str(path)


def _saved(family, folder):
    model = tiny_moe(family).to(torch.bfloat16)
    model.save_pretrained(folder)
    TOK.save_pretrained(folder)
    return model


def _tensors(folder):
    out = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_slice(k) for k in s.keys()})
    return out


def _weight_names(names):
    """compressed-tensors suffixes back to the plain weight each came from."""
    return {n.replace(".weight_packed", ".weight").replace(".weight_scale", ".weight")
             .replace(".weight_shape", ".weight").replace(".weight_zero_point", ".weight")
            for n in names}


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_experts_compute_what_the_fused_ones_did(family):
    model = tiny_moe(family)
    ids = torch.randint(3, 250, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        found = experts.linearize_experts(model)
        assert found and all(v == 8 for v in found.values())
        assert not any(experts.is_fused_experts(m) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
        with experts.every_token(model):          # statistics from every token, same output
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)
            routed = sum(int(m.routed.sum()) for m in experts.moe_blocks(model).values())
    assert routed == len(found) * ids.numel() * 2          # top-2 of each token, per block


def test_only_statistics_passes_send_every_token_and_they_skip_the_down_matmuls():
    model = tiny_moe("qwen3_moe")
    experts.linearize_experts(model)
    block = next(iter(experts.moe_blocks(model).values()))
    rows, matmuls = {}, []
    for e, ex in enumerate(block):
        down = ex.projections()[2]
        down.register_forward_pre_hook(
            lambda m, a, e=e: rows.__setitem__(e, rows.get(e, 0) + a[0].shape[0]))
        down.register_forward_hook(lambda m, a, y, e=e: matmuls.append(e))
    ids = torch.randint(3, 250, (2, 16))
    with torch.no_grad(), experts.every_token(model):
        with experts.statistics_pass(model):
            model(ids)
        assert rows == {e: ids.numel() for e in range(8)} and not matmuls
        rows.clear()
        model(ids)          # a pass whose output is read: the routed tokens alone
    assert sum(rows.values()) == ids.numel() * 2 and sorted(set(matmuls)) == sorted(rows)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["W4A16", "W8A8_FP8"])
def test_every_routed_expert_is_compressed_and_named_as_the_original(tmp_path, text, family,
                                                                     scheme):
    base = tmp_path / "base"
    _saved(family, base)
    out = tmp_path / "ckpt"
    sch = tp.get_scheme(scheme, group_size=16) if scheme == "W4A16" else scheme
    r = tp.compress(str(base), sch, out, calibration=tp.Calibration(text, 4, 32),
                    evaluation=None, run=tp.Run(device="cpu", progress=False))
    # the report counts the experts of every MoE block: all compressed
    layers = r["experts"]["layers"]
    assert layers and all(v["experts"] == 8 and v["compressed"] == 8 and v["fell_back"] == 0
                          for v in layers.values())
    t = _tensors(out)
    with safe_open(base / "model.safetensors", "pt") as s:
        original = set(s.keys())
    # per-expert tensors under the original checkpoint's names (Mixtral: block_sparse_moe.w1);
    # gpt-oss's own checkpoints keep the fused tensors: per-expert names are ours there
    if family != "gpt_oss":
        assert _weight_names(t) == original
    else:
        assert {n for n in original if ".experts." not in n} < _weight_names(t)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    suffix = ".weight_packed" if scheme == "W4A16" else ".weight_scale"
    quantized = {n.removesuffix(suffix) for n in t if n.endswith(suffix)}
    routed = {n for n in quantized if ".experts." in n and ".shared_expert" not in n}
    assert len(routed) == 8 * 3 * len(layers)            # every routed expert's 3 matrices
    # the routers (and Qwen2-MoE's shared-expert gate) stay 16-bit and are in ignore
    for name in qc["ignore"]:
        if name == "lm_head":
            continue
        assert t[f"{name}.weight"].get_dtype() in ("BF16", "F16", "F32"), name
    routers = [n for n in qc["ignore"] if n.endswith((".gate", ".router", "shared_expert_gate"))]
    assert len(routers) >= len(layers)
    # the report names what stayed unquantized: each router (in-memory names) and lm_head
    kept = r["not_quantized"]
    assert kept["lm_head"] == "ignore"
    assert sum(n.endswith((".gate", ".router", "shared_expert_gate")) and why == "ignore"
               for n, why in kept.items()) == len(routers)


@pytest.mark.parametrize("scheme,recipe", [
    ("W8A8_INT8", None), ("W8A8_INT8", "sq"), ("W4A16_ASYM", "awq"), ("W8A8_FP8_24", None),
    ("NVFP4A16", None), ("NVFP4", None), ("MXFP4A16", None), ("W4A8", None), ("W4AFP8", None)])
def test_every_scheme_and_method_compresses_every_routed_expert(tmp_path, text, scheme, recipe):
    """The schemes and methods beyond the two above, on one family: each routed expert's three
    matrices are written compressed, the report counts them, the routers stay 16-bit."""
    model = tiny_moe("qwen3_moe")
    model.tokenizer = TOK
    sch = tp.get_scheme(scheme, group_size=16) if scheme in ("W4A16_ASYM", "W4A8", "W4AFP8") \
        else scheme
    rec = {None: None, "sq": [tp.SmoothQuant(0.8), tp.GPTQ()], "awq": [tp.AWQ()]}[recipe]
    r = tp.compress(model, sch, tmp_path / "ckpt", rec, calibration=tp.Calibration(text, 4, 32),
                    evaluation=None, run=tp.Run(device="cpu", progress=False))
    layers = r["experts"]["layers"]
    assert layers and all(v["compressed"] == 8 and v["fell_back"] == 0 for v in layers.values())
    t = _tensors(tmp_path / "ckpt")
    # every routed expert's three matrices carry a weight scale (compressed in some form)
    quantized = {n.removesuffix(".weight_scale") for n in t if n.endswith(".weight_scale")}
    assert len({n for n in quantized if ".experts." in n}) == 8 * 3 * len(layers)
    assert all(t[f"{n}.weight"].get_dtype() != "F32" for n in quantized if f"{n}.weight" in t)
    for name in json.loads((tmp_path / "ckpt" / "config.json").read_text())[
            "quantization_config"]["ignore"]:
        if name != "lm_head":       # the model's own dtype (fp32 here)
            assert t[f"{name}.weight"].get_dtype() == "F32", name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_moe_streams_layer_by_layer_and_writes_what_the_whole_model_writes(tmp_path, text,
                                                                          family):
    """Streamed, the skeleton's experts are Linears read under their stored names (Mixtral's
    block_sparse_moe.experts.N.w1); the checkpoint equals the in-memory run's, byte for byte.
    gpt-oss stores its experts fused: it cannot stream, and the report says so."""
    base = tmp_path / "base"
    _saved(family, base)
    outs = {}
    for stream in ("on", "off"):
        if family == "gpt_oss" and stream == "on":
            with pytest.raises(ValueError, match="tensor names do not match"):
                tp.compress(str(base), "W8A8_FP8", tmp_path / "x", run=tp.Run(
                    device="cpu", progress=False, stream="on"), evaluation=None)
            r = tp.compress(str(base), "W8A8_FP8", tmp_path / "auto", evaluation=None,
                            run=tp.Run(device="cpu", progress=False))
            assert any("not streamed" in n for n in r["notes"])
            continue
        outs[stream] = tmp_path / stream
        r = tp.compress(str(base), tp.get_scheme("W4A16", group_size=16), outs[stream],
                        calibration=tp.Calibration(text, 4, 32), evaluation=None,
                        run=tp.Run(device="cpu", progress=False, stream=stream))
        assert r["experts"]["blocks"] >= 1
        assert all(v["compressed"] == 8 for v in r["experts"]["layers"].values())
    if family == "gpt_oss":
        return
    on, off = _tensors(outs["on"]), _tensors(outs["off"])
    assert set(on) == set(off)
    with safe_open(outs["on"] / "model.safetensors", "pt") as a, \
            safe_open(outs["off"] / "model.safetensors", "pt") as b:
        for k in a.keys():
            assert torch.equal(a.get_tensor(k).view(torch.uint8),
                               b.get_tensor(k).view(torch.uint8)), k
    qc_on = json.loads((outs["on"] / "config.json").read_text())["quantization_config"]
    qc_off = json.loads((outs["off"] / "config.json").read_text())["quantization_config"]
    assert qc_on == qc_off


def test_runtime_runs_the_moe_checkpoint_as_it_was_computed(tmp_path, text):
    model = tiny_moe("mixtral")
    model.tokenizer = TOK
    tp.compress(model, tp.get_scheme("W4A16", group_size=16), tmp_path / "ckpt",
                calibration=tp.Calibration(text, 4, 32), evaluation=None,
                run=tp.Run(device="cpu", progress=False))
    rt, _ = load_compressed(tmp_path / "ckpt", dtype=torch.float32)
    ids = torch.randint(3, 250, (2, 24))
    with torch.no_grad():      # the compressed model in memory holds the dequantized weights
        torch.testing.assert_close(rt(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-4)


def test_rarely_routed_experts_fall_back_and_the_report_says_so(tmp_path, text):
    model = tiny_moe("qwen3_moe")
    model.tokenizer = TOK
    r = tp.compress(model, tp.get_scheme("W4A16", group_size=16), None,
                    calibration=tp.Calibration(text, 2, 32, experts="routed"),
                    evaluation=None, run=tp.Run(device="cpu", progress=False,
                                                print_report=True))
    layers = r["experts"]["layers"].values()
    assert sum(v["fell_back"] for v in layers) > 0         # 64 tokens, 8 experts, top-2
    assert all(v["compressed"] + v["fell_back"] == 8 for v in layers)
    assert all(v["least_routed_share"] < 0.25 for v in layers)
    fell = [i for n, i in r["layers"].items() if ".experts." in n and i.get("fallback")]
    assert fell and all(i["fallback"] == "rtn" and i["tokens"] < 16 for i in fell)
    with pytest.raises(ValueError, match="Calibration\\(experts='all'\\)"):
        tp.compress(tiny_moe("qwen3_moe"), "W4A16_ASYM", None, [tp.AWQ()],
                    calibration=tp.Calibration(text, 2, 32, experts="routed"),
                    evaluation=None, run=tp.Run(device="cpu", progress=False))


def test_evaluate_reads_an_moe_checkpoint(tmp_path, text):
    base = tmp_path / "base"
    _saved("qwen3_moe", base)
    r = tp.compress(str(base), tp.get_scheme("W4A16", group_size=16), tmp_path / "ckpt",
                    calibration=tp.Calibration(text, 4, 32),
                    evaluation=tp.Evaluation(text, 2, 32), run=tp.Run(device="cpu",
                                                                     progress=False))
    e = tp.evaluate(tmp_path / "ckpt", str(base), evaluation=tp.Evaluation(text, 2, 32),
                    run=tp.Run(device="cpu", progress=False))
    assert e[text]["kl"] == pytest.approx(r["quality"][text]["kl"], rel=1e-3)


LLMC = ROOT / ".venv-llmc" / "bin" / "python"


@pytest.mark.skipif(not (os.environ.get("TRITONPRESS_LLMC_TESTS") and LLMC.exists()),
                    reason="opt-in: TRITONPRESS_LLMC_TESTS=1 with make llmc-env")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("scheme,recipe", [("W4A16", "gptq-w4a16"), ("W8A8_FP8", "fp8")])
def test_names_dtypes_and_shapes_match_llm_compressor(tmp_path, text, family, scheme, recipe):
    base = tmp_path / "base"
    _saved(family, base)
    ids = torch.randint(3, 250, (4, 32))
    torch.save(ids, tmp_path / "calib.pt")
    subprocess.run([str(LLMC), str(ROOT / "bench" / "llmc_oneshot.py"), "--model", str(base),
                    "--calib", str(tmp_path / "calib.pt"), "--recipe", recipe,
                    "--group-size", "16", "--out", str(tmp_path / "llmc")], check=True,
                   capture_output=True)
    sch = tp.get_scheme(scheme, group_size=16) if scheme == "W4A16" else scheme
    tp.compress(str(base), sch, tmp_path / "ours", calibration=tp.Calibration(text, 4, 32),
                evaluation=None, run=tp.Run(device="cpu", progress=False))
    ours, theirs = _tensors(tmp_path / "ours"), _tensors(tmp_path / "llmc")
    if family == "mixtral":     # llm-compressor names Mixtral's experts gate/up/down_proj, its
        # checkpoints w1/w3/w2 (ours): vLLM's Mixtral loader maps the former onto the latter
        names = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
        theirs = {_sub(k, names): v for k, v in theirs.items()}
    assert set(ours) == set(theirs)
    for k in ours:
        assert (ours[k].get_dtype(), ours[k].get_shape()) == \
            (theirs[k].get_dtype(), theirs[k].get_shape()), k
    qc = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
          for d in ("ours", "llmc")]
    assert set(qc[0]["ignore"]) >= set(qc[1]["ignore"]) - {"lm_head"}, (qc[0]["ignore"],
                                                                         qc[1]["ignore"])


def _sub(name, pairs):
    for a, b in pairs.items():
        name = name.replace(a, b)
    return name


def test_experts_under_llm_compressors_names_read_the_same(tmp_path, text):
    """llm-compressor names Mixtral's experts gate/up/down_proj (vLLM maps them to w1/w3/w2):
    the reader takes either, with the same weights."""
    from safetensors.torch import load_file, save_file
    model = tiny_moe("mixtral")
    model.tokenizer = TOK
    tp.compress(model, tp.get_scheme("W4A16", group_size=16), tmp_path / "ours",
                calibration=tp.Calibration(text, 4, 32), evaluation=None,
                run=tp.Run(device="cpu", progress=False))
    import shutil
    shutil.copytree(tmp_path / "ours", tmp_path / "theirs")
    f = tmp_path / "theirs" / "model.safetensors"
    names = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
    save_file({_sub(k, names): v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    ids = torch.randint(3, 250, (2, 16))
    with torch.no_grad():
        a = load_compressed(tmp_path / "ours", dtype=torch.float32)[0](ids).logits
        b = load_compressed(tmp_path / "theirs", dtype=torch.float32)[0](ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
