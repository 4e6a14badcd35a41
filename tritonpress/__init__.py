"""tritonpress: compress Hugging Face causal LMs into vLLM-loadable checkpoints."""
from .schemes import PRESETS, Scheme, get_scheme

__all__ = ["PRESETS", "Scheme", "get_scheme", "compress", "evaluate"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import tritonpress` light: torch models load on first use
    if name == "compress":
        from .api import compress
        return compress
    if name == "evaluate":
        from .quality import evaluate
        return evaluate
    raise AttributeError(name)
