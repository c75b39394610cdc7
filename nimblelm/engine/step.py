"""The step contract: what the scheduler hands the model runner, and what comes back. Plain data that
pickles, so a runner in another process (or on another machine) receives exactly this and nothing else.

The runner keeps each sequence's state (tokens, sampling params, block tables, RNG) from the moment it
arrives as a NewRequest until its id is listed in finished_req_ids; every step sends only what changed.
A table holds only the blocks a sequence still attends to: in a group that dropped d blocks from its
front, position p's K/V are at entry p - d * block_size.
Torch-free: the grammar bitmask is whatever tensor type the engine builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nimblelm.sampling_params import SamplingParams


@dataclass
class NewRequest:
    """A sequence the runner does not hold yet, or holds from before it was preempted (its blocks and
    tokens are then replaced; its RNG continues)."""

    req_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    seed: int | None  # of this sequence's RNG; None: the shared one
    block_ids: list[list[int]]  # per KV group
    num_dropped_blocks: list[int]  # per KV group, blocks dropped from the front of its table
    num_computed_tokens: int


@dataclass
class RunningRequest:
    """A sequence the runner holds, with what changed since it was last scheduled."""

    req_id: int
    new_token_ids: list[int]  # appended since (the tokens sampled for it)
    new_block_ids: list[list[int]]  # per KV group, appended to its tables
    num_dropped_blocks: list[int]  # per KV group, dropped from the front of its table so far
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    new_requests: list[NewRequest] = field(default_factory=list)
    running_requests: list[RunningRequest] = field(default_factory=list)
    # Tokens to compute this step per sequence, in batch order; a sequence samples a token when these
    # reach the end of its tokens.
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    finished_req_ids: list[int] = field(default_factory=list)  # the runner forgets these
    # Speculative decoding: per sequence, the draft tokens that follow its tokens this step (counted in
    # num_scheduled_tokens); the runner verifies them and returns the ones the target keeps.
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)
    # Of the sequences whose drafts are a token tree (speculative/tree.py): each draft's parent (-1: the
    # sequence's last token); drafts without an entry here are a chain.
    spec_parents: dict[int, list[int]] = field(default_factory=dict)
    # Structured output: for the sequences in grammar_req_ids, the allowed next tokens as an int32
    # bitmask [rows, ceil(vocab / 32)], computed on the engine side: per sequence in turn, a row for its next
    # token, then one after each of its drafts (the rows its drafts are verified at).
    grammar_req_ids: list[int] = field(default_factory=list)
    grammar_bitmask: Any = None
    # KV policies: the sequences whose KV this step compacts once it has run. Per KV group, None (untouched) or
    # the blocks of its new table, which the kept entries are gathered into, and the blocks then dropped from
    # the table's front; the entries kept are those past the dropped blocks' tokens.
    compactions: dict[int, list[tuple[list[int], int] | None]] = field(default_factory=dict)
    # Pipeline stages: per sequence that verified drafts in the step run before, the draft nodes it kept
    # (ModelRunnerOutput.kept_drafts). A stage before the last never sees the verification: before this step runs
    # it does what the last stage did after that one (a token tree's kept branch copied into the sequence's slots,
    # H2O's scores of the kept rows folded in).
    kept_drafts: dict[int, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class ModelRunnerOutput:
    req_ids: list[int]  # the sequences that sampled this step
    # Per sampled sequence, its new tokens: one, or with drafts the ones the target kept and one more.
    sampled_token_ids: list[list[int]]
    # Per sampled sequence, when logprobs were asked for, per new token: (its logprob, its rank, top ids,
    # top logprobs).
    logprobs: list[list[tuple[float, int, list[int], list[float]]]] | None = None
    # For sequences with prompt_logprobs whose prompt this step computed part of: the entries (as above) of
    # the prompt tokens after the computed positions, in order.
    prompt_logprobs: dict[int, list[tuple[float, int, list[int], list[float]]]] = field(default_factory=dict)
    # Speculative decoding: per sampled sequence that may go on, the drafts proposed to follow its new tokens.
    draft_token_ids: dict[int, list[int]] = field(default_factory=dict)
    draft_parents: dict[int, list[int]] = field(default_factory=dict)  # of the drafts that are a tree
    # Per sequence that verified drafts, the nodes kept: a chain's first ones, a tree's path from its root.
    kept_drafts: dict[int, list[int]] = field(default_factory=dict)
