"""compress() end to end on a tiny model, every scheme with its methods, as a user calls it:
the checkpoint it writes is what transformers loads, and the report says what happened."""
import json

import pytest
import torch

from tritonpress.cli import main
from tritonpress.compress.api import compress, load_checkpoint_dequantized
from tritonpress.compress.checkpoint import load_quantized_weights
from tritonpress.compress.models import tiny_llama

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

    # transformers decompresses exactly the weights the compressed model computed with
    loaded, act_args, ignore = load_checkpoint_dequantized(out)
    theirs = dict(loaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(theirs[name], p), name
    assert "lm_head" in ignore
    assert (act_args is None) == scheme.startswith("W4A16")
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
    # an existing output directory is refused with a message naming the way out
    assert main(["compress", *args, "--scheme", "W4A16", "--group-size", "32", "--out", str(out),
                 "--dataset", text, "--num-samples", "8", "--seq-len", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
