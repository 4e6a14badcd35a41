"""The options of one compression run, in one place.

compress() builds an `Options` from its arguments and checks it once (`resolved`); the CLI
takes its defaults from here; the report prints `as_dict()`; a resume folder is pinned to it.
Each knob has one name everywhere: `damp` (GPTQ's and SparseGPT's dampening, a fraction of
the Hessian's mean diagonal), `block_size` (the column block of their sweeps).
Plain Python (no torch): the CLI builds its parser from here before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .schemes import Scheme

# the method each scheme gets when none is named
DEFAULT_METHOD = {"W4A16": "gptq", "W4A16_ASYM": "gptq", "W8A8_INT8": "gptq",
                  "W8A8_FP8": "rtn", "W8A8_FP8_24": "sparsegpt"}
METHODS = ("rtn", "gptq", "awq", "awq+gptq", "sparsegpt", "magnitude")
DATA_FREE = ("rtn", "magnitude")          # no calibration data, no layer loop
GPTQ_METHODS = ("gptq", "awq+gptq")      # the methods whose weights GPTQ quantizes
ORDERED_METHODS = GPTQ_METHODS + ("sparsegpt",)   # the sweeps that take an actorder


@dataclass(frozen=True)
class Options:
    method: str | None = None      # None: DEFAULT_METHOD of the scheme
    dataset: str = "canterbury"    # calibration text
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    damp: float = 0.01
    block_size: int = 128
    actorder: str | None = "static"   # GPTQ, SparseGPT: "static" or None (columns in order)
    clip: bool = True              # the clipping search of 4-bit group scales (GPTQ, AWQ)
    smoothquant: float | None = None   # SmoothQuant strength before GPTQ (W8A8_INT8)
    refit: float | None = None     # SparseGPT: ridge of the kept weights' refit (None: off)
    sequential: bool = False       # SparseGPT: each Hessian after the Linears called before it
    permute: bool | None = None    # SparseGPT: spread down/o_proj's inputs over the 2:4 groups
                                   # (None: on with SparseGPT)
    partial_last_group: bool = False

    def resolved(self, scheme: Scheme) -> "Options":
        """The method named (or the scheme's default), every value checked against the
        scheme; actorder None for methods that sweep no columns (it is then meaningless)."""
        method = (self.method or DEFAULT_METHOD[scheme.name]).lower()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if method in ("sparsegpt", "magnitude") and not scheme.sparsity_24:
            raise ValueError(f"method {method} prunes to 2:4: use it with scheme W8A8_FP8_24")
        if scheme.sparsity_24 and method not in ("sparsegpt", "magnitude"):
            raise ValueError("scheme W8A8_FP8_24 needs method sparsegpt (default) or magnitude")
        if method.startswith("awq") and scheme.weights.num_bits != 4:
            raise ValueError("AWQ is for W4A16 schemes (W4A16_ASYM by default)")
        actorder = check_actorder(self.actorder)
        if not self.damp >= 0:
            raise ValueError(f"damp={self.damp}: the dampening is a fraction >= 0 of the "
                             "Hessian's mean diagonal (default 0.01)")
        if self.refit is not None and (method != "sparsegpt" or not self.refit > 0):
            raise ValueError(f"refit={self.refit}: SparseGPT's refit of the kept weights takes "
                             "a ridge > 0, a fraction of the Hessian's mean diagonal (e.g. "
                             "0.1), with method sparsegpt")
        if (self.sequential or self.permute) and method != "sparsegpt":
            raise ValueError("sequential and permute are SparseGPT's: use them with method "
                             "sparsegpt (scheme W8A8_FP8_24)")
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size}: use a positive number of "
                             "columns (default 128)")
        return dataclasses.replace(self, method=method,
                                   actorder=actorder if method in ORDERED_METHODS else None,
                                   permute=(self.permute is not False) and method == "sparsegpt")

    @property
    def data_free(self) -> bool:
        return self.method in DATA_FREE

    @property
    def checkpoint_actorder(self) -> str | None:
        """What the checkpoint records: compressed-tensors' actorder is GPTQ's (as
        llm-compressor writes it); SparseGPT's order of 2:4 groups leaves no trace in it."""
        return self.actorder if self.method in GPTQ_METHODS else None

    def gptq(self) -> dict:
        """The keyword arguments of gptq.gptq_layer (and gptq_quantize_stacked)."""
        return dict(block_size=self.block_size, damp=self.damp, actorder=self.actorder,
                    clip=self.clip)

    def sparsegpt(self) -> dict:
        """The keyword arguments of sparsegpt.sparsegpt_method."""
        return dict(block_size=self.block_size, damp=self.damp, actorder=self.actorder,
                    refit=self.refit, sequential=self.sequential,
                    permute=self.permute)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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
