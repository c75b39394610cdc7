"""The linear layer every projection of the model uses; the one place that picks a matmul kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nimblelm.kernels import cpu_ops

# Up to this many activation rows the weight-streaming kernel beats torch's GEMM on CPU: on the 2-core
# EPYC, over SmolLM2's layer shapes with 2 threads, 21 vs 61 ms at 8 rows, 46 vs 79 ms at 32 rows, and
# about even near 128 (2026-11-28). Decode batches fit; prefill chunks go to the GEMM.
SKINNY_MAX_ROWS = 32


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self._skinny = None

    def prepare(self) -> None:
        """Choose the kernel once the weights are on their device and in their dtype."""
        w = self.weight
        if w.device.type == "cpu" and w.dtype == torch.float32:
            ops = cpu_ops()
            self._skinny = ops.skinny_linear if ops is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._skinny is not None and x.shape[0] <= SKINNY_MAX_ROWS:
            return self._skinny(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
