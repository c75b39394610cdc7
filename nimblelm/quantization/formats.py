"""The registry of linear-layer storage formats: a format's name -> the LinearMethod that stores and
multiplies it. Every way a layer gets quantized names its format here: `quantization=` at load (RTN of
the float weights), a saved folder's config (saved.py), a GGUF tensor's type (gguf_direct.py).

A name is a kind, with the group of input channels that share a scale for the weight-only kinds: "none"
(float), "bf16" and "fp16" (16-bit weights, float32 activations), "w8a8" (a scale per output channel),
"int8-g16", "int4-g128". A weight-only kind without a
group ("int8", "int4", as `quantization=` names them) takes 32, llama.cpp's Q8_0/Q4_0 block. A layer whose
output rows come in parts of different formats is "stack:" and its parts' (stacked.py).
"""

from __future__ import annotations

from nimblelm.layers.linear import LinearMethod, Unquantized
from nimblelm.quantization import stacked
from nimblelm.quantization.half import FORMATS as HALF_FORMATS
from nimblelm.quantization.half import HalfWeights
from nimblelm.quantization.int4 import Int4WeightOnly
from nimblelm.quantization.int8 import Int8WeightOnly
from nimblelm.quantization.w8a8 import W8A8

KINDS = ("none", *HALF_FORMATS, "w8a8", "int8", "int4")
GROUPED = ("int8", "int4")
DEFAULT_GROUP = 32


def format_name(kind: str, group: int | None = None) -> str:
    return f"{kind}-g{group}" if kind in GROUPED and group is not None else kind


def linear_method(name: str, symmetric: bool = True) -> LinearMethod:
    """The method of format `name`. `symmetric` is how int4 rounds float weights itself (LinearMethod.process);
    tensors a layer adopts in the format carry their own minimums."""
    if stacked.is_stacked(name):
        return stacked.Stacked([(linear_method(fmt), rows) for fmt, rows in stacked.parts_of(name)])
    kind, grouped, group = name.partition("-g")
    if kind not in KINDS or (grouped and (kind not in GROUPED or not group.isdigit())):
        raise ValueError(f"unknown linear format {name!r}")
    group_size = int(group) if grouped else DEFAULT_GROUP
    if kind == "int4":
        return Int4WeightOnly(group_size, symmetric)
    if kind == "int8":
        return Int8WeightOnly(group_size)
    if kind in HALF_FORMATS:
        return HalfWeights(kind)
    return W8A8() if kind == "w8a8" else Unquantized()
