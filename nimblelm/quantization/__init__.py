"""Quantized storage for the model's linear layers, chosen by name at engine start."""

from __future__ import annotations

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.linear import LinearMethod, Unquantized
from nimblelm.quantization.int8 import Int8WeightOnly

METHODS = {"int8": Int8WeightOnly}


def linear_method(name: str | None) -> LinearMethod:
    """The LinearMethod for `quantization=name`; None means the unquantized weights."""
    if name is None or name == "none":
        return Unquantized()
    if name not in METHODS:
        raise InvalidRequestError(f"unknown quantization {name!r}: use none or {', '.join(METHODS)}")
    return METHODS[name]()
