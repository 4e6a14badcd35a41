import os

# The Triton interpreter is chosen when kernels are decorated, so set it before any import
# of tritonpress.kernels. On a CUDA machine the real kernels run instead.
try:
    import torch
    _cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _cuda = False
if not _cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return "cuda" if _cuda else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
