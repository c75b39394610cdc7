"""The linear layer every projection of the model uses, and how it multiplies: its LinearMethod.

The model only ever calls Linear; a LinearMethod decides how the weight is stored (fp32, int8 with
group scales, ...) and which kernel multiplies by it, so the model code never branches on a scheme.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nimblelm.kernels import cpu_ops

# Up to this many activation rows the weight-streaming kernel beats torch's GEMM on CPU: on the 2-core
# EPYC, over SmolLM2's 120 layer matrices with 2 threads, 21 vs 61 ms at 8 rows, 46 vs 79 ms at 32,
# 97 vs 114 ms at 48, 150 vs 169 ms at 64, and about even from 96 rows (2026-11-28). Decode batches up to
# the default max_num_seqs fit, and so do short prompts; longer prefill chunks go to the GEMM.
SKINNY_MAX_ROWS = 64


class LinearMethod:
    """One storage format and kernel choice for Linear layers; a single instance serves every layer."""

    name = "none"

    def process(self, layer: Linear) -> None:
        """Convert the loaded layer.weight (on its device, in its dtype) into this method's storage."""
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel_spec(self, layer: Linear) -> tuple | None:
        """How the C++ decode stack applies this layer, (weight, scales, bias, group) with group 0 for a
        float32 weight; None when it cannot (the model then runs its layers from Python)."""
        return None


class Unquantized(LinearMethod):
    def process(self, layer: Linear) -> None:
        w = layer.weight
        ops = cpu_ops() if w.device.type == "cpu" and w.dtype == torch.float32 else None
        layer.skinny = ops.skinny_linear if ops is not None else None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.skinny is not None and x.shape[0] <= SKINNY_MAX_ROWS:
            return layer.skinny(x.contiguous(), layer.weight, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def kernel_spec(self, layer: Linear) -> tuple | None:
        return None if layer.skinny is None else (layer.weight, None, layer.bias, 0)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.method: LinearMethod = Unquantized()
        self.skinny = None

    def prepare(self, method: LinearMethod | None = None) -> None:
        """Adopt `method` (default: unquantized) once the weights are loaded, on their device and dtype."""
        self.method = method or Unquantized()
        self.method.process(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)
