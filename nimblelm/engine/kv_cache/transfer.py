"""A prompt's computed KV blocks, as one engine hands them to another (distributed/disaggregated.py). Plain data
that pickles: the blocks' prefix-cache hashes, and their K/V as each rank of the exporting engine holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class PrefixKV:
    salt: bytes  # the exporting engine's prefix-cache salt: both engines must shape their K/V alike
    hashes: list[bytes]  # of the prompt's full blocks, in order
    # Per KV group, the first block the group holds (a sliding-window group holds only its window's), its blocks
    # running from there to the last hash.
    firsts: list[int]
    # Per rank, per layer: the layer's K/V of its group's blocks ([2, blocks, block_size, kv_heads, head_dim]),
    # and their int8 scales or None; None for a layer the rank does not hold (a pipeline stage's).
    kv: list[list[tuple[Any, Any] | None]]
