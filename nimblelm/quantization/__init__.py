"""Quantized storage for the model's linear layers, chosen by name at engine start."""

from __future__ import annotations

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.linear import LinearMethod, Unquantized
from nimblelm.quantization.int4 import Int4WeightOnly
from nimblelm.quantization.int8 import Int8WeightOnly
from nimblelm.quantization.w8a8 import W8A8

# On-the-fly RTN at load: int8 and int4 weight-only with a group of 32 (llama.cpp's Q8_0/Q4_0 blocks),
# and W8A8 (int8 per-channel weights, int8 per-token activations) without smoothing.
# "gguf": a .gguf file's quantized linear layers served as stored (gguf_direct.py); the method named
# here is the one for the layers whose GGUF type has no exact nimblelm format: unquantized.
METHODS = {"int8": Int8WeightOnly, "int4": Int4WeightOnly, "w8a8": W8A8, "gguf": Unquantized}
GGUF_DIRECT = "gguf"


def linear_method(name: str | None) -> LinearMethod:
    """The LinearMethod for `quantization=name`; None means the unquantized weights."""
    if name is None or name == "none":
        return Unquantized()
    if name not in METHODS:
        raise InvalidRequestError(f"unknown quantization {name!r}: use none or {', '.join(METHODS)}")
    return METHODS[name]()
