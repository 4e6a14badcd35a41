"""The result of compressing one Linear: the integers (or fp8 values) an algorithm chose."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.quant import dequantize_ref
from ..schemes import QuantArgs


@dataclass
class QuantizedWeight:
    q: torch.Tensor                   # [out, in] int8 values (int schemes) or float8_e4m3fn
    scale: torch.Tensor               # [out, ngroups] in the storage dtype (the model's dtype)
    zero_point: torch.Tensor | None   # [out, ngroups] int8, asymmetric schemes only
    args: QuantArgs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_ref(self.q, self.scale, self.zero_point, dtype)

    def is_24_sparse(self) -> bool:
        """Every group of 4 consecutive input weights has at least two zeros."""
        out, cols = self.q.shape
        if cols % 4:
            return False
        nz = (self.q.float() != 0).reshape(out, cols // 4, 4).sum(-1)
        return bool((nz <= 2).all())
