"""Scheduler decisions, asserted exactly: admission, token budget, chunking, preemption, prefix hits, and
the step contract it emits. No torch."""

import itertools
import pickle
import subprocess
import sys

from nimblelm.engine.kv_cache.manager import KVCacheManager
from nimblelm.engine.scheduler import Scheduler, SchedulerConfig
from nimblelm.engine.sequence import Sequence, SequenceStatus
from nimblelm.sampling_params import SamplingParams


def make(num_blocks=8, block_size=4, max_num_seqs=4, budget=16, chunked=True, caching=True):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, chunked), kv), kv


_starts = itertools.count(1, 1000)


def seq(n_prompt, rid="r", first=None):
    """A sequence whose prompt shares nothing with other sequences', unless `first` makes it."""
    first = next(_starts) if first is None else first
    return Sequence(rid, list(range(first, first + n_prompt)), SamplingParams(temperature=0))


class Step:
    """One step as the engine sees it: the contract, and the sequences it scheduled."""

    def __init__(self, sched, out):
        self.out = out
        self.seqs = [sched.seqs[i] for i in out.num_scheduled_tokens]
        self.num_new_tokens = list(out.num_scheduled_tokens.values())


def run_step(sched, sampled_token=7):
    """What the engine does after the model ran: count computed tokens, append a sampled token."""
    out = sched.schedule()
    step = Step(sched, out)
    sched.update(out)
    for s in step.seqs:
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sampled_token)
    return step


def test_scheduler_is_torch_free():
    code = "import sys, nimblelm.engine.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admission_in_order_within_budget():
    sched, _ = make(budget=16)
    a, b, c = seq(6, "a"), seq(6, "b"), seq(6, "c")
    for s in (a, b, c):
        sched.add(s)
    out = run_step(sched)
    # a and b fit whole (12 tokens); c gets the 4 left of the budget: a chunk of its prompt.
    assert out.seqs == [a, b, c]
    assert out.num_new_tokens == [6, 6, 4]
    assert [sched.kv.block_ids(s) for s in (a, b, c)] == [[[0, 1]], [[2, 3]], [[4]]]
    assert c.num_computed_tokens == 4 and c.num_tokens == 6  # no token sampled for a partial chunk


def test_chunk_continues_beside_decodes():
    sched, _ = make(budget=16)
    a, b = seq(6, "a"), seq(20, "b")
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert out.num_new_tokens == [6, 10]
    out = run_step(sched)
    # a decodes one token; b's remaining 10 prompt tokens complete.
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 10]
    assert b.num_tokens == 21


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched, _ = make(budget=16, chunked=False)
    a, b = seq(10, "a"), seq(10, "b")
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert out.seqs == [a] and out.num_new_tokens == [10]
    out = run_step(sched)
    assert out.seqs == [a, b] and out.num_new_tokens == [1, 10]


def test_max_num_seqs_caps_running():
    sched, _ = make(max_num_seqs=2, budget=64, num_blocks=16)
    seqs = [seq(2, str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = run_step(sched)
    assert out.seqs == seqs[:2]
    assert list(sched.waiting) == [seqs[2]]


def test_admission_stops_when_blocks_run_out():
    sched, kv = make(num_blocks=3, block_size=4, budget=64)
    a, b = seq(8, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert out.seqs == [a]  # b needs 2 blocks, only 1 is free
    assert kv.num_free_blocks == 1 and list(sched.waiting) == [b]


def test_preemption_by_recompute_of_the_newest():
    sched, kv = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq(7, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: blocks [0, 1], 8 tokens; b: blocks [2, 3], 9 tokens
    assert kv.num_free_blocks == 0
    out = run_step(sched)
    # a's 8th token fits its block 1; b's 9th token needs a fifth block: b, the newest, is preempted.
    assert out.seqs == [a]
    assert b.status is SequenceStatus.WAITING and kv.block_ids(b) == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    assert b.num_tokens == 9  # its output so far is kept and will be recomputed, not lost
    out = run_step(sched)
    # a needs a block for token 9: it takes b's last block (evicted first); b cannot come back yet.
    assert out.seqs == [a] and kv.block_ids(a) == [[0, 1, 3]]
    sched.finish(a, "stop")
    out = run_step(sched)
    # b's prompt and output come back: its first block was still cached, the rest is recomputed.
    assert out.seqs == [b] and out.num_new_tokens == [5] and kv.num_hit_tokens == 4
    assert b.num_tokens == 10


def test_a_lone_sequence_preempts_itself_rather_than_deadlock():
    sched, _ = make(num_blocks=2, block_size=2, budget=64)
    a, b = seq(2, "a"), seq(2, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: [0], b: [1]; both have 3 tokens now
    out = run_step(sched)
    # Both need a second block; none free: b is preempted, a takes b's block.
    assert out.seqs == [a] and list(sched.waiting) == [b] and sched.kv.block_ids(a) == [[0, 1]]


def test_finish_and_abort_free_blocks_everywhere():
    sched, kv = make(budget=4)
    a, b = seq(6, "a"), seq(6, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 4 of 6 tokens; b still waiting
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert kv.num_free_blocks == kv.num_blocks
    assert not sched.has_unfinished()
    assert a.finish_reason == "abort" and b.status is SequenceStatus.FINISHED


def test_a_cached_prefix_is_skipped_and_the_contract_says_where_it_starts():
    sched, kv = make(num_blocks=16, block_size=4, budget=64)
    a = seq(10, "a", first=1)
    sched.add(a)
    run_step(sched)
    b = seq(11, "b", first=1)  # shares a's first 10 tokens: blocks 0 and 1 are full and cached
    sched.add(b)
    out = sched.schedule()
    new = out.new_requests[0]
    assert (new.req_id, new.num_computed_tokens, new.block_ids) == (b.seq_id, 8, [[0, 1, 3]])
    assert out.num_scheduled_tokens == {a.seq_id: 1, b.seq_id: 3}
    assert b.num_computed_tokens == 8 and kv.num_hit_tokens == 8


def test_a_prompt_waits_a_step_for_the_blocks_another_computes():
    """b's prompt starts with a's, which nothing has cached yet: b waits one step and then finds a's blocks
    cached, while c, unrelated and behind it in the queue, goes ahead."""
    sched, kv = make(num_blocks=16, block_size=4, budget=64)
    a, b, c = seq(10, "a", first=1), seq(11, "b", first=1), seq(5, "c")
    for s in (a, b, c):
        sched.add(s)
    first = run_step(sched)
    assert first.seqs == [a, c] and list(sched.waiting) == [b]
    second = sched.schedule()
    assert second.new_requests[0].req_id == b.seq_id and second.new_requests[0].num_computed_tokens == 8
    assert kv.num_hit_tokens == 8


def test_without_prefix_caching_nothing_waits_for_a_prefix():
    sched, _ = make(num_blocks=16, block_size=4, budget=64, caching=False)
    a, b = seq(10, "a", first=1), seq(11, "b", first=1)
    sched.add(a)
    sched.add(b)
    assert run_step(sched).seqs == [a, b]


def test_the_contract_carries_only_what_changed_and_pickles():
    sched, _ = make(num_blocks=16, block_size=4, budget=64)
    a = Sequence("a", [1, 2, 3], SamplingParams(temperature=0.5, seed=3, max_tokens=5), index=1)
    sched.add(a)
    first = sched.schedule()
    assert [(r.prompt_token_ids, r.output_token_ids, r.seed, r.block_ids) for r in first.new_requests] == [
        ([1, 2, 3], [], 4, [[0]])
    ]
    sched.update(first)
    a.token_ids += [9, 9]  # two steps' sampled tokens as the engine appends them (one here, for brevity)
    second = pickle.loads(pickle.dumps(sched.schedule()))
    assert second.new_requests == []
    running = second.running_requests[0]
    assert (running.req_id, running.new_token_ids, running.new_block_ids, running.num_computed_tokens) == (
        a.seq_id, [9, 9], [[1]], 3
    )
    sched.update(second)
    sched.finish(a, "stop")
    third = sched.schedule()
    assert third.is_empty and third.finished_req_ids == [a.seq_id]
    assert sched.schedule().finished_req_ids == []


def test_a_resumed_sequence_comes_back_whole_with_its_output():
    sched, _ = make(num_blocks=2, block_size=2, budget=64)
    a, b = seq(2, "a"), seq(2, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)
    run_step(sched)  # b is preempted; a takes its block
    sched.finish(a, "stop")
    out = sched.schedule()
    assert out.finished_req_ids == [a.seq_id]
    resumed = out.new_requests[0]
    assert resumed.req_id == b.seq_id and resumed.output_token_ids == [7]
