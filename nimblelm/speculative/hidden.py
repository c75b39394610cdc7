"""What a proposer that reads the target's hidden states (Medusa, EAGLE) is shown after each step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Seen:
    """One sequence's rows of a step whose next token is known: for a prompt chunk all its rows; for a
    sampled sequence its uncomputed tokens and the drafts it kept. After a preemption a sequence's rows come
    again from position 0."""

    position: int  # of the first row
    hidden: torch.Tensor  # [rows, hidden size]: the last decoder layer's output, before the final norm
    next_tokens: list[int]  # per row, the token after it (for the last row of a sampled one, its newest token)
