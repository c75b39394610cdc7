"""The lossless verifier: which of a sequence's draft tokens the target model keeps, and the token after them.

A sequence with drafts d_0 .. d_{k-1} runs k + 1 rows in one step: its last token, then the drafts. Row j's
logits give the target's distribution p_j of the token that d_j proposes. Greedy rows keep d_j while it is
p_j's first maximal token. Sampled rows keep d_j with probability min(1, p_j(d_j) / q_j(d_j)), where q_j is
the distribution the proposer drew d_j from (a one-hot for deterministic proposers such as prompt lookup);
at the first rejection the token comes from max(p_j - q_j, 0), renormalized, and after k acceptances from
p_k. Every emitted token is then distributed as the target alone would sample it (Leviathan et al. 2023,
Chen et al. 2023), and greedy output is identical to plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nimblelm.layers.sampler import Sampler, SamplingBatch, token_logprobs


@dataclass
class Verified:
    token_ids: list[list[int]]  # per sequence: the drafts it kept, then one token of the target's
    # per sequence, when logprobs were asked for: one entry (as token_logprobs gives) per token above
    logprobs: list[list[tuple[float, int, list[int], list[float]]]] | None


def verify(
    sampler: Sampler,
    logits: torch.Tensor,
    batch: SamplingBatch,
    drafts: list[list[int]],
    draft_probs: torch.Tensor | None = None,
) -> Verified:
    """logits [rows, vocab] and batch: every sequence's len(drafts[i]) + 1 rows, in order (a sequence without
    drafts has one row and is sampled as usual). draft_probs [draft rows, vocab]: q_j of every draft in
    order, None when the proposer is deterministic."""
    raw_logits, logits, greedy = sampler.processed(logits, batch)
    device = logits.device
    starts, row = [], 0
    for d in drafts:
        starts.append(row)
        row += len(d) + 1
    draft_rows = torch.tensor([s + j for s, d in zip(starts, drafts) for j in range(len(d))], dtype=torch.long,
                              device=device)
    draft_tokens = torch.tensor([t for d in drafts for t in d], dtype=torch.long, device=device)

    accepted = greedy[draft_rows] == draft_tokens
    probs = None
    if not batch.all_greedy:
        probs = sampler.probabilities(logits, batch)
        p = probs[draft_rows].gather(1, draft_tokens[:, None])[:, 0]
        q = draft_probs.gather(1, draft_tokens[:, None])[:, 0] if draft_probs is not None else torch.ones_like(p)
        u = _uniforms(batch.generators, draft_rows.tolist(), device)
        sampled_accept = u * q < p
        accepted = torch.where(batch.temperature[draft_rows] == 0, accepted, sampled_accept)

    # Per sequence: how many leading drafts it keeps; its last row is the one that chooses the next token.
    flags, num_kept, at = accepted.tolist(), [], 0
    for d in drafts:
        kept = 0
        while kept < len(d) and flags[at + kept]:
            kept += 1
        num_kept.append(kept)
        at += len(d)
    last_rows = torch.tensor([s + m for s, m in zip(starts, num_kept)], dtype=torch.long, device=device)
    final = greedy[last_rows]
    if probs is not None:
        final_dist = probs[last_rows].clone()
        rejected = [i for i, (m, d) in enumerate(zip(num_kept, drafts)) if m < len(d)]
        for i in rejected:  # the residual max(p - q, 0) at the first rejected draft
            j = sum(len(d) for d in drafts[:i]) + num_kept[i]  # that draft's index among all drafts
            q = draft_probs[j] if draft_probs is not None else _one_hot(draft_tokens[j], final_dist.shape[1])
            residual = (final_dist[i] - q).clamp_(min=0)
            if residual.sum() > 0:  # else p == q up to rounding, and rejection had probability ~0
                final_dist[i] = residual
        last_list = last_rows.tolist()
        drawn = sampler.draw(final_dist, [batch.generators[r] for r in last_list])
        final = torch.where(batch.temperature[last_rows] == 0, final, drawn)

    final_list = final.tolist()
    token_ids = [d[:m] + [t] for d, m, t in zip(drafts, num_kept, final_list)]
    logprobs = None
    if batch.max_logprobs is not None:
        rows = torch.tensor([s + j for s, ids in zip(starts, token_ids) for j in range(len(ids))], device=device)
        chosen = torch.tensor([t for ids in token_ids for t in ids], device=device)
        entries = token_logprobs(raw_logits[rows], chosen, batch.max_logprobs)
        logprobs, at = [], 0
        for ids in token_ids:
            logprobs.append(entries[at : at + len(ids)])
            at += len(ids)
    return Verified(token_ids, logprobs)


def _uniforms(generators: list[torch.Generator | None], rows: list[int], device: torch.device) -> torch.Tensor:
    """A uniform draw per row, from the row's own generator where it has one."""
    u = torch.rand(len(rows), device=device)
    for i, r in enumerate(rows):
        if generators[r] is not None:
            u[i] = torch.rand(1, generator=generators[r], device=device)[0]
    return u


def _one_hot(token: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(vocab, device=token.device).index_fill_(0, token.view(1), 1.0)
