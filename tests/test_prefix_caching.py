"""Prefix caching on a tiny random model: greedy output is the same cold, warm and partially warm, with
chunked prefill, preemption and rounded KV caches; the engine without caching is the oracle. And the step
contract crosses a process boundary: a model runner in another process, fed the pickled contract,
generates what the engine's own runner does."""

import multiprocessing

import pytest

from nimblelm import LLM, SamplingParams
from nimblelm.config import EngineConfig
from nimblelm.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SYSTEM = "You are a careful assistant. Answer briefly and cite the rule you used. " * 3
QUESTIONS = ["Why is the sky blue?", "Name a prime.", "What is a cache?", "Spell 'block'.", "Count to three."]


def outputs(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("kv", ["auto", "float16", "int8"])
@pytest.mark.parametrize(
    "options",
    [{}, {"max_num_batched_tokens": 16, "block_size": 4}, {"block_size": 4, "num_kv_blocks": 48, "max_model_len": 192}],
    ids=["whole", "chunked", "preempting"],
)
def test_greedy_output_is_the_same_cold_warm_and_partially_warm(tiny_qwen, kv, options):
    prompts = [SYSTEM + q for q in QUESTIONS]
    options = {"max_model_len": 256, "max_num_seqs": 16, "kv_cache_dtype": kv} | options
    oracle = outputs(LLM(str(tiny_qwen), dtype="float32", enable_prefix_caching=False, **options), prompts)
    llm = LLM(str(tiny_qwen), dtype="float32", **options)
    cold = outputs(llm, prompts[:1])  # nothing cached
    partial = outputs(llm, prompts)  # the shared system prompt cached, the questions not
    warm = outputs(llm, prompts)  # every prompt cached but its last block (or token)
    assert [cold[0], partial, warm] == [oracle[0], oracle, oracle]
    stats = llm.llm_engine.stats()
    assert stats.prefix_cache_hits > 0.5 * stats.prefix_cache_queries
    if "num_kv_blocks" in options:
        assert llm.llm_engine.scheduler.num_preemptions > 0
        assert llm.llm_engine.kv_cache_manager.num_free_blocks == options["num_kv_blocks"]


def test_identical_prompts_in_one_batch_and_n_completions(tiny_qwen):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256)
    alone = outputs(llm, [SYSTEM])
    assert outputs(llm, [SYSTEM] * 3) == alone * 3
    params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=8)
    first = [c.token_ids for c in llm.generate(SYSTEM + "Go.", params, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in llm.generate(SYSTEM + "Go.", params, use_tqdm=False)[0].outputs]
    assert first == again  # seeded samples do not depend on whether the prompt was cached


def test_without_prefix_caching_nothing_is_looked_up(tiny_qwen):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, enable_prefix_caching=False)
    outputs(llm, [SYSTEM, SYSTEM])
    stats = llm.llm_engine.stats()
    assert stats.prefix_cache_hits == 0 and stats.prefix_cache_queries == 0


def test_reset_prefix_cache_forgets_every_cached_prompt(tiny_qwen):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256)
    cold = outputs(llm, [SYSTEM])
    hits = llm.llm_engine.stats().prefix_cache_hits
    assert outputs(llm, [SYSTEM]) == cold and llm.llm_engine.stats().prefix_cache_hits > hits
    assert llm.reset_prefix_cache()
    hits = llm.llm_engine.stats().prefix_cache_hits
    assert outputs(llm, [SYSTEM]) == cold and llm.llm_engine.stats().prefix_cache_hits == hits
    engine = llm.llm_engine
    engine.add_request("running", SYSTEM, SamplingParams(max_tokens=4))
    engine.step()  # the request now holds blocks: nothing is forgotten
    assert not llm.reset_prefix_cache()
    while engine.has_unfinished_requests():
        engine.step()
    assert llm.reset_prefix_cache()


def _serve_runner(folder: str, conn) -> None:
    """A worker process: its own engine's model runner, driven only by the contracts it receives."""
    runner = LLMEngine(EngineConfig(dtype="float32", model=folder, max_model_len=256, num_kv_blocks=64), progress=False).runner
    while (sched := conn.recv()) is not None:
        conn.send(runner.execute(sched))


class _RemoteRunner:
    """Stands in for the engine's runner: sends each step's contract to the worker and returns its answer."""

    def __init__(self, conn):
        self.conn = conn

    def execute(self, sched):
        self.conn.send(sched)
        return self.conn.recv()


def test_a_model_runner_in_another_process_runs_from_the_contract(tiny_qwen):
    prompts = [SYSTEM + q for q in QUESTIONS[:3]] + [SYSTEM + QUESTIONS[0]]
    sampled = SamplingParams(temperature=0.9, seed=11, max_tokens=10, ignore_eos=True)
    local = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, num_kv_blocks=64)
    expected = outputs(local, prompts) + outputs(local, prompts, sampled)

    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=_serve_runner, args=(str(tiny_qwen), there), daemon=True)
    worker.start()
    try:
        remote = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, num_kv_blocks=64)
        remote.llm_engine.runner = _RemoteRunner(here)
        assert outputs(remote, prompts) + outputs(remote, prompts, sampled) == expected
    finally:
        here.send(None)
        worker.join(timeout=60)
    assert worker.exitcode == 0
