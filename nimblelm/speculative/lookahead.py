"""Lookahead decoding (Fu et al. 2024): Jacobi iteration with an n-gram pool; no extra model, no training.

Each sequence keeps a window of guesses for the k positions after its newest token. Every step verifies the
window as one branch of the sequence's draft tree, so the target's token at each guess is the next Jacobi
iterate of the position after it, and the guesses it confirms are kept like any draft. Along the iterates of
the last steps, a position's guess, the target's token after it, the target's token after that one in the
next step, and so on, form an n-gram of the target's own predictions (each made after the token before it);
n-grams go to a pool keyed by their first token. When the sequence's newest token begins pooled n-grams, the
most recent of them are verified in the same tree: the first as the primary chain, the others and the window
as further branches.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from nimblelm.speculative.config import LOOKAHEAD_CANDIDATES
from nimblelm.speculative.seen import Seen
from nimblelm.speculative.tree import DraftTree

# N-grams kept per first token: the most recent.
POOL_PER_TOKEN = 8


@dataclass
class _State:
    window: list[int]  # guesses for positions start .. start + k - 1
    start: int  # the position after the sequence's newest token when the window was last proposed
    history: deque[dict[int, int]]  # per recent step, the tokens it verified the window's positions with
    pool: dict[int, OrderedDict[tuple[int, ...], None]] = field(default_factory=dict)


class LookaheadProposer:
    observes = True
    pass_seconds = 0.0  # the window rides in the verification step: no pass of its own

    def __init__(self, num_speculative_tokens: int):
        self.k = num_speculative_tokens  # the window's guesses, and the tokens an n-gram continues its first with
        self.state: dict[int, _State] = {}

    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, DraftTree]:
        """Per sequence (its tokens, prompt length, room for drafts): pooled n-grams that follow its newest
        token, then its window; the model runner cuts the tree to the room."""
        out = {}
        for req_id, (tokens, _, _) in requests.items():
            state = self._aligned(req_id, tokens)
            pooled = state.pool.get(tokens[-1], {})
            candidates = [list(c) for c in reversed(pooled)][:LOOKAHEAD_CANDIDATES]
            out[req_id] = DraftTree.from_paths(candidates + [state.window])
        return out

    def _aligned(self, req_id: int, tokens: list[int]) -> _State:
        """The sequence's state with its window moved to the positions after its newest token: guesses for
        positions now decided are dropped, and the window is filled with its last guess."""
        start = len(tokens)
        state = self.state.get(req_id)
        if state is None or start < state.start:  # new, or rolled back by a preemption: guess from the tokens
            window = (tokens[-self.k :] * self.k)[: self.k]
            state = self.state[req_id] = _State(window, start, deque(maxlen=self.k + 1))
        window = state.window[start - state.start :] or [tokens[-1]]
        state.window = (window + [window[-1]] * self.k)[: self.k]
        state.start = start
        return state

    def observe(self, seen: dict[int, Seen]) -> None:
        """The target's tokens at the window's guesses: the next Jacobi iterate, and new n-grams."""
        for req_id, s in seen.items():
            state = self.state.get(req_id)
            if state is None or s.tree is None or s.position != state.start - 1:  # not the window proposed
                continue
            iterate = self._iterate(state, s.tree, s.outputs)
            self._pool(state, iterate)
            after = s.position + len(s.next_tokens) + 1  # the position after the sequence's newest token
            state.window = [iterate[p] for p in sorted(iterate) if p >= after] or [s.next_tokens[-1]]
            state.start = after

    def _iterate(self, state: _State, tree: DraftTree, outputs: list[int]) -> dict[int, int]:
        """Position -> the target's token there, after the window's guesses that the tree verified."""
        children = tree.children()
        iterate = {state.start: outputs[0]}
        node = -1
        for pos, guess in enumerate(state.window, state.start):
            node = next((c for c in children[node] if tree.tokens[c] == guess), None)
            if node is None:
                break
            iterate[pos + 1] = outputs[1 + node]
        return iterate

    def _pool(self, state: _State, iterate: dict[int, int]) -> None:
        """N-grams along the diagonals of the recent iterates: the token at p in step t - j, then at p + 1 in
        step t - j + 1, ..., then this step's at p + j; each the target's token after the one before it."""
        state.history.append(iterate)
        steps = list(state.history)
        for end in iterate:
            gram = []
            for back, step in enumerate(reversed(steps)):
                token = step.get(end - back)
                if token is None:
                    break
                gram.append(token)
            if len(gram) >= 2:
                gram.reverse()
                pooled = state.pool.setdefault(gram[0], OrderedDict())
                pooled[tuple(gram[1:])] = None
                pooled.move_to_end(tuple(gram[1:]))
                while len(pooled) > POOL_PER_TOKEN:
                    pooled.popitem(last=False)

    def forget(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            self.state.pop(req_id, None)
