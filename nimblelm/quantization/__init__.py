"""The `quantization=` option: how the linear layers that load in float are stored (formats.py names the
formats, including those of layers that arrive already quantized)."""

from __future__ import annotations

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.linear import LinearMethod
from nimblelm.quantization import formats
from nimblelm.quantization.int4 import Int4WeightOnly
from nimblelm.quantization.int8 import Int8WeightOnly
from nimblelm.quantization.w8a8 import W8A8

__all__ = ["GGUF_DIRECT", "ON_THE_FLY", "W8A8", "Int4WeightOnly", "Int8WeightOnly", "linear_method",
           "refuse_requantizing"]

# On-the-fly RTN at load: int8 and int4 weight-only with a group of 32 (llama.cpp's Q8_0/Q4_0 blocks),
# and W8A8 (int8 per-channel weights, int8 per-token activations) without smoothing.
ON_THE_FLY = ("int8", "int4", "w8a8")
# A .gguf file's quantized linear layers served as stored (gguf_direct.py); the layers whose GGUF type
# has no exact nimblelm format load in float and stay unquantized.
GGUF_DIRECT = "gguf"


def linear_method(name: str | None) -> LinearMethod:
    """The LinearMethod for the layers that load in float under `quantization=name`; None: unquantized."""
    if name in (None, "none", GGUF_DIRECT):
        return formats.linear_method("none")
    if name not in ON_THE_FLY:
        names = ", ".join((*ON_THE_FLY, GGUF_DIRECT))
        raise InvalidRequestError(f"unknown quantization {name!r}: use none or {names}")
    return formats.linear_method(name)


def refuse_requantizing(name: str | None, quantized: dict[str, tuple[str, dict]]) -> None:
    """A model whose layers arrive quantized (a folder from `nimblelm quantize`) takes no second quantization."""
    if quantized and name not in (None, "none", GGUF_DIRECT):
        held = ", ".join(sorted({fmt for fmt, _ in quantized.values()}))
        raise InvalidRequestError(f"the model is already quantized ({held}): drop quantization={name!r}")
