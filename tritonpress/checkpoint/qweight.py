"""The result of compressing one Linear: the integers (or fp8 values) an algorithm chose."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.quant import dequantize_ref
from ..schemes import QuantArgs


@dataclass
class QuantizedWeight:
    q: torch.Tensor                   # [out, in] int8 values (int schemes), float8_e4m3fn, or
                                      # uint8 e2m1 codes (fp4 schemes, unpacked)
    scale: torch.Tensor               # [out, ngroups] in the storage dtype (the model's dtype;
                                      # float8_e4m3fn NVFP4, uint8 e8m0 exponents MXFP4);
                                      # [ceil(out/bh), ceil(in/bw)] for block strategy
    zero_point: torch.Tensor | None   # [out, ngroups] int8, asymmetric schemes only
    args: QuantArgs
    global_scale: torch.Tensor | None = None        # NVFP4 weights: fp32 [1]
    input_global_scale: torch.Tensor | None = None  # NVFP4 activations: fp32 [1] (calibrated)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.args.is_fp4:
            from ..kernels.fp4 import decode_e2m1, effective_scale
            rows, cols = self.q.shape
            s = effective_scale(self.scale, self.global_scale, self.args)
            v = decode_e2m1(self.q).reshape(rows, s.shape[1], -1) * s.unsqueeze(-1)
            return v.reshape(rows, cols).to(dtype)
        if self.args.strategy == "block":
            from ..kernels.fp8_block import dequantize_fp8_block_ref
            return dequantize_fp8_block_ref(self.q, self.scale, tuple(self.args.block_structure),
                                            dtype)
        return dequantize_ref(self.q, self.scale, self.zero_point, dtype)

    def cpu(self) -> "QuantizedWeight":
        cpu = (lambda t: None if t is None else t.cpu())
        return QuantizedWeight(self.q.cpu(), self.scale.cpu(), cpu(self.zero_point), self.args,
                               cpu(self.global_scale), cpu(self.input_global_scale))

    def is_24_sparse(self) -> bool:
        """Every group of 4 consecutive input weights has at least two zeros."""
        out, cols = self.q.shape
        if cols % 4:
            return False
        nz = (self.q.float() != 0).reshape(out, cols // 4, 4).sum(-1)
        return bool((nz <= 2).all())
