"""A linear layer whose output rows come in parts of different formats: a fused layer (q/k/v, gate/up) whose
GGUF parts share no integer format, as Q4_K_M files make them (Q4_K q and k beside a Q6_K v). Each part is a
Linear of its own format on the same input, and their outputs are joined; the float32 layer this replaces read
about seven times the bytes of those parts (Qwen2.5-Coder-1.5B: 14 such layers, 176 MB of its 1444 a token).

The format's name lists the parts, each its own format's name and rows: "stack:int4-g32x1792+int8-g16x256"; its
tensors are the parts', under their index: "0.qweight", "1.scales", ...
"""

from __future__ import annotations

import torch
from torch import nn

from nimblelm.layers.linear import Linear, LinearMethod

PREFIX = "stack:"


def is_stacked(name: str) -> bool:
    return name.startswith(PREFIX)


def stack_name(parts: list[tuple[str, int]]) -> str:
    """The format name of parts (format name, rows) in order."""
    return PREFIX + "+".join(f"{fmt}x{rows}" for fmt, rows in parts)


def parts_of(name: str) -> list[tuple[str, int]]:
    """The parts (format name, rows) a stacked format's name lists; ValueError when it lists none."""
    parts = []
    for part in name.removeprefix(PREFIX).split("+"):
        fmt, _, rows = part.rpartition("x")
        if not fmt or not rows.isdigit() or is_stacked(fmt):
            raise ValueError(f"unknown linear format {name!r}")
        parts.append((fmt, int(rows)))
    return parts


def part_tensors(tensors: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    prefix = f"{index}."
    return {key.removeprefix(prefix): t for key, t in tensors.items() if key.startswith(prefix)}


def select_rows(name: str, tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[str, dict[str, torch.Tensor]]:
    """Output rows `rows` (ascending) of a stacked layer's tensors: each part keeps those among its own (a tensor-
    parallel rank's heads); a part left with none is dropped, and a layer of one part is in that part's format."""
    kept, out, start = [], {}, 0
    for original, (fmt, count) in enumerate(parts_of(name)):
        mine = rows[(rows >= start) & (rows < start + count)] - start
        if len(mine):
            out |= {f"{len(kept)}.{key}": t.index_select(0, mine) for key, t in part_tensors(tensors, original).items()}
            kept.append((fmt, len(mine)))
        start += count
    if len(kept) == 1:
        return kept[0][0], part_tensors(out, 0)
    return stack_name(kept), out


class Stacked(LinearMethod):
    """Parts (a LinearMethod, rows) stacked along the outputs, each on its own Linear of the layer (layer.parts)."""

    name = "stacked"

    def __init__(self, parts: list[tuple[LinearMethod, int]]):
        self.parts = parts

    def adopt(self, layer: Linear, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        if sum(rows for _, rows in self.parts) != layer.out_features:
            raise ValueError(f"stacked parts of {[rows for _, rows in self.parts]} rows do not fit the layer")
        modules = []
        for index, (method, rows) in enumerate(self.parts):
            with torch.device("meta"):  # its weight is never made: the part adopts its tensors as they are
                part = Linear(layer.in_features, rows)
            part.adopt(method, part_tensors(tensors, index), dtype)
            modules.append(part)
        layer.parts = nn.ModuleList(modules)
        layer.compute_dtype = dtype

    def stored(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {f"{index}.{key}": t for index, part in enumerate(layer.parts)
                for key, t in part.method.stored(part).items()}

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([part(x) for part in layer.parts], dim=-1)
        return out if layer.bias is None else out.add_(layer.bias)
