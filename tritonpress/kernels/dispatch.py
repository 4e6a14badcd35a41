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


# Shared memory one block may use (the opt-in maximum), by compute capability.
SMEM_BYTES = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
              (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}


def smem_bytes() -> int:
    """Shared memory per block on the current CUDA device; 99 KB (what every sm80+ GPU has)
    for a capability not in the table."""
    return SMEM_BYTES.get(capability(), 99 * 1024)


def fits_gpu(configs: list, smem_need, max_acc_per_thread: int | None = None) -> list:
    """The autotune configs this GPU can run without waste: the shared memory estimate
    smem_need(config) fits, and (if given) the BLOCK_M x BLOCK_N accumulator spread over the
    warps holds at most max_acc_per_thread values per thread (more spills registers; the bounds
    per kernel were measured with tests/compile_kernels.py). The smallest config when none fits."""
    limit = smem_bytes()

    def ok(c):
        if max_acc_per_thread is not None and (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
                                               > max_acc_per_thread * 32 * c.num_warps):
            return False
        return smem_need(c) <= limit
    keep = [c for c in configs if ok(c)]
    return keep or [min(configs, key=smem_need)]


def launch(kernel, tuned, grid, args: tuple, consts: dict, config: dict | None = None) -> None:
    """One GEMM launch: with `config` (a tile choice; what the interpreter and the compile test
    pass) the plain kernel, else `tuned`, its autotuned wrapper, picks over its configs."""
    if config is not None:
        kernel[grid](*args, **consts, **config)
    else:
        tuned[grid](*args, **consts)


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t as a 2-D [rows, last dim] tensor whose rows are contiguous (what the GEMM kernels
    index with one row stride): a view when it already is one."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()
