"""What several bench scripts share: timing, table cells and markdown tables, the run's
environment, peak GPU memory, magnitude 2:4, a SIGTERM stop, and where and how
llm-compressor runs (bench/llmc_oneshot.py in its own python).

Plain functions. Module level needs only the standard library and torch: llm-compressor's
venv imports this too, when a script re-runs itself there as a worker. Each script makes
the repository root importable first (its `sys.path` lines at the top), then
`from bench import common`.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
LLMC_VENV_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"   # `make llmc-env`
LLMC_ONESHOT = ROOT / "bench" / "llmc_oneshot.py"


# ----------------------------------------------------------------------------- timing

def _on_gpu(device) -> bool:
    return CUDA if device is None else torch.device(device).type == "cuda"


def sync(device=None):
    """Wait for the GPU: for `device` when given (nothing unless it is a CUDA device), else
    whenever CUDA is available."""
    if _on_gpu(device):
        torch.cuda.synchronize()


def timed(fn, reps=3, warmup=1, setup=None, device=None):
    """(median wall ms of `reps` calls after `warmup` untimed ones, the last result).

    Calls fn(), or fn(setup()) with setup's time left out; the GPU is synchronized before
    and after each timed call (sync(device))."""
    out = None
    for _ in range(warmup):
        out = fn() if setup is None else fn(setup())
    ts = []
    for _ in range(reps):
        arg = None if setup is None else setup()
        sync(device)
        t = time.perf_counter()
        out = fn() if setup is None else fn(arg)
        sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), out


def cpu_ms(fn, arg_sets=((),), reps=3) -> float:
    """Median wall ms of `reps` calls fn(*arg_sets[r % len(arg_sets)]): no warm-up, no
    synchronize (the reduced CPU modes)."""
    times = []
    for r in range(reps):
        t = time.perf_counter()
        fn(*arg_sets[r % len(arg_sets)])
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def graph_ms(fn, arg_sets, rep) -> float:
    """Median ms per call over CUDA-graph replays (triton's do_bench_cudagraph, `rep` ms);
    call k runs fn(*arg_sets[k % len(arg_sets)]), so the calls cycle through copies of the
    weights. Calls that cannot be captured are timed with CUDA events instead (launch
    overhead included)."""
    import triton
    i = [0]

    def call():
        fn(*arg_sets[i[0] % len(arg_sets)])
        i[0] += 1
    try:
        return triton.testing.do_bench_cudagraph(call, rep=rep, return_mode="median")
    except Exception:   # something not capturable: plain events (includes launch overhead)
        torch.cuda.synchronize()
        return triton.testing.do_bench(call, warmup=5, rep=40, return_mode="median")


class Stopped(BaseException):
    """SIGTERM arrived (not an Exception: the per-step handlers must not swallow it)."""


def raise_stopped(signum, frame):
    """SIGTERM handler (`timeout` ends a run): raise Stopped, so the run reports what it has."""
    raise Stopped()


# ----------------------------------------------------------------------------- tables

def fmt(x, nd=3) -> str:
    """A table cell: '-' for None, a float to `nd` significant digits, anything else str()."""
    return "-" if x is None else (f"{x:.{nd}g}" if isinstance(x, float) else str(x))


def md_table(header, rows, right=False) -> str:
    """A markdown table, columns padded to their widest cell (str() of each), left-aligned
    or, with right=True, right-aligned."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.rjust(n) if right else c.ljust(n) for c, n in zip(r, w)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (n + 2) for n in w) + "|",
                      *map(line, cells[1:])])


# ----------------------------------------------------------------------------- environment

def env_info(cuda: bool, date: bool = False) -> dict:
    """The head of a result's "info": device, capability, torch, python (and date)."""
    info = dict(device=torch.cuda.get_device_name() if cuda else "cpu",
                capability=list(torch.cuda.get_device_capability()) if cuda else None,
                torch=torch.__version__, python=platform.python_version())
    if date:
        info["date"] = datetime.date.today().isoformat()
    return info


def add_versions(info: dict, modules=("triton",)) -> dict:
    """info[m] = m.__version__ for each module that imports."""
    for mod in modules:
        try:
            info[mod] = importlib.import_module(mod).__version__
        except ImportError:
            pass
    return info


# ----------------------------------------------------------------------------- memory

def reset_peak_memory(device=None, empty_cache=False):
    """Start a new GPU peak for peak_gib() (with empty_cache: release cached blocks first)."""
    if _on_gpu(device):
        if empty_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device=None) -> float | None:
    """Peak GPU memory allocated since the last reset, in GiB; None off the GPU."""
    return torch.cuda.max_memory_allocated() / 2 ** 30 if _on_gpu(device) else None


# ----------------------------------------------------------------------------- weights

def prune24(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest of every four consecutive inputs (magnitude 2:4; the library's
    mask, ties to the lower column)."""
    from tritonpress.kernels.sparse24 import keep_2_of_4
    return torch.where(keep_2_of_4(w.abs()), w, torch.zeros_like(w))


def save_with_tokenizer(model, path):
    """Save a (random) model with the byte-level tokenizer, for llm-compressor or compress()
    to load from the folder."""
    from tritonpress.models import byte_tokenizer
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)


# ----------------------------------------------------------------------------- llm-compressor

def llmc_venv_python() -> str | None:
    """.venv-llmc's python when it is there."""
    return str(LLMC_VENV_PYTHON) if LLMC_VENV_PYTHON.exists() else None


def find_llmc_python(arg: str | None = None) -> str | None:
    """The python to run llm-compressor in: `arg` when given, else this one when it has
    llmcompressor, else .venv-llmc's when present, else None."""
    if arg:
        return arg
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    return llmc_venv_python()


def llmc_oneshot_args(model_dir, calib, recipe: str, group_size=None, out=None) -> list[str]:
    """bench/llmc_oneshot.py's arguments (they follow the python and the script)."""
    args = ["--model", str(model_dir), "--calib", str(calib), "--recipe", recipe]
    if group_size is not None:
        args += ["--group-size", str(group_size)]
    if out is not None:
        args += ["--out", str(out)]
    return args
