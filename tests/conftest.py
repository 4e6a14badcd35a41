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


def scale_through_awq_mappings(model, generator):
    """Fold random scales (0.3 ... 3.3) into every AWQ mapping of every decoder layer, as AWQ
    would; returns ([smoothing layer names], {skipped: why}) per layer."""
    from tritonpress.methods.awq import apply_scales, find_mappings
    per_layer = []
    for layer in model.model.layers:
        modules = dict(layer.named_modules())
        found, skipped = find_mappings(layer)
        for m in found:
            s = torch.rand(modules[m.balance[0]].in_features, generator=generator) * 3 + 0.3
            apply_scales(modules[m.smooth], [modules[b] for b in m.balance], s)
        per_layer.append(([m.smooth for m in found], skipped))
    return per_layer
