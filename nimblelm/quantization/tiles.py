"""Row tiles: the layout in which int8 and int4 weight-only layers keep their tensors in memory.

Four consecutive output rows form a tile, stored as one row of the tensor with their 32-byte units
interleaved: unit u of row r sits at (4 u + r) * 32 bytes into the tile (scales and minimums: value g
of row r at 4 g + r). The CPU kernels multiply four rows at once, and tiled those four rows stream
from one contiguous range of memory instead of four (kernels/quant_gemm.cpp, RowTile, for the timings).

Everything outside the layer (quantizers, GGUF conversion, saved folders) speaks the plain layout,
one row per output; `tile` and `untile` convert, and a layer whose shape does not tile (rows not a
multiple of 4, or row bytes not of 32) stays plain, which the kernels tell apart by its shape.
"""

from __future__ import annotations

import torch

ROWS = 4
# elements per interleaved unit, per tensor (the factors of GGUF's K-quant scales: int8.FACTORS)
UNITS = {"qweight": 32, "scales": 1, "mins": 1, "scale_factors": 1, "min_factors": 1}


def tileable(qweight: torch.Tensor) -> bool:
    n, row_bytes = qweight.shape
    return n % ROWS == 0 and row_bytes % UNITS["qweight"] == 0


def tile(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """Plain [N, C] tensors of one layer in tiles [N / 4, 4 C] (as they are when the layer does not tile);
    others (a bias) pass as they are."""
    if not tileable(tensors["qweight"]):
        return tensors
    out = {}
    for key, t in tensors.items():
        if t is not None and key in UNITS:
            n, c = t.shape
            unit = UNITS[key]
            t = t.reshape(n // ROWS, ROWS, c // unit, unit).transpose(1, 2).reshape(n // ROWS, ROWS * c)
        out[key] = t
    return out


def is_tiled(layer) -> bool:
    return layer.qweight.shape[0] != layer.out_features


def untile(layer, key: str, ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The layer's tensor `key` in the plain layout: all rows, or rows `ids` (1-D) alone."""
    t = getattr(layer, key)
    if t is None or not is_tiled(layer):
        return t if t is None or ids is None else t[ids]
    n4, c = t.shape[0], t.shape[1] // ROWS
    unit = UNITS[key]
    units = t.view(n4, c // unit, ROWS, unit)
    if ids is None:
        return units.transpose(1, 2).reshape(n4 * ROWS, c)
    return units[ids // ROWS, :, ids % ROWS, :].reshape(len(ids), c)
