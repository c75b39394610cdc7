"""Batched sampling: penalties, grammar masks, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Every row of the batch is processed by the same tensor ops; only rows with their own seed draw their
noise separately, so that a seeded request samples the same tokens whatever batch it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nimblelm.engine.structured import apply_bitmask
from nimblelm.kernels import ops_for
from nimblelm.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """The sampling parameters of one step's sampled rows, as tensors."""

    temperature: torch.Tensor  # [rows] float; rows with 0 are greedy
    all_greedy: bool
    top_k: torch.Tensor | None  # [rows] long, vocab size where disabled; None if no row uses it
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    generators: list[torch.Generator | None]
    penalties: _Penalties | None
    max_logprobs: int | None  # largest number of alternatives any row asked for
    # [rows, ceil(vocab / 32)] int32: per row the tokens its grammar allows (all for rows without one);
    # None if no row has a grammar
    bitmask: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        token_ids: list[list[int]],
        num_prompt_tokens: list[int],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        bitmask: torch.Tensor | None = None,
    ) -> SamplingBatch:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        top_k = top_p = min_p = None
        if any(p.top_k for p in params):
            top_k = column([p.top_k or vocab_size for p in params], torch.long)
        if any(p.top_p < 1 for p in params):
            top_p = column([p.top_p for p in params])
        if any(p.min_p for p in params):
            min_p = column([p.min_p for p in params])
        penalties = None
        if any(p.has_penalties for p in params):
            penalties = _Penalties.build(params, token_ids, num_prompt_tokens, vocab_size, device)
        logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=column([p.temperature for p in params]),
            all_greedy=all(p.greedy for p in params),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            generators=generators,
            penalties=penalties,
            max_logprobs=max(logprobs) if logprobs else None,
            bitmask=bitmask,
        )


@dataclass
class _Penalties:
    presence: torch.Tensor  # [rows, 1]
    frequency: torch.Tensor
    repetition: torch.Tensor
    output_counts: torch.Tensor  # [rows, vocab] occurrences in the output so far
    seen: torch.Tensor  # [rows, vocab] bool: in the prompt or the output

    @classmethod
    def build(cls, params, token_ids, num_prompt_tokens, vocab_size, device) -> _Penalties:
        rows = len(params)
        output_counts = torch.zeros(rows, vocab_size, device=device)
        seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        for row, (ids, n_prompt) in enumerate(zip(token_ids, num_prompt_tokens)):
            out = torch.tensor(ids[n_prompt:], dtype=torch.long, device=device)
            output_counts[row].index_add_(0, out, torch.ones(len(out), device=device))
            seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True

        def column(attr):
            return torch.tensor([getattr(p, attr) for p in params], device=device)[:, None]

        return cls(column("presence_penalty"), column("frequency_penalty"), column("repetition_penalty"), output_counts, seen)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # Repetition penalty as in CTRL / Hugging Face: shrink positive logits, grow negative ones.
        penalized = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
        logits = torch.where(self.seen, penalized, logits)
        return logits - self.frequency * self.output_counts - self.presence * (self.output_counts > 0)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, when logprobs were asked for: (sampled logprob, its rank, top ids, top logprobs).
    logprobs: list[tuple[float, int, list[int], list[float]]] | None


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        raw_logits, logits, greedy = self.processed(logits, batch)
        if batch.all_greedy:
            sampled = greedy
        else:
            probs = self.probabilities(logits, batch)
            sampled = torch.where(batch.temperature == 0, greedy, self.draw(probs, batch.generators))
        logprobs = token_logprobs(raw_logits, sampled, batch.max_logprobs) if batch.max_logprobs is not None else None
        return SamplerOutput(sampled.tolist(), logprobs)

    @staticmethod
    def processed(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logits as float32, then with penalties and grammar masks applied, and each row's greedy token."""
        logits = logits.float()
        raw_logits = logits
        if batch.penalties is not None:
            logits = batch.penalties.apply(logits)
        if batch.bitmask is not None:
            logits = apply_bitmask(logits, batch.bitmask)
        # max's indices, not argmax: the same first maximal index, but torch's CPU argmax takes 2.5x as
        # long over [32, 49152] logits (1.0 ms against 0.4, 2 threads, 2026-12-04).
        ops = ops_for(logits)
        greedy = logits.max(dim=-1).indices if ops is None else ops.greedy_tokens(logits)
        return raw_logits, logits, greedy

    @staticmethod
    def probabilities(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """Each row's distribution after temperature, top-k, top-p and min-p (greedy rows at temperature 1)."""
        temperature = torch.where(batch.temperature == 0, 1.0, batch.temperature)
        logits = logits / temperature[:, None]
        if batch.top_k is not None or batch.top_p is not None:
            logits = _top_k_top_p(logits, batch.top_k, batch.top_p)
        probs = logits.softmax(dim=-1)
        if batch.min_p is not None:
            floor = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs

    @staticmethod
    def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row from its (unnormalized) weights probs."""
        # argmax(p / q) with q ~ Exp(1) samples from p (the exponential race) without a host sync.
        noise = torch.empty_like(probs)
        shared = [row for row, g in enumerate(generators) if g is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_()
        for row, g in enumerate(generators):
            if g is not None:
                noise[row].exponential_(generator=g)
        return (probs / noise).max(dim=-1).indices



def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[tuple[float, int, list[int], list[float]]]:
    """Per row: the logprob of token_ids[row] under the row's logits, its rank (1 = the most likely), and
    the k most likely tokens with their logprobs."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    rows = logits.shape[0]
    top_ids, top_lps = ([[]] * rows, [[]] * rows)
    if k:
        top = logprobs.topk(k, dim=-1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    return list(zip(chosen[:, 0].tolist(), ranks.tolist(), top_ids, top_lps))


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
        drop |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
