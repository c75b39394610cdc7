"""W8A8: int8 weights with one scale per output channel, activations rounded to int8 per token.

Storage: `qweight` int8 [N, K] and `scales` float32 [N]; w[n, k] = scales[n] * qweight[n, k] (in memory
in row tiles, tiles.py, the scales as [N, 1] tiled). At each call the activations get a scale per row
(token), max|x| / 127, computed from that row alone.

Up to SKINNY_MAX_ROWS rows (decode) the C++ kernel `w8a8_linear` rounds each row to int8 and takes
exact integer dot products (maddubs on AVX2), scaled by both scales; larger batches (prefill) compute
float32 F.linear of the two dequantized operands, the same result up to float rounding.
`torch._int_mm` (int8 x int8 -> int32, weight column-major, i.e. qweight.t()) was measured on this
machine (AMD EPYC, AVX2 without VNNI, 2 threads, torch 2.13, SmolLM2-135M's 120 layer matrices) against
the float path: 522 vs 40 ms at 1 row, 6.6 s vs 1.8 s at 64 rows, 53 s vs 3.0 s at 512 rows. Without
VNNI it loses everywhere, so it is not used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nimblelm.kernels import ops_for
from nimblelm.layers.linear import SKINNY_MAX_ROWS, Linear, LinearMethod
from nimblelm.quantization import tiles

_TINY = torch.finfo(torch.float32).tiny


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (q int8, scale float32 [rows, 1]) with x ~ q * scale."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp_min(_TINY)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


class W8A8(LinearMethod):
    name = "w8a8"

    def process(self, layer: Linear) -> None:
        q, scales = quantize_rows(layer.weight.detach())
        dtype = layer.weight.dtype
        layer.weight = None  # a tied lm_head only drops its reference: the embedding keeps the tensor
        self.adopt(layer, {"qweight": q, "scales": scales.squeeze(1)}, dtype)

    def adopt(self, layer: Linear, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        q, scales = tensors["qweight"], tensors["scales"]
        n, k = layer.out_features, layer.in_features
        if q.dtype != torch.int8 or tuple(q.shape) != (n, k) or tuple(scales.shape) != (n,):
            raise ValueError(f"w8a8 tensors {tuple(q.shape)} {tuple(scales.shape)} do not fit the layer")
        # The scales tile as a column, one value per row.
        for key, t in tiles.tile({"qweight": q, "scales": scales.to(torch.float32)[:, None]}).items():
            layer.register_buffer(key, t)
        layer.compute_dtype = dtype

    def stored(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {"qweight": tiles.untile(layer, "qweight"), "scales": tiles.untile(layer, "scales").squeeze(1)}

    def _kernel(self, layer: Linear) -> bool:
        return layer.compute_dtype == torch.float32 and layer.in_features % 32 == 0  # the kernel's blocks

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        ops = ops_for(x)
        if ops is not None and x.shape[0] <= SKINNY_MAX_ROWS and self._kernel(layer):
            return ops.w8a8_linear(x, layer.qweight, layer.scales, layer.bias)
        xq, xs = quantize_rows(x)
        if ops is not None and self._kernel(layer):
            w = ops.int8_dequantize(layer.qweight, layer.scales, layer.in_features, layer.in_features)
        else:
            w = tiles.untile(layer, "qweight").float() * tiles.untile(layer, "scales")
        return F.linear(xq.float() * xs, w, layer.bias).to(layer.compute_dtype)

