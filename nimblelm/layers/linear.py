"""The linear layer every projection of the model uses, and how it multiplies: its LinearMethod.

The model only ever calls Linear; a LinearMethod decides how the weight is stored (fp32, int8 with
group scales, ...) and which kernel multiplies by it, so the model code never branches on a scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nimblelm.kernels import cpu_ops

if TYPE_CHECKING:
    from nimblelm.distributed.tensor_parallel import TensorParallel

# Up to this many activation rows the C++ kernels serve a whole decode step (models/decoder.py) and
# W8A8 weights are multiplied as they are stored rather than dequantized for torch's GEMM (int8 and
# int4 weight-only layers have their own limits, quantization.int8.integer_kernel_max_rows).
SKINNY_MAX_ROWS = 64


class LinearMethod:
    """One storage format and kernel choice for Linear layers; a single instance serves every layer."""

    name = "none"
    # Whether rows() reads the exact weight rows back from this method's storage.
    has_rows = False

    def process(self, layer: Linear) -> None:
        """Convert the loaded layer.weight (on its device, in its dtype) into this method's storage."""
        raise NotImplementedError

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adopt(self, layer: Linear, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Take tensors already in this method's storage format (a GGUF's converted, a saved folder's,
        GPTQ's) as the layer's, exactly as they are, instead of converting a loaded fp32 weight; `dtype`
        is the model's compute dtype. ValueError when they do not fit the layer."""
        raise NotImplementedError(f"{type(self).__name__} cannot adopt stored tensors")

    def stored(self, layer: Linear) -> dict[str, torch.Tensor]:
        """The layer's tensors in the method's file format (what `adopt` takes), whatever layout the
        layer keeps them in."""
        raise NotImplementedError(f"{type(self).__name__} has no file format")

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight: the lookup of an embedding tied to this layer, so that the model need
        not keep a second copy of the matrix in another layout."""
        raise NotImplementedError


class Unquantized(LinearMethod):
    """The loaded weights as they are; on the CPU in float32, repacked once into panels of 16 output
    columns for the C++ kernel, which serves every batch size (kernels/gemm.cpp, packed_linear)."""

    has_rows = True

    def process(self, layer: Linear) -> None:
        w = layer.weight
        if w.device.type == "cpu" and w.dtype == torch.float32 and cpu_ops() is not None:
            layer.register_buffer("panels", cpu_ops().pack_panels(w.detach()))
            layer.weight = None  # a tied embedding then reads its rows from the panels (rows below)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if layer.weight is None:
            return cpu_ops().packed_linear(x, layer.panels, layer.out_features, layer.bias)
        return F.linear(x, layer.weight, layer.bias)

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        if layer.weight is None:
            return layer.panels[ids // 16, :, ids % 16]  # row n is column n % 16 of panel n // 16
        return F.embedding(ids, layer.weight)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: TensorParallel | None = None):
        """reduce: a row-parallel layer's tensor-parallel group, which sums the ranks' partial outputs."""
        super().__init__()
        if reduce is not None and bias:
            raise ValueError("a row-parallel Linear would add its bias once per rank")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.method: LinearMethod = Unquantized()
        self.reduce = reduce

    def prepare(self, method: LinearMethod | None = None) -> None:
        """Adopt `method` (default: unquantized) once the weights are loaded, on their device and dtype."""
        self.method = method or Unquantized()
        self.method.process(self)

    def adopt(self, method: LinearMethod, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Take `method` with its storage given as it is (no fp32 weight was ever made for this layer)."""
        self.method = method
        self.weight = None
        method.adopt(self, tensors, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, x)
        return out if self.reduce is None else self.reduce.all_reduce_(out)


class RowsEmbedding(Linear):
    """A token embedding stored as a linear method stores a weight (GGUF direct loading keeps a quantized
    token_embd quantized): the lookup reads rows back through the method, so no fp32 table is kept."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.method.rows(self, ids)
