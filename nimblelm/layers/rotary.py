"""Rotary position embedding (rotate-half layout, as Hugging Face Llama/Qwen2 checkpoints expect)."""

from __future__ import annotations

import math

import torch

from nimblelm.errors import UnsupportedModelError


def _inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, blended, scaled)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables of one or more rope variants (base, scaling): Gemma 3's sliding-window layers rotate
    with another base than its global ones. Each layer picks its variant by index."""

    def __init__(self, head_dim: int, max_positions: int, variants: list[tuple[float, dict | None]]):
        super().__init__()
        self.inv_freqs = [_inv_freq(head_dim, base, scaling) for base, scaling in variants]
        shape = (len(variants), max_positions, head_dim)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the tables; also called after a model built on the meta device is materialized."""
        if self.cos.device.type == "meta":
            return
        positions = torch.arange(self.cos.shape[1], dtype=torch.float64, device="cpu")
        for i, inv_freq in enumerate(self.inv_freqs):
            angles = torch.outer(positions, inv_freq).repeat(1, 2)
            self.cos[i].copy_(angles.cos())
            self.sin[i].copy_(angles.sin())

    def forward(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per variant, cos and sin for each token, [tokens, head_dim]: looked up once per step, used by every
        layer."""
        return [(self.cos[i][positions], self.sin[i][positions]) for i in range(len(self.inv_freqs))]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate a [tokens, heads, head_dim] tensor by its tokens' positions (cos, sin: [tokens, 1, head_dim])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
