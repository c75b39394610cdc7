"""Prompt lookup (n-gram) drafts: the tokens that followed the latest earlier occurrence of the sequence's
last n tokens, longest n first. No model and no training; it pays off where the output copies from the
prompt or from itself (code edits, extraction, summaries that quote)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    observes = False
    pass_seconds = 0.0  # a lookup per sequence, no batched pass

    def __init__(self, num_speculative_tokens: int, lookup_min: int, lookup_max: int):
        self.k = num_speculative_tokens
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to min(k, max_tokens) draft tokens to follow token_ids; none when no n-gram recurs."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        if k <= 0 or len(token_ids) < self.lookup_min + 1:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.lookup_max, len(tokens) - 1), self.lookup_min - 1, -1):
            # Windows that end before the last token, so that at least one token follows each.
            windows = sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(starts):
                follow = starts[-1] + n
                return tokens[follow : follow + k].tolist()
        return []

    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, list[int]]:
        """Per sequence (its tokens, prompt length, room for drafts), its drafts where it has any."""
        drafts = {req_id: self.propose(tokens, room) for req_id, (tokens, _, room) in requests.items()}
        return {req_id: d for req_id, d in drafts.items() if d}

    def forget(self, req_ids: list[int]) -> None:
        """Nothing is kept per sequence."""
