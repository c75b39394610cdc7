"""The linear layer every projection of the model uses; the one place that picks a matmul kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nimblelm.kernels import cpu_ops

# Up to this many activation rows, a weight-streaming kernel beats torch's GEMM on CPU (bench decode).
SKINNY_MAX_ROWS = 4


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
