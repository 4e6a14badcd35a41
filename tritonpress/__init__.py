"""tritonpress: compress Hugging Face causal LMs into vLLM-loadable checkpoints.

    import tritonpress as tp
    tp.compress("smollm2-135m", "W8A8_FP8", "out/fp8")
    tp.compress(path, "W8A8_INT8", "out/int8", [tp.SmoothQuant(0.8), tp.GPTQ()],
                calibration=tp.Calibration(num_samples=256))
"""
from .recipe import Calibration, Evaluation, Run
from .schemes import PRESETS, Scheme, get_scheme

__all__ = ["compress", "evaluate", "get_scheme", "PRESETS", "Scheme", "Calibration",
           "Evaluation", "Run", "RTN", "GPTQ", "AWQ", "SmoothQuant", "SparseGPT", "Magnitude"]
__version__ = "0.1.0"

_LAZY = {"compress": "api", "evaluate": "api", "RTN": "methods.rtn", "GPTQ": "methods.gptq",
         "AWQ": "methods.awq", "SmoothQuant": "methods.smoothquant",
         "SparseGPT": "methods.sparsegpt", "Magnitude": "methods.sparsegpt"}


def __getattr__(name):  # keep `import tritonpress` light: torch loads on first use
    if name not in _LAZY:
        raise AttributeError(f"module 'tritonpress' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value          # no submodule of that name can shadow it later
    return value
