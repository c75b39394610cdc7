"""Low-bit KV cache in the manner of KIVI (Liu et al., 2024): kv_cache_dtype="int4" or "int2".

Keys have outlier channels, so keys are quantized per channel over a group of tokens (one scale and minimum
per channel), values per token over groups of VALUE_GROUP channels; scales and minimums are float16. A KV
block is the keys' token group: its keys can be quantized only once all of its tokens are known, so a block is
sealed, quantized into its place in the pool, in the step that writes its last token. A sealed block never
changes once its tokens are final (rejected drafts may have sealed it, below), so the prefix cache shares it as it
shares any full block.

What a query reads: its residual at full precision, the entries of its own block and of the blocks before it
up to residual_length entries (KIVI's residual: the recent tokens, whose errors cost the most), and the earlier
entries quantized. The rule depends on positions only, so chunking and batching give every query the same keys,
and a reference can apply it in one pass (tests). The prefix cache keeps sealed blocks only: a sequence that
starts after a hit (or resumes after preemption through one) reads the hit's entries as stored, its residual's
too (fill_ring).

A sequence's residual ring (per KV group) keeps its last ring_length entries, position p at slot p mod
ring_length of its ring: the residual, and with speculative decoding room for the rows of a step whose drafts may
be rejected, so that none of them overwrites an entry the sequence still reads after a rejection (a block sealed
with rejected entries is in the next query's residual, and is sealed again once complete). Full precision is the
model's dtype, as an auto cache would hold K/V: a bfloat16 model's rings are bfloat16 (half the bytes of
float32's) though the CPU kernels compute in float32; entries are rounded to it as they are written, and blocks
are sealed from the rounded ones.

Packing: a byte holds 8 // bits values, of channels c, c + n, c + 2n, ... (n = head_dim * bits / 8), the first
in its lowest bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nimblelm.kernels import ops_for
from nimblelm.layers.rotary import apply_rotary

# kv_cache_dtype names the packed formats by torch's own packed dtypes; storage is uint8.
BITS = {torch.quint4x2: 4, torch.quint2x4: 2}
RESIDUAL_LENGTH = 128  # KIVI's residual, kv_residual_length's default


def value_group(head_dim: int) -> int:
    """Channels per value scale: KIVI's 32, or what divides head_dim."""
    return math.gcd(32, head_dim)


@dataclass
class LowBitKV:
    """A KV tensor's quantization parameters and residual rings, beside its packed values (KVCache.values, uint8
    [2, num_blocks, block_size, kv_heads, head_dim * bits / 8])."""

    bits: int
    k_scale: torch.Tensor  # float16 [num_blocks, kv_heads, head_dim]
    k_min: torch.Tensor
    v_scale: torch.Tensor  # float16 [num_blocks, block_size, kv_heads, head_dim / value_group]
    v_min: torch.Tensor
    residual: torch.Tensor  # [2, rings * ring_length, kv_heads, head_dim] in the model's dtype: K then V
    residual_length: int  # entries a query reads at full precision: whole blocks
    ring_length: int  # entries a ring holds: the residual and the spare room of speculative steps, whole blocks

    @classmethod
    def empty(cls, bits: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, rings: int,
              residual_length: int, dtype: torch.dtype, device, ring_length: int | None = None) -> LowBitKV:
        half = {"dtype": torch.float16, "device": device}
        k_shape = (num_blocks, kv_heads, head_dim)
        v_shape = (num_blocks, block_size, kv_heads, head_dim // value_group(head_dim))
        return cls(bits, torch.zeros(k_shape, **half), torch.zeros(k_shape, **half), torch.zeros(v_shape, **half),
                   torch.zeros(v_shape, **half),
                   torch.zeros((2, rings * (ring_length or residual_length), kv_heads, head_dim), dtype=dtype,
                               device=device),
                   residual_length, ring_length or residual_length)

    @property
    def block_params(self) -> tuple[torch.Tensor, ...]:
        """The K scales, K minimums, V scales and V minimums, each indexed by block first."""
        return self.k_scale, self.k_min, self.v_scale, self.v_min

    @staticmethod
    def bytes_per_block(bits: int, block_size: int, kv_heads: int, head_dim: int) -> int:
        packed = block_size * kv_heads * head_dim * bits // 8
        return 2 * packed + 2 * 2 * kv_heads * head_dim + 2 * 2 * block_size * kv_heads * (head_dim // value_group(head_dim))

    def grow(self, rings: int) -> None:
        """Room for `rings` residual rings in all (rings already there keep their entries)."""
        more = rings * self.ring_length - self.residual.shape[1]
        if more > 0:
            self.residual = torch.cat([self.residual, self.residual.new_zeros(2, more, *self.residual.shape[2:])], 1)


def ring_slots(at, entries, length: int):
    """The residual slots of a sequence's entries (ints, numpy or torch alike): `at` is its ring's first slot
    plus its table's offset (the entries it dropped from its front) mod `length`, so that position p is at slot
    p mod length of the ring, whatever the table dropped."""
    return at - at % length + (at % length + entries) % length


def pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    parts = levels.view(*levels.shape[:-1], per, -1)
    out = parts[..., 0, :].clone()
    for i in range(1, per):
        out |= parts[..., i, :] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], -2).flatten(-2)


def quantize(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min-max over `dim` of float32 x: (levels uint8, scale, minimum), float16, with
    x ~ levels * scale + minimum; the levels are rounded against the float16 scale and minimum that are kept."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, low = ((hi - lo) / ((1 << bits) - 1)).half(), lo.half()
    inv = torch.where(scale > 0, 1 / scale.float(), 0.0)
    levels = torch.round((x - low.float()) * inv).clamp_(0, (1 << bits) - 1).to(torch.uint8)
    return levels, scale.squeeze(dim), low.squeeze(dim)


def dequantize_blocks(values: torch.Tensor, lowbit: LowBitKV, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `blocks` as float32 [len(blocks) * block_size, kv_heads, head_dim]."""
    k = unpack(values[0][blocks], lowbit.bits).float() * lowbit.k_scale[blocks][:, None].float()
    k += lowbit.k_min[blocks][:, None].float()
    v = unpack(values[1][blocks], lowbit.bits).float()
    v = v.unflatten(-1, (lowbit.v_scale.shape[-1], -1)) * lowbit.v_scale[blocks][..., None].float()
    v = (v + lowbit.v_min[blocks][..., None].float()).flatten(-2)
    return k.flatten(0, 1), v.flatten(0, 1)


@dataclass
class Segment:
    """One sequence's rows in a step: rows [row, row + end - start) are its entries [start, end)."""

    row: int
    start: int
    end: int
    full: int  # the first entry of its first row's residual
    fp_at: int  # where its entries from `full` on begin in LowBitPlan.fp_index
    blocks: torch.Tensor  # the blocks of its table up to its last row's
    sealed: torch.Tensor  # those before its last row's block: what it reads quantized
    # A token tree's rows (speculative decoding) sit at consecutive entries but stand for entries along their
    # branches: per row, the entry it stands for, and [rows, rows] which of the segment's rows it attends to.
    stands_for: torch.Tensor | None = None
    visible: torch.Tensor | None = None


@dataclass
class LowBitPlan:
    """A KV group's low-bit work in one step, for every layer alike. An index into "residual or step" is a
    residual slot (>= 0) or -1 - a row of the step."""

    segments: list[Segment]
    fp_index: torch.Tensor  # per segment, its entries from its first row's residual to its end
    # The writes of the rows after the decode rows (those write themselves: write_decodes):
    seal_blocks: torch.Tensor  # the blocks this step completes
    seal_index: torch.Tensor  # their entries, block_size per block
    residual_rows: torch.Tensor  # the rows whose K/V the rings keep: each sequence's last residual_length entries'
    residual_slots: torch.Tensor
    num_decode_segments: int  # the first segments, whose rows are the step's decode rows
    decode_residual: torch.Tensor  # per decode row, its residual slot (ring_slots)

    @classmethod
    def build(cls, spans: list[tuple], num_decodes: int, block_size: int, residual_length: int, ring_length: int,
              device) -> LowBitPlan:
        """spans: per sequence in row order, (first row, first entry, rows, its table, its residual slot, and for a
        token tree (Segment.stands_for, Segment.visible), else None); the first num_decodes rows are decode rows."""
        bs, length, ring = block_size, residual_length, ring_length
        segments, fp, seal_blocks, seal, rows, slots = [], [], [], [], [], []
        decode_spans = [span for span in spans if span[0] < num_decodes]
        fp_at = 0
        for row, start, n, table, at, tree in spans:
            end, own = start + n, start // bs * bs
            full = max(0, own + bs - length)
            blocks = torch.tensor(table[: (end - 1) // bs + 1], dtype=torch.long, device=device)
            segments.append(Segment(row, start, end, full, fp_at, blocks, blocks[:-1], *(tree or ())))
            fp_at += end - full
            # Entries full .. end: those before start are in the ring, the rest in the step.
            entries = np.arange(full, end)
            fp.append(np.where(entries < start, ring_slots(at, entries, ring), -1 - (row + entries - start)))
            if row < num_decodes:  # a decode row writes itself (write_decodes)
                continue
            seal_blocks.extend(table[own // bs : end // bs])  # its blocks that are full once the step is done
            seal.append(fp[-1][own - full : end // bs * bs - full])
            kept = max(start, end - ring)  # what the ring holds of the step's entries: all a later query may read
            rows.append(np.arange(row + kept - start, row + n))
            slots.append(ring_slots(at, np.arange(kept, end), ring))

        def tensor(parts: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(parts or [np.zeros(0)]).astype(np.int64)).to(device)

        return cls(segments, tensor(fp), torch.tensor(seal_blocks, dtype=torch.long, device=device), tensor(seal),
                   tensor(rows), tensor(slots), len(decode_spans),
                   torch.tensor([base for _, _, n, _, base, _ in decode_spans for _ in range(n)], dtype=torch.long,
                                device=device))

    @classmethod
    def decodes(cls, decode_residual: torch.Tensor) -> LowBitPlan:
        """A step of decode rows alone on the kernels, which need nothing else: a replayed step's."""
        empty = decode_residual[:0]
        return cls([], empty, empty, empty, empty, empty, 0, decode_residual)


def _gather(residual: torch.Tensor, new: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = residual[index.clamp(min=0)]
    from_step = index < 0
    out[from_step] = new[-1 - index[from_step]].to(out.dtype)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, values: torch.Tensor, lowbit: LowBitKV, meta,
           scale: float, received: torch.Tensor | None = None, regions: torch.Tensor | None = None) -> torch.Tensor:
    """Write the step's K/V (sealing the blocks it completes, keeping each sequence's last entries in its ring)
    and attend: q [rows, heads, head_dim], k and v [rows, kv_heads, head_dim], meta the step's
    AttentionMetadata. Where the C++ kernels serve, decode rows read the cache as stored and prompt chunks a
    dequantized copy; torch's attention reads both copies through a mask otherwise. With `received` (H2O's,
    [num_blocks, block_size, kv_heads]), every row's attention weights are added at its entries' slots; with
    `regions` (its regions, beside speculative decoding), a chunk's draft rows add into their ranks' regions
    (meta.draft_ranks)."""
    plan, window, d, length = meta.lowbit, meta.sliding_window, meta.num_decodes, lowbit.residual_length
    ops = ops_for(q)
    if ops is None and d and not plan.num_decode_segments:
        raise RuntimeError("a plan of decode rows alone (LowBitPlan.decodes) needs the C++ kernels")
    kv_heads = k.shape[1]
    if received is not None:  # a new entry has received nothing yet (the decode kernel sets its rows' own)
        received.view(-1, kv_heads)[meta.slot_mapping[d:] if ops is not None else meta.slot_mapping] = 0
    if d:
        write_decodes(k[:d], v[:d], values, lowbit, meta, ops)
    out = torch.empty_like(q)
    if d and ops is not None:
        ops.lowbit_decode_attention(out[:d], q[:d], values, lowbit.k_scale, lowbit.k_min, lowbit.v_scale, lowbit.v_min,
                                    lowbit.residual, meta.decode_block_tables, meta.decode_context_lens,
                                    plan.decode_residual, scale, window or 0, lowbit.bits, length, lowbit.ring_length,
                                    received)
    segments = plan.segments[plan.num_decode_segments :] if ops is not None else plan.segments
    if not segments:
        return out
    res_k, res_v = lowbit.residual.unbind()
    # The full-precision entries the rows read, before the rings move on.
    skip = segments[0].fp_at
    fp_k, fp_v = (_gather(res, new, plan.fp_index[skip:]) for res, new in ((res_k, k), (res_v, v)))
    if len(plan.seal_blocks):
        _seal(values, lowbit, plan.seal_blocks, _gather(res_k, k, plan.seal_index), _gather(res_v, v, plan.seal_index))
    res_k[plan.residual_slots] = k[plan.residual_rows].to(res_k.dtype)
    res_v[plan.residual_slots] = v[plan.residual_rows].to(res_v.dtype)
    bs = values.shape[2]
    vote_rows = meta.vote_rows or []  # per prefill chunk, the last segments
    voting = iter([0] * (len(segments) - len(vote_rows)) + vote_rows)
    fused = ops is not None and q.shape[-1] % 16 == 0
    for seg in segments:
        kq, vq = dequantize_blocks(values, lowbit, seg.sealed)
        fp = slice(seg.fp_at - skip, seg.fp_at - skip + seg.end - seg.full)
        fk, fv = fp_k[fp].float(), fp_v[fp].float()  # entries seg.full .. end
        rows = slice(seg.row, seg.row + seg.end - seg.start)
        voters = next(voting)
        slots = (seg.blocks[:, None] * bs + torch.arange(bs, device=q.device)).flatten()[: seg.end]
        # Drafts verified in the chunk: each row's weights go to its rank's region, which the fused kernel's sum
        # over the rows cannot do.
        ranks = meta.draft_ranks[rows] if regions is not None else None
        ranked = ranks is not None and bool(ranks.any())
        tree = seg.visible is not None
        got = None  # what the rows give each entry, H2O's
        if fused and not tree:  # every entry's quantized copy (its full one where none is sealed yet), and the full ones
            n = len(kq)
            got = None if received is None or ranked else torch.zeros(kv_heads, seg.end, device=q.device)
            ops.lowbit_prefill_attention(out[rows], q[rows], torch.cat([kq, fk[n - seg.full :]]),
                                         torch.cat([vq, fv[n - seg.full :]]), fk, fv, scale, window or 0, bs, length,
                                         got)
        if not fused or voters or ranked or tree:
            # Both copies as keys, a mask choosing each query's: for torch's attention, the ranked rows, or the
            # voting rows alone.
            keys, vals = torch.cat([kq, fk]), torch.cat([vq, fv])
            quantized = torch.arange(len(kq), device=q.device)[None, :]
            full = torch.arange(seg.full, seg.end, device=q.device)[None, :]
            if tree:  # each row reads the entries before the step and, of the step's rows, its branch's
                history = full[:, : seg.start - seg.full]
                pos = seg.stands_for[:, None]
                at = torch.cat([history, seg.stands_for[None]], 1)  # the entries the full copies stand for
                seen = torch.cat([(history >= 0).expand(len(pos), -1), seg.visible], 1)
            else:
                pos = torch.arange(seg.end - voters if fused and not ranked else seg.start, seg.end, device=q.device)[:, None]
                at, seen = full, full <= pos
            first = (pos // bs * bs + bs - length).clamp(min=0)  # of each query's residual
            mask = torch.cat([quantized < first, (full >= first) & seen], 1)
            if window is not None:
                mask &= torch.cat([quantized, at], 1) > pos - window
            if not fused or tree:
                o = F.scaled_dot_product_attention(q[rows].float().transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                                   vals.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                                   enable_gqa=True)
                out[rows] = o[0].transpose(0, 1).to(out.dtype)
                if received is not None and not ranked:
                    got = _weights(q[rows], keys, mask, len(kq), seg.full, seg.end, scale)
            if ranked:
                for rank in ranks.unique().tolist():
                    mine = ranks == rank
                    weights = _weights(q[rows][mine], keys, mask[mine], len(kq), seg.full, seg.end, scale)
                    regions[rank].view(-1, kv_heads).index_add_(0, slots, weights.T)
            if voters:  # SnapKV's: the window's weights averaged over its rows and each KV head's query heads
                weights = _weights(q[rows][-voters:], keys, mask[-voters:], len(kq), seg.full, seg.end, scale)
                meta.votes.append(weights / (voters * (q.shape[1] // kv_heads)))
        if got is not None:
            received.view(-1, kv_heads).index_add_(0, slots, got.T)
    return out


def write_decodes(k: torch.Tensor, v: torch.Tensor, values: torch.Tensor, lowbit: LowBitKV, meta, ops) -> None:
    """The decode rows' K/V (a sequence's token and its drafts, or one) into their residual rings, then the blocks they
    complete: by the C++ kernel where `ops` serve, else by torch."""
    plan, ring = meta.lowbit, lowbit.ring_length
    if ops is not None:
        ops.lowbit_decode_write_(values, lowbit.k_scale, lowbit.k_min, lowbit.v_scale, lowbit.v_min, lowbit.residual,
                                 k, v, meta.decode_block_tables, meta.decode_context_lens, plan.decode_residual,
                                 lowbit.bits, ring)
        return
    bs = values.shape[2]
    pos = meta.decode_context_lens - 1
    res_k, res_v = lowbit.residual.unbind()
    res_k[ring_slots(plan.decode_residual, pos, ring)] = k.to(res_k.dtype)
    res_v[ring_slots(plan.decode_residual, pos, ring)] = v.to(res_v.dtype)
    done = ((pos + 1) % bs == 0).nonzero()[:, 0]
    if len(done):
        first = ring_slots(plan.decode_residual[done], pos[done] // bs * bs, ring)  # a block is whole in its ring
        index = (first[:, None] + torch.arange(bs, device=k.device)).flatten()
        _seal(values, lowbit, meta.decode_block_tables[done, pos[done] // bs], res_k[index], res_v[index])


def keep_branch(values: torch.Tensor, lowbit: LowBitKV, at: int, src: torch.Tensor, dst: torch.Tensor,
                table: list[int]) -> None:
    """A token tree's kept nodes, computed at the consecutive entries src, moved to the entries dst they stand for
    in a sequence's ring (residual slot `at`, ring_slots); the blocks of `table` that dst completes, sealed in the
    step with the rows that were there, sealed again from the ring."""
    res, ring, bs = lowbit.residual, lowbit.ring_length, values.shape[2]
    res[:, ring_slots(at, dst, ring)] = res[:, ring_slots(at, src, ring)]
    whole = range(int(dst[0]) // bs, (int(dst[-1]) + 1) // bs)
    if len(whole):
        slots = ring_slots(at, torch.arange(whole.start * bs, whole.stop * bs, device=dst.device), ring)
        blocks = torch.tensor([table[b] for b in whole], dtype=torch.long, device=dst.device)
        _seal(values, lowbit, blocks, res[0][slots], res[1][slots])


def _weights(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, num_quantized: int, full: int, end: int,
             scale: float) -> torch.Tensor:
    """The attention weights of the rows q [rows, heads, d] over entries [0, end), summed over the rows and each KV
    head's query heads, [kv_heads, end]. The keys are the quantized entries, then the full-precision ones from
    `full`; the mask says which copy a row reads."""
    rows, kv_heads = q.shape[0], keys.shape[1]
    qg = q.float().view(rows, kv_heads, -1, q.shape[-1]).permute(1, 2, 0, 3)  # [kv, group, rows, d]
    logits = qg @ keys.permute(1, 2, 0)[:, None] * scale  # [kv, group, rows, copies]
    weights = logits.masked_fill_(~mask, float("-inf")).softmax(-1).sum((1, 2))  # [kv, copies]
    out = weights.new_zeros(kv_heads, end)
    out[:, :num_quantized] += weights[:, :num_quantized]
    out[:, full:] += weights[:, num_quantized:]
    return out


def _seal(values: torch.Tensor, lowbit: LowBitKV, blocks: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor) -> None:
    """Quantize whole blocks' K/V (keys, vals: [len(blocks) * block_size, kv_heads, head_dim]) into `blocks`."""
    bs, bits = values.shape[2], lowbit.bits
    levels, lowbit.k_scale[blocks], lowbit.k_min[blocks] = quantize(keys.float().unflatten(0, (-1, bs)), 1, bits)
    values[0][blocks] = pack(levels, bits)
    groups = vals.float().unflatten(0, (-1, bs)).unflatten(-1, (lowbit.v_scale.shape[-1], -1))
    levels, lowbit.v_scale[blocks], lowbit.v_min[blocks] = quantize(groups, -1, bits)
    values[1][blocks] = pack(levels.flatten(-2), bits)


def fill_ring(values: torch.Tensor, lowbit: LowBitKV, table: torch.Tensor, num_entries: int, at: int) -> None:
    """The ring of a sequence that starts after num_entries entries it did not compute (a prefix cache hit, whole
    sealed blocks of `table`): those of its first query's residual, as stored."""
    bs, length = values.shape[2], lowbit.residual_length
    full = max(0, num_entries + bs - length)
    k, v = dequantize_blocks(values, lowbit, table[full // bs : num_entries // bs])
    slots = ring_slots(at, torch.arange(full, num_entries, device=table.device), lowbit.ring_length)
    res_k, res_v = lowbit.residual.unbind()
    res_k[slots], res_v[slots] = k.to(res_k.dtype), v.to(res_v.dtype)


def _block_head(x: torch.Tensor, blocks: torch.Tensor, heads: torch.Tensor) -> tuple:
    """The index of (block, KV head) pairs in a tensor of packed levels or parameters: [blocks, heads, ...] for
    the keys' parameters, [blocks, block_size, heads, ...] for the rest."""
    return (blocks, heads) if x.dim() == 3 else (blocks, slice(None), heads)


def compact(values: torch.Tensor, lowbit: LowBitKV, table: torch.Tensor, num_entries: int, kept: torch.Tensor,
            new_table: torch.Tensor, at: int, new_at: int, rotate_back: tuple | None = None) -> None:
    """A KV policy's compaction (engine/model_runner.py): the entries `kept` [kv_heads, keep] of the num_entries
    in `table` (their ring at residual slot `at`) gathered per KV head into new_table from its start. Each is
    taken as the next query would read it: full precision from the ring where it is in that query's residual,
    else as sealed. Full new blocks are sealed again from those (a second rounding for the sealed ones), but for
    a KV head whose new block holds one sealed block's entries, which it takes as stored: sealing those again
    need not give the same levels (a minimum rounded to float16 can leave the top level unused, and the second
    scale is then narrower). The new residual's entries go to the ring, at slot new_at (the new table's offset).
    new_table may reuse table's blocks: everything is read before anything is written. rotate_back: (cos, sin,
    first), streaming's cache positions: the kept keys from the first-th on are rotated back by the angles of the
    distance they moved before they are stored (so no block is taken as stored)."""
    bs, keep, length = values.shape[2], kept.shape[1], lowbit.residual_length
    full = max(0, num_entries // bs * bs + bs - length)
    res_k, res_v = lowbit.residual.unbind()
    k, v = dequantize_blocks(values, lowbit, table[: full // bs])
    slots = ring_slots(at, torch.arange(full, num_entries, device=kept.device), lowbit.ring_length)
    heads = torch.arange(kept.shape[0], device=kept.device)
    k, v = (torch.cat([x, res[slots].float()])[kept.T, heads] for x, res in ((k, res_k), (v, res_v)))
    if rotate_back is not None:
        cos, sin, first = rotate_back
        k[first:] = apply_rotary(k[first:], cos, -sin)
    sealed = keep // bs
    if sealed and rotate_back is not None:
        _seal(values, lowbit, new_table[:sealed], k[: sealed * bs], v[: sealed * bs])
    elif sealed:
        # Per (KV head, new block): its entries are one sealed block's, in order (kept is ascending).
        groups = kept[:, : sealed * bs].view(-1, sealed, bs)
        first = groups[..., 0]
        whole = (first % bs == 0) & (groups[..., -1] - first == bs - 1) & (first + bs <= full)
        head, block = whole.nonzero(as_tuple=True)
        src, dst = table[first[head, block] // bs], new_table[block]
        parts = (values[0], values[1], *lowbit.block_params)
        stored = [x[_block_head(x, src, head)] for x in parts]
        _seal(values, lowbit, new_table[:sealed], k[: sealed * bs], v[: sealed * bs])
        for x, got in zip(parts, stored):
            x[_block_head(x, dst, head)] = got
    new_full = max(0, sealed * bs + bs - length)
    slots = ring_slots(new_at, torch.arange(new_full, keep, device=kept.device), lowbit.ring_length)
    res_k[slots], res_v[slots] = k[new_full:].to(res_k.dtype), v[new_full:].to(res_v.dtype)
