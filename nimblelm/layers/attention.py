"""Paged attention on torch's fused SDPA: writes new K/V into cache pages and attends over them.

A step's tokens arrive flat: first the decode sequences (one query token each), then the prefill
chunks, each a run of consecutive query tokens. Decodes are attended in one batched call over their
gathered pages; each prefill chunk gets its own causal call, since chunks differ in length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    num_decodes: int  # the first num_decodes tokens are decode queries, one per sequence
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # [num_decodes] tokens in context, the new one included
    decode_max_context: int
    prefill_query_lens: list[int]  # per prefill chunk, in token order after the decodes
    prefill_context_lens: list[int]  # tokens in context after this chunk, the chunk included
    prefill_block_tables: list[torch.Tensor]  # per prefill chunk: its block ids
    sliding_window: int | None = None


class PagedAttention(torch.nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,  # [tokens, heads, head_dim]
        k: torch.Tensor,  # [tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        k_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)
        d = meta.num_decodes
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, meta)
        start = d
        for q_len, ctx, blocks in zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_tables):
            end = start + q_len
            if ctx == q_len:  # a whole prompt in one chunk: its K/V are at hand, no gather needed
                k_ctx, v_ctx = k[start:end], v[start:end]
            else:
                k_ctx = k_cache[blocks].flatten(0, 1)[:ctx]
                v_ctx = v_cache[blocks].flatten(0, 1)[:ctx]
            out[start:end] = self._prefill(q[start:end], k_ctx, v_ctx, meta.sliding_window)
            start = end
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        d = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        blocks = meta.decode_block_tables
        # Queries of one KV head are stacked as rows, so GQA needs no K/V repetition.
        qg = q.view(d, self.num_kv_heads, group, self.head_dim)
        k = k_cache[blocks].flatten(1, 2)[:, : meta.decode_max_context].transpose(1, 2)
        v = v_cache[blocks].flatten(1, 2)[:, : meta.decode_max_context].transpose(1, 2)
        pos = torch.arange(meta.decode_max_context, device=q.device)
        lens = meta.decode_context_lens[:, None]
        mask = pos[None, :] < lens
        if meta.sliding_window is not None:
            mask &= pos[None, :] >= lens - meta.sliding_window
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None, None, :], scale=self.scale)
        return out.reshape(d, self.num_heads, self.head_dim)

    def _prefill(self, q, k, v, sliding_window: int | None) -> torch.Tensor:
        q_len, ctx = q.shape[0], k.shape[0]
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if ctx == q_len and (sliding_window is None or sliding_window >= ctx):
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            k_pos = torch.arange(ctx, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)
