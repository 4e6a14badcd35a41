"""Smoke test of bench/bench_vs_llmcompressor.py on a tiny random Llama (llm-compressor skipped):
the shared-reference scorer must give exactly what api.evaluate gives."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

import tritonpress
from helpers import tiny_llama

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_vs_llmcompressor.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_vs_llmcompressor", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_bench_rows_and_scorer(tmp_path):
    bench = _bench()
    model, tok = tiny_llama(hidden=64, intermediate=128, layers=2)
    mdir = tmp_path / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    out = tmp_path / "bench"
    rows = bench.main(["--tiny", "--model", str(mdir), "--schemes", "W4A16", "--group-size", "32",
                       "--skip-llmc", "--out-dir", str(out)])

    got = {(r["scheme"], r["tool"], r["method"]): r for r in rows}
    assert set(got) == {("-", "bf16", "-"), ("W4A16", "tritonpress", "gptq"),
                        ("W4A16", "tritonpress", "rtn")}
    for key in [("W4A16", "tritonpress", "gptq"), ("W4A16", "tritonpress", "rtn")]:
        r = got[key]
        assert r["compress_s"] > 0 and r["process_s"] >= r["compress_s"]
        for src in bench.SOURCES:
            q = r["quality"][src]
            assert math.isfinite(q["ppl"]) and q["kl"] > 0
            assert q["ppl_before"] == pytest.approx(got[("-", "bf16", "-")]["quality"][src]["ppl"])
    assert json.loads((out / "results.json").read_text())["rows"]

    # the scorer shares references across checkpoints; the numbers must be evaluate()'s
    ckpt = out / "checkpoints" / "W4A16-tp-gptq"
    ref = tritonpress.evaluate(ckpt, str(mdir), evaluation=tritonpress.Evaluation(windows=2, seq_len=64),
                               run=tritonpress.Run(progress=False, dtype="bfloat16"))  # as llmc
    for src in bench.SOURCES:
        assert got[("W4A16", "tritonpress", "gptq")]["quality"][src]["kl"] == \
            pytest.approx(ref[src]["kl"], rel=1e-6)
        assert got[("W4A16", "tritonpress", "gptq")]["quality"][src]["ppl"] == \
            pytest.approx(ref[src]["ppl"], rel=1e-6)
    assert "W4A16" in bench.table(rows) and "tritonpress" in bench.table(rows)
