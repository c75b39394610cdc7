"""Retrieval drafts (REST, He et al. 2023): the continuation of the sequence's longest suffix that occurs in a
datastore of text (datastore.py) or earlier in the sequence itself.

The datastore's suffix array holds every occurrence of a pattern in one contiguous range, found by binary
search. A match of m tokens implies one of its last m - 1, so the longest match is a binary search over m
too. Among (a sample of) the occurrences the draft is built greedily: the most common next token, then the
most common one after it among the occurrences that had it, and so on: one linear draft, as the verifier
takes. The sequence's own tokens (prompt lookup, as ngram.py) win ties: what this conversation repeats
beats what the corpus says most often.
"""

from __future__ import annotations

import bisect

import numpy as np

from nimblelm.speculative.datastore import Datastore

# Occurrences whose continuations are counted: evenly spaced over the match's range, which the suffix array
# orders by continuation, so the sample keeps every common continuation's share.
MAX_OCCURRENCES = 64


class SuffixProposer:
    observes = False
    pass_seconds = 0.0  # a lookup per sequence, no batched pass

    def __init__(self, store: Datastore, num_speculative_tokens: int, match_min: int, match_max: int):
        self.store = store
        self.k = num_speculative_tokens
        self.match_min = match_min
        self.match_max = match_max

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to min(k, max_tokens) draft tokens to follow token_ids; none when no suffix of at least
        match_min tokens occurs in the datastore or earlier in token_ids."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        if k <= 0 or len(token_ids) < self.match_min:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        own_len, own_drafts = self._own_match(tokens, k)
        if own_len == self.match_max:
            return own_drafts
        tail = tokens[-self.match_max :].tolist()
        lo, hi = max(self.match_min, own_len + 1), min(self.match_max, len(tail))
        best = None
        while lo <= hi:  # the longest m in [lo, hi] whose last m tokens occur in the store
            m = (lo + hi) // 2
            found = self._occurrences(tail[-m:])
            if found[0] < found[1]:
                best, lo = (m, found), m + 1
            else:
                hi = m - 1
        if best is None:
            return own_drafts
        return self._continuation(*best, k) or own_drafts

    def _own_match(self, tokens: np.ndarray, k: int) -> tuple[int, list[int]]:
        """The longest suffix (up to match_max) that occurs earlier in tokens with a token after it, and
        what followed its latest occurrence; (0, []) below match_min."""
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])  # where earlier matches of n tokens end
        n = 1
        while n < self.match_max and len(ends):
            longer = ends[(ends >= n) & (tokens[np.maximum(ends - n, 0)] == tokens[-1 - n])]
            if not len(longer):
                break
            ends, n = longer, n + 1
        if not len(ends) or n < self.match_min:
            return 0, []
        return n, tokens[ends[-1] + 1 : ends[-1] + 1 + k].tolist()

    def _occurrences(self, pattern: list[int]) -> tuple[int, int]:
        """The suffix array's range of the suffixes that start with pattern."""
        tokens, order, m = self.store.tokens, self.store.suffix_array, len(pattern)

        def head(i: int) -> list[int]:
            return tokens[order[i] : order[i] + m].tolist()

        lo = bisect.bisect_left(range(len(order)), pattern, key=head)
        return lo, bisect.bisect_right(range(lo, len(order)), pattern, key=head) + lo

    def _continuation(self, m: int, found: tuple[int, int], k: int) -> list[int]:
        tokens, order = self.store.tokens, self.store.suffix_array
        lo, hi = found
        picks = np.linspace(lo, hi - 1, min(hi - lo, MAX_OCCURRENCES)).astype(np.int64)
        after = order[picks].astype(np.int64)[:, None] + m + np.arange(k)
        # Up to k tokens after each occurrence; -1 (the separator's value) from a document's end on.
        rows = np.where(after < len(tokens), tokens[np.minimum(after, len(tokens) - 1)], -1)
        rows[np.cumsum(rows < 0, axis=1) > 0] = -1
        drafts = []
        for j in range(k):
            column = rows[:, j]
            values, counts = np.unique(column[column >= 0], return_counts=True)
            if not len(values):
                break
            drafts.append(int(values[counts.argmax()]))
            rows = rows[column == drafts[-1]]
        return drafts

    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, list[int]]:
        """Per sequence (its tokens, prompt length, room for drafts), its drafts where it has any."""
        drafts = {req_id: self.propose(tokens, room) for req_id, (tokens, _, room) in requests.items()}
        return {req_id: d for req_id, d in drafts.items() if d}

    def forget(self, req_ids: list[int]) -> None:
        """Nothing is kept per sequence."""
