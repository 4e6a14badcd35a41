"""compress() end to end on a tiny model, every scheme with its methods, as a user calls it:
the checkpoint it writes is what transformers loads, and the report says what happened."""
import json

import pytest
import torch

import tritonpress
from tritonpress.cli import main
from tritonpress.checkpoint import load_dequantized, load_quantized_weights
from helpers import tiny_llama

from tritonpress.cli import compress_from_flags as compress

from test_distributed import write_text

CASES = [("W8A8_FP8", "rtn", {}), ("W4A16", "gptq", {"group_size": 32}),
         ("W8A8_INT8", "gptq", {"smoothquant": 0.5}),
         ("W4A16_ASYM", "awq", {"group_size": 32}),
         ("W8A8_FP8_24", "sparsegpt", {}), ("W8A8_FP8_24", "magnitude", {})]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.mark.parametrize("scheme,method,opts", CASES, ids=[f"{s}-{m}" for s, m, _ in CASES])
def test_compress_writes_a_checkpoint_transformers_loads(tmp_path, text, scheme, method, opts):
    model, tok = tiny_llama(seed=1)
    model = model.to(torch.bfloat16)      # as models are loaded
    model.tokenizer = tok
    out = tmp_path / "ckpt"
    report = compress(model, scheme, str(out), method=method, dataset=text, num_samples=8,
                      seq_len=32, eval_dataset=text, eval_windows=2, eval_seq_len=32,
                      progress=False, device="cpu", **opts)
    # the report: quality before/after on the held-out windows, times, size
    q = report["quality"][text]
    assert q["kl"] > 0 and q["ppl"] > 1 and q["ppl_before"] > 1
    assert report["size_bytes"] > 0 and report["seconds"]["compress"] >= 0
    assert json.loads((tmp_path / "ckpt.report.json").read_text())["scheme"] == scheme
    # what vLLM's CPU build will do beyond the simulated KL is said (W4A8 on AMX CPUs)
    assert any("W4A8" in n for n in report["notes"]) == scheme.startswith("W4A16")
    # where the compress seconds went: the method's steps, adding up to the compress time
    prof = report["profile"]
    want_steps = {"rtn": {"rtn"}, "magnitude": set(), "awq": {"awq search", "statistics pass"},
                  "gptq": {"statistics pass", "hessian", "gptq solve", "propagate"},
                  "sparsegpt": {"hessian", "sparsegpt solve", "propagate"}}[method]
    assert want_steps <= set(prof) and "other" in prof
    assert sum(v["seconds"] for v in prof.values()) == pytest.approx(
        report["seconds"]["compress"], abs=0.01 * len(prof))

    # transformers decompresses exactly the weights the compressed model computed with
    loaded, act_args, ignore = load_dequantized(out)
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    assert "lm_head" in ignore
    assert (act_args is None) == scheme.startswith("W4A16")
    # GPTQ ran in static activation order by default (llm-compressor's); the checkpoint and
    # the report say so, and say null for every other method; SparseGPT sweeps its 2:4
    # groups in that order too, which the report says and the checkpoint has no field for
    want = "static" if method == "gptq" else None
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == want
    assert report["options"]["actorder"] == ("static" if method in ("gptq", "sparsegpt")
                                             else None)
    if method == "gptq":
        assert all(i["actorder"] == "static" for i in report["layers"].values())
    if scheme == "W8A8_FP8_24":
        assert all(qw.is_24_sparse() for qw in load_quantized_weights(out).values())


def test_cli_compress_and_eval(tmp_path, text, monkeypatch, capsys):
    model, tok = tiny_llama(seed=2)
    model = model.to(torch.bfloat16)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    out = tmp_path / "w4"
    args = ["--model", str(base), "--eval-dataset", text, "--eval-windows", "2",
            "--eval-seq-len", "32", "--no-progress"]
    assert main(["compress", *args, "--scheme", "W4A16", "--group-size", "32", "--out", str(out),
                 "--dataset", text, "--num-samples", "8", "--seq-len", "32"]) == 0
    assert "held-out text" in capsys.readouterr().out
    assert main(["eval", *args, "--checkpoint", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r[text]["kl"] > 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "static"     # the default
    # --actorder none: GPTQ in column order, recorded as null
    off = tmp_path / "w4-none"
    assert main(["compress", *args, "--scheme", "W4A16", "--group-size", "32", "--out", str(off),
                 "--dataset", text, "--num-samples", "8", "--seq-len", "32", "--no-eval",
                 "--actorder", "none"]) == 0
    assert "(gptq, actorder none)" in capsys.readouterr().out
    qc = json.loads((off / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] is None
    assert json.loads((tmp_path / "w4-none.report.json").read_text())["options"]["actorder"] is None
    with pytest.raises(SystemExit):
        main(["compress", *args, "--out", str(tmp_path / "x"), "--actorder", "desc"])
    assert "static" in capsys.readouterr().err
    # an existing output directory is refused with a message naming the way out
    assert main(["compress", *args, "--scheme", "W4A16", "--group-size", "32", "--out", str(out),
                 "--dataset", text, "--num-samples", "8", "--seq-len", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _saved_tensors(ckpt):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_dtype_auto_keeps_an_fp32_model_fp32(tmp_path, text, capsys):
    from tritonpress.report import format_report
    from tritonpress.loop.resume import fingerprint
    model, tok = tiny_llama(seed=3)                 # fp32, saved as such
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    common = dict(method="rtn", progress=False, device="cpu", eval_dataset=text,
                  eval_windows=2, eval_seq_len=32)

    r = compress(str(base), "W8A8_INT8", str(tmp_path / "auto"), **common)
    assert r["dtype"] == {"dtype": "float32", "why": "auto: the model's own (dtype in config.json)"}
    t = _saved_tensors(tmp_path / "auto")
    assert t["model.embed_tokens.weight"].dtype == torch.float32
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert t["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8   # quantized as before
    assert torch.equal(t["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    # the report says which dtype and which activation convention the KL was measured with
    assert r["quality"]["act_sim"].startswith("vllm: int8 per token") and "/ 127)" in \
        r["quality"]["act_sim"]
    text_out = format_report(r)
    assert "dtype: float32 (auto" in text_out and "activations: vllm" in text_out
    # what stayed unquantized is named, never silent: lm_head by the default ignore list
    assert r["not_quantized"] == {"lm_head": "ignore"}
    assert "not quantized (float32): 1 Linear(s), lm_head (ignore)" in text_out

    r = compress(str(base), "W8A8_INT8", str(tmp_path / "bf16"), dtype="bfloat16",
                 act_sim="compressed-tensors", **common)
    assert r["dtype"] == {"dtype": "bfloat16", "why": "asked for"}
    assert "absmax / 127.5" in r["quality"]["act_sim"]
    t = _saved_tensors(tmp_path / "bf16")
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    # the resume fingerprint pins parameter dtypes: an fp32 run never resumes a bf16 one
    fp = [fingerprint(m, None, None, {})["parameters"]
          for m in (model, tiny_llama(seed=3)[0].to(torch.bfloat16))]
    assert fp[0] != fp[1]

    with pytest.raises(ValueError, match="auto, bfloat16, float16, float32"):
        compress(str(base), "W8A8_INT8", None, dtype="bf16", **common)
    with pytest.raises(ValueError, match="vllm, compressed-tensors"):
        compress(str(base), "W8A8_INT8", None, act_sim="exact", **common)
    with pytest.raises(ValueError, match=r"actorder='group': use 'static'.*None/'none'"):
        compress(str(base), "W8A8_INT8", None, **dict(common, method="gptq"), actorder="group")
    with pytest.raises(ValueError, match="actorder do not apply to method rtn"):
        compress(str(base), "W8A8_INT8", None, actorder="static", **common)
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(base), "--out", str(tmp_path / "x"), "--dtype", "half"])
    assert "float32" in capsys.readouterr().err


def test_recipes_and_options_are_checked_before_any_work(tmp_path):
    """Each method's defaults live on its object; bad values, recipes and combinations are
    refused when made or at compress()'s door, naming the argument and the way out."""
    import dataclasses
    import inspect

    from tritonpress.recipe import default_recipe, recipe_from_flags, resolve_recipe
    from tritonpress.schemes import get_scheme

    assert len(inspect.signature(tritonpress.compress).parameters) <= 8
    w4, fp8, s24 = get_scheme("W4A16"), get_scheme("W8A8_FP8"), get_scheme("W8A8_FP8_24")
    assert default_recipe(w4) == [tritonpress.GPTQ(damp=0.01)]
    # defaults that depend on the scheme are filled in when the recipe meets it
    nv = get_scheme("NVFP4A16")
    assert default_recipe(nv) == [tritonpress.GPTQ(damp=0.1)]
    assert resolve_recipe([tritonpress.GPTQ()], nv) == [tritonpress.GPTQ(damp=0.1)]
    assert resolve_recipe([tritonpress.GPTQ(damp=0.03)], nv)[0].damp == 0.03
    assert resolve_recipe([tritonpress.AWQ(), tritonpress.GPTQ()], w4)[1].damp == 0.01
    assert default_recipe(fp8) == [tritonpress.RTN()]
    assert default_recipe(s24) == [tritonpress.SparseGPT()]
    assert tritonpress.SparseGPT().permute is True
    # the CLI's flags build the same objects; unset flags keep the objects' defaults
    assert recipe_from_flags(w4, None) == [tritonpress.GPTQ()]
    assert recipe_from_flags(w4, "awq+gptq", clip=False) == [tritonpress.AWQ(),
                                                             tritonpress.GPTQ(clip=False)]
    assert recipe_from_flags(get_scheme("W8A8_INT8"), None, smoothquant=0.5) == [
        tritonpress.SmoothQuant(0.5), tritonpress.GPTQ()]
    for make, exc, match in [
            (lambda: tritonpress.GPTQ(damp=-0.1), ValueError, "damp=-0.1"),
            (lambda: tritonpress.GPTQ(block_size=0), ValueError, "block_size=0"),
            (lambda: tritonpress.GPTQ(block_size=64.0), TypeError, "block_size=64.0"),
            (lambda: tritonpress.GPTQ(actorder="group"), ValueError, "use 'static'"),
            (lambda: tritonpress.SmoothQuant(1.5), ValueError, "alpha=1.5"),
            (lambda: tritonpress.SparseGPT(refit=0), ValueError, "ridge > 0"),
            (lambda: recipe_from_flags(w4, "gptqq"), ValueError, "unknown method 'gptqq'"),
            (lambda: recipe_from_flags(w4, "gptq", permute=True), ValueError,
             "permute do not apply"),
            (lambda: resolve_recipe([tritonpress.SparseGPT()], w4), ValueError, "prunes to 2:4"),
            (lambda: resolve_recipe([tritonpress.GPTQ()], s24), ValueError, "SparseGPT"),
            (lambda: resolve_recipe([tritonpress.AWQ()], get_scheme("W8A8_INT8")), ValueError,
             "AWQ is for the 4-bit"),
            (lambda: resolve_recipe([tritonpress.SmoothQuant(0.5), tritonpress.GPTQ()], w4),
             ValueError, "keeps them in 16 bits"),
            (lambda: resolve_recipe([tritonpress.SmoothQuant(0.5)], fp8), ValueError,
             "follow it with a quantizer"),
            (lambda: resolve_recipe([tritonpress.GPTQ(), tritonpress.AWQ()], w4), ValueError,
             "must come last"),
            (lambda: resolve_recipe([tritonpress.GPTQ], w4), TypeError, "write GPTQ()"),
            (lambda: resolve_recipe(["gptq"], w4), TypeError, "not a method")]:
        with pytest.raises(exc, match=match):
            make()
    assert all(dataclasses.is_dataclass(m) for m in default_recipe(w4))
