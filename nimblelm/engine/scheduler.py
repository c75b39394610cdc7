"""Continuous batching with a per-step token budget. Torch-free.

There is no prefill or decode phase: each sequence has `num_computed_tokens`, and each step gives
every scheduled sequence some of its uncomputed tokens. A decode is a sequence with one uncomputed
token; a long prompt takes several steps (chunked prefill), sharing them with decodes; a prompt whose
start is in the prefix cache begins after it. When blocks run out, the most recently admitted sequence
is preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
(prompt and output so far, from whatever of it is still cached) when room returns.

With a KV policy (kv_cache/policy.py), a step that leaves a sequence over its budget also compacts it:
the step carries the blocks its kept entries move to (fresh ones, or its own first ones), and the rest are
freed after it; a step that compacts a sequence verifies no drafts of it (its drafts stop before that token).
A preempted sequence is recomputed whole and compacted again. SnapKV votes with the attention
of the prompt's last window_size tokens, so a prompt's last chunk holds at least those; and since a prompt
holds all its blocks until its compaction, a new one starts only when all of it fits.

Each step's decisions go out as a SchedulerOutput (engine/step.py): plain data, the model runner's only
input.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from nimblelm.engine.kv_cache.manager import KVCacheManager
from nimblelm.engine.kv_cache.policy import KVPolicy
from nimblelm.engine.sequence import Sequence, SequenceStatus
from nimblelm.engine.step import NewRequest, RunningRequest, SchedulerOutput


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, kv_policy: KVPolicy | None = None,
                 group_depths: list[float] | None = None):
        self.config = config
        self.kv = kv_cache_manager
        self.kv_policy = kv_policy
        # Per KV group, its first layer's depth in the model (0 first, 1 last): PyramidKV's budgets follow it.
        self.group_depths = group_depths or [0.0] * len(kv_cache_manager.windows)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence, by seq_id
        self._num_sent: dict[int, int] = {}  # seq_id -> how many of its tokens the runner holds
        self._finished_ids: list[int] = []  # held by the runner, to be forgotten at the next step
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        out.finished_req_ids, self._finished_ids = self._finished_ids, []
        budget = self.config.max_num_batched_tokens
        preempted = False

        filling: set[bytes] = set()  # hashes of the blocks this step completes
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            drafts = self._drafts(seq)
            n = self._chunk(seq, seq.num_tokens - seq.num_computed_tokens + len(drafts), budget)
            if not n:
                i += 1
                continue
            new_ids = self.kv.allocate_slots(seq, n)
            while new_ids is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
                new_ids = self.kv.allocate_slots(seq, n)
            if new_ids is None:
                break
            sent = self._num_sent[seq.seq_id]
            out.running_requests.append(
                RunningRequest(seq.seq_id, seq.token_ids[sent:], new_ids, self.kv.dropped_blocks(seq),
                               seq.num_computed_tokens)
            )
            num_drafts = max(0, n - (seq.num_tokens - seq.num_computed_tokens))
            if num_drafts:
                out.spec_token_ids[seq.seq_id] = drafts[:num_drafts]
                if seq.spec_parents is not None:  # a tree's first nodes are a tree: parents come first
                    out.spec_parents[seq.seq_id] = seq.spec_parents[:num_drafts]
            filling.update(self.kv.blocks_filled(seq, seq.num_computed_tokens, n - num_drafts))
            self._schedule(out, seq, n)
            self._compact(out, seq, n)
            budget -= n
            i += 1

        # New sequences wait while anything was preempted: room is short, and the preempted go first. A
        # prompt whose next block this step completes for another sequence waits a step to find it cached
        # instead of computing it twice (a burst of requests behind one new system prompt); those after
        # it go ahead meanwhile.
        deferred: list[Sequence] = []
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            # Prompt logprobs need the logits of every prompt position they score (from the row before the
            # first): the cache may supply only what comes before that row.
            params = seq.params
            uses_cache = params.prompt_logprobs is None or params.prompt_logprobs_start > 1
            cached = self.kv.cached_prefix(seq) if uses_cache else 0
            if uses_cache and params.prompt_logprobs is not None:
                cached = min(cached, (params.prompt_logprobs_start - 1) // self.kv.block_size * self.kv.block_size)
            if self.kv_policy is not None and self.kv_policy.needs_votes:  # the window's rows are computed
                cached = min(cached, max(0, seq.num_tokens - self.kv_policy.window_size) // self.kv.block_size
                             * self.kv.block_size)
            if uses_cache and not filling.isdisjoint(self.kv.blocks_filled(seq, cached, self.kv.block_size)):
                deferred.append(seq)
                continue
            remaining = seq.num_tokens - cached
            n = self._chunk(seq, remaining, budget)
            chunk_refused = n < remaining and not self.config.enable_chunked_prefill
            if not n or chunk_refused or not self._room_for_prompt(seq, cached) \
                    or self.kv.allocate_slots(seq, n, cached) is None:
                self.waiting.appendleft(seq)
                break
            seq.num_computed_tokens = cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.new_requests.append(NewRequest(
                seq.seq_id, seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids, params,
                None if params.seed is None else params.seed + seq.index, self.kv.block_ids(seq),
                self.kv.dropped_blocks(seq), cached,
            ))
            filling.update(self.kv.blocks_filled(seq, cached, n))
            self._schedule(out, seq, n)
            self._compact(out, seq, n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return out

    def _room_for_prompt(self, seq: Sequence, cached: int) -> bool:
        """With a KV policy that compacts whole prompts, a prompt starts only when all of it fits beside what the
        prompts already started still lack and a block for each decoding sequence's next one: each prompt holds
        its whole context until its compaction, and sequences growing into the same free blocks would preempt
        one another (and recompute) instead."""
        if self.kv_policy is None or self.kv_policy.per_chunk or not self.running:
            return True
        owed = sum(self.kv.blocks_short(s, s.num_tokens + 1) for s in self.running)
        return self.kv.blocks_short(seq, seq.num_tokens, cached) <= self.kv.num_free_blocks - owed

    def _chunk(self, seq: Sequence, remaining: int, budget: int) -> int:
        """How many of seq's remaining tokens this step computes: as many as the budget allows, but a chunk
        that stops short of the end leaves the whole of a voting window to the last one (0: none this step)."""
        n = min(remaining, budget)
        policy = self.kv_policy
        if policy is not None and policy.needs_votes and n < remaining < n + policy.window_size:
            n = max(0, remaining - policy.window_size)
        return n

    def _drafts(self, seq: Sequence) -> list[int]:
        """The drafts seq may verify this step. With a KV policy, none at or past the token whose one-token step
        would compact seq: that step runs without drafts, so that every row attends to the cache a token-at-a-time
        run holds, and the greedy output is the same."""
        drafts = seq.spec_token_ids
        if self.kv_policy is None or not drafts:
            return drafts
        for j in range(len(drafts) + 1):
            if self._compacts_after(seq, seq.num_tokens + j):
                return drafts[: max(0, j - 1)]
        return drafts

    def _compacts_after(self, seq: Sequence, end: int) -> bool:
        """Whether a one-token step that leaves seq's first `end` tokens computed would compact it."""
        return any(window is None and self.kv_policy.kept_entries(
                       seq.num_prompt_tokens, self.kv.num_entries(seq, g, end), 1, True, self.kv.block_size,
                       self.group_depths[g]) is not None
                   for g, window in enumerate(self.kv.windows))

    def _compact(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        """Plan seq's compaction after this step, where its policy asks for one and blocks allow."""
        if self.kv_policy is None:
            return
        end = seq.num_computed_tokens + n
        keep = [None if window is not None else self.kv_policy.kept_entries(
                    seq.num_prompt_tokens, self.kv.num_entries(seq, g, end), n, end == seq.num_tokens,
                    self.kv.block_size, self.group_depths[g])
                for g, window in enumerate(self.kv.windows)]
        plan = self.kv.plan_compaction(seq, end, keep) if any(k is not None for k in keep) else None
        if plan is not None:
            out.compactions[seq.seq_id] = plan

    def _schedule(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        out.num_scheduled_tokens[seq.seq_id] = n
        self._num_sent[seq.seq_id] = seq.num_tokens

    def update(self, out: SchedulerOutput, num_rejected: dict[int, int] | None = None) -> None:
        """The step ran: the scheduled tokens' K/V are in the cache, but for the num_rejected drafts at the end
        of a sequence's (their slots are written again by the tokens that take their places); full blocks of
        computed tokens can be cached."""
        for seq_id, n in out.num_scheduled_tokens.items():
            seq = self.seqs[seq_id]
            seq.num_computed_tokens += n - (num_rejected or {}).get(seq_id, 0)
            self.kv.cache_computed(seq)
            if seq_id in out.compactions:
                self.kv.finish_compaction(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.spec_parents = None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End `seq` (stopped, out of length, or aborted) and return its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv.free(seq)
        del self.seqs[seq.seq_id]
        if self._num_sent.pop(seq.seq_id, None) is not None:
            self._finished_ids.append(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
