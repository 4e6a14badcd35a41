"""The benchmark suite's CPU reduced modes run, write the JSON they promise, and plot.

bench/bench_qps.py --cpu (tiny layer, torch references) and bench/bench_compress_speed.py
--small (tiny model) run in-process on tiny inputs; the crossover finder is checked on
made-up timings whose answer is known. Timings themselves are not asserted (CPU, shared).
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" \
        and path.stat().st_size > 10_000


@pytest.fixture
def qps():
    return _load("bench_qps")


def test_crossover_found_where_the_made_up_timings_cross(qps):
    ms = [1, 2, 4, 8, 16, 32]
    # W4A16 takes 1 ms everywhere; W8A8 2 ms up to M=8, then 0.5 ms: the log ratio goes
    # from log(1/2) to log(2) between 8 and 16, zero halfway in log2 M: 2**3.5
    rows = {m: {"W4A16": 1.0, "W8A8-INT8": 2.0 if m <= 8 else 0.5} for m in ms}
    c = qps.crossover(rows, "W8A8-INT8", "W4A16", ms)
    assert c["status"] == "crosses" and c["m"] == 16 and c["between"] == [8, 16]
    assert c["m_interp"] == pytest.approx(2 ** 3.5, abs=0.1)
    # ahead at M=2 only, behind at 4 and 8, ahead from 16: the lasting crossover is 16
    rows[2]["W8A8-INT8"] = 0.9
    assert qps.crossover(rows, "W8A8-INT8", "W4A16", ms)["m"] == 16
    # the other way round it never stays ahead
    c = qps.crossover(rows, "W4A16", "W8A8-INT8", ms)
    assert c["m"] is None and c["status"] == "ahead only below the largest M"
    # ahead everywhere; and missing measurements are skipped, not taken as zero
    rows = {m: {"bf16": 1.0, "W4A16": 0.5 if m != 4 else None} for m in ms}
    c = qps.crossover(rows, "W4A16", "bf16", ms)
    assert c["status"] == "ahead at every measured M" and c["m"] == 1
    assert qps.crossover({}, "W4A16", "bf16", ms)["status"] == "not measured"


def test_measure_order_covers_every_m_coarse_first(qps):
    order = qps.measure_order(qps.MS)
    assert sorted(order) == qps.MS
    assert order[:2] == [1, 4096]        # a run cut short still has both ends


def test_layer_shapes_are_llama3_8b(qps):
    fused = qps.layer_shapes(qps.LLAMA3_8B)
    assert [(n, k) for _, n, k in fused] == [(6144, 4096), (4096, 4096), (28672, 4096),
                                             (4096, 14336)]
    sep = qps.layer_shapes(qps.LLAMA3_8B, separate=True)
    # same weights either way
    assert sum(n * k for _, n, k in sep) == sum(n * k for _, n, k in fused)


def test_qps_cpu_reduced_mode(qps, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONPRESS_GEMM_BACKEND", "torch")   # run() sets it; restore after
    qps.main([str(tmp_path / "qps"), "--cpu", "--ms", "1,16"])
    r = json.loads((tmp_path / "qps" / "qps.json").read_text())
    assert set(r) >= {"info", "ms", "schemes", "checks", "results", "crossovers", "fastest"}
    assert r["ms"] == [1, 16] and r["info"]["mode"] == "cpu-reference"
    assert r["schemes"] == ["bf16", "W4A16", "W8A8-INT8", "W8A8-FP8", "2:4-FP8"]
    by = {(x["scheme"], x["m"]): x for x in r["results"]}
    assert len(by) == 10
    for (s, m), x in by.items():
        assert x["ms"] > 0 and math.isfinite(x["ms"])
        assert x["tokens_per_s"] == pytest.approx(m / (32 * x["ms"] / 1e3))
        assert x["speedup"] == pytest.approx(by[("bf16", m)]["ms"] / x["ms"])
        assert x["kernels"] == (["cublas"] if s == "bf16" else ["torch"])
    # every scheme computes the layer: equal to its reference, near the bf16 product, and
    # the quantized ones not equal to it (they did quantize); 2:4 drops half the weights
    for s, bound in [("W4A16", 0.3), ("W8A8-INT8", 0.05), ("W8A8-FP8", 0.1), ("2:4-FP8", 0.8)]:
        c = r["checks"][s]
        assert c["rel_err_vs_ref"] < 1e-5
        assert 1e-4 < c["rel_err_vs_bf16"] < bound, (s, c)
    assert r["checks"]["bf16"]["rel_err_vs_bf16"] < 1e-2
    names = {(c["winner"], c["loser"]) for c in r["crossovers"]}
    assert ("W8A8-INT8", "W4A16") in names and ("W8A8-FP8", "W4A16") in names
    assert all(c["status"] in ("crosses", "never ahead", "ahead at every measured M",
                               "ahead only below the largest M") for c in r["crossovers"])
    assert set(r["fastest"]) == {"1", "16"}
    if qps.plots.available():
        assert _is_png(tmp_path / "qps" / "qps.png")
    # the claims summary reads it, and says CPU numbers are no evidence
    text = _load("summarize").summarize(str(tmp_path))
    assert "not evidence" in text and "W8A8-FP8 is faster than W4A16" in text
    assert (tmp_path / "SUMMARY.md").read_text() == text


def test_compress_speed_small(tmp_path):
    cs = _load("bench_compress_speed")
    cs.main([str(tmp_path), "--small", "--skip-llmc", "--schemes", "W8A8_FP8,W4A16",
             "--samples", "4", "--seq-len", "32", "--no-warm-up"])
    r = json.loads((tmp_path / "compress_speed.json").read_text())
    assert set(r) == {"info", "results"}
    assert r["info"]["shape"] == "tiny" and r["info"]["llmc"] is None
    rows = {x["scheme"]: x for x in r["results"]}
    assert set(rows) == {"W8A8_FP8", "W4A16"}
    for x in rows.values():
        assert "error" not in x, x
        assert x["tool"] == "tritonpress" and x["seconds"] > 0 and x["total_s"] >= x["seconds"]
        assert x["peak_rss_bytes"] > 50 * 2**20
        assert (x["peak_gpu_bytes"] > 0) if torch.cuda.is_available() else \
            (x["peak_gpu_bytes"] is None)
    assert rows["W8A8_FP8"]["method"] == "rtn" and rows["W4A16"]["method"] == "gptq"
    # int4 weights make a smaller checkpoint than fp8 ones of the same model
    assert 0 < rows["W4A16"]["size_bytes"] < rows["W8A8_FP8"]["size_bytes"]
    assert not (tmp_path / "_work").exists()          # model and text cleaned up
    if cs.plots.available():
        assert _is_png(tmp_path / "compress_speed.png")
        assert _is_png(tmp_path / "compress_memory.png")
