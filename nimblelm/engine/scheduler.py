"""Continuous batching with a per-step token budget. Torch-free.

There is no prefill or decode phase: each sequence has `num_computed_tokens`, and each step gives
every scheduled sequence some of its uncomputed tokens. A decode is a sequence with one uncomputed
token; a long prompt takes several steps (chunked prefill), sharing them with decodes. When blocks
run out, the most recently admitted sequence is preempted: its blocks are freed and it goes back to
the front of the waiting queue, to be recomputed (prompt and output so far) when room returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from nimblelm.engine.kv_cache.block_manager import BlockManager
from nimblelm.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)  # in batch order
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence, this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            needed = bm.blocks_needed(seq, n)
            while not bm.can_allocate(needed) and self.running[-1] is not seq:
                self._preempt(self.running.pop(), out)
            if not bm.can_allocate(needed):
                self._preempt(self.running.pop(), out)
                break
            bm.allocate(seq, n)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
            i += 1

        # New sequences wait while anything was preempted: room is short, and the preempted go first.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            remaining = seq.num_tokens - seq.num_computed_tokens
            n = min(remaining, budget)
            if n < remaining and not self.config.enable_chunked_prefill:
                break
            if not bm.can_allocate(bm.blocks_needed(seq, n)):
                break
            self.waiting.popleft()
            bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget -= n
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End `seq` (stopped, out of length, or aborted) and return its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
