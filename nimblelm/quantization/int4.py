"""int4 weights with a scale and a minimum per group of input channels.

Storage format (one format for every producer: RTN at load, GPTQ, AWQ, saved folders; layers keep
it in row tiles, tiles.py):

- `qweight`: uint8 [N, K / 2]. Each output row n is cut along K into blocks of 32 weights, stored as
  16 consecutive bytes; byte i (0..15) of a block holds q[i] in its low nibble and q[i + 16] in its
  high nibble (llama.cpp's Q4_0 nibble order). q is unsigned, 0..15.
- `scales`, `mins`: float32 [N, K / group], one pair per group of `group` inputs (32, 64 or 128, a
  multiple of the block, dividing K); in memory float16 where that holds them exactly (int8.scale_storage:
  symmetric RTN and GPTQ, GGUF's Q4_0 and Q4_1), as llama.cpp's blocks store them.
- GGUF's Q4_K keeps its scales and minimums in two levels instead: int8 values per group times the float16
  factor of their super-block of 256 weights (`scale_factors`, `min_factors`; int8.with_factors).
- The weight is w[n, k] = scales[n, k // group] * q[n, k] + mins[n, k // group].

Symmetric quantization has mins = -8 * scales (q - 8 is the signed value, as in Q4_0); asymmetric
quantization with an integer zero point (AWQ) has mins = -scales * zero. A layer whose mins are all
-8 * scales keeps none in memory (its `mins` is None): the kernel and dequantize_int4 derive them (to
float rounding), and a decode step reads a tenth fewer bytes at groups of 32 (a sixth with float32 scales,
when SmolLM2's and Qwen2.5-Coder-1.5B's int4 layers at batch 1 ran 9% and 14% faster for it). Saved folders
always hold mins, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import ops_for
from nimblelm.layers.linear import Linear, LinearMethod
from nimblelm.quantization import tiles
from nimblelm.quantization.int8 import (
    check_factors,
    half_rounded,
    integer_kernel_max_rows,
    layer_scales,
    scale_storage,
    takes_dequant_linear,
)

BLOCK = 32
GROUP_SIZES = (32, 64, 128)


def check_group(group_size: int, k: int) -> None:
    if group_size not in GROUP_SIZES:
        raise InvalidRequestError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise InvalidRequestError(f"group size {group_size} does not divide the input dimension {k}")


def int4_params(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) of each group for the RTN grid over the last dimension of `groups`."""
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        # As Q4_0: the value of largest magnitude maps onto -8 (to the scale's float16 rounding), so all 16
        # levels are in use.
        extreme = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
        scale = half_rounded(extreme / -8)
        return scale, -8 * scale
    # The range always holds 0, and the zero point is an integer, so that 0 and the min are on the grid.
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((hi - lo) / 15).clamp_min(tiny)
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale, -scale * zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """q = round((w - min) / scale) in 0..15, as float (shapes broadcast). A zero scale (a group of zeros)
    maps every weight onto its minimum."""
    return torch.round((w - minimum) / torch.where(scale == 0, torch.inf, scale)).clamp(0, 15)


def quantize_int4(
    weight: torch.Tensor, group_size: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN: returns (q uint8 [N, K] in 0..15, unpacked; scales [N, K / g]; mins [N, K / g])."""
    n, k = weight.shape
    check_group(group_size, k)
    groups = weight.float().reshape(n, k // group_size, group_size)
    scale, minimum = int4_params(groups, symmetric)
    q = quantize_to_grid(groups, scale[..., None], minimum[..., None])
    return q.to(torch.uint8).reshape(n, k), scale, minimum


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K / 2] in the block layout of the module doc."""
    n, k = q.shape
    halves = q.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [N, K / 2] -> uint8 [N, K] values 0..15."""
    n, half = qweight.shape
    blocks = qweight.reshape(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack([blocks & 0xF, blocks >> 4], dim=2).reshape(n, 2 * half)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    q = unpack_int4(qweight)
    n, k = q.shape
    groups = q.reshape(n, scales.shape[1], -1).float()
    mins = -8 * scales if mins is None else mins
    return (groups * scales[..., None] + mins[..., None]).reshape(n, k)


class Int4WeightOnly(LinearMethod):
    """An eighth of the fp32 bytes, plus a scale per group and, unless the layer is symmetric, a minimum.

    Up to integer_kernel_max_rows activation rows the C++ kernel multiplies the packed values as stored, with
    activations rounded to int8 per block of 32 (llama.cpp's Q4_1 x Q8_1 product); larger batches run a
    GEMM that dequantizes the weights a slice at a time (int4_dequant_linear), on bfloat16 panels where the
    CPU multiplies bfloat16 fast, as int8's does (int8.takes_dequant_linear); beyond, and on other devices,
    the layer is dequantized for torch's GEMM.
    """

    name = "int4"

    def __init__(self, group_size: int = 32, symmetric: bool = True):
        self.group_size = group_size
        self.symmetric = symmetric

    def process(self, layer: Linear) -> None:
        q, scales, mins = quantize_int4(layer.weight.detach(), self.group_size, self.symmetric)
        dtype = layer.weight.dtype
        layer.weight = None  # a tied lm_head only drops its reference: the embedding keeps the tensor
        self.adopt(layer, {"qweight": pack_int4(q), "scales": scales, "mins": mins}, dtype)

    def adopt(self, layer: Linear, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        q, scales, mins = tensors["qweight"], tensors["scales"], tensors["mins"]
        n, k = layer.out_features, layer.in_features
        groups = (n, k // self.group_size)
        if q.dtype != torch.uint8 or tuple(q.shape) != (n, k // 2) or scales.shape != groups or mins.shape != groups:
            raise ValueError(f"int4 tensors {tuple(q.shape)} {tuple(scales.shape)} do not fit the layer")
        factors = {key: tensors.get(key) for key in ("scale_factors", "min_factors")}
        check_factors(layer, scales, factors["scale_factors"])
        check_factors(layer, mins, factors["min_factors"])
        if (factors["scale_factors"] is None) != (factors["min_factors"] is None):
            raise ValueError("int4 scales and minimums take factors both or neither")
        if factors["scale_factors"] is None:
            scales, mins = scale_storage(scales, mins)
            mins = None if torch.equal(mins, -8 * scales) else mins
        stored = tiles.tile({"qweight": q, "scales": scales, "mins": mins, **factors})
        for key, t in stored.items():
            layer.register_buffer(key, t)
        layer.compute_dtype = dtype

    def stored(self, layer: Linear) -> dict[str, torch.Tensor]:
        q, scales, mins = tiles.untile(layer, "qweight"), layer_scales(layer, "scales"), layer_scales(layer, "mins")
        mins = -8 * scales if mins is None else mins
        return {"qweight": q, "scales": scales.float(), "mins": mins.float()}

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q, scales, mins = tiles.untile(layer, "qweight", flat), *(layer_scales(layer, k, flat) for k in ("scales", "mins"))
        w = dequantize_int4(q, scales, mins).to(layer.compute_dtype)
        return w.reshape(*ids.shape, layer.in_features)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        ops = ops_for(x)
        weight = (layer.qweight, layer.scales, layer.mins)
        factors = (layer.scale_factors, layer.min_factors)
        if ops is not None and x.shape[0] <= integer_kernel_max_rows("int4"):
            return ops.int4_linear(x, *weight, layer.bias, self.group_size, *factors)
        if ops is not None and takes_dequant_linear(ops, layer, x.shape[0]):
            return ops.int4_dequant_linear(x, *weight, layer.bias, self.group_size, *factors)
        if ops is not None:
            w = ops.int4_dequantize(*weight, layer.in_features, self.group_size, *factors)
            return F.linear(x, w, layer.bias)
        q, scales, mins = tiles.untile(layer, "qweight"), layer_scales(layer, "scales"), layer_scales(layer, "mins")
        return F.linear(x, dequantize_int4(q, scales, mins).to(layer.compute_dtype), layer.bias)

