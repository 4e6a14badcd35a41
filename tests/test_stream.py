"""Streaming (one decoder layer in memory at a time): the checkpoint is byte for byte the one
the in-memory path writes, for every scheme and method; the evaluation streamed layer by layer
gives the in-memory numbers; at most one decoder layer is ever materialised; models that cannot
stream say why; a failure leaves nothing behind."""
import json

import pytest
import torch

from tritonpress.checkpoint import writer

from tritonpress.loop import stream
from tritonpress.cli import compress_from_flags as compress
from helpers import tiny_llama

from test_api import CASES
from test_distributed import write_text


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def _save(tmp_path, tie=True, seed=1, layers=3, shard="20KB", **kw):
    model, tok = tiny_llama(seed=seed, tie=tie, layers=layers)
    model = model.to(torch.bfloat16)
    d = tmp_path / f"base-{'tied' if tie else 'untied'}"
    model.save_pretrained(d, max_shard_size=shard, **kw)    # several input shards
    tok.save_pretrained(d)
    return d


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _run(base, out, scheme, method, opts, text, **kw):
    return compress(str(base), scheme, str(out), method=method, dataset=text, num_samples=6,
                    seq_len=32, eval_dataset=text, eval_windows=2, eval_seq_len=32,
                    progress=False, device="cpu", **opts, **kw)


@pytest.mark.parametrize("scheme,method,opts", CASES, ids=[f"{s}-{m}" for s, m, _ in CASES])
def test_streamed_checkpoint_is_byte_identical(tmp_path, text, scheme, method, opts,
                                               monkeypatch):
    base = _save(tmp_path, tie=method != "gptq")           # tied and untied embeddings
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 12_000)   # several output shards
    a = _run(base, tmp_path / "mem", scheme, method, opts, text, stream="off")
    b = _run(base, tmp_path / "str", scheme, method, opts, text, stream="on")
    assert a["streamed"] is False and b["streamed"] is True
    fa, fb = _files(tmp_path / "mem"), _files(tmp_path / "str")
    assert "model.safetensors.index.json" in fa
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], name
    # the streamed evaluation (layer by layer) measures what the whole-model one does
    for k in ("ppl_before", "ppl", "kl"):
        assert b["quality"][text][k] == pytest.approx(a["quality"][text][k], rel=2e-3, abs=1e-5)
    assert b["quality"][text]["kl"] > 0
    assert "eval" not in b["profile"] and "write" in b["profile"]


def test_one_layer_in_memory_at_a_time(tmp_path, text, monkeypatch):
    base = _save(tmp_path, layers=4)
    live, peak = set(), [0]
    load, done = stream.Stream.load, stream.Stream.done

    def counting_load(self, i, layer, prefix):
        load(self, i, layer, prefix)
        live.add(i)
        peak[0] = max(peak[0], len(live))
        # the other layers hold no data
        others = [p for j, l in enumerate(self.layers) if j != i for p in l.parameters()]
        assert all(p.device.type == "meta" for p in others)

    def counting_done(self, i, layer, prefix, qw):
        done(self, i, layer, prefix, qw)
        live.discard(i)

    monkeypatch.setattr(stream.Stream, "load", counting_load)
    monkeypatch.setattr(stream.Stream, "done", counting_done)
    r = _run(base, tmp_path / "out", "W4A16", "gptq", {"group_size": 32}, text, stream="on")
    assert peak == [1] and r["streamed"]
    r = _run(base, tmp_path / "fp8", "W8A8_FP8", "rtn", {}, text, stream="on", overwrite=True)
    assert peak == [1]


def test_data_free_stream_never_loads_the_embeddings(tmp_path, monkeypatch):
    base = _save(tmp_path, tie=False)
    monkeypatch.setattr(stream.Stream, "load_rest",
                        lambda self: pytest.fail("a data-free run without eval loads no modules"))
    r = compress(str(base), "W8A8_FP8", str(tmp_path / "fp8"), evaluate_quality=False,
                 progress=False, device="cpu")
    assert r["streamed"]
    ref = compress(str(base), "W8A8_FP8", str(tmp_path / "fp8-mem"), evaluate_quality=False,
                   progress=False, device="cpu", stream="off")
    assert _files(tmp_path / "fp8") == _files(tmp_path / "fp8-mem")
    assert not ref["streamed"]


def test_models_that_cannot_stream_say_why(tmp_path):
    base = _save(tmp_path, shard="10GB")
    from safetensors.torch import load_file
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()                 # a .bin checkpoint only
    r = compress(str(base), "W8A8_FP8", str(tmp_path / "a"), evaluate_quality=False,
                 progress=False, device="cpu")
    assert not r["streamed"] and any("not streamed" in n and "safetensors" in n
                                     for n in r["notes"])
    with pytest.raises(stream.NotStreamable, match="safetensors"):
        compress(str(base), "W8A8_FP8", str(tmp_path / "b"), evaluate_quality=False,
                 progress=False, device="cpu", stream="on")
    with pytest.raises(ValueError, match="stream="):
        compress(str(base), "W8A8_FP8", str(tmp_path / "c"), stream="sometimes")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_failure_mid_stream_leaves_nothing(tmp_path, text, monkeypatch):
    base = _save(tmp_path)
    done = stream.Stream.done

    def fail_at_layer_1(self, i, layer, prefix, qw):
        if i == 1:
            raise RuntimeError("boom")
        done(self, i, layer, prefix, qw)

    monkeypatch.setattr(stream.Stream, "done", fail_at_layer_1)
    with pytest.raises(RuntimeError, match="boom"):
        _run(base, tmp_path / "out", "W4A16", "gptq", {"group_size": 32}, text, stream="on")
    assert sorted(p.name for p in tmp_path.iterdir()) == [base.name]


def test_streamed_nan_weights_are_refused(tmp_path, text):
    from safetensors.torch import load_file, save_file
    base = _save(tmp_path, shard="10GB")
    f = base / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN or Inf.*layers.1.mlp.up_proj"):
        _run(base, tmp_path / "out", "W4A16", "gptq", {"group_size": 32}, text, stream="on")
    assert not (tmp_path / "out").exists()


def test_index_json_lists_every_tensor(tmp_path, text, monkeypatch):
    from safetensors import safe_open
    base = _save(tmp_path)
    monkeypatch.setattr(writer, "MAX_SHARD_BYTES", 12_000)
    _run(base, tmp_path / "out", "W4A16", "gptq", {"group_size": 32}, text, stream="on",
         evaluate_quality=False)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    seen = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            seen.update({k: f.name for k in h.keys()})
    assert seen == index["weight_map"]
    assert "lm_head.weight" not in seen           # tied: saved once, as the embeddings


def test_too_little_memory_is_refused_before_any_work(tmp_path, text, monkeypatch):
    base = _save(tmp_path)
    monkeypatch.setattr(stream, "available_memory", lambda: 10_000)
    with pytest.raises(MemoryError, match=r"--spill-dir.*--num-samples") as e:
        _run(base, tmp_path / "out", "W4A16", "gptq", {"group_size": 32}, text, stream="on")
    assert "available" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [base.name]
    monkeypatch.setattr(stream, "available_memory", lambda: 1 << 40)
    r = _run(base, tmp_path / "out", "W4A16", "gptq", {"group_size": 32}, text, stream="on",
             evaluate_quality=False)
    assert 0 < r["memory_plan"]["need"] < r["memory_plan"]["available"]
    assert stream.available_memory() is None or stream.available_memory() > 0


def test_model_larger_than_memory_bounds_the_allocator(tmp_path, text, monkeypatch):
    # only then is the slower, flat-peak allocation chosen (it is process-wide), and said
    # (otherwise large blocks are kept for reuse: keep_large_allocations, data-free runs too)
    base = _save(tmp_path)
    calls, kept = [], []
    monkeypatch.setattr(stream, "map_large_allocations", lambda: calls.append(1))
    monkeypatch.setattr(stream, "keep_large_allocations", lambda: kept.append(1))
    monkeypatch.setattr(stream, "check_memory", lambda *a: {"need": 1, "available": 1 << 40})
    r = _run(base, tmp_path / "a", "W4A16", "gptq", {"group_size": 32}, text, stream="on",
             evaluate_quality=False)
    assert not calls and kept == [1] and not any("larger than the memory" in n for n in r["notes"])
    monkeypatch.setattr(stream, "check_memory", lambda *a: {"need": 1, "available": 1000})
    r = _run(base, tmp_path / "b", "W4A16", "gptq", {"group_size": 32}, text, stream="on",
             evaluate_quality=False)
    assert calls == [1] and kept == [1] and any("larger than the memory" in n for n in r["notes"])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    monkeypatch.setattr(stream, "available_memory", lambda: 1 << 40)     # data-free: no plan
    _run(base, tmp_path / "c", "W8A8_FP8", "rtn", {}, text, stream="on", evaluate_quality=False)
    assert calls == [1] and kept == [1, 1]


SLOW = pytest.mark.skipif(__import__("os").environ.get("TRITONPRESS_SLOW_TESTS") != "1",
                          reason="demo model runs (~5 min on 2 cores): set TRITONPRESS_SLOW_TESTS=1")


@SLOW
@pytest.mark.parametrize("scheme,method,opts", CASES, ids=[f"{s}-{m}" for s, m, _ in CASES])
def test_demo_model_streams_byte_identical(tmp_path, scheme, method, opts):
    """The issue's check on the real model: both paths, every scheme, the same files."""
    common = dict(method=method, num_samples=8, seq_len=256, evaluate_quality=False,
                  progress=False, device="cpu", **opts)
    a = compress("smollm2-135m", scheme, str(tmp_path / "mem"), stream="off", **common)
    b = compress("smollm2-135m", scheme, str(tmp_path / "str"), stream="on", **common)
    assert not a["streamed"] and b["streamed"]
    assert _files(tmp_path / "mem") == _files(tmp_path / "str")


def test_no_eval_run_never_loads_an_untied_lm_head(tmp_path, text, monkeypatch):
    from tritonpress.loop import sequential as pipeline
    base = _save(tmp_path, tie=False)
    seen, real = {}, pipeline.compress_sequential

    def spy(model, *a, **kw):
        seen["lm_head"] = model.lm_head.weight.device.type
        return real(model, *a, **kw)

    monkeypatch.setattr(pipeline, "compress_sequential", spy)
    _run(base, tmp_path / "a", "W4A16", "gptq", {"group_size": 32}, text, stream="on",
         evaluate_quality=False)
    assert seen["lm_head"] == "meta"          # read from the shards only to be written
    _run(base, tmp_path / "b", "W4A16", "gptq", {"group_size": 32}, text, stream="off",
         evaluate_quality=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_sigterm_mid_stream_leaves_nothing(tmp_path, text):
    """A stop from outside (kill, a scheduler, a timeout) cleans up as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import sys
    import time
    base = _save(tmp_path, layers=6)
    out = tmp_path / "out"
    code = ("import sys, time, tritonpress.loop.sequential as p\n"
            "real = p.compress_sequential\n"
            "def slow(*a, **k):\n"
            "    open(sys.argv[1], 'w').close(); time.sleep(60)\n"
            "p.compress_sequential = slow\n"
            "from tritonpress.cli import main\n"
            f"sys.exit(main(['compress', '--model', {str(base)!r}, '--scheme', 'W4A16', '--group-size',"
            f" '32', '--out', {str(out)!r}, '--dataset', {text!r}, '--num-samples', '4',"
            " '--seq-len', '32', '--no-eval', '--no-progress']))\n")
    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", code, str(flag)], stderr=subprocess.PIPE)
    for _ in range(600):
        if flag.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert flag.exists(), proc.stderr.read().decode()[-2000:]
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())   # mid-write
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([base.name, "started"])
