"""Several processes with torch.distributed (launch with torchrun): a Hessian reducer for the
one layer loop, nothing more.

What each rank does, layer by layer (the single-process loop, unchanged, on the rank's share of
the calibration batches):
  1. calibration batches are split into contiguous slices, one per rank (split_batches);
  2. Hessians (collect_hessians_allreduced, given to the loop as ctx.hessians): each rank sums
     RAW x x^T over its real tokens in float64 and counts them; the sums and counts are
     all-reduced, then H = 2/n sum x x^T (float32). Normalising after the reduction makes H
     exact whatever the split (up to float64 summation order, ~1e-16 relative);
  3. every rank then solves every Linear from the same H, so all ranks hold the same weights
     and compute their batches' next-layer inputs; rank 0 writes the checkpoint.
Without an initialised process group nothing here runs: the loop uses float32 running-mean
Hessians, which differ from these in the last bits; GPTQ's error feedback turns that into
~0.5% of integers one or two steps apart (same scales). A process group of ONE rank
(torchrun --nproc_per_node 1) runs this code and gives the N-rank checkpoint bit for bit.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .hooks import HessianStats, amax_abs, run_with_linear_inputs, tokens_of


def active() -> bool:
    """A process group is initialised (even of one rank: a 1-process torchrun run takes this
    path too, so that it gives the same checkpoint as an N-process one, bit for bit)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active() and dist.get_world_size() > 1:
        dist.barrier()


def init_from_env() -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE in the env):
    NCCL when CUDA is there, else gloo. Returns whether it is now active."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return active()


def local_device(device) -> torch.device:
    """'cuda' without an index means this rank's GPU (LOCAL_RANK)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def split_batches(batches: list, r: int | None = None, w: int | None = None) -> list:
    """Rank r's contiguous slice of the batches (the first len % w ranks get one more)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    if len(batches) < w:
        raise ValueError(f"{len(batches)} calibration batches cannot be split over {w} ranks: "
                         f"ask for at least {w} batches (more samples or a smaller batch size), "
                         "or launch fewer processes")
    k, extra = divmod(len(batches), w)
    start = r * k + min(r, extra)
    return batches[start:start + k + (r < extra)]


# ----------------------------------------------------------------------------- Hessians

def collect_hessians_allreduced(layer, linears, inputs) -> dict[str, HessianStats]:
    """hooks.collect_hessians' contract with H = 2/n sum x x^T over every rank's tokens;
    Linears reading the same input share one HessianStats."""
    sums: dict[str, list] = {}

    def add(lead, x, mask):
        t = tokens_of(x, mask)
        a = amax_abs(t) if t.numel() else torch.zeros((), dtype=t.dtype, device=t.device)
        t = t.double()
        if lead not in sums:
            sums[lead] = [torch.zeros(t.shape[-1], t.shape[-1], dtype=torch.float64,
                                      device=t.device), 0, a]
        sums[lead][0].addmm_(t.t(), t)
        sums[lead][1] += t.shape[0]
        sums[lead][2] = torch.maximum(sums[lead][2], a)

    groups = run_with_linear_inputs(layer, linears, inputs, add)
    out = {}
    for lead in sorted(groups):                   # same order on every rank
        S, n, amax = sums[lead]
        if active():
            counts = torch.tensor([n], dtype=torch.float64, device=S.device)
            dist.all_reduce(S)
            dist.all_reduce(counts)
            n = int(counts.item())
            # NVFP4's activation global scale: the max over every rank's tokens (exact: the
            # inputs' values, reduced as fp32)
            a = amax.float().reshape(1)
            dist.all_reduce(a, op=dist.ReduceOp.MAX)
            amax = a[0].to(amax.dtype)
        st = HessianStats((S * (2.0 / n)).float() if n else S.float(), n, groups[lead], amax)
        for m in groups[lead]:
            out[m] = st
    return out
