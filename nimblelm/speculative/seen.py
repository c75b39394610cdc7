"""What a proposer that learns from the target's steps (Medusa and EAGLE its hidden states, lookahead its
outputs at every draft) is shown after each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nimblelm.speculative.tree import DraftTree


@dataclass
class Seen:
    """One sequence's rows of a step whose next token is known: for a prompt chunk all its rows; for a
    sampled sequence its uncomputed tokens and the drafts it kept. After a preemption a sequence's rows come
    again from position 0."""

    position: int  # of the first row
    hidden: torch.Tensor  # [rows, hidden size]: the last decoder layer's output, before the final norm
    next_tokens: list[int]  # per row, the token after it (for the last row of a sampled one, its newest token)
    # A sampled sequence's drafts verified this step (None: none), and the target's first maximal token at
    # each of its sampled rows (its last token's, then each node's), kept or not.
    tree: DraftTree | None = None
    outputs: list[int] | None = None
