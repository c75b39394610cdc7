"""Speculative decoding: the n-gram proposer, the lossless verifier (exact for greedy, the target's
distribution for sampling), and the engine with drafts inside continuous batching against plain decoding."""

import pytest
import torch

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.layers.sampler import Sampler, SamplingBatch
from nimblelm.speculative import SpeculativeConfig
from nimblelm.speculative.budget import Acceptance, StepCost, draft_budget
from nimblelm.speculative.ngram import NgramProposer
from nimblelm.speculative.verifier import verify

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
CHI2_5_DOF_AT_0_001 = 20.515  # chi-square with 5 degrees of freedom: exceeded with probability 0.001
# Prompts that repeat themselves, so that prompt lookup finds drafts and some of them are kept.
PROMPTS = [
    "one two three four five six one two three four five six one two three",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(",
    "The cat sat on the mat. The cat sat on the mat. The cat sat",
    "Rivers",
]


def test_ngram_proposes_what_followed_the_latest_match_longest_first():
    p = NgramProposer(3, lookup_min=1, lookup_max=3)
    assert p.propose([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3]) == [5, 6, 2]  # "2 3" last followed by 5
    assert p.propose([7, 1, 2, 3, 8, 8, 5, 1, 2, 3]) == [8, 8, 5]  # the 3-gram "1 2 3"
    assert p.propose([1, 2, 3, 4]) == []  # nothing recurs
    assert p.propose([5, 6, 5, 6], max_tokens=1) == [5]
    assert p.propose([5, 6, 5, 6], max_tokens=0) == []
    assert NgramProposer(4, 2, 2).propose([1, 2, 1, 3, 1]) == []  # 1-grams recur, 2-grams do not


@pytest.mark.parametrize("options, message", [
    ({"method": "medusa9", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 16}, "num_speculative_tokens"),
    ({"method": "ngram"}, "needs"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft": 1}, "unknown"),
    ("ngram", "dict"),
])
def test_bad_configs_are_refused_with_what_is_wrong(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        SpeculativeConfig.from_dict(options)


def _batch(rows: int, temperature: float, vocab: int, generator=None) -> SamplingBatch:
    params = [SamplingParams(temperature=temperature)] * rows
    return SamplingBatch.build(params, [[0]] * rows, [1] * rows, [generator] * rows, vocab, torch.device("cpu"))


def test_greedy_verification_keeps_drafts_up_to_the_first_mismatch():
    vocab = 10
    targets = [[3, 4, 5, 6], [7], [1, 2, 3]]  # each row's greedy token
    logits = torch.full((8, vocab), -5.0)
    for row, t in enumerate(t for seq in targets for t in seq):
        logits[row, t] = 5.0
    drafts = [[3, 4, 9], [], [1, 8]]  # the first keeps two, the second has none, the third keeps one
    out = verify(Sampler(), logits, _batch(8, 0.0, vocab), drafts)
    assert out.token_ids == [[3, 4, 5], [7], [1, 2]]
    all_kept = verify(Sampler(), logits, _batch(8, 0.0, vocab), [[3, 4, 5], [], [1, 2]])
    assert all_kept.token_ids == [[3, 4, 5, 6], [7], [1, 2, 3]]  # the bonus token after the last draft


@pytest.mark.parametrize("draft_kind", ["one-hot", "distribution"])
def test_sampled_verification_emits_the_targets_distribution(draft_kind):
    """The first token a step emits, over many trials, is distributed as the target's p whatever the drafts
    (chi-square goodness of fit, significance level 0.001), and drafts that p favours are mostly kept."""
    vocab, trials = 6, 4000
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    p = p_logits.softmax(-1)
    q = torch.tensor([0.05, 0.05, 0.4, 0.3, 0.1, 0.1])  # a poor drafter: far from p
    logits = p_logits.repeat(2 * trials, 1)  # per trial: the draft's row and the bonus row
    if draft_kind == "one-hot":
        drafts = [[int(torch.multinomial(q, 1, generator=g))] for _ in range(trials)]
        draft_probs = None
    else:
        drafts = [[int(torch.multinomial(q, 1, generator=g))] for _ in range(trials)]
        draft_probs = q.repeat(trials, 1)
    out = verify(Sampler(), logits, _batch(2 * trials, 1.0, vocab, g), drafts, draft_probs)
    first = torch.tensor([ids[0] for ids in out.token_ids])
    counts = torch.bincount(first, minlength=vocab).double()
    expected = p.double() * trials
    assert ((counts - expected) ** 2 / expected).sum() < CHI2_5_DOF_AT_0_001
    kept = sum(len(ids) - 1 for ids in out.token_ids) / trials
    expected_kept = (torch.minimum(p, q).sum() if draft_probs is not None else (q * p).sum()).item()
    assert kept == pytest.approx(expected_kept, abs=0.04)


def test_acceptance_counts_trials_up_to_the_first_rejection():
    a = Acceptance()
    assert a.rate == 0.5  # the prior
    a.update(num_drafts=4, num_kept=4)  # four trials, all kept
    assert a.rate == pytest.approx(5 / 6)
    a.update(num_drafts=4, num_kept=1)  # two trials: one kept, one rejected
    assert a.rate == pytest.approx((0.8 * 4 + 1 + 1) / (0.8 * 4 + 2 + 2))


def test_a_sequence_that_stopped_drafting_drifts_back_to_the_prior():
    a = Acceptance()
    a.update(num_drafts=4, num_kept=0)
    a.update(num_drafts=4, num_kept=0)
    low = a.rate
    assert low < 0.3
    for _ in range(10):  # steps without drafts
        a.idle()
    assert low < a.rate < 0.5 and a.rate == pytest.approx(1 / (2 + 1.8 * 0.8**10))  # tried: 0.8 + 1, faded


def test_step_cost_is_the_bucket_that_holds_the_rows_and_extrapolates_past_the_last():
    cost = StepCost({1: 10.0, 2: 11.0, 4: 12.0, 8: 16.0})
    assert [cost(r) for r in (1, 2, 3, 4, 5, 8)] == [10.0, 11.0, 12.0, 12.0, 16.0, 16.0]
    assert cost(12) == pytest.approx(20.0)


def test_step_cost_rises_with_the_rows_whatever_the_timing_noise():
    # 36 rows timed faster than 32 (a start-up measurement seen on a busy machine): pooled, then every added
    # row costs at least half the average row ((60 - 17) / 39 / 2 per row here).
    cost = StepCost({1: 17.0, 32: 58.0, 36: 52.9, 40: 60.0})
    seconds = [cost(r) for r in (1, 32, 36, 40)]
    assert seconds == sorted(seconds) and seconds[0] == 17.0
    assert cost(33) - cost(32) >= 4 * 0.5 * (cost(40) - 17.0) / 39 - 1e-9
    assert cost(32) == pytest.approx((58.0 + 52.9) / 2, abs=1.5)
    # Drafts at 32 rows no longer look free: four drafts kept 20% of the time would pay on the raw timings.
    assert draft_budget(dict.fromkeys(range(32), 3), dict.fromkeys(range(32), 0.2), 32, cost) == {}


def test_draft_budget_keeps_the_rows_that_pay_for_themselves():
    room = {0: 4, 1: 4}
    free = StepCost({1: 1.0, 64: 1.0})
    assert draft_budget(room, {0: 0.1, 1: 0.9}, 2, free) == room  # rows cost nothing: all of them
    linear = StepCost({1: 1.0, 2: 2.0})  # each row costs a whole step: no draft pays
    assert draft_budget(room, {0: 0.99, 1: 0.99}, 2, linear) == {}
    gentle = StepCost({r: 1.0 + 0.1 * r for r in range(1, 65)})
    # At 10% of a step per row, drafts kept 90% of the time pay until 0.9^j falls under about (T) 0.1 / 1.x;
    # those kept 10% of the time never do.
    kept = draft_budget(room, {0: 0.1, 1: 0.9}, 2, gentle)
    assert 0 not in kept and 1 <= kept[1] <= 4
    # The same drafts in a batch of 32 pay less: each row's cost is measured against 32 tokens.
    busy = draft_budget({0: 4}, {0: 0.9}, 32, gentle)
    assert busy.get(0, 0) < draft_budget({0: 4}, {0: 0.9}, 1, gentle)[0]
    # A step pads its rows up to a bucket: the row that opens one pays only with the rows after it.
    buckets = StepCost({1: 1.0, 2: 1.05, 4: 1.5, 8: 1.6})
    assert draft_budget({0: 4}, {0: 0.9}, 1, buckets) == {0: 4}


def test_a_steps_overhead_outside_its_trace_makes_rows_cheaper_in_proportion():
    """Qwen2.5-Coder-1.5B's traces as measured (85 ms at 1 row, 128 ms at 3, 147 ms at 6), a 10 ms drafting
    pass: drafts kept 75% of the time pay at depth 4 once the 23 ms every step spends outside its trace (LM
    head, sampling) is counted, and look worth one draft on the traces alone."""
    cost = StepCost({1: 0.0854, 2: 0.0916, 3: 0.1283, 4: 0.1348, 5: 0.1411, 6: 0.1474})
    assert draft_budget({0: 4}, {0: 0.75}, 1, cost, draft_pass=0.010) == {0: 1}
    assert draft_budget({0: 4}, {0: 0.75}, 1, cost, draft_pass=0.010, overhead=0.023) == {0: 4}
    # without drafting passes too: a row that does not pay on the trace alone pays on the whole step
    steep = StepCost({1: 0.010, 2: 0.0125})
    assert draft_budget({0: 1}, {0: 0.2}, 1, steep) == {}
    assert draft_budget({0: 1}, {0: 0.2}, 1, steep, overhead=0.020) == {0: 1}


def test_draft_budget_weighs_what_verifying_at_all_costs():
    """A step that verifies drafts over a low-bit KV cache runs eagerly: its extra seconds, paid once whatever the
    rows, turn drafts down unless they bring enough tokens to cover it."""
    gentle = StepCost({r: 1.0 + 0.1 * r for r in range(1, 65)})
    room, rates = {0: 4}, {0: 0.9}
    assert draft_budget(room, rates, 1, gentle, verify_extra=0.0) == draft_budget(room, rates, 1, gentle) == {0: 4}
    assert draft_budget(room, rates, 1, gentle, verify_extra=0.5) == {0: 4}  # 4.1 tokens in 2.0 s against 1 in 1.1
    assert draft_budget(room, rates, 1, gentle, verify_extra=5.0) == {}  # 4.1 tokens in 6.5 s
    assert draft_budget(room, {0: 0.3}, 1, gentle, verify_extra=0.5) == {}  # 1.4 tokens in 1.7 s at best
    # with drafting passes, both: each depth pays its passes and the one extra
    flat = StepCost({1: 1.0, 64: 1.0})
    assert draft_budget(room, {0: 0.8}, 1, flat, draft_pass=0.3, verify_extra=0.2) == {0: 3}
    assert draft_budget(room, {0: 0.8}, 1, flat, draft_pass=0.3, verify_extra=2.0) == {}


def test_draft_budget_weighs_a_drafting_pass_against_what_it_serves():
    """A proposer's pass (a draft model's step) is paid once per draft position, for the whole batch: each
    depth is drafted only while its pass pays for the tokens it adds."""
    flat = StepCost({1: 1.0, 64: 1.0})  # verifying rows cost nothing: only the passes count
    one = {0: 4}
    assert draft_budget(one, {0: 0.8}, 1, flat, draft_pass=0.1) == {0: 4}  # cheap passes: every draft
    assert draft_budget(one, {0: 0.8}, 1, flat, draft_pass=1.0) == {}  # a pass as dear as a step: none
    # 1.8 tokens in 1.3 s, 2.44 in 1.6 s, 2.95 in 1.9 s (best), 3.36 in 2.2 s.
    assert draft_budget(one, {0: 0.8}, 1, flat, draft_pass=0.3) == {0: 3}
    # Eight sequences kept at half their drafts: 12 tokens in 1.4 s beat 8 in 1 s, 14 in 1.8 s do not.
    batch = dict.fromkeys(range(8), 2)
    rates = dict.fromkeys(range(8), 0.5)
    assert draft_budget(batch, rates, 8, flat, draft_pass=0.4) == dict.fromkeys(range(8), 1)
    assert draft_budget(batch, rates, 8, flat) == batch  # no pass cost: as before


@pytest.fixture(scope="module")
def plain_and_spec(tiny_qwen):
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8)
    spec = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, speculative_config=NGRAM)
    # On the tiny model a row costs nearly a step's share, and the draft budget would cut most drafts: these
    # tests verify every draft proposed (test_draft_budget_* covers the budget).
    spec.llm_engine.runner.step_cost = None
    return plain, spec


def test_greedy_output_is_identical_with_drafts_in_a_batch(plain_and_spec):
    plain, spec = plain_and_spec
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    out = spec.generate(PROMPTS, params, use_tqdm=False)
    for r, o in zip(ref, out):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert o.outputs[0].text == r.outputs[0].text
        for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
    stats = spec.llm_engine.stats().spec
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
    assert 1 < stats.mean_acceptance_length <= 1 + NGRAM["num_speculative_tokens"]
    assert sum(o.metrics.spec.num_accepted_tokens for o in out if o.metrics.spec) == stats.num_accepted_tokens
    assert stats.accepted_per_position[0] >= stats.accepted_per_position[-1]


def test_limits_stops_n_and_penalties_hold_with_drafts(plain_and_spec):
    plain, spec = plain_and_spec
    cases = [
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),  # max_tokens inside a draft run
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["three", "mat"]),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3),  # no drafts
        SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True),
    ]
    for params in cases:
        ref = plain.generate(PROMPTS, params, use_tqdm=False)
        out = spec.generate(PROMPTS, params, use_tqdm=False)
        for r, o in zip(ref, out):
            assert [c.token_ids for c in o.outputs] == [c.token_ids for c in r.outputs]
            assert [(c.text, c.finish_reason, c.stop_reason) for c in o.outputs] == \
                [(c.text, c.finish_reason, c.stop_reason) for c in r.outputs]


def test_greedy_output_survives_preemption_and_the_context_limit(tiny_qwen):
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    # Few blocks: sequences are preempted and recomputed while they hold drafts.
    tight = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, max_num_seqs=4, num_kv_blocks=12, block_size=8,
                speculative_config=NGRAM)
    tight.llm_engine.runner.step_cost = None  # every draft verified, as in plain_and_spec
    ref = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, max_num_seqs=4).generate(PROMPTS, params, use_tqdm=False)
    out = tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    for r, o in zip(ref, out):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        assert len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 64
    assert tight.llm_engine.kv_cache_manager.num_free_blocks == 12


def test_seeded_sampling_with_drafts_is_reproducible(plain_and_spec):
    _, spec = plain_and_spec
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True)
    a = spec.generate(PROMPTS, params, use_tqdm=False)
    b = spec.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_seeded_sampling_drafts_whatever_the_step_timings(tiny_qwen):
    # Which positions are drafts decides which random draws make a sampled token, so a seeded request drafts
    # its whole room: with step costs under which no draft pays, and with free rows, one seed gives one output.
    spec = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, speculative_config=NGRAM)
    runner = spec.llm_engine.runner
    params = SamplingParams(temperature=0.8, max_tokens=30, seed=7, ignore_eos=True)
    outputs = []
    for costs in ({1: 1e-3, 2: 1.0}, {1: 1e-3, 2: 1e-3}):
        runner.step_cost = StepCost(costs)
        outputs.append([o.outputs[0].token_ids for o in spec.generate(PROMPTS, params, use_tqdm=False)])
    assert outputs[0] == outputs[1]


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_model_greedy_output_is_identical_with_prompt_lookup(dtype):
    """SmolLM2 on chat prompts that invite copying: the same tokens and text as plain decoding, with
    drafts kept. A verifying step runs the drafts as extra rows of the same kernels (bfloat16 included)."""
    questions = [
        "Repeat this list exactly, then add one more item: apples, pears, plums, cherries, grapes.",
        "Rewrite this function with type hints:\ndef area(width, height):\n    return width * height",
        "What is the capital of France? Answer in one word.",
    ]
    plain = LLM("smollm2-135m", max_model_len=1024, dtype=dtype)
    spec = LLM("smollm2-135m", max_model_len=1024, dtype=dtype, speculative_config=NGRAM)
    prompts = [plain.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=64)
    for prompt in prompts:  # one at a time: batch 1 on both sides, so only the drafts differ
        ref = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        out = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert spec.llm_engine.stats().spec.acceptance_rate > 0.3


def test_server_with_drafts_answers_as_plain_decoding_and_counts_them(tiny_qwen, plain_and_spec):
    import json

    import openai
    from server_process import ServerProcess

    plain, _ = plain_and_spec
    server = ServerProcess(tiny_qwen, "--dtype", "float32", "--max-model-len", "256", "--speculative-config",
                           json.dumps(NGRAM))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        refs = plain.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
        for prompt, ref in zip(PROMPTS, refs):
            reply = client.completions.create(model=str(tiny_qwen), prompt=prompt, max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert reply.choices[0].text == ref.outputs[0].text
        # The server's draft budget decides how many drafts the tiny model verifies (from timings taken at
        # start), so only the counters' consistency is fixed here; what is kept is counted offline above.
        metrics = server.wait_idle()
        drafts = metrics["nimblelm_spec_decode_num_draft_tokens_total"]
        accepted = metrics["nimblelm_spec_decode_num_accepted_tokens_total"]
        assert metrics["nimblelm_spec_decode_num_drafts_total"] > 0 and drafts > 0
        assert accepted <= drafts
        assert accepted == sum(v for k, v in metrics.items() if "accepted_tokens_per_pos_total{" in k)
    finally:
        server.stop()


def test_cli_refuses_a_bad_speculative_config_in_one_line(tiny_qwen):
    import subprocess
    import sys

    def run(config: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nimblelm", "generate", "--model", str(tiny_qwen),
                               "--speculative-config", config, "hi"], capture_output=True, text=True, check=False)

    malformed = run("{not json")  # argparse's usage error: exit 2, its last line says what is wrong
    assert malformed.returncode == 2 and "--speculative-config: not valid JSON" in malformed.stderr.splitlines()[-1]
    unknown = run('{"method": "nope", "num_speculative_tokens": 2}')
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr
    assert "speculative_config: method 'nope'" in unknown.stderr


@pytest.mark.parametrize("drafter", ["tiny_qwen", "tiny_llama"])
def test_draft_model_output_is_identical_and_a_copy_of_the_target_keeps_every_draft(drafter, request, tiny_qwen,
                                                                                      plain_and_spec):
    """The target's own weights as the drafter keep every greedy draft; another model with the same tokenizer
    keeps fewer; the output is plain decoding's either way, in a batch."""
    plain, _ = plain_and_spec
    config = {"method": "draft_model", "model": str(request.getfixturevalue(drafter)), "num_speculative_tokens": 3}
    spec = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, speculative_config=config)
    spec.llm_engine.runner.step_cost = None  # every draft verified, as in plain_and_spec
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    out = spec.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    stats = spec.llm_engine.stats().spec
    assert stats.num_draft_tokens > 0
    if drafter == "tiny_qwen":
        assert stats.acceptance_rate == 1.0
    # The drafter forgets a sequence when the runner does (the step after it finished), blocks and all.
    spec.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    runner = spec.llm_engine.runner
    assert set(runner.proposer.seqs) <= set(runner.seqs) and len(runner.seqs) == 1
    held = runner.proposer.kv.num_blocks - runner.proposer.kv.num_free_blocks
    assert held == sum(len(runner.proposer.kv.block_ids(seq)[0]) for seq in runner.proposer.seqs.values())


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_qwen, tmp_path):
    from tiny_models import make_tiny_hf_model

    other = make_tiny_hf_model(tmp_path / "other", arch="qwen2", vocab_size=300)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=128,
            speculative_config={"method": "draft_model", "model": str(other), "num_speculative_tokens": 2})


@pytest.mark.integration
def test_qwen_coder_drafted_by_its_int4_copy_gives_the_same_greedy_code():
    """A real float32 target drafted at batch 1 by a draft model in its own precision: Qwen2.5-Coder-0.5B by its
    int4 copy (survey speculative runs the 1.5B drafted by the 0.5B; a drafter of another size is tested on the
    tiny models; the 1.5B in float32 costs CI a 6.8 GB cache). Quantized targets are left out on purpose: their
    kernels round activations to int8, which turns the last-bit differences between a 5-row verifying step and
    1-row steps (attention over shared pages sums in another order) into logprob changes of about 0.02, enough
    to flip a near-tie, as batch size already may."""
    prompts = ["def fibonacci(n):\n    ", "# Return the sum of the squares of a list of numbers\ndef sum_squares(xs):\n"]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = LLM("qwen2.5-coder-0.5b", dtype="float32", max_model_len=512, max_num_seqs=1)
    refs = [plain.generate([prompt], params, use_tqdm=False)[0].outputs[0] for prompt in prompts]
    del plain
    spec = LLM("qwen2.5-coder-0.5b", dtype="float32", max_model_len=512, max_num_seqs=1, speculative_config={
        "method": "draft_model", "model": "qwen2.5-coder-0.5b", "quantization": "int4", "num_speculative_tokens": 4})
    for prompt, ref in zip(prompts, refs):
        assert spec.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == ref.token_ids
    assert spec.llm_engine.stats().spec.acceptance_rate > 0.3
