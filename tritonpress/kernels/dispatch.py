"""Which implementation runs: Triton kernels on CUDA GPUs, torch references elsewhere.

TRITONPRESS_BACKEND forces a choice for testing:
  auto   (default) Triton on CUDA tensors, torch reference on CPU tensors
  torch  always the torch reference
  triton always Triton; on CPU tensors this needs TRITON_INTERPRET=1 set before import
Nothing here touches the CUDA driver unless a tensor is already on a CUDA device.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def backend() -> str:
    b = os.environ.get("TRITONPRESS_BACKEND", "auto").lower()
    if b not in BACKENDS:
        raise ValueError(f"TRITONPRESS_BACKEND={b!r}: use one of {', '.join(BACKENDS)}")
    return b


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernel should run on these tensors."""
    b = backend()
    if b == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if b == "triton":
        if not on_cuda and not interpreting():
            raise RuntimeError("TRITONPRESS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "in the environment before tritonpress is imported")
        return True
    return on_cuda


def capability(device: torch.device | None = None) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None on CPU."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)
