"""GPTQ over several processes with torch.distributed (launch with torchrun).

What each rank does, layer by layer (the single-process pipeline, unchanged, runs on the rank's
share of the calibration batches):
  1. calibration batches are split into contiguous slices, one per rank;
  2. Hessians: each rank sums RAW x x^T over its real tokens in float64 and counts them; the
     sums and counts are all-reduced, then H = 2/n sum x x^T (float32). Normalising after the
     reduction makes H exact whatever the split (up to float64 summation order, ~1e-16
     relative, far below float32's rounding);
  3. solves: the layer's Linears are dealt round-robin over the ranks; each rank GPTQs its
     share and broadcasts (q, scale, zero point, dequantized weight, info) to every rank, so all
     ranks write the same weights back and compute their batches' next-layer inputs;
  4. rank 0 writes the checkpoint (api.compress only saves on rank 0).
Without an initialised process group nothing here runs: api.compress takes the ordinary
single-process path, whose float32 running-mean Hessians differ from these in the last bits;
GPTQ's error feedback turns that into ~0.5% of integers one or two steps apart (same scales).
A process group of ONE rank (torchrun --nproc_per_node 1) runs this code and gives the
N-rank checkpoint bit for bit.
"""
from __future__ import annotations

import os
from functools import partial

import torch
import torch.distributed as dist

from .hooks import run_with_linear_inputs, tokens_of
from .sequential import compress_sequential


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

def collect_hessians_allreduced(layer, linears, inputs) -> dict[str, tuple[torch.Tensor, int]]:
    """{full name: (H [in, in] fp32 = 2/n sum x x^T over every rank's tokens, n)}; Linears
    reading the same input share one H object."""
    sums: dict[str, list] = {}

    def add(lead, x, mask):
        t = tokens_of(x, mask).double()
        if lead not in sums:
            sums[lead] = [torch.zeros(t.shape[-1], t.shape[-1], dtype=torch.float64,
                                      device=t.device), 0]
        sums[lead][0].addmm_(t.t(), t)
        sums[lead][1] += t.shape[0]

    groups = run_with_linear_inputs(layer, linears, inputs, add)
    out = {}
    for lead in sorted(groups):                   # same order on every rank
        S, n = sums[lead]
        if active():
            counts = torch.tensor([n], dtype=torch.float64, device=S.device)
            dist.all_reduce(S)
            dist.all_reduce(counts)
            n = int(counts.item())
        H = (S * (2.0 / n)).float() if n else S.float()
        for m in groups[lead]:
            out[m] = (H, n)
    return out


# ----------------------------------------------------------------------------- GPTQ

def gptq_layer_distributed(layer_idx, layer, prefix, inputs, ctx, *, block_size: int = 128,
                           damp: float = 0.01, max_damp: float = 10.0,
                           actorder: str | None = "static", group_scales: str | None = None,
                           clip: bool = True):
    """gptq.gptq_layer's contract (static activation order by default), with all-reduced
    Hessians and the stacked solves (one per shared Hessian) dealt over the ranks."""
    from ..methods import gptq

    hessians = collect_hessians_allreduced(layer, ctx.linears, inputs)
    names = list(ctx.linears)
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(hessians[name][0]), []).append(name)
    w, r = world_size(), rank()
    mine = {}
    for j, members in enumerate(groups.values()):
        if j % w != r:
            continue
        done = gptq.gptq_linears({n: ctx.linears[n] for n in members},
                                 {n: hessians[n][0] for n in members}, ctx.scheme.weights,
                                 ctx.scale_dtype, block_size=block_size, damp=damp,
                                 max_damp=max_damp,
                                 actorder=gptq.check_actorder(actorder),
                                 group_scales=group_scales or gptq.DEFAULT_GROUP_SCALES,
                                 clip=clip, partial_last_group=ctx.partial_last_group)
        for n, (qw, info) in done.items():
            info.update(tokens=hessians[n][1], solved_on_rank=r)
            mine[n] = (qw, ctx.linears[n].weight.data.cpu(), info)

    results = dict(mine)
    if active():
        for src in range(w):
            box = [mine if src == r else None]
            dist.broadcast_object_list(box, src=src)
            results.update(box[0])

    qweights, infos = {}, {}
    for name in names:                               # same write-back order on every rank
        qw, deq, info = results[name]
        lin = ctx.linears[name]
        lin.weight.data = deq.to(lin.weight.device)
        qweights[name], infos[name] = qw, info
    return qweights, infos


def run_method(model, batches, scheme, opts, device, *, progress: bool = True, wrap=None,
               spill_dir=None):
    """api._run_method's contract when a process group is active: (qweights, infos), the same
    on every rank."""
    if opts.method != "gptq":
        raise ValueError(f"method {opts.method} does not run on several processes yet: use gptq, "
                         "or run it in a single process (python, not torchrun)")
    if opts.smoothquant is not None:
        raise ValueError("SmoothQuant does not run on several processes yet: drop --smoothquant "
                         "or run in a single process (python, not torchrun)")
    fn = partial(gptq_layer_distributed, **opts.gptq())
    if wrap is not None:                 # resume.resumable
        fn = wrap(fn)
    res = compress_sequential(model, split_batches(list(batches)), scheme, fn,
                              device=local_device(device),
                              partial_last_group=opts.partial_last_group,
                              progress=progress and is_main(), spill_dir=spill_dir)
    return res.qweights, res.infos
