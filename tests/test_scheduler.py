"""Scheduler decisions, asserted exactly: admission, token budget, chunking, preemption. No torch."""

import subprocess
import sys

from nimblelm.engine.kv_cache.block_manager import BlockManager
from nimblelm.engine.scheduler import Scheduler, SchedulerConfig
from nimblelm.engine.sequence import Sequence, SequenceStatus
from nimblelm.sampling_params import SamplingParams


def make(num_blocks=8, block_size=4, max_num_seqs=4, budget=16, chunked=True):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs, budget, chunked), bm), bm


def seq(n_prompt, rid="r"):
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(temperature=0))


def run_step(sched, sampled_token=7):
    """What the engine does after the model ran: count computed tokens, append a sampled token."""
    out = sched.schedule()
    for s, n in zip(out.seqs, out.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sampled_token)
    return out


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
    assert a.block_ids == [0, 1] and b.block_ids == [2, 3] and c.block_ids == [4]
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
    sched, bm = make(num_blocks=3, block_size=4, budget=64)
    a, b = seq(8, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert out.seqs == [a]  # b needs 2 blocks, only 1 is free
    assert bm.num_free_blocks == 1 and list(sched.waiting) == [b]


def test_preemption_by_recompute_of_the_newest():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq(7, "a"), seq(8, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: blocks [0, 1], 8 tokens; b: blocks [2, 3], 9 tokens
    assert bm.num_free_blocks == 0
    out = run_step(sched)
    # a's 8th token fits its block 1; b's 9th token needs a fifth block: b, the newest, is preempted.
    assert out.seqs == [a] and out.preempted == [b]
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.num_preemptions == 1
    assert b.num_tokens == 9  # its output so far is kept and will be recomputed, not lost
    out = run_step(sched)
    # a needs block for token 9: it takes one of b's freed blocks; b cannot come back yet (needs 3).
    assert out.seqs == [a] and a.block_ids == [0, 1, 3]
    sched.finish(a, "stop")
    out = run_step(sched)
    assert out.seqs == [b] and out.num_new_tokens == [9]  # prompt and output recomputed in one chunk
    assert b.num_tokens == 10


def test_a_lone_sequence_preempts_itself_rather_than_deadlock():
    sched, _ = make(num_blocks=2, block_size=2, budget=64)
    a, b = seq(2, "a"), seq(2, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: [0], b: [1]; both have 3 tokens now
    out = run_step(sched)
    # Both need a second block; none free: b is preempted, a takes b's block.
    assert out.seqs == [a] and out.preempted == [b] and a.block_ids == [0, 1]


def test_finish_and_abort_free_blocks_everywhere():
    sched, bm = make(budget=4)
    a, b = seq(6, "a"), seq(6, "b")
    sched.add(a)
    sched.add(b)
    run_step(sched)  # a: 4 of 6 tokens; b still waiting
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert bm.num_free_blocks == bm.num_blocks
    assert not sched.has_unfinished()
    assert a.finish_reason == "abort" and b.status is SequenceStatus.FINISHED
