"""What a run is asked to do, checked at the door: the recipe and the option objects.

A recipe is a list of methods (methods/*.py), each a small frozen dataclass that holds its own
defaults: `[GPTQ()]`, `[SmoothQuant(0.8), GPTQ()]`, `[AWQ(), GPTQ()]`. The last one quantizes;
the ones before it only rescale the layer (SmoothQuant, AWQ's scale search) for it.
`Calibration`, `Evaluation` and `Run` hold the rest of compress()'s options. Every value is
checked when its object is made, and the recipe against the scheme by `resolve_recipe`, before
anything is loaded; each error names the argument, the value and what to pass instead.

Plain Python (no torch): the CLI builds its parser before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .schemes import ACT_SIMS, Scheme


# ----------------------------------------------------------------------------- checks

def check_type(name: str, value, kinds, hint: str):
    """`value` is one of `kinds` (bool is never taken for a number), else a TypeError."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise TypeError(f"{name}={value!r} ({type(value).__name__}): {hint}")
    return value


def check_int(name: str, value, low: int, hint: str) -> int:
    check_type(name, value, int, hint)
    if value < low:
        raise ValueError(f"{name}={value}: {hint}")
    return value


def check_number(name: str, value, low: float, high: float | None, hint: str) -> float:
    check_type(name, value, (int, float), hint)
    if not (value >= low and (high is None or value <= high)):     # NaN fails too
        raise ValueError(f"{name}={value}: {hint}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def check_path(name: str, value, none_ok: bool = True):
    if value is None and none_ok:
        return None
    return check_type(name, value, (str, Path), "pass a folder path (str or pathlib.Path)")


def check_actorder(actorder) -> str | None:
    """The one spelling of an actorder option: "static" or None (off).

    Accepts "static", None or "none" (any case); the old spellings "desc" and True mean
    "static", False means None. Anything else (e.g. "group", which would need a g_idx)
    raises ValueError naming the allowed values."""
    if actorder is None or actorder is False:
        return None
    if actorder is True:
        return "static"
    if isinstance(actorder, str):
        key = actorder.strip().lower()
        if key in ("static", "desc"):
            return "static"
        if key == "none":
            return None
    raise ValueError(f"actorder={actorder!r}: use 'static' (sweep columns by decreasing Hessian "
                     "diagonal, groups on the original columns) or None/'none' (no ordering)")


# ----------------------------------------------------------------------------- methods

class Method:
    """What every method object is to the layer loop (loop/sequential.py).

    `__call__(layer_idx, layer, prefix, inputs, ctx)` compresses ctx.linears of one decoder
    layer, writes their dequantized weights back, and returns (QuantizedWeights, infos) by full
    Linear name. A method that can come before the quantizer (`rescales`) has
    `rescale(...)` with the same arguments, which changes the layer and returns infos.
    `check(scheme)` refuses a scheme the method cannot serve, and `check_model(model,
    linears)` a model or Linears (all the model's targets) it cannot compress, before any
    work (the model may be a streamed skeleton on the meta device)."""
    data_free = False       # needs no calibration data (the loop then captures nothing)
    rescales = False        # may precede the quantizer of a recipe
    quantizes = True        # may be the last method of a recipe

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def check(self, scheme: Scheme) -> None:
        pass

    def check_model(self, model, linears: dict) -> None:
        pass

    def for_scheme(self, scheme: Scheme) -> "Method":
        """The method with the defaults that depend on the scheme filled in (GPTQ's damp)."""
        return self

    def as_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}


def default_recipe(scheme: Scheme) -> list[Method]:
    """The recipe a scheme gets when none is given."""
    from .methods.gptq import GPTQ
    from .methods.rtn import RTN
    from .methods.sparsegpt import SparseGPT
    if scheme.sparsity_24:
        return [SparseGPT()]
    if scheme.weights.type == "float" and scheme.weights.num_bits == 8:
        return [RTN()]             # fp8 (per channel or per block): data-free
    return [GPTQ().for_scheme(scheme)]     # 4-bit grids: int4, and the fp4 formats


def resolve_recipe(recipe, scheme: Scheme) -> list[Method]:
    """The recipe as a list of method objects, checked against the scheme and in itself."""
    if recipe is None:
        return default_recipe(scheme)
    if isinstance(recipe, Method):
        recipe = [recipe]
    if not isinstance(recipe, (list, tuple)) or not recipe:
        raise TypeError(f"recipe={recipe!r}: pass a list of methods, e.g. [tritonpress.GPTQ()] "
                        "or [tritonpress.SmoothQuant(0.8), tritonpress.GPTQ()]")
    for m in recipe:
        if isinstance(m, type) and issubclass(m, Method):
            raise TypeError(f"recipe item {m.__name__} is a class: write {m.__name__}() "
                            "(an object, with its options)")
        if not isinstance(m, Method):
            raise TypeError(f"recipe item {m!r} is not a method: use tritonpress.GPTQ(), AWQ(), "
                            "SmoothQuant(alpha), SparseGPT(), RTN() or Magnitude()")
    *before, last = recipe
    for m in before:
        if not m.rescales:
            raise ValueError(f"{type(m).__name__} quantizes, so it must come last in the recipe; "
                             "only SmoothQuant and AWQ may come before the quantizer")
    if not last.quantizes:
        raise ValueError(f"{type(last).__name__} only rescales the layer: follow it with a "
                         f"quantizer, e.g. [{type(last).__name__}(...), GPTQ()]")
    if len({type(m) for m in recipe}) < len(recipe):
        raise ValueError(f"recipe {recipe}: each method at most once")
    for m in recipe:
        m.check(scheme)
    return [m.for_scheme(scheme) for m in recipe]


def recipe_label(recipe: list[Method]) -> str:
    return "+".join(m.name for m in recipe)


def checkpoint_actorder(recipe: list[Method]) -> str | None:
    """compressed-tensors' actorder field is GPTQ's (as llm-compressor writes it)."""
    return getattr(recipe[-1], "actorder", None) if recipe[-1].name == "gptq" else None


METHODS = ("rtn", "gptq", "awq", "awq+gptq", "sparsegpt", "magnitude")


def recipe_from_flags(scheme: Scheme, method: str | None = None, *,
                      smoothquant: float | None = None, **options) -> list[Method]:
    """The recipe the CLI's flags name: --method (default by scheme), --smoothquant ALPHA, and
    each method's own options (--damp, --actorder, ...; None: the method's default). An option
    that no method of the recipe takes is refused."""
    from .methods.awq import AWQ
    from .methods.gptq import GPTQ
    from .methods.rtn import RTN
    from .methods.smoothquant import SmoothQuant
    from .methods.sparsegpt import Magnitude, SparseGPT

    kinds = {"rtn": [RTN], "gptq": [GPTQ], "awq": [AWQ], "awq+gptq": [AWQ, GPTQ],
             "sparsegpt": [SparseGPT], "magnitude": [Magnitude]}
    if method is None:
        classes = [type(m) for m in default_recipe(scheme)]
    else:
        classes = kinds.get(str(method).strip().lower())
        if classes is None:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    given = {k: v for k, v in options.items() if v is not None}
    recipe, used = [], set()
    for cls in classes:
        own = {f.name for f in dataclasses.fields(cls)}
        if cls is AWQ and GPTQ in classes:
            own = set()                    # the quantizer's options go to GPTQ
        recipe.append(cls(**{k: v for k, v in given.items() if k in own}))
        used |= own & set(given)
    unused = set(given) - used
    if unused:
        raise ValueError(f"option(s) {', '.join(sorted(unused))} do not apply to method "
                         f"{recipe_label(recipe)}")
    if smoothquant is not None:
        recipe.insert(0, SmoothQuant(smoothquant))
    return recipe


# ----------------------------------------------------------------------------- options

EXPERT_MODES = ("all", "routed")


@dataclass(frozen=True)
class Calibration:
    """The calibration text: `num_samples` windows of `seq_len` tokens from `dataset`
    (canterbury, code, a+b mixes, .txt/.jsonl files or folders, or a `datasets` name).
    experts (Mixture-of-Experts models): the statistics of each routed expert from every
    token ("all", as llm-compressor; the layer's output stays the routed one) or from the
    tokens routed to it ("routed"); see loop/experts.py. Windows start with BOS when the
    model's tokenizer puts one first; chat_template (instruct models): each window one user
    turn rendered by the model's chat template (data.py)."""
    dataset: str = "canterbury"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    experts: str = "all"
    chat_template: bool = False

    def __post_init__(self):
        check_type("dataset", self.dataset, (str, Path),
                   "name a built-in text (canterbury, code), a file or a datasets name")
        check_int("num_samples", self.num_samples, 1, "pass a positive whole number of windows")
        check_int("seq_len", self.seq_len, 1, "pass a positive whole number of tokens")
        check_int("seed", self.seed, 0, "pass a whole number >= 0")
        check_choice("experts", self.experts, EXPERT_MODES)
        check_type("chat_template", self.chat_template, bool, "pass True or False")


@dataclass(frozen=True)
class Evaluation:
    """Held-out perplexity and KL against the uncompressed model: `windows` windows of
    `seq_len` tokens of each text in `dataset` ("a+b": both); `act_sim`: how the scheme's
    dynamic activation quantization is simulated, "vllm" (its kernels' rounding) or
    "compressed-tensors" (its fake quantization)."""
    dataset: str = "canterbury+code"
    windows: int = 16
    seq_len: int = 512
    act_sim: str = "vllm"

    def __post_init__(self):
        check_type("evaluation dataset", self.dataset, (str, Path),
                   "name held-out texts, e.g. 'canterbury+code' or a file")
        check_int("windows", self.windows, 1, "pass a positive whole number of windows")
        check_int("seq_len", self.seq_len, 1, "pass a positive whole number of tokens")
        check_choice("act_sim", self.act_sim, ACT_SIMS)


STREAM_MODES = ("auto", "on", "off")
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Run:
    """How the run is carried out (none of it changes what is computed, except dtype and
    partial_last_group).

    device: where layers compute (default cuda if available); dtype: auto (the model's own),
    bfloat16, float16 or float32; overwrite: replace `out` (only once the new one is complete);
    resume_dir: per-layer state there, a rerun resumes (loop/resume.py); spill_dir: cached
    activations in files there; stream: auto/on/off, one decoder layer in memory at a time
    (loop/stream.py); max_shard_bytes: checkpoint shard size (default 1 GiB); sparse_format:
    "dense" or "sparse-24-bitmask" for 2:4; cache_dir: converted models and data; report_path:
    the JSON report (default OUT.report.json); print_report: the table on the terminal;
    partial_last_group: allow a shorter last weight group."""
    device: str | None = None
    dtype: str = "auto"
    overwrite: bool = False
    resume_dir: str | Path | None = None
    spill_dir: str | Path | None = None
    stream: str = "auto"
    max_shard_bytes: int | None = None
    sparse_format: str = "dense"
    cache_dir: str | Path | None = None
    progress: bool = True
    report_path: str | Path | None = None
    print_report: bool = False
    partial_last_group: bool = False

    def __post_init__(self):
        if self.device is not None:
            check_type("device", self.device, str, "pass 'cuda', 'cuda:1' or 'cpu'")
            if self.device.split(":")[0] not in ("cpu", "cuda"):
                raise ValueError(f"device={self.device!r}: pass 'cuda', 'cuda:N' or 'cpu'")
        check_choice("dtype", self.dtype, DTYPES)
        if self.stream in (True, False):
            object.__setattr__(self, "stream", "on" if self.stream else "off")
        check_choice("stream", self.stream, STREAM_MODES)
        check_choice("sparse_format", self.sparse_format, ("dense", "sparse-24-bitmask"))
        for name in ("overwrite", "progress", "print_report", "partial_last_group"):
            check_type(name, getattr(self, name), bool, "pass True or False")
        for name in ("resume_dir", "spill_dir", "cache_dir", "report_path"):
            check_path(name, getattr(self, name))
        if self.max_shard_bytes is not None:
            check_int("max_shard_bytes", self.max_shard_bytes, 1,
                      "pass a positive number of bytes, e.g. 2 * 1024**3")
