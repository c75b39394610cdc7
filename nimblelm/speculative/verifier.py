"""The lossless verifier: which of a sequence's draft tokens the target model keeps, and the token after them.

A sequence with a draft tree of k nodes (a chain d_0 .. d_{k-1} is the tree whose node i is the child of
i - 1) runs k + 1 rows in one step: its last token, then the nodes. A row's logits give the target's
distribution p of the token after that row's token. The walk starts at the last token's row: greedy rows keep
the child whose token is p's first maximal token. Sampled rows try the children in order, each with its
proposal distribution q (a one-hot for deterministic proposers such as prompt lookup): child c is kept with
probability min(1, p(c) / q(c)); after a rejection p becomes max(p - q, 0), renormalized, for the next child
and, when none is kept, for the token drawn in their place. Every emitted token is then distributed as the
target alone would sample it (Leviathan et al. 2023, Chen et al. 2023 for a chain; SpecInfer, Miao et al.
2024, for several candidates), and greedy output is identical to plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nimblelm.layers.sampler import Sampler, SamplingBatch, token_logprobs
from nimblelm.speculative.tree import DraftTree, as_tree


@dataclass
class Verified:
    token_ids: list[list[int]]  # per sequence: the drafts it kept, then one token of the target's
    paths: list[list[int]]  # per sequence: the nodes it kept, in order (a chain's: 0, 1, ...)
    outputs: list[list[int]]  # per sequence: the target's first maximal token at each of its rows
    # per sequence, when logprobs were asked for: one entry (as token_logprobs gives) per token above
    logprobs: list[list[tuple[float, int, list[int], list[float]]]] | None


def verify(
    sampler: Sampler,
    logits: torch.Tensor,
    batch: SamplingBatch,
    trees: list[DraftTree | list[int]],
    draft_probs: torch.Tensor | None = None,
) -> Verified:
    """logits [rows, vocab] and batch: every sequence's len(trees[i]) + 1 rows, in order (a sequence without
    drafts has one row and is sampled as usual; a list of drafts is a chain). draft_probs [nodes, vocab]: q of every node in order, for
    chains only (a node's siblings would have to be drawn from the same q); None when the proposer is
    deterministic."""
    trees = [as_tree(t) for t in trees]
    raw_logits, logits, greedy = sampler.processed(logits, batch)
    probs = None if batch.all_greedy else sampler.probabilities(logits, batch)
    greedy_tokens = greedy.tolist()
    temperatures = batch.temperature.tolist()
    paths: list[list[int]] = []
    finals: list[int | None] = []  # None: drawn below from final_dists
    final_dists: list[torch.Tensor] = []
    final_rows: list[int] = []
    start, first_node = 0, 0
    for tree in trees:
        children = tree.children()
        path: list[int] = []
        node = -1  # the sequence's last token; node n's row is start + 1 + n
        if temperatures[start] == 0:
            while True:
                token = greedy_tokens[start + 1 + node]
                kept = next((c for c in children[node] if tree.tokens[c] == token), None)
                if kept is None:
                    break
                path.append(kept)
                node = kept
            finals.append(token)
        else:
            generator = batch.generators[start]
            while True:
                p = probs[start + 1 + node]
                kept = None
                for c in children[node]:
                    token = tree.tokens[c]
                    q = draft_probs[first_node + c] if draft_probs is not None else None
                    q_token = 1.0 if q is None else q[token].item()
                    if _uniform(generator, p.device) * q_token < p[token].item():
                        kept = c
                        break
                    residual = p.clone()
                    if q is None:
                        residual[token] = 0.0
                    else:
                        residual = (residual - q).clamp_(min=0)
                    if residual.sum() > 0:  # else p == q up to rounding, and rejection had probability ~0
                        p = residual / residual.sum()
                if kept is None:
                    break
                path.append(kept)
                node = kept
            finals.append(None)
            final_dists.append(p)
            final_rows.append(start)
        paths.append(path)
        start += len(tree) + 1
        first_node += len(tree)

    if final_dists:
        drawn = iter(sampler.draw(torch.stack(final_dists), [batch.generators[r] for r in final_rows]).tolist())
        finals = [next(drawn) if t is None else t for t in finals]
    token_ids = [[tree.tokens[n] for n in path] + [t] for tree, path, t in zip(trees, paths, finals)]
    logprobs = None
    if batch.max_logprobs is not None:
        rows, start = [], 0
        for tree, path in zip(trees, paths):
            rows.extend([start] + [start + 1 + n for n in path])
            start += len(tree) + 1
        chosen = torch.tensor([t for ids in token_ids for t in ids], device=logits.device)
        entries = token_logprobs(raw_logits[torch.tensor(rows, device=logits.device)], chosen, batch.max_logprobs)
        logprobs, at = [], 0
        for ids in token_ids:
            logprobs.append(entries[at : at + len(ids)])
            at += len(ids)
    outputs, start = [], 0
    for tree in trees:
        outputs.append(greedy_tokens[start : start + len(tree) + 1])
        start += len(tree) + 1
    return Verified(token_ids, paths, outputs, logprobs)


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    """A uniform draw from the sequence's own generator where it has one."""
    return torch.rand(1, generator=generator, device=device).item()
