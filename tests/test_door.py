"""Every bad argument is refused at the door: before any model is loaded or file written, with
a message that names the argument, the value and what to pass instead (issue: bad input)."""
import os

import pytest
import torch

import tritonpress as tp
from tritonpress import models
from tritonpress.cli import compress_from_flags, main
from helpers import tiny_llama

C, E, R = tp.Calibration, tp.Evaluation, tp.Run


def call(model="smollm2-135m", scheme="W4A16", out=None, recipe=None, **kw):
    return lambda: tp.compress(model, scheme, out, recipe, **kw)


# (id, the call, exception, regex the message must match)
CASES = [
    ("scheme None", call(scheme=None), TypeError, r"scheme=None \(NoneType\): pass a scheme name"),
    ("scheme unknown", call(scheme="W3A7"), ValueError, r"unknown scheme 'W3A7': choose one of"),
    ("model None", call(model=None), TypeError, r"model=None .*smollm2-135m.*folder"),
    ("model int", call(model=3), TypeError, r"model=3 \(int\)"),
    ("out int", call(out=123), TypeError, r"out=123 \(int\): pass the checkpoint folder"),
    ("out under a file", call(out=__file__ + "/x"), ValueError, r"is a file, not a folder"),
    ("recipe string", call(recipe="gptq"), TypeError, r"recipe='gptq': pass a list of methods"),
    ("recipe class", call(recipe=[tp.GPTQ]), TypeError, r"write GPTQ\(\)"),
    ("quantizer first", call(recipe=[tp.GPTQ(), tp.SmoothQuant(0.5)]), ValueError,
     r"GPTQ quantizes, so it must come last"),
    ("smoothquant alone", call(scheme="W8A8_INT8", recipe=[tp.SmoothQuant(0.5)]), ValueError,
     r"only rescales the layer: follow it with a quantizer"),
    ("smoothquant with W4A16", call(recipe=[tp.SmoothQuant(0.5), tp.GPTQ()]), ValueError,
     r"W4A16 keeps them in 16 bits: drop SmoothQuant"),
    ("sparsegpt on W4A16", call(recipe=[tp.SparseGPT()]), ValueError, r"W8A8_FP8_24"),
    ("gptq on 2:4", call(scheme="W8A8_FP8_24", recipe=[tp.GPTQ()]), ValueError,
     r"prunes to 2:4: use SparseGPT\(\)"),
    ("awq on int8", call(scheme="W8A8_INT8", recipe=[tp.AWQ()]), ValueError,
     r"AWQ is for the 4-bit group schemes"),
    ("calibration None", call(calibration=None), ValueError,
     r"recipe gptq needs calibration data"),
    ("calibration dict", call(calibration={"num_samples": 8}), TypeError,
     r"calibration=\{.*tritonpress.Calibration"),
    ("evaluation string", call(evaluation="canterbury"), TypeError,
     r"pass tritonpress.Evaluation\(...\), or None"),
    ("run dict", call(run={"device": "cpu"}), TypeError, r"run=\{.*tritonpress.Run"),
    ("num_samples str", lambda: C(num_samples="8"), TypeError, r"num_samples='8' \(str\)"),
    ("num_samples 0", lambda: C(num_samples=0), ValueError, r"num_samples=0: pass a positive"),
    ("seq_len float", lambda: C(seq_len=64.5), TypeError, r"seq_len=64.5 \(float\)"),
    ("seed bool", lambda: C(seed=True), TypeError, r"seed=True"),
    ("windows float", lambda: E(windows=2.0), TypeError, r"windows=2.0"),
    ("act_sim", lambda: E(act_sim="exact"), ValueError, r"act_sim='exact': choose one of vllm"),
    ("device", lambda: R(device="tpu"), ValueError, r"device='tpu': pass 'cuda'"),
    ("dtype", lambda: R(dtype="bf16"), ValueError, r"dtype='bf16': choose one of auto"),
    ("stream", lambda: R(stream="sometimes"), ValueError, r"stream='sometimes': choose one of"),
    ("overwrite str", lambda: R(overwrite="yes"), TypeError, r"overwrite='yes'.*True or False"),
    ("resume_dir int", lambda: R(resume_dir=5), TypeError, r"resume_dir=5"),
    ("max_shard_bytes", lambda: R(max_shard_bytes=-1), ValueError, r"max_shard_bytes=-1"),
    ("sparse_format", lambda: R(sparse_format="csr"), ValueError, r"sparse_format='csr'"),
    ("group_size str", lambda: tp.get_scheme("W4A16", group_size="64"), TypeError,
     r"group_size='64' \(str\)"),
    ("group_size float", lambda: tp.get_scheme("W4A16", group_size=64.0), TypeError,
     r"group_size=64.0 \(float\)"),
    ("group_size on fp8", lambda: tp.get_scheme("W8A8_FP8", group_size=64), ValueError,
     r"applies only to W4A16"),
    ("ignore string", lambda: tp.get_scheme("W4A16", ignore="lm_head"), TypeError,
     r"ignore='lm_head': pass a list"),
    ("smoothquant 1.5", lambda: tp.SmoothQuant(1.5), ValueError, r"alpha=1.5"),
    ("damp negative", lambda: tp.GPTQ(damp=-1), ValueError, r"damp=-1"),
    ("damp str", lambda: tp.GPTQ(damp="0.1"), TypeError, r"damp='0.1'"),
    ("block_size float", lambda: tp.GPTQ(block_size=64.0), TypeError, r"block_size=64.0"),
    ("actorder group", lambda: tp.GPTQ(actorder="group"), ValueError, r"use 'static'"),
    ("clip str", lambda: tp.AWQ(clip="on"), TypeError, r"clip='on'"),
    ("refit 0", lambda: tp.SparseGPT(refit=0), ValueError, r"ridge > 0"),
    ("permute str", lambda: tp.SparseGPT(permute="on"), TypeError, r"permute='on'"),
    ("option of another method", lambda: compress_from_flags("smollm2-135m", "W8A8_INT8",
                                                             permute=True), ValueError,
     r"permute do not apply to method gptq"),
    ("smoothquant flag on W4A16", lambda: compress_from_flags("smollm2-135m", "W4A16",
                                                              group_size=64, smoothquant=0.5),
     ValueError, r"keeps them in 16 bits"),
    ("group_size flag float", lambda: compress_from_flags("smollm2-135m", "W4A16",
                                                          group_size=64.0), TypeError,
     r"group_size=64.0"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_is_refused_before_any_work(monkeypatch, tmp_path, make, exc, match):
    def loaded(*a, **k):
        raise AssertionError("a model was looked up before the arguments were checked")
    monkeypatch.setattr(models, "model_path", loaded)
    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=match):
        make()
    assert os.listdir(tmp_path) == []                    # nothing written


def test_existing_out_is_refused_in_the_users_words(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'ckpt'} already exists.*--overwrite"):
        tp.compress("smollm2-135m", "W8A8_FP8", tmp_path / "ckpt")


def test_compress_twice_in_one_process(tmp_path):
    """tritonpress.compress stays the function, however often it is called (no subpackage of
    that name shadows it)."""
    for i in range(2):
        model, tok = tiny_llama(seed=i)
        model.tokenizer = tok
        r = tp.compress(model.to(torch.bfloat16), "W8A8_FP8", tmp_path / f"fp8-{i}",
                        evaluation=None, run=tp.Run(device="cpu", progress=False))
        assert r["method"] == "rtn" and (tmp_path / f"fp8-{i}" / "config.json").exists()
    assert callable(tp.compress) and callable(tp.evaluate)
    import tritonpress.api  # noqa: F401  (importing the module does not rebind the function)
    assert callable(tp.compress)


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    assert main(["compress", "--model", str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritonpress: error: ") and "Traceback" not in err
    assert main(["compress", "--scheme", "W4A16", "--group-size", "64", "--smoothquant", "0.5",
                 "--out", str(tmp_path / "o")]) == 2
    assert "keeps them in 16 bits" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2         # checked before loading
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
