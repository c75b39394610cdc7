"""16-bit weights (bfloat16 or float16) for float32 activations: half the bytes of float32 per decode step.
On the CPU the weights live in pack_panels' layout, and the panel kernel widens each value in registers (a
bfloat16's bits are the top half of a float32; float16 through F16C) for float32 arithmetic; on a CPU with
AMX (or AVX-512 BF16, where faster), steps of 8 rows and more multiply bfloat16 weights by the activations
rounded to bfloat16 (kernels/bf16_gemm.cpp). Elsewhere torch multiplies by the widened weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nimblelm.kernels import cpu_ops
from nimblelm.layers.linear import Linear, LinearMethod

FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16}


class HalfWeights(LinearMethod):
    has_rows = True

    def __init__(self, name: str):
        self.name, self.dtype = name, FORMATS[name]

    def process(self, layer: Linear) -> None:
        self._store(layer, layer.weight.detach().to(self.dtype), layer.weight.dtype)

    def adopt(self, layer: Linear, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        weight = tensors["weight"]
        if weight.shape != (layer.out_features, layer.in_features):
            raise ValueError(f"{self.name} weight of shape {tuple(weight.shape)} for a {layer.in_features} -> "
                             f"{layer.out_features} layer")
        self._store(layer, weight.to(self.dtype), dtype)

    def _store(self, layer: Linear, weight: torch.Tensor, dtype: torch.dtype) -> None:
        layer.weight = None
        layer.compute_dtype = dtype
        if weight.device.type == "cpu" and dtype == torch.float32 and cpu_ops() is not None:
            layer.register_buffer("panels", cpu_ops().pack_panels(weight))
        else:
            layer.register_buffer("half_weight", weight)

    def stored(self, layer: Linear) -> dict[str, torch.Tensor]:
        if hasattr(layer, "panels"):
            return {"weight": panel_rows(layer.panels, torch.arange(layer.out_features), layer.in_features)}
        return {"weight": layer.half_weight}

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if hasattr(layer, "panels"):
            return cpu_ops().packed_linear(x, layer.panels, layer.out_features, layer.bias)
        return F.linear(x, layer.half_weight.to(x.dtype), layer.bias)

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        if hasattr(layer, "panels"):
            rows = panel_rows(layer.panels, ids, layer.in_features)
        else:
            rows = F.embedding(ids, layer.half_weight)
        return rows.to(layer.compute_dtype)


def panel_rows(panels: torch.Tensor, ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `ids` of the weight that pack_panels stored: row n is column n % 16 of panel n // 16, and a
    bfloat16 panel [Kp, 16] holds k-values in pairs, [Kp / 2, 16, 2], with K padded to Kp."""
    if panels.dtype != torch.bfloat16:
        return panels[ids // 16, :, ids % 16]
    pairs = panels.view(panels.shape[0], -1, 16, 2)
    return pairs[ids // 16, :, ids % 16].flatten(-2)[..., :in_features]
