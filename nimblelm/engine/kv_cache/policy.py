"""KV cache policies: which of a sequence's KV entries stay once it holds more than a budget of them.

- streaming (StreamingLLM): the first num_sinks entries (attention sinks) and the most recent ones; applied
  when the whole prompt is in (or after each of its chunks, per_chunk) and again whenever the sequence has
  grown a block past its budget. With cache_positions, as in the paper, a token's rotary position is its
  place in the cache, not in the text: kept keys are rotated back as they move, and generation goes on past
  max_model_len (the cache never holds more than the budget and a block).
- snapkv (SnapKV): once, when the whole prompt is in (or after each of its chunks, per_chunk). Each KV head
  keeps the prompt positions that its query heads, at the prompt's last window_size tokens, attend to most
  (averaged over kernel_size neighbours); the window itself always stays. Later tokens are all kept.
- h2o (H2O): the heavy hitters, the entries that have received the most attention from every query so far
  (summed over each KV head's query heads), and the last window_size entries; applied as streaming is, the
  attention received kept up to date by the attention layers as prompt chunks and decodes run.
- pyramidkv (PyramidKV): SnapKV with a budget per layer, falling linearly from the first layer to the last
  around the same mean (kvpress's schedule, beta its steepness). Each full-attention layer is then a KV
  group of its own, with its own table.

Who does what: the scheduler decides when a sequence is compacted and how many entries it keeps
(`kept_entries`); the attention layers of that step provide the window's votes (layers/attention.py); the
model runner picks the entries (`select`) and gathers them into fresh blocks; the KV cache manager then
frees the old ones. Only layers that attend to the whole context take part: a sliding window already
bounds the others.

The kept count is rounded up (by less than a block) so that the sequence's later tokens land where the
manager expects them: entry p - d * block_size after d blocks dropped from the table's front, the
arrangement sliding windows use. Keys carry their rotary positions from when they were written, so kept
entries keep their original positions (as kvpress does), except with streaming's cache_positions.

A low-bit cache quantizes keys per block of tokens (layers/kivi.py), so a compaction that regroups kept entries
quantizes them again, and an entry kept through many compactions (an attention sink, a heavy hitter) would
drift further each time. There every method keeps the first block (the sinks' own) whole, and once a
compaction has grouped a sequence's entries, the later ones keep or drop its quantized entries a whole block at
a time; a block kept whole moves as stored. An entry is then rounded at most twice: sealed, then regrouped once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from nimblelm.errors import InvalidRequestError

METHODS = ("streaming", "snapkv", "pyramidkv", "h2o")


@dataclass(frozen=True)
class KVPolicy:
    method: str
    budget: int | None = None  # KV entries a sequence keeps; or
    ratio: float | None = None  # the fraction of its prompt's entries it keeps (kvpress: 1 - compression_ratio)
    num_sinks: int = 4  # streaming: the first entries, always kept
    # snapkv, pyramidkv: the last prompt tokens whose attention votes; h2o: the recent entries. Always kept.
    window_size: int = 64
    kernel_size: int = 5  # snapkv, pyramidkv: votes are averaged over this many neighbouring positions
    beta: float = 20  # pyramidkv: the last layer's budget is the first's over about 2 * beta - 1
    # Compact after each chunk of a prompt too, not only once it is all in: a text longer than the budget then
    # streams through it, each chunk attending to what the policy kept of the chunks before (the streaming
    # setting of StreamingLLM's perplexity runs). False compacts the whole prompt at once, as kvpress does.
    per_chunk: bool = False
    # streaming: rotary positions are places in the cache (StreamingLLM; kvpress's KeyRerotationPress), so a
    # sequence can outgrow max_model_len. False: each token keeps its position in the text.
    cache_positions: bool = False

    @classmethod
    def from_dict(cls, options: dict[str, Any] | KVPolicy) -> KVPolicy:
        """A policy from options such as {"method": "snapkv", "ratio": 0.2}, or one clear error."""
        if isinstance(options, KVPolicy):
            return options
        if not isinstance(options, dict):
            raise InvalidRequestError(f"kv_policy must be a dict, got {type(options).__name__}")
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise InvalidRequestError(f"kv_policy: unknown option(s) {', '.join(unknown)}")
        if "method" not in options:
            raise InvalidRequestError(f"kv_policy needs a 'method': one of {', '.join(METHODS)}")
        policy = cls(**options)
        policy._validate()
        return policy

    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"kv_policy: {msg}")

        if self.method not in METHODS:
            raise bad(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if (self.budget is None) == (self.ratio is None):
            raise bad("give either 'budget' (entries kept) or 'ratio' (the fraction of the prompt kept)")
        for name in ("num_sinks", "window_size", "kernel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_sinks" else 1):
                raise bad(f"{name} must be a {'non-negative' if name == 'num_sinks' else 'positive'} integer, "
                          f"got {value!r}")
        for name in ("per_chunk", "cache_positions"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.cache_positions and self.method != "streaming":
            raise bad("cache_positions applies to method streaming only")
        if not isinstance(self.beta, (int, float)) or isinstance(self.beta, bool) or self.beta < 1:
            raise bad(f"beta must be a number of at least 1, got {self.beta!r}")
        if self.kernel_size % 2 == 0:
            raise bad(f"kernel_size must be odd (the pooling is centred), got {self.kernel_size}")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1):
            raise bad(f"ratio must be in (0, 1), got {self.ratio!r}")
        if self.budget is not None:
            floor = self.num_sinks + 1 if self.method == "streaming" else self.window_size
            if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < floor:
                what = "num_sinks + 1" if self.method == "streaming" else "window_size"
                raise bad(f"budget must be an integer of at least {what} ({floor}), got {self.budget!r}")

    def budget_for(self, num_prompt_tokens: int, depth: float = 0.0) -> int:
        """The entries a sequence with this many prompt tokens keeps in a layer at `depth` (0 first, 1 last):
        never fewer than the window (snapkv, pyramidkv, h2o) or the sinks and one recent entry (streaming)."""
        mean = self.budget if self.budget is not None else num_prompt_tokens * self.ratio
        if self.method == "streaming":
            return max(int(mean), self.num_sinks + 1)
        budget = int(mean)
        if self.method == "pyramidkv":  # kvpress's schedule, which keeps SnapKV's budget where it cannot fall
            w, n = self.window_size, num_prompt_tokens
            low = mean / self.beta
            high = 2 * mean - low
            if high >= n - w:
                high = n - w
                low = 2 * mean - high
            budget = round(high - depth * (high - low)) if n >= high >= low >= w else round(mean)
        return max(budget, self.window_size)

    @property
    def needs_votes(self) -> bool:
        """Whether a compaction needs the step's window to vote (else it has what it needs: positions, or H2O's
        attention received)."""
        return self.method in ("snapkv", "pyramidkv")

    def kept_entries(self, num_prompt_tokens: int, num_entries: int, num_new: int, completes: bool,
                     block_size: int, depth: float = 0.0) -> int | None:
        """How many entries a sequence keeps, in a layer at `depth`, after a step that leaves it num_entries
        entries there, num_new of them computed by the step; None: no compaction. completes: the step computes
        the sequence's last token. A compaction frees at least a block."""
        if not (completes or self.per_chunk) or (self.needs_votes and num_new < max(self.window_size, 2)):
            return None  # a voting policy compacts prompts only, voting with its window's rows, computed now
        budget = self.budget_for(num_prompt_tokens, depth)
        keep = budget + (num_entries - budget) % block_size
        return keep if num_entries - keep >= block_size else None

    def select(self, keep: int, num_entries: int, num_kv_heads: int, votes=None, key_group: int = 1,
               grouped: int = 0):
        """Per KV head, the `keep` entries (of num_entries) that stay, ascending: a LongTensor [kv_heads, keep].
        votes: [kv_heads, num_entries], each entry's attention from snapkv's window averaged over its rows and
        the head's query heads, or h2o's attention received.

        A low-bit cache's: key_group, the tokens it quantizes keys over (its block), and grouped, its entries
        before this that an earlier compaction left in key groups. Every method keeps the first group (the
        attention sinks' own) whole, and the grouped entries a whole group at a time (by the sum of its scores),
        so that no entry is regrouped, so quantized, more than once (the module's docstring)."""
        import torch  # here only: the scheduler, which uses the rest of the policy, is torch-free
        import torch.nn.functional as F

        if self.method == "streaming":
            whole = -(-self.num_sinks // key_group) * key_group
            sinks = whole if whole < keep else min(self.num_sinks, keep)
            kept = torch.cat([torch.arange(sinks), torch.arange(num_entries - (keep - sinks), num_entries)])
            return kept.expand(num_kv_heads, keep)
        w = min(self.window_size, num_entries)
        pooled = votes[:, : num_entries - w].float()
        if self.method != "h2o":
            pooled = F.avg_pool1d(pooled, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        top = pooled.max().item() + 1 if pooled.numel() else 1.0
        scores = F.pad(pooled, (0, w), value=top)
        if key_group > 1 and keep > key_group + w:
            scores[:, :key_group] = top
        kept = scores.topk(keep, dim=-1).indices
        grouped = min(grouped, num_entries - w) // key_group * key_group
        if grouped:
            kept = self._whole_groups(scores, kept, keep, key_group, grouped)
        return kept.sort(dim=-1).values

    @staticmethod
    def _whole_groups(scores, kept, keep: int, group: int, grouped: int):
        """kept, with its entries before `grouped` taken a whole key group at a time: as many groups as it held
        whole entries' worth there (at least what the entries after leave to them), the best by their scores'
        sums, and the rest of the budget from the entries after by their scores."""
        import torch

        heads, n = scores.shape
        room = n - grouped
        groups = torch.clamp((kept < grouped).sum(-1) // group, min=-(-(keep - room) // group))
        sums = scores[:, :grouped].view(heads, -1, group).sum(-1)
        rank = sums.argsort(dim=-1, descending=True).argsort(dim=-1)
        mask = (rank < groups[:, None]).repeat_interleave(group, dim=-1)
        rank = scores[:, grouped:].argsort(dim=-1, descending=True).argsort(dim=-1)
        mask = torch.cat([mask, rank < (keep - groups * group)[:, None]], -1)
        return mask.nonzero()[:, 1].view(heads, keep)
