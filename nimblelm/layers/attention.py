"""Paged attention on torch's fused SDPA: writes new K/V into cache pages and attends over them.

A step's tokens arrive flat: first the decode sequences (one query token each), then the prefill
chunks, each a run of consecutive query tokens. On the C++ kernels the decodes are one call over their pages
and the prefill chunks another (paged_prefill_attention), both reading the cache as stored; chunks whose rows
also vote (SnapKV) or add up their weights (H2O) keep a call each. On torch's, the decodes are one call over
their gathered pages and each prefill chunk its own causal call.

A layer's cache holds K/V in the model's dtype, in float16 or bfloat16 (kv_cache_dtype), or as int8 with one
float32 scale per token and KV head (kv_cache_dtype="int8"): new K/V are rounded as they are written,
decodes read the stored values in the C++ kernel, and prefill chunks attend to their pages widened back
to the model's dtype. An int8 cache may keep some layers in the model's dtype (quantization/kv_int8.py);
each layer's KVCache says which it is. An int4 or int2 cache (layers/kivi.py) has a path of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nimblelm.kernels import ops_for
from nimblelm.layers import kivi


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot of each new token
    # The first num_decodes tokens are decode rows: each attends over its sequence's cache on its own (a
    # sequence's new token, or each of the few tokens after its prompt that a step verifies at once).
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks]: each row's sequence's blocks
    decode_context_lens: torch.Tensor  # [num_decodes] tokens the row attends to, itself included
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_context] bool, for torch's attention only
    prefill_query_lens: list[int]  # per prefill chunk, in token order after the decodes
    prefill_context_lens: list[int]  # tokens in context after this chunk, the chunk included
    prefill_block_tables: list[torch.Tensor]  # per prefill chunk: its block ids
    prefill_masks: list[torch.Tensor | None]  # per chunk: [query, context] bool, None for plain causal
    sliding_window: int | None = None
    # Token trees (speculative/tree.py): rows whose K/V are written a second time, into the blocks of each
    # further branch that reads them; None in every other step.
    extra_write_rows: torch.Tensor | None = None
    extra_write_slots: torch.Tensor | None = None
    # KV policies that vote (engine/kv_cache/policy.py): per prefill chunk, how many of its last rows vote on
    # the entries its sequence keeps (0: none). Each layer appends, per voting chunk in order, the votes
    # [kv_heads, context]: each entry's attention weight averaged over the voting rows and each KV head's
    # query heads. None in every other step.
    vote_rows: list[int] | None = None
    votes: list[torch.Tensor] | None = None
    # H2O: every row's attention weights are added to the attention its entries have received
    # (KVCache.received), summed over each KV head's query heads.
    accumulate: bool = False
    # H2O with speculative decoding: each row's place after its sequence's last token (0: a token, j: its j-th
    # draft), the region of KVCache.received_regions it adds into until verification keeps or drops it. Drafts
    # are decode rows, but in a low-bit cache, where they are a prompt chunk's last rows.
    draft_ranks: torch.Tensor | None = None
    # An int4 or int2 cache: what the step writes, seals and reads (layers/kivi.py); None otherwise.
    lowbit: kivi.LowBitPlan | None = None
    _prefill_batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def prefill_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefill chunks as paged_prefill_attention takes them, made once a step for every layer: their
        block tables padded into one [chunks, max_blocks] tensor, their query and context lengths."""
        if self._prefill_batch is None:
            tables = torch.nn.utils.rnn.pad_sequence(self.prefill_block_tables, batch_first=True)
            self._prefill_batch = tables, *(torch.tensor(lens, dtype=torch.long, device=tables.device)
                                            for lens in (self.prefill_query_lens, self.prefill_context_lens))
        return self._prefill_batch

    @staticmethod
    def decode_mask_for(context_lens: torch.Tensor, max_context: int, sliding_window: int | None) -> torch.Tensor:
        pos = torch.arange(max_context, device=context_lens.device)[None, :]
        lens = context_lens[:, None]
        mask = pos < lens
        if sliding_window is not None:
            mask &= pos >= lens - sliding_window
        return mask[:, None, None, :]

    @classmethod
    def decodes(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                sliding_window: int | None, decode_mask: torch.Tensor | None = None,
                accumulate: bool = False, lowbit: kivi.LowBitPlan | None = None,
                draft_ranks: torch.Tensor | None = None) -> AttentionMetadata:
        """A step of decode rows only."""
        return cls(
            slot_mapping=slot_mapping, num_decodes=len(slot_mapping), decode_block_tables=block_tables,
            decode_context_lens=context_lens, decode_mask=decode_mask, prefill_query_lens=[],
            prefill_context_lens=[], prefill_block_tables=[], prefill_masks=[], sliding_window=sliding_window,
            accumulate=accumulate, lowbit=lowbit, draft_ranks=draft_ranks,
        )

    @classmethod
    def whole_prompt(cls, n: int, block_size: int, sliding_window: int | None, device) -> AttentionMetadata:
        """One prefill of n tokens in one chunk, its K/V in blocks 0, 1, ... of the cache."""
        blocks = -(-n // block_size)
        return cls(
            slot_mapping=torch.arange(n, dtype=torch.long, device=device), num_decodes=0,
            decode_block_tables=torch.zeros((0, 0), dtype=torch.long, device=device),
            decode_context_lens=torch.zeros(0, dtype=torch.long, device=device), decode_mask=None,
            prefill_query_lens=[n], prefill_context_lens=[n],
            prefill_block_tables=[torch.arange(blocks, dtype=torch.long, device=device)],
            prefill_masks=[cls.prefill_mask_for(n, n, sliding_window, device)], sliding_window=sliding_window,
        )

    @staticmethod
    def prefill_mask_for(query_len: int, context_len: int, sliding_window: int | None, device) -> torch.Tensor | None:
        """None when SDPA's own causal mask is exact: a whole prompt with no window cutting into it."""
        if context_len == query_len and (sliding_window is None or sliding_window >= context_len):
            return None
        q_pos = torch.arange(context_len - query_len, context_len, device=device)[:, None]
        k_pos = torch.arange(context_len, device=device)[None, :]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        return mask


@dataclass
class KVCache:
    """One layer's paged K/V. values: [2, num_blocks, block_size, kv_heads, head_dim], K then V, in the
    model's dtype or float16, or int8 with scales: float32 [2, num_blocks, block_size, kv_heads],
    K/V = values * scales."""

    values: torch.Tensor
    scales: torch.Tensor | None = None
    # H2O: per slot and KV head, the attention weight its entry has received from every query so far, float32
    # [num_blocks, block_size, kv_heads]; None for other policies.
    received: torch.Tensor | None = None
    # H2O with speculative decoding: [1 + drafts, num_blocks, block_size, kv_heads], received as its region 0 and
    # in region j what a step's j-th draft rows gave, until the model runner folds in those of kept drafts.
    received_regions: torch.Tensor | None = None
    # An int4 or int2 cache's scales and residual (values are then packed uint8); None otherwise.
    lowbit: kivi.LowBitKV | None = None
    # K's and V's halves of them, as views made once (in a replayed step, a view made per layer is an op).
    k: torch.Tensor = field(init=False)
    v: torch.Tensor = field(init=False)
    k_scales: torch.Tensor | None = field(init=False)
    v_scales: torch.Tensor | None = field(init=False)

    def __post_init__(self):
        self.k, self.v = self.values.unbind()
        self.k_scales, self.v_scales = (None, None) if self.scales is None else self.scales.unbind()


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: (q, scale) with x ~ q * scale and scale = max|x| / 127.

    The same float32 arithmetic as the C++ write_kv_cache_int8_ (x * (127 / max|x|), rounded half to
    even), so the kernels and this reference path store the same bytes."""
    x = x.float()
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, 0.0)
    return torch.round(x * inv[..., None]).to(torch.int8), amax / 127.0


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[..., None]).to(dtype)


def _pages(cache: KVCache, i: int, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K (i=0) or V (i=1) of the blocks indexed by `blocks` (any shape), as [*blocks.shape, block_size,
    kv_heads, head_dim] in `dtype`."""
    pages = cache.values[i][blocks]
    return pages.to(dtype) if cache.scales is None else dequantize_kv(pages, cache.scales[i][blocks], dtype)


# H2O's prefill pass adds up the weights of this many rows of a chunk at a time.
RECEIVE_ROWS = 256


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
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if kv_cache.lowbit is not None:
            return kivi.attend(q, k, v, kv_cache.values, kv_cache.lowbit, meta, self.scale,
                               kv_cache.received if meta.accumulate else None,
                               kv_cache.received_regions if meta.accumulate and meta.draft_ranks is not None else None)
        ops = ops_for(q)
        self._write(k, v, kv_cache, meta.slot_mapping, ops)
        # H2O's, with draft ranks all its regions: region 0 comes first, so a slot indexes it in either. The zeroing
        # and the decode kernel take the same tensor: a trace drops writes to a tensor no op of it reads.
        received = kv_cache.received if meta.draft_ranks is None else kv_cache.received_regions
        if meta.accumulate:  # a slot's new entry has received nothing yet
            received.view(-1, self.num_kv_heads)[meta.slot_mapping] = 0
        if meta.extra_write_rows is not None:
            rows = meta.extra_write_rows
            self._write(k[rows], v[rows], kv_cache, meta.extra_write_slots, ops)
        out = torch.empty_like(q)
        d = meta.num_decodes
        if d == len(q):  # decode rows only (every replayed step): no views to make
            self._decode(q, kv_cache, meta, ops, out)
        elif d:
            self._decode(q[:d], kv_cache, meta, ops, out[:d])
        if d and meta.accumulate:
            if ops is not None:
                ops.paged_decode_received_(received, q[:d], kv_cache.k, kv_cache.k_scales, meta.decode_block_tables,
                                           meta.decode_context_lens, self.scale,
                                           None if meta.draft_ranks is None else meta.draft_ranks[:d])
            else:
                self._receive_decodes(q[:d], kv_cache, meta)
        if d < len(q) and ops is not None and self.head_dim % 16 == 0 and not meta.accumulate and not any(
                meta.vote_rows or ()):
            ops.paged_prefill_attention(out[d:], q[d:], kv_cache.k, kv_cache.v, kv_cache.k_scales, kv_cache.v_scales,
                                        *meta.prefill_batch(), self.scale, meta.sliding_window or 0)
            return out
        start = d
        chunks = zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_tables, meta.prefill_masks,
                     meta.vote_rows or [0] * len(meta.prefill_query_lens))
        for q_len, ctx, blocks, mask, voters in chunks:
            end = start + q_len
            if ctx == q_len and kv_cache.values.dtype == q.dtype:  # a whole prompt in one chunk: K/V at hand
                k_ctx, v_ctx = k[start:end], v[start:end]
            else:
                # A rounded (float16 or int8) cache is always read back, even for a whole prompt: every
                # query then sees the same rounded K/V however the prompt was chunked, as the decodes will.
                k_ctx = _pages(kv_cache, 0, blocks, q.dtype).flatten(0, 1)[:ctx]
                v_ctx = _pages(kv_cache, 1, blocks, q.dtype).flatten(0, 1)[:ctx]
            received = None  # H2O's: what the chunk's rows give each entry, [kv_heads, ctx]
            if ops is not None and self.head_dim % 16 == 0:
                if meta.accumulate:
                    received = torch.zeros(self.num_kv_heads, ctx, device=q.device)
                ops.prefill_attention(out[start:end], q[start:end], k_ctx, v_ctx, self.scale, meta.sliding_window or 0,
                                      received)
            else:
                qt, kt, vt = (x.transpose(0, 1)[None] for x in (q[start:end], k_ctx, v_ctx))
                o = F.scaled_dot_product_attention(
                    qt, kt, vt, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True
                )
                out[start:end] = o[0].transpose(0, 1)
            if voters:
                meta.votes.append(self._votes(q[end - voters : end], k_ctx))
            if meta.accumulate:
                if received is None:
                    received = self._received(q[start:end], k_ctx)
                bs = kv_cache.values.shape[2]
                slots = (blocks[:, None] * bs + torch.arange(bs, device=q.device)).flatten()[:ctx]
                kv_cache.received.view(-1, self.num_kv_heads).index_add_(0, slots, received.T)
            start = end
        return out

    def _weights(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Attention weights of queries q [rows, heads, d] at entries q_pos over keys k [ctx, kv_heads, d],
        causal, summed over each KV head's query heads: [kv_heads, rows, ctx]."""
        rows, ctx = q.shape[0], k.shape[0]
        qg = q.float().view(rows, self.num_kv_heads, -1, self.head_dim).permute(1, 2, 0, 3)  # [kv, group, rows, d]
        logits = qg @ k.float().transpose(0, 1)[:, None].transpose(-1, -2) * self.scale  # [kv, group, rows, ctx]
        logits.masked_fill_(torch.arange(ctx, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
        return logits.softmax(-1).sum(1)

    def _received(self, q: torch.Tensor, k_ctx: torch.Tensor) -> torch.Tensor:
        """What a prefill chunk's rows give each entry of its context (H2O), [kv_heads, ctx], RECEIVE_ROWS rows at
        a time to bound the weights held at once: a second pass over the keys (the prefill kernel adds them up
        as it attends)."""
        ctx, rows = k_ctx.shape[0], q.shape[0]
        got = torch.zeros(self.num_kv_heads, ctx, device=q.device)
        for r in range(0, rows, RECEIVE_ROWS):
            part = q[r : r + RECEIVE_ROWS]
            got += self._weights(part, k_ctx, torch.arange(ctx - rows + r, ctx - rows + r + len(part),
                                                           device=q.device)).sum(1)
        return got

    def _receive_decodes(self, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> None:
        """Add what each decode row gives the entries it attends to (H2O): a second pass over their keys (torch's
        ops; the kernels' paged_decode_received_ reads the pages in place)."""
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        rows, n, bs = q.shape[0], int(lens.max()), kv_cache.values.shape[2]
        slots = (tables[:, :, None] * bs + torch.arange(bs, device=q.device)).flatten(1)[:, :n]  # [rows, n]
        keys = kv_cache.values[0].flatten(0, 1)[slots]
        if kv_cache.scales is not None:
            keys = dequantize_kv(keys, kv_cache.scales[0].flatten(0, 1)[slots], torch.float32)
        qg = q.float().view(rows, self.num_kv_heads, -1, self.head_dim)
        logits = torch.einsum("rhgd,rnhd->rhgn", qg, keys.float()) * self.scale
        padding = torch.arange(n, device=q.device)[None, :] >= lens[:, None]  # [rows, n]
        got = logits.masked_fill_(padding[:, None, None], float("-inf")).softmax(-1).sum(2)  # [rows, kv_heads, n]
        received = kv_cache.received.view(-1, self.num_kv_heads)
        if meta.draft_ranks is not None:  # each row into its rank's region
            slots = slots + meta.draft_ranks[:rows, None] * len(received)
            received = kv_cache.received_regions.view(-1, self.num_kv_heads)
        received.index_add_(0, slots[~padding], got.transpose(1, 2)[~padding])

    def _votes(self, q: torch.Tensor, k_ctx: torch.Tensor) -> torch.Tensor:
        """The attention weights of the last rows of a chunk (q) over its context, averaged over the rows and
        the query heads of each KV head: [kv_heads, context]. A second, small pass beside the fused prefill,
        whose kernel keeps no weights: rows x context per head, against the chunk's rows x context."""
        rows, ctx = q.shape[0], k_ctx.shape[0]
        weights = self._weights(q, k_ctx, torch.arange(ctx - rows, ctx, device=q.device))
        return weights.sum(1) / (rows * (self.num_heads // self.num_kv_heads))

    def _write(self, k, v, kv_cache: KVCache, slots: torch.Tensor, ops) -> None:
        """Store the new tokens' K/V in their cache slots, rounded to the cache's dtype."""
        c = kv_cache
        if ops is not None:
            if c.scales is None:
                ops.write_kv_cache_(c.k, c.v, k, v, slots)
            else:
                ops.write_kv_cache_int8_(c.k, c.v, c.k_scales, c.v_scales, k, v, slots)
            return
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        for i, x in enumerate((k, v)):
            if c.scales is None:
                c.values[i].view(flat_shape).index_copy_(0, slots, x.to(c.values.dtype))
            else:
                qx, sx = quantize_kv(x)
                c.values[i].view(flat_shape).index_copy_(0, slots, qx)
                c.scales[i].view(-1, self.num_kv_heads).index_copy_(0, slots, sx)

    def _decode(self, q, kv_cache: KVCache, meta: AttentionMetadata, ops, out: torch.Tensor) -> None:
        """Attention of the decode queries, written into out (the first rows of the step's output)."""
        c = kv_cache
        if ops is not None:
            tables, lens, window = meta.decode_block_tables, meta.decode_context_lens, meta.sliding_window or 0
            if c.scales is None:
                ops.paged_decode_attention(out, q, c.k, c.v, tables, lens, self.scale, window)
            else:
                ops.paged_decode_attention_int8(
                    out, q, c.k, c.v, c.k_scales, c.v_scales, tables, lens, self.scale, window
                )
            return
        d = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        max_context = meta.decode_mask.shape[-1]
        # Queries of one KV head are stacked as rows, so GQA needs no K/V repetition.
        qg = q.view(d, self.num_kv_heads, group, self.head_dim)
        k = _pages(kv_cache, 0, meta.decode_block_tables, q.dtype).flatten(1, 2)[:, :max_context].transpose(1, 2)
        v = _pages(kv_cache, 1, meta.decode_block_tables, q.dtype).flatten(1, 2)[:, :max_context].transpose(1, 2)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask, scale=self.scale)
        out.copy_(o.reshape(d, self.num_heads, self.head_dim))
