"""Row tiles: the layout in which int8 and int4 weight-only layers keep their tensors in memory.

Four consecutive output rows form a tile, stored as one row of the tensor with their 32-byte units
interleaved: unit u of row r sits at (4 u + r) * 32 bytes into the tile (scales and minimums: value g
of row r at 4 g + r). The CPU kernels multiply four rows at once, and tiled those four rows stream
from one contiguous range of memory instead of four (kernels/quant_gemm.cpp, RowTile, for the timings).

Everything outside the layer (quantizers, GGUF conversion, saved folders) speaks the plain layout,
one row per output; `tile` and `untile` convert, and a layer whose shape does not tile (rows not a
multiple of 4, or row bytes not of 32) stays plain, which the kernels tell apart by its shape.

Six-bit tiles: int8 tiles whose values all lie in [-32, 31] (GGUF's Q6_K) pack into 6 bits a value, uint8
[N / 4, 3 K] (kernels/quant_gemm.cpp, six_bit, for the layout of each 256 bytes in 192); `untile` expands them.
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


def is_six_bit(layer) -> bool:
    return layer.qweight.dtype == torch.uint8 and layer.qweight.shape[1] == 3 * layer.in_features


SIX_CHUNK, EIGHT_CHUNK = 192, 256


def six_bit(t: torch.Tensor) -> torch.Tensor | None:
    """int8 tiles [N / 4, 4 K] as six-bit tiles [N / 4, 3 K] (K a multiple of 64), or None when a value lies
    outside [-32, 31]."""
    if t.shape[1] % EIGHT_CHUNK or t.numel() == 0 or t.min() < -32 or t.max() > 31:
        return None
    c = (t + 32).to(torch.uint8).view(t.shape[0], -1, EIGHT_CHUNK)  # u = q + 32, 0-63
    lo = c[..., :128] & 15 | c[..., 128:] << 4
    hi = c[..., 0:64] >> 4 | (c[..., 64:128] >> 4) << 2 | (c[..., 128:192] >> 4) << 4 | (c[..., 192:] >> 4) << 6
    return torch.cat([lo, hi], dim=-1).reshape(t.shape[0], -1)


def eight_bit(t: torch.Tensor) -> torch.Tensor:
    """The int8 tiles [N / 4, 4 K] of six-bit tiles [N / 4, 3 K]."""
    s = t.view(t.shape[0], -1, SIX_CHUNK)
    lo, hi = s[..., :128], s[..., 128:]
    u = torch.cat([lo[..., :64] & 15 | (hi & 3) << 4, lo[..., 64:] & 15 | (hi >> 2 & 3) << 4,
                   lo[..., :64] >> 4 | (hi >> 4 & 3) << 4, lo[..., 64:] >> 4 | (hi >> 6) << 4], dim=-1)
    return (u.to(torch.int8) - 32).reshape(t.shape[0], -1)  # no dtype view: a decode-step trace records this


def untile(layer, key: str, ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """The layer's tensor `key` in the plain layout: all rows, or rows `ids` (1-D) alone."""
    t = getattr(layer, key)
    if t is None or not is_tiled(layer):
        return t if t is None or ids is None else t[ids]
    six = key == "qweight" and is_six_bit(layer)
    if ids is not None and six:  # expand only the tiles that hold rows ids, one tile a row
        t, tile_ids = eight_bit(t[ids // ROWS]), torch.arange(len(ids))
    else:
        t, tile_ids = eight_bit(t) if six else t, None if ids is None else ids // ROWS
    n4, c = t.shape[0], t.shape[1] // ROWS
    unit = UNITS[key]
    units = t.view(n4, c // unit, ROWS, unit)
    if ids is None:
        return units.transpose(1, 2).reshape(n4 * ROWS, c)
    return units[tile_ids, :, ids % ROWS, :].reshape(len(ids), c)
