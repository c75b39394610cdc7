"""int8 weights with one scale per group of input channels (round-to-nearest, symmetric): qweight int8
[N, K] and scales [N, K / group], w = scales * q per group; layers keep them in row tiles (tiles.py), in six bits
a value where every value fits (GGUF's Q6_K), the scales in float16 where that holds them exactly
(scale_storage), GGUF's Q6_K's in their two levels (int8 scales and `scale_factors`, with_factors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import kernel_isa_cap, ops_for
from nimblelm.layers.linear import Linear, LinearMethod
from nimblelm.platform import first_cpu
from nimblelm.quantization import tiles


def half_rounded(scales: torch.Tensor) -> torch.Tensor:
    """Scales as float16 values (kept in float32), as llama.cpp's Q8_0 and Q4_0 store theirs, unless one
    overflows float16. Rounded away from zero, so that the group's largest weight stays on the grid (within
    level 127 of int8, -8 of int4); quantizers round before they place the weights, so the grid is the one
    stored. Below float16's normal range (max|w| under 0.0078 for int8, 0.0005 for int4) a scale keeps fewer
    bits: its step is then a few percent coarser, on weights that small."""
    rounded = scales.half()
    short = rounded.float().abs() < scales.abs()
    rounded = torch.where(short, (rounded.view(torch.int16) + 1).view(torch.float16), rounded)  # next one out
    return rounded.float() if torch.isfinite(rounded).all() else scales


def scale_storage(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A layer's scales (and minimums) as it keeps them: float16 where each value is one, which a decode step
    then reads in half the bytes (the quantizers here and GGUF's Q8_0, Q5_0, Q4_0 and Q4_1 give such);
    else float32 (GGUF's K-quants, whose products of two scales are exact in float32 only)."""
    values = tuple(v.float() for v in values)
    exact = all(torch.equal(v.half().float(), v) for v in values)
    return tuple(v.half() if exact else v for v in values)


# The float16 factors of a format's int8 scales and minimums (GGUF's K-quants, gguf_direct.py), by what they scale.
FACTORS = {"scales": "scale_factors", "mins": "min_factors"}


def with_factors(values: torch.Tensor | None, factors: torch.Tensor | None) -> torch.Tensor | None:
    """Scales (or minimums) as float32 [N, G]: int8 sub-scales times the float16 factor that each run of
    G / F groups shares (factors [N, F]; exact in float32); values without factors as they are."""
    if factors is None:
        return values
    return values.float() * factors.float().repeat_interleave(values.shape[1] // factors.shape[1], dim=1)


def plain_scales(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A format's tensors with any factors multiplied into the scales and minimums they scale."""
    out = {key: t for key, t in tensors.items() if key not in FACTORS.values()}
    for key, factors in FACTORS.items():
        if key in out:
            out[key] = with_factors(out[key], tensors.get(factors))
    return out


def layer_scales(layer: Linear, key: str, ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """A layer's scales or minimums (`key`) in the plain layout, rows `ids` or all, their factors multiplied in."""
    return with_factors(tiles.untile(layer, key, ids), tiles.untile(layer, FACTORS[key], ids))


def check_factors(layer: Linear, values: torch.Tensor, factors: torch.Tensor | None) -> None:
    """ValueError unless factors (where given) are float16 [N, a power of two dividing the groups] of int8 values."""
    if factors is None:
        return
    n, groups = values.shape
    per = groups // max(factors.shape[1], 1) if factors.dim() == 2 else 0
    if (values.dtype != torch.int8 or factors.dtype != torch.float16 or factors.shape[0] != n or per < 2
            or per & (per - 1) or groups % factors.shape[1]):
        raise ValueError(f"factors {tuple(factors.shape)} {factors.dtype} do not fit scales {tuple(values.shape)} "
                         f"{values.dtype} of {layer.out_features} x {layer.in_features}")


def int8_scales(groups: torch.Tensor) -> torch.Tensor:
    """The RTN scale max|w| / 127 of each group over the last dimension."""
    return half_rounded(groups.abs().amax(-1) / 127)


def quantize_int8(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN: q = round(w / s) in [-127, 127] with s = max|w| / 127 per group; returns (q [N, K], s [N, K / g])."""
    n, k = weight.shape
    if k % group_size:
        raise InvalidRequestError(f"group size {group_size} does not divide the input dimension {k}")
    groups = weight.float().reshape(n, k // group_size, group_size)
    scales = int8_scales(groups)
    q = torch.round(groups / scales.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(n, k), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n, scales.shape[1], -1).float() * scales[..., None]).reshape(n, k)


# The sliced float GEMM (int8_dequant_linear, int4_dequant_linear) against dequantizing a layer whole for
# torch's GEMM: it saves writing and reading the float matrix, which pays on few rows and where that matrix
# outgrows the caches; torch's GEMM wins on many rows of small layers. 2 threads, Xeon with AMX (2026-12-04),
# int8, ms: SmolLM2's four layer shapes (0.3-1.8 M weights) at 32 rows 0.87 sliced against 1.28 whole, at 128
# rows 3.11 against 2.93, at 512 11.9 against 9.8; Qwen2.5-Coder-1.5B's (2.4-27.5 M weights) at 512 rows
# 164.0 against 199.0, at 2048 rows 717.7 against 674.6.
SLICED_MAX_ROWS = 512
SLICED_SMALL_MAX_ROWS = 128  # for layers under SLICED_MIN_WEIGHTS
SLICED_MIN_WEIGHTS = 2_000_000


# Activation rows up to which the integer kernels (int8_linear, int4_linear) are faster than the sliced float
# GEMM, by CPU kind: it turns on how fast each multiplies, which differs by kind, not by features alone.
# Qwen2.5-Coder-1.5B's four layer shapes (benchmarks/scripts/quant_linear.py), 2 threads, ms:
# - Xeon with AMX (2026-12-04, before the integer kernels took four activation rows at a time): int8 12.8 at
#   16 rows, 18.2 at 24, 23.7 at 32 against 14.4, 17.3, 17.9 sliced; int4 17.3 at 32 rows, 26.1 at 48
#   against 18.1, 23.8 sliced. Kept for every CPU not measured since, AVX2 ones included.
# - AMD with AVX-512 (EPYC Zen 4, 2026-12-05, `80480f9`): int8 16.9 at 32 rows, 26.2 at 48, 34.5 at 64
#   against 20.6, 28.6, 35.6 sliced; int4 10.6, 15.0, 22.6 against 21.3, 29.2, 35.7. Against the bfloat16
#   panels of prefills (`4bdb24e`, int8 in pairs of blocks): int8 54.2 at 128 rows, 110.9 at 256 against
#   62.5, 93.3; int4 40.3 at 128, 87.5 at 256, 189.7 at 512 against 61.2, 92.1, 167.1. Measured again on the
#   same kind (2026-12-07, the 512-bit int8 kernel taking the weights unsigned), the sliced int8 layers on
#   AVX-512 BF16 dot products are faster from 48 rows: int8 11.04-11.12 at 32, 16.39 at 48, 21.41-21.74 at 64,
#   42.45-42.55 at 128 against 10.98-11.27, 14.78-14.80, 18.46-18.68, 34.41 sliced (SmolLM2's shapes: 1.01 at
#   32, 1.47 at 48 against 0.94, 1.21); int4 9.55 at 32, 36.66 at 128, 73.10 at 256 against 21.41, 65.15, 124.49.
INTEGER_MAX_ROWS = {"int8": 24, "int4": 40}
INTEGER_MAX_ROWS_AMD_AVX512 = {"int8": 32, "int4": 256}
# - Xeon with AMX, against the dequantizing linear on AMX tiles (2026-12-06, benchmarks/README.md "Quantized
#   prefill on bfloat16 products"): int8 4.66 at 8 rows, 6.73 at 12 against 4.86, 5.02; int4 3.13 at 8,
#   4.77 at 12, 6.35 at 16 against 4.36, 4.89, 5.01. With the 512-bit integer kernels (`11cc022`, two runs):
#   int8 4.93-5.07 at 8 rows, 5.92-7.16 at 12, 9.25-9.96 at 16 against 5.83-6.14, 5.95-6.61, 5.97-8.26; int4
#   3.58-3.76 at 12, 4.54-4.93 at 16, 6.74-7.03 at 24 against 6.08-6.28, 5.96-6.06, 6.57-10.50. SmolLM2's
#   shapes: int8 0.47-0.68 at 12, 0.60-0.86 at 16 against 0.60-0.81, 0.57-0.79; int4 0.57-0.58 at 20,
#   0.67-0.70 at 24 against 0.63-0.65, 0.63-0.65.
INTEGER_MAX_ROWS_AMX = {"int8": 12, "int4": 20}


def integer_kernel_max_rows(fmt: str) -> int:
    """The most activation rows `fmt` ("int8", "int4") multiplies on its integer kernel here. From
    /proc/cpuinfo and the kernels' variant cap, not from the ops: a decode-step trace calls it."""
    cpu = first_cpu()
    flags, native = cpu.get("flags", "").split(), kernel_isa_cap() == "native"
    if "amx_bf16" in flags and native:
        return INTEGER_MAX_ROWS_AMX[fmt]
    if cpu.get("vendor_id") == "AuthenticAMD" and "avx512f" in flags and kernel_isa_cap() in ("native", "avx512"):
        return INTEGER_MAX_ROWS_AMD_AVX512[fmt]
    return INTEGER_MAX_ROWS[fmt]


def takes_dequant_linear(ops, layer: Linear, rows: int) -> bool:
    """Whether `rows` rows past the integer kernel's take the dequantizing linear (ops.int8_dequant_linear,
    int4_dequant_linear) rather than torch's GEMM on the layer dequantized whole: up to the rows the float32
    slices are faster (SLICED_*), and at any rows where the CPU's bfloat16 products serve, for which it makes
    bfloat16 panels a slice at a time. The products are asked only past SLICED_SMALL_MAX_ROWS, above the rows
    of any decode-step trace, which cannot record the query."""
    large = layer.in_features * layer.out_features >= SLICED_MIN_WEIGHTS
    return rows <= (SLICED_MAX_ROWS if large else SLICED_SMALL_MAX_ROWS) or 0 < ops.bf16_product_rows() <= rows


class Int8WeightOnly(LinearMethod):
    """About a quarter of the fp32 bytes per decode step.

    Up to integer_kernel_max_rows activation rows, the C++ kernel multiplies int8 weights by activations it
    quantizes per block of 32 values (llama.cpp's Q8_0 dot product); larger batches (batched decode,
    prefills) run a GEMM that dequantizes the weights a slice at a time (int8_dequant_linear): into bfloat16
    panels where the CPU multiplies bfloat16 fast (AMX, AVX-512 BF16; activations rounded to bfloat16),
    else in float32 up to the rows takes_dequant_linear allows; beyond, and on other devices, the layer is
    dequantized for torch's GEMM.
    """

    name = "int8"

    def __init__(self, group_size: int = 32):
        self.group_size = group_size

    def process(self, layer: Linear) -> None:
        q, scales = quantize_int8(layer.weight.detach(), self.group_size)
        dtype = layer.weight.dtype
        layer.weight = None  # a tied lm_head only drops its reference: the embedding keeps the tensor
        self.adopt(layer, {"qweight": q, "scales": scales}, dtype)

    def adopt(self, layer: Linear, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        q, scales, factors = tensors["qweight"], tensors["scales"], tensors.get("scale_factors")
        groups = (layer.out_features, layer.in_features // self.group_size)
        if q.dtype != torch.int8 or tuple(q.shape) != (layer.out_features, layer.in_features) or scales.shape != groups:
            raise ValueError(f"int8 tensors {tuple(q.shape)} {tuple(scales.shape)} do not fit the layer")
        check_factors(layer, scales, factors)
        if factors is None:
            (scales,) = scale_storage(scales)
        stored = tiles.tile({"qweight": q, "scales": scales, "scale_factors": factors})
        if tiles.tileable(q) and self._kernel_group():  # tiled: six bits a value where the values fit
            six = tiles.six_bit(stored["qweight"])
            stored["qweight"] = stored["qweight"] if six is None else six
        for key, t in stored.items():
            layer.register_buffer(key, t)
        layer.compute_dtype = dtype

    def stored(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {"qweight": tiles.untile(layer, "qweight"), "scales": layer_scales(layer, "scales").float()}

    def rows(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        w = dequantize_int8(tiles.untile(layer, "qweight", flat), layer_scales(layer, "scales", flat))
        return w.to(layer.compute_dtype).reshape(*ids.shape, layer.in_features)

    def _kernel_group(self) -> bool:
        # The kernel takes groups of 16 (GGUF's Q6_K) or multiples of 32.
        return self.group_size == 16 or self.group_size % 32 == 0

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        ops = ops_for(x)
        if ops is not None and self._kernel_group():
            q, scales, factors, group = layer.qweight, layer.scales, layer.scale_factors, self.group_size
            if x.shape[0] <= integer_kernel_max_rows("int8"):
                return ops.int8_linear(x, q, scales, layer.bias, group, factors)
            if takes_dequant_linear(ops, layer, x.shape[0]):
                return ops.int8_dequant_linear(x, q, scales, layer.bias, group, factors)
            return F.linear(x, ops.int8_dequantize(q, scales, layer.in_features, group, factors), layer.bias)
        w = dequantize_int8(tiles.untile(layer, "qweight"), layer_scales(layer, "scales"))
        return F.linear(x, w.to(layer.compute_dtype), layer.bias)

