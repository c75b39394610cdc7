"""EAGLE (Li et al. 2024, EAGLE-1): a draft layer that continues the target's own features autoregressively.

The target's feature f_p is its last hidden state at position p through its final norm (as EAGLE's, Hugging
Face's last hidden_states), the one whose logits chose token x_{p+1}. The draft layer reads the pair
(f_p, x_{p+1}): fc([embed(x_{p+1}); f_p]) (2H -> H; embed the target's own token embedding, frozen), then one
decoder layer of the target's architecture (models/decoder.py's DecoderLayer, at position p + 1, with its own
K/V), giving f^_{p+1}; the target's frozen output layer turns that into a draft of x_{p+2}. A draft then feeds
back as (f^_{p+1}, x^_{p+2}), a depth per pass. (Features before the final norm, whose scale SmolLM2-135M's
outliers set, trained to 11.8% held-out first-draft accuracy where normed ones reached 17.7%: the same 80
answers, 3 epochs.)

Each step the model runner shows the proposer the hidden states of the rows it computed (observe): their pairs
go through the draft layer, which stores their K/V, and the last one's output drafts the first token. Each
further depth is one batched pass over every speculating sequence; its K/V are stored past the seen ones and
replaced when the next step's rows arrive (they start at the row of the newest token, before any draft).
Prompt rows the prefix cache served are never computed, so the layer has no K/V for them.

The draft layer's K/V are paged as the target's (a pool of blocks of its own, doubled when full), so a pass
over many sequences is one call of the same attention kernels. Drafts are a chain, or with a token tree
(speculative_token_tree) the chain with other candidates beside it as leaves: a node off the chain is a
depth's rank-r candidate after the chain's nodes before it, [0, .., 0, r]; it needs no pass of its own.

A draft file is safetensors: "fc.weight" [H, 2H], "fc.bias", "layer.*" (the decoder layer's parameters by
DecoderLayer's names), "norm.weight" (the target's final norm, which identifies the target) and, for a cut
vocabulary, "vocab_ids" (FR-Spec, as Medusa's); its metadata (medusa.METADATA_KEY) holds the target, the
tokenizer's digest, the training cost and the held-out accuracy (eagle_train.py).
"""

from __future__ import annotations

import bisect
import time

import torch
from torch import nn

from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import ops_for
from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.linear import Linear
from nimblelm.models.decoder import DecoderLayer
from nimblelm.speculative.budget import PassTime
from nimblelm.speculative.medusa import DraftOutput, HeadsKind, _primary_first, open_for_target, rms_norm
from nimblelm.speculative.seen import Seen
from nimblelm.speculative.tree import DraftTree

EAGLE = HeadsKind("eagle", ".eagle.safetensors", "EAGLE draft layer", "fc.weight")
# A sequence's seen rows up to this many are decode rows of the draft layer's attention (each with its own
# context, as the target's verified drafts are); longer runs (prompt chunks) are prefill chunks.
MAX_DECODE_ROWS = 16
FIRST_BLOCKS = 64  # the K/V pool's blocks at start; it doubles when full


class DraftNet(nn.Module):
    """fc and the decoder layer: (token embeddings, features) [rows, H] each -> next features [rows, H]."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)
        self.layer = DecoderLayer(cfg, rope_index=0)  # rope variant 0: the target's global layers'

    def forward(self, embedded: torch.Tensor, features: torch.Tensor, ropes, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.layer(self.fc(torch.cat([embedded, features], dim=-1)), None, ropes, kv_cache, meta)
        return x + residual

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parameters by file name (fc.*, layer.*), float32."""
        return {name: p.detach().float().contiguous() for name, p in self.named_parameters()}

    def load(self, tensors: dict[str, torch.Tensor]) -> DraftNet:
        own = dict(self.named_parameters())
        stored = {name: t for name, t in tensors.items() if name.startswith(("fc.", "layer."))}
        if set(stored) != set(own):
            raise ValueError(f"its draft layer's tensors are not this architecture's "
                             f"({sorted(set(own) ^ set(stored))[:3]} differ)")
        with torch.no_grad():
            for name, p in own.items():
                if p.shape != stored[name].shape:
                    raise ValueError(f"{name} is {tuple(stored[name].shape)}, the target's layer needs "
                                     f"{tuple(p.shape)}")
                p.copy_(stored[name])
        return self


def new_kv(blocks: int, block_size: int, cfg, dtype: torch.dtype, device) -> KVCache:
    return KVCache(torch.zeros(2, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device))


class _Seq:
    """A sequence's K/V in the draft layer: its blocks of the pool, the position key of each entry (the target
    row p whose pair (f_p, x_{p+1}) made it; sorted), and the output of the last seen pair with its token."""

    __slots__ = ("blocks", "feature", "keys", "token")

    def __init__(self):
        self.blocks: list[int] = []
        self.keys: list[int] = []
        self.feature: torch.Tensor | None = None
        self.token: int | None = None


class EagleProposer:
    """Chains of up to k greedy drafts per sequence: the first from the draft layer's output on the newest
    seen pair, each further one by a batched pass over every sequence still drafting; with a token tree
    (rank paths, each zeros then one rank), also each depth's other candidates as leaves."""

    observes = True

    def __init__(self, path: str | None, num_speculative_tokens: int, runner,
                 token_tree: list[list[int]] | None = None):
        model, cfg = runner.model, runner.full_config  # the draft layer whole on every rank
        tensors, self.meta = open_for_target(path, cfg, model.norm.weight, EAGLE)
        self.k = num_speculative_tokens
        self.tree = None if token_tree is None else _primary_first([tuple(p) for p in token_tree])
        self.ranks = 1 if self.tree is None else 1 + max(p[-1] for p in self.tree)
        self.device = device = runner.device
        try:
            net = DraftNet(cfg).load(tensors)
        except ValueError as e:
            raise InvalidRequestError(f"speculative_config: the EAGLE draft layer {path or 'found for the target'} "
                                      f"does not fit the target: {e}") from None
        self.net = net.float().to(device).requires_grad_(False).eval()
        for module in self.net.modules():
            if isinstance(module, Linear):
                module.prepare()  # float32 on the CPU: the panel kernel's layout
        self.embed = model.embed
        self.rotary = model.rotary
        self.norm_weight = model.norm.weight.detach().float()
        self.eps = cfg.rms_norm_eps
        self.output = DraftOutput(model, tensors.get("vocab_ids"), runner.dtype)
        self.cfg, self.bs = cfg, runner.block_size
        self.kernels = ops_for(torch.empty(0, device=device)) is not None
        self.kv = new_kv(FIRST_BLOCKS, self.bs, cfg, torch.float32, device)
        self.free = list(range(FIRST_BLOCKS - 1, -1, -1))
        self.seqs: dict[int, _Seq] = {}
        self._pass_time = PassTime()

    @property
    def pass_seconds(self) -> float:
        """One drafting pass past the first depth (which reads the output the step's seen pairs gave)."""
        return self._pass_time.seconds

    # The pool of K/V blocks.

    def _alloc(self) -> int:
        if not self.free:
            old = self.kv.values
            n = old.shape[1]
            self.kv = new_kv(2 * n, self.bs, self.cfg, torch.float32, self.device)
            self.kv.values[:, :n] = old
            self.free = list(range(2 * n - 1, n - 1, -1))
        return self.free.pop()

    def _truncate(self, seq: _Seq, entries: int) -> None:
        del seq.keys[entries:]
        keep = -(-entries // self.bs)
        self.free.extend(seq.blocks[keep:])
        del seq.blocks[keep:]

    def _append(self, seq: _Seq, keys: range) -> list[int]:
        """Entries for the pairs of keys after the sequence's last; their cache slots."""
        first = len(seq.keys)
        seq.keys.extend(keys)
        while len(seq.blocks) * self.bs < len(seq.keys):
            seq.blocks.append(self._alloc())
        return [seq.blocks[e // self.bs] * self.bs + e % self.bs for e in range(first, len(seq.keys))]

    def forget(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            seq = self.seqs.pop(req_id, None)
            if seq is not None:
                self.free.extend(seq.blocks)

    # Running the draft layer.

    def _run(self, tokens: list[int], features: torch.Tensor, keys: list[int], meta: AttentionMetadata) -> torch.Tensor:
        ids = torch.tensor(tokens, device=self.device)
        positions = torch.tensor(keys, device=self.device) + 1  # pair (f_p, x_{p+1}) sits at x_{p+1}'s place
        return self.net(self.embed(ids).float(), features.float(), self.rotary(positions), self.kv, meta)

    def _decode_meta(self, slots: list[int], tables: list[list[int]], contexts: list[int],
                     chunks: list[tuple[list[int], tuple[int, int]]] = ()) -> AttentionMetadata:
        """Decode rows (slot, block table, context each), then prefill chunks (block table, (rows, context));
        the chunks' rows' slots follow the decodes' in slots."""
        device = self.device
        width = max(map(len, tables), default=1)
        contexts_t = torch.tensor(contexts, dtype=torch.long, device=device)
        mask = None
        if tables and not self.kernels:
            mask = AttentionMetadata.decode_mask_for(contexts_t, width * self.bs, None)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device), num_decodes=len(contexts),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long,
                                             device=device).view(len(tables), width),
            decode_context_lens=contexts_t, decode_mask=mask, prefill_query_lens=[], prefill_context_lens=[],
            prefill_block_tables=[], prefill_masks=[])
        for table, (q_len, context) in chunks:
            meta.prefill_query_lens.append(q_len)
            meta.prefill_context_lens.append(context)
            meta.prefill_block_tables.append(torch.tensor(table, dtype=torch.long, device=device))
            meta.prefill_masks.append(AttentionMetadata.prefill_mask_for(q_len, context, None, device))
        return meta

    @torch.inference_mode()
    def observe(self, seen: dict[int, Seen]) -> None:
        """The seen pairs through the draft layer, their K/V stored in place of anything kept from their
        positions on (drafts' K/V; after a preemption, the whole sequence's)."""
        if not seen:
            return
        short = [(r, s) for r, s in seen.items() if len(s.next_tokens) <= MAX_DECODE_ROWS]
        long = [(r, s) for r, s in seen.items() if len(s.next_tokens) > MAX_DECODE_ROWS]
        slots, tables, contexts, chunks, tokens, features, keys, last = [], [], [], [], [], [], [], {}
        for req_id, s in short + long:
            if not s.next_tokens:
                continue
            seq = self.seqs.setdefault(req_id, _Seq())
            kept = bisect.bisect_left(seq.keys, s.position)
            self._truncate(seq, kept)
            rows = len(s.next_tokens)
            slots += self._append(seq, range(s.position, s.position + rows))
            if rows <= MAX_DECODE_ROWS:
                tables += [seq.blocks] * rows
                contexts += range(kept + 1, kept + rows + 1)
            else:
                chunks.append((seq.blocks, (rows, kept + rows)))
            tokens += s.next_tokens
            features.append(s.hidden)
            keys += range(s.position, s.position + rows)
            last[req_id] = len(tokens) - 1
            seq.token = s.next_tokens[-1]
        if not tokens:
            return
        features = rms_norm(torch.cat(features).float(), self.norm_weight, self.eps)
        out = self._run(tokens, features, keys, self._decode_meta(slots, tables, contexts, chunks))
        for req_id, row in last.items():
            self.seqs[req_id].feature = out[row]

    def _draft(self, features: torch.Tensor) -> list[list[int]]:
        """Per row of draft features [rows, H], the self.ranks best tokens, best first."""
        logits = self.output(features)
        best = logits.argmax(-1, keepdim=True) if self.ranks == 1 else logits.topk(self.ranks, dim=-1).indices
        return self.output.token_ids(best).tolist()

    @torch.inference_mode()
    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, list[int] | DraftTree]:
        """Per sequence (its tokens, prompt length, room for drafts), a chain of up to min(k, room) greedy
        drafts, or the tree's nodes to that depth: for those whose newest token is the last seen pair's (the
        draft layer has read every row before it)."""
        items = []
        for req_id, (tokens, _, room) in requests.items():
            seq = self.seqs.get(req_id)
            if (room > 0 and seq is not None and seq.feature is not None and seq.token == tokens[-1]
                    and seq.keys and seq.keys[-1] == len(tokens) - 2):
                items.append((req_id, seq, len(tokens) - 2, min(self.k, room)))
        if not items:
            return {}
        features = torch.stack([seq.feature for _, seq, _, _ in items])
        # Per sequence and depth, the candidates (best first); the chain goes on with the best.
        candidates = {req_id: [top] for (req_id, _, _, _), top in zip(items, self._draft(features))}
        for depth in range(1, max(n for _, _, _, n in items)):
            rows = [i for i, (_, _, _, n) in enumerate(items) if n > depth]
            t0 = time.perf_counter()
            slots, tables, contexts, keys = [], [], [], []
            for i in rows:
                _, seq, last, _ = items[i]
                slots += self._append(seq, range(last + depth, last + depth + 1))
                tables.append(seq.blocks)
                contexts.append(len(seq.keys))
                keys.append(last + depth)
            tokens = [candidates[items[i][0]][-1][0] for i in rows]
            features = self._run(tokens, features[rows] if len(rows) < len(features) else features, keys,
                                 self._decode_meta(slots, tables, contexts))
            for i, top in zip(rows, self._draft(features)):
                candidates[items[i][0]].append(top)
            self._pass_time.add(time.perf_counter() - t0)
            items = [items[i] for i in rows]
        if self.tree is None:
            return {req_id: [top[0] for top in tops] for req_id, tops in candidates.items()}
        out = {}
        for req_id, tops in candidates.items():
            paths = [p for p in self.tree if len(p) <= len(tops)]
            index = {p: i for i, p in enumerate(paths)}
            out[req_id] = DraftTree([tops[len(p) - 1][p[-1]] for p in paths],
                                    [index.get(p[:-1], -1) for p in paths])
        return out
