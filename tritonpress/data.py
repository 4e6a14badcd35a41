"""Text for calibration and evaluation, with a held-out split that calibration never sees.

Sources (a string):
  "canterbury"          English literature: the Canterbury corpus texts alice29, asyoulik,
                        lcet10, plrabn12 (1.2 MB), shipped in the brotli 1.2.1 sdist on PyPI
  "code"                C source: brotli's own C files from the same sdist (0.97 MB,
                        tables of numbers left out)
  "a+b"                 a mixture: samples and windows are shared evenly between the parts
  path.txt | folder     local text files (a folder: every *.txt and *.jsonl under it)
  path.jsonl            one JSON object per line with a "text" field
  name[:config]         a `datasets` dataset (train split, "text" column); needs the
                        `datasets` package and network
The two built-ins are fetched once with pip into the cache folder (see models.cache_root).

Each document is cut at a line break near 90% of its length: the head is calibration text,
the tail held-out text. Documents of a split are tokenized and joined with EOS between them.

Windows start as the model reads text in use: with BOS when its tokenizer puts one first
(what `tokenizer("x")` prepends: add_bos_token, or a post-processor as Llama 3's), then
seq_len - 1 tokens of the stream; without BOS when it does not. With chat_template=True each
calibration window is one user turn rendered by the model's chat template: the template's
text before the message (BOS included, where the template writes it), calibration text, the
template's text after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from .models import atomic_dir, cache_root

EVAL_FRACTION = 0.1
BROTLI_SDIST = "brotli==1.2.1"
BROTLI_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
CANTERBURY = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt")
BUILTIN_SOURCES = ("canterbury", "code")
MAX_DATASET_CHARS = 20_000_000  # ~5M tokens: plenty for calibration, bounded tokenizing time


# ----------------------------------------------------------------------------- loading text

def load_texts(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[str]:
    """The documents of one source (not a mixture), newlines normalized to \\n."""
    name = str(source)
    path = Path(name).expanduser()
    if path.exists():
        texts = _load_path(path)
    elif name in BUILTIN_SOURCES:
        folder = builtin_texts_dir(cache_dir) / name
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(folder.iterdir())]
    elif name.endswith((".txt", ".jsonl")) or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or folder: {name}")
    else:
        texts = _load_dataset(name)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{name}: no text found (empty files?)")
    return texts


def _load_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ValueError(f"folder {path} holds no .txt or .jsonl files")
        return [t for f in files for t in _load_path(f)]
    if path.suffix == ".jsonl":
        return [_read_jsonl(path)]
    # text mode turns \r\n into \n (three of the Canterbury texts use CRLF)
    return [path.read_text(encoding="utf-8", errors="replace")]


def _read_jsonl(path: Path) -> str:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'{path}:{lineno}: each line must be an object with a "text" string')
            records.append(obj["text"])
    # records are often short: one document, so the 90/10 cut keeps whole records apart
    return "\n\n".join(records)


def _load_dataset(name: str) -> list[str]:
    hint = (f"built-in sources are {', '.join(BUILTIN_SOURCES)}; local .txt/.jsonl files and "
            "folders work offline")
    try:
        import datasets
    except ImportError:
        raise ModuleNotFoundError(
            f"{name!r} is not a built-in source nor a local path, so it was taken for a "
            f"`datasets` dataset, but `datasets` is not installed (pip install datasets); {hint}"
        ) from None
    ds_name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, config or None, split="train")
    except Exception as e:  # the library raises many kinds (offline, not found, gated)
        raise RuntimeError(f"could not load dataset {name!r}: {e}. {hint}") from e
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    records, total = [], 0
    for t in ds["text"]:
        records.append(t)
        total += len(t)
        if total >= MAX_DATASET_CHARS:
            break
    return ["\n\n".join(records)]


# ----------------------------------------------------------------------------- built-ins

def builtin_texts_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding canterbury/ and code/, fetched from the brotli sdist on first use."""
    final = cache_root(cache_dir) / "texts"
    if not final.is_dir():
        with tempfile.TemporaryDirectory() as dl, atomic_dir(final) as tmp:
            _extract_brotli_texts(_download_brotli_sdist(Path(dl)), tmp)
    return final


def _download_brotli_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", BROTLI_SDIST, "-d", str(dest)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    sdists = list(dest.glob("brotli-*.tar.gz"))
    if run.returncode or not sdists:
        raise RuntimeError(
            f"could not fetch the built-in texts ({' '.join(cmd[2:])} failed: "
            f"{run.stderr.strip()[-500:]}). Without network, pass local .txt files instead.")
    sdist = sdists[0]
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != BROTLI_SHA256:
        raise RuntimeError(f"{sdist.name} has sha256 {digest}, expected {BROTLI_SHA256}")
    return sdist


def _is_number_table(text: str) -> bool:
    # brotli's dictionaries and lookup tables are C arrays of numbers, not code anyone reads
    return sum(c.isdigit() or c in ",x" for c in text) > 0.3 * len(text)


def _extract_brotli_texts(sdist: Path, out: Path) -> None:
    (out / "canterbury").mkdir()
    (out / "code").mkdir()
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")[1:]  # drop "brotli-1.2.1/"
            if not member.isfile():
                continue
            if parts[:2] == ["tests", "testdata"] and parts[-1] in CANTERBURY:
                (out / "canterbury" / parts[-1]).write_bytes(tar.extractfile(member).read())
            elif parts[0] == "c" and member.name.endswith((".c", ".h")):
                text = tar.extractfile(member).read().decode("utf-8", errors="replace")
                if not _is_number_table(text):
                    (out / "code" / "__".join(parts)).write_text(text, encoding="utf-8")
    found = sorted(p.name for p in (out / "canterbury").iterdir())
    if found != sorted(CANTERBURY):
        raise RuntimeError(f"{sdist.name} lacks Canterbury texts: found only {found}")


# ----------------------------------------------------------------------------- splits, tokens

def split_texts(texts: list[str], eval_fraction: float = EVAL_FRACTION) -> tuple[list[str], list[str]]:
    """Cut each document at the first line break after (1 - eval_fraction) of its length."""
    calib, held_out = [], []
    for t in texts:
        cut = int(len(t) * (1 - eval_fraction))
        nl = t.find("\n", cut)
        cut = nl + 1 if 0 <= nl < len(t) - 1 else cut
        calib.append(t[:cut])
        held_out.append(t[cut:])
    return calib, held_out


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """1-D LongTensor: the texts tokenized without special tokens, EOS between them."""
    ids = tokenizer([t for t in texts if t], add_special_tokens=False, verbose=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for i, doc in enumerate(ids):
        if i and eos is not None:
            out.append(eos)
        out.extend(doc)
    return torch.tensor(out, dtype=torch.long)


def split_stream(tokenizer, source: str, split: str, cache_dir=None) -> torch.Tensor:
    """Token stream of the "calibration" or "eval" split of one source."""
    calib, held_out = split_texts(load_texts(source, cache_dir))
    return token_stream(tokenizer, calib if split == "calibration" else held_out)


def _parts(source: str | os.PathLike) -> list[str]:
    s = str(source)
    if Path(s).expanduser().exists() or "+" not in s:
        return [s]
    parts = [p.strip() for p in s.split("+")]
    if not all(parts):
        raise ValueError(f"bad mixture {s!r}: write it as e.g. canterbury+code")
    return parts


def _shares(total: int, k: int) -> list[int]:
    return [total // k + (i < total % k) for i in range(k)]


def _check_seq_len(seq_len: int, max_positions: int | None) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                         f"({max_positions}): use seq_len <= {max_positions}")


def _too_few(source: str, split: str, have: int, want: int, seq_len: int, what: str) -> ValueError:
    return ValueError(
        f"{source}: the {split} split has {have} tokens, room for {have // seq_len} "
        f"non-overlapping windows of {seq_len}, but {want} {what} were asked: ask for fewer or "
        "shorter windows, or add text (mix sources with '+', or pass more files)")


def bos_prefix(tokenizer) -> list[int]:
    """[BOS id] when the tokenizer puts BOS first on its own (tokenizer("x")), else []."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x")["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return [bos] if bos is not None and ids[:1] == [bos] and plain[:1] != [bos] else []


CHAT_SLOT = "\u2063tritonpress-text\u2063"   # where the text goes in the rendered template


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the user's message in the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template=True, but the tokenizer ({type(tokenizer).__name__}, "
            f"{getattr(tokenizer, 'name_or_path', '')}) has no chat template (a base model?): "
            "calibrate on plain text (chat_template=False, no --chat-template), or give the "
            "tokenizer its chat template (tokenizer.chat_template = ...; save_pretrained)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_SLOT}],
                                         tokenize=False, add_generation_prompt=False)
    if text.count(CHAT_SLOT) != 1:
        raise ValueError("the chat template does not write the user's message once as given; "
                         "calibrate without chat_template")
    before, after = text.split(CHAT_SLOT)

    def ids(t):
        return tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
    return ids(before), ids(after)


def _frame(tokenizer, chat_template: bool, seq_len: int) -> tuple[list[int], list[int], int]:
    """(ids before, ids after, text tokens per window) of each window."""
    before, after = chat_frame(tokenizer) if chat_template else (bos_prefix(tokenizer), [])
    body = seq_len - len(before) - len(after)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text beside the "
                         f"{len(before) + len(after)} tokens of {'the chat template' if chat_template else 'BOS'}: "
                         f"use seq_len > {len(before) + len(after)}")
    return before, after, body


def _framed(windows: list[torch.Tensor], before: list[int], after: list[int]) -> torch.Tensor:
    x = torch.stack(windows)
    b = torch.tensor(before, dtype=torch.long).expand(len(x), -1)
    a = torch.tensor(after, dtype=torch.long).expand(len(x), -1)
    return torch.cat([b, x, a], dim=1)


def _streams(tokenizer, source: str, count: int, split: str, cache_dir):
    """(part, its share of `count`, its token stream) for each part of a mixed source
    ("canterbury+code"), in order; parts whose share is 0 are left out."""
    parts = _parts(source)
    for part, n in zip(parts, _shares(count, len(parts))):
        if n:
            yield part, n, split_stream(tokenizer, part, split, cache_dir)


# ----------------------------------------------------------------------------- public

def calibration_batches(tokenizer, source: str = "canterbury", num_samples: int = 128,
                        seq_len: int = 512, seed: int = 0, batch_size: int = 8,
                        cache_dir=None, max_positions: int | None = None,
                        chat_template: bool = False) -> list[dict]:
    """Random non-overlapping windows of seq_len tokens from the calibration split, in batches
    of dicts {input_ids, attention_mask} ([b, seq_len] each), each BOS first when the model's
    tokenizer puts one first, or (chat_template) a user turn of the chat template. Same seed,
    same batches."""
    _check_seq_len(seq_len, max_positions)
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be positive ({num_samples}, {batch_size})")
    before, after, body = _frame(tokenizer, chat_template, seq_len)
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for part, n, stream in _streams(tokenizer, source, num_samples, "calibration", cache_dir):
        slots = len(stream) // body
        if slots < n:
            raise _too_few(part, "calibration", len(stream), n, body, "samples")
        # a random offset, then n of the slots that tile the stream from there
        offset = int(torch.randint(0, len(stream) - slots * body + 1, (1,), generator=gen))
        for j in torch.randperm(slots, generator=gen)[:n].tolist():
            start = offset + j * body
            windows.append(stream[start:start + body])
    order = torch.randperm(len(windows), generator=gen).tolist()  # interleave mixture parts
    x = _framed([windows[i] for i in order], before, after)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in x.split(batch_size)]


def eval_windows(tokenizer, source: str = "canterbury", num_windows: int = 16, seq_len: int = 512,
                 cache_dir=None, max_positions: int | None = None) -> torch.Tensor:
    """LongTensor [num_windows, seq_len]: non-overlapping windows spread evenly over the
    held-out split (none of its text is in calibration_batches), each BOS first when the
    model's tokenizer puts one first."""
    _check_seq_len(seq_len, max_positions)
    if num_windows < 1:
        raise ValueError(f"num_windows must be positive, got {num_windows}")
    before, after, body = _frame(tokenizer, False, seq_len)
    windows = []
    for part, n, stream in _streams(tokenizer, source, num_windows, "eval", cache_dir):
        if len(stream) < n * body:
            raise _too_few(part, "held-out", len(stream), n, body, "windows")
        # spacing (len - body) / (n - 1) >= body, so windows never overlap
        starts = [i * (len(stream) - body) // max(n - 1, 1) for i in range(n)]
        windows += [stream[s:s + body] for s in starts]
    return _framed(windows, before, after)
