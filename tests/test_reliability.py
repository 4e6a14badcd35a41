"""Bad input, interruptions, resume, spilled activations, determinism (issue #9 items 1, 2, 3, 5).

The checkpoint writer's own guarantees (existing directory, disk full, failure or Ctrl-C while
writing) are tested in test_checkpoint.py; here they are checked through compress()."""
import json

import pytest
import torch

from tritonpress.methods import gptq

from tritonpress.loop import sequential as pipeline
from tritonpress.methods.gptq import GPTQ
from helpers import tiny_llama
from tritonpress.loop.activations import DiskTensors
from tritonpress.loop.sequential import compress_sequential
from tritonpress.schemes import get_scheme

from helpers import Identity
from tritonpress.cli import compress_from_flags as compress
from test_distributed import all_tensors, write_text


def tiny(seed=0, **kw):
    model, tok = tiny_llama(seed=seed, **kw)
    model.tokenizer = tok
    return model


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def run(model, out, text, scheme="W4A16", **kw):
    opts = dict(method="gptq", dataset=text, num_samples=16, seq_len=32, evaluate_quality=False,
                progress=False, device="cpu", group_size=32 if scheme == "W4A16" else None)
    opts.update(kw)
    return compress(model, scheme, None if out is None else str(out), **opts)


def batches(n=2, seq=24, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, vocab, (2, seq), generator=g)} for _ in range(n)]


# ----------------------------------------------------------------------------- 1. bad input

def test_nan_in_weights_named_before_calibrating(tmp_path, text):
    model = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in the model's weights "
                                         r"\(model.layers.1.mlp.up_proj.weight\).*re-download"):
        run(model, tmp_path / "out", text)
    assert not (tmp_path / "out").exists()


def test_nan_in_activations_names_the_layer():
    model = tiny()
    with torch.no_grad():                  # finite weights whose outputs overflow float32
        model.model.layers[0].self_attn.o_proj.weight.fill_(3e38)
    with pytest.raises(FloatingPointError, match=r"model.layers.0 .*NaN or Inf in the layer's "
                                                 r"output on calibration batch 0.*float32"):
        compress_sequential(model, batches(), get_scheme("W8A8_INT8"), Identity(),
                            progress=False)
    model = tiny()
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")
    with pytest.raises(FloatingPointError, match="embeddings' output on calibration batch 0"):
        compress_sequential(model, batches(), get_scheme("W8A8_INT8"), Identity(),
                            progress=False)


def test_non_pd_hessian_raises_dampening_and_reports_it():
    # 2 x 24 tokens per batch, 2 batches: rank <= 96 < 160 in-features of down_proj, so
    # with no dampening H is singular; the raise is warned and recorded per Linear
    model = tiny()
    with pytest.warns(UserWarning, match=r"down_proj: Hessian not positive definite with "
                                         r"dampening \[0.0\]; needed dampening 0.0001"):
        res = compress_sequential(model, batches(), get_scheme("W4A16", group_size=32),
                                  GPTQ(damp=0.0), progress=False)
    info = res.infos["model.layers.0.mlp.down_proj"]
    assert info["dampening_failed"] == [0.0] and info["dampening"] == pytest.approx(1e-4)
    assert info["fallback"] is None
    # nothing dampening can fix within the cap: RTN, reported as the fallback
    model = tiny()
    with pytest.warns(UserWarning, match="down_proj: .*fell back to RTN"):
        res = compress_sequential(model, batches(), get_scheme("W4A16", group_size=32),
                                  GPTQ(damp=0.0, max_damp=0.0),
                                  progress=False)
    assert res.infos["model.layers.1.mlp.down_proj"]["fallback"] == "rtn"


def test_calibration_data_errors_through_compress(tmp_path, text):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="no text found"):
        run(tiny(), None, str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match=r"calibration split has \d+ tokens.*ask for fewer"):
        run(tiny(), None, text, num_samples=10_000)
    with pytest.raises(ValueError, match=r"seq_len 64 is longer than the model's "
                                         r"max_position_embeddings \(32\): use seq_len <= 32"):
        run(tiny(max_positions=32), None, text, seq_len=64)


def test_shapes_and_architectures_that_do_not_fit(tmp_path, text):
    with pytest.raises(ValueError, match=r"group size 48 does not divide.*ignore=|"
                                         r"group size 48 does not divide"):
        run(tiny(), None, text, group_size=48)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    gpt2.tokenizer = tiny().tokenizer
    with pytest.raises(ValueError, match="GPT2LMHeadModel: no decoder layers at "
                                         "model.model.layers.*laid out like Llama"):
        run(gpt2, None, text)


def test_existing_checkpoint_dir_refused_before_any_work(tmp_path, text, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    monkeypatch.setattr(pipeline, "compress_sequential",
                        lambda *a, **k: pytest.fail("calibrated before checking --out"))
    with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
        run(tiny(), out, text)
    assert (out / "keep.txt").read_text() == "old"


# ----------------------------------------------------------------------------- 2. interruptions

def _interrupt_at_layer(monkeypatch, idx, exc):
    real = gptq.GPTQ.__call__

    def fn(self, layer_idx, *a, **k):
        if layer_idx == idx:
            raise exc
        return real(self, layer_idx, *a, **k)
    monkeypatch.setattr(gptq.GPTQ, "__call__", fn)


def test_interrupt_leaves_no_checkpoint_and_resume_gives_the_same_one(tmp_path, text,
                                                                     monkeypatch):
    run(tiny(layers=3), tmp_path / "ref", text)                     # uninterrupted

    resume = tmp_path / "state"
    with monkeypatch.context() as m:
        _interrupt_at_layer(m, 2, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            run(tiny(layers=3), tmp_path / "out", text, resume_dir=resume)
    assert not (tmp_path / "out").exists()                           # nothing that looks done
    assert sorted(p.name for p in resume.glob("layer_*.pt")) == ["layer_0000.pt", "layer_0001.pt"]
    assert not list(resume.glob(".*tmp*"))

    calls = []
    real = gptq.GPTQ.__call__
    monkeypatch.setattr(gptq.GPTQ, "__call__",
                        lambda self, i, *a, **k: calls.append(i) or real(self, i, *a, **k))
    run(tiny(layers=3), tmp_path / "out", text, resume_dir=resume)
    assert calls == [2]                                              # finished layers restored
    ta, tb = all_tensors(tmp_path / "ref"), all_tensors(tmp_path / "out")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_resumed_nvfp4_run_restores_the_activation_scales(tmp_path, text):
    """NVFP4's calibrated input_global_scale goes back onto each restored Linear (the
    evaluation's activation simulation reads it there), not only into the checkpoint."""
    first, again = tiny(layers=2), tiny(layers=2)
    run(first, tmp_path / "a", text, scheme="NVFP4", resume_dir=tmp_path / "state")
    run(again, tmp_path / "b", text, scheme="NVFP4", resume_dir=tmp_path / "state")
    for (name, a), b in zip(first.named_modules(), again.modules()):
        if isinstance(a, torch.nn.Linear) and name.startswith("model.layers"):
            assert torch.equal(a.input_global_scale, b.input_global_scale), name
    ta, tb = all_tensors(tmp_path / "a"), all_tensors(tmp_path / "b")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_dir_of_another_run_is_refused(tmp_path, text):
    resume = tmp_path / "state"
    run(tiny(), None, text, resume_dir=resume)
    with pytest.raises(ValueError, match=r"holds the state of a different run \(differs in: "
                                         r"calibration, options\)"):
        run(tiny(), None, text, resume_dir=resume, seed=1, damp=0.1)
    # the activation order is one of the options: a run in column order is not resumed
    # from a static-order one (the default)
    manifest = json.loads((resume / "manifest.json").read_text())
    assert json.loads(manifest["options"])["actorder"] == "static"
    with pytest.raises(ValueError, match=r"differs in: options\)"):
        run(tiny(), None, text, resume_dir=resume, actorder="none")


# ----------------------------------------------------------------------------- 3. spill to disk

def test_spilled_activations_give_the_same_result(tmp_path):
    spill = tmp_path / "spill"
    seen = []

    def method(layer_idx, layer, prefix, inputs, ctx):
        seen.append((type(inputs.hidden).__name__, len(list(spill.rglob("*.pt")))))
        return GPTQ()(layer_idx, layer, prefix, inputs, ctx)

    scheme = get_scheme("W4A16", group_size=32)
    a = compress_sequential(tiny(), batches(3), scheme, GPTQ(), progress=False,
                            keep_final=True)
    b = compress_sequential(tiny(), batches(3), scheme, method, progress=False, spill_dir=spill,
                            keep_final=True)
    assert seen == [("DiskTensors", 3), ("DiskTensors", 3)]          # 3 batches on disk, not 6
    assert a.qweights.keys() == b.qweights.keys()
    assert all(torch.equal(a.qweights[k].q, b.qweights[k].q) for k in a.qweights)
    assert all(torch.equal(x, y) for x, y in zip(a.final.hidden, b.final.hidden))
    del b
    assert not list(spill.rglob("*.pt"))                            # cleaned up with the list


def test_disk_tensors_round_trip(tmp_path):
    ts = [torch.randn(2, 3, 5), torch.randn(1, 7, 5).to(torch.bfloat16)]
    d = DiskTensors(tmp_path, ts)
    assert len(d) == 2 and all(torch.equal(x, y) for x, y in zip(d, ts))
    assert d[1].dtype == torch.bfloat16 and len(d[:1]) == 1


# ----------------------------------------------------------------------------- 5. determinism

def test_same_inputs_and_seed_give_a_byte_identical_checkpoint(tmp_path, text):
    for name in ("a", "b"):
        run(tiny(), tmp_path / name, text, seed=3)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                     if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                     if p.is_file())
    assert files_a == files_b and any(str(f).endswith(".safetensors") for f in files_a)
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
