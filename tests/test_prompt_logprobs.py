"""SamplingParams(prompt_logprobs=k): every prompt token's logprob after the first, with its rank and the
top k, computed by the engine's own path; transformers on the same weights is the oracle."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nimblelm import LLM, InvalidRequestError, SamplingParams

TEXTS = ["The quick brown fox jumps over the lazy dog, again and again.", "def add(a, b):\n    return a + b"]


@pytest.fixture(scope="module")
def reference(tiny_qwen):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32).eval()

    def logprobs(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].log_softmax(-1)

    return logprobs


@pytest.mark.parametrize(
    "options", [{}, {"max_num_batched_tokens": 16, "max_num_seqs": 4}, {"block_size": 4, "num_kv_blocks": 18}],
    ids=["whole", "chunked", "preempting"],
)
def test_prompt_logprobs_match_transformers(tiny_qwen, reference, options):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, **options)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=3, n=2)
    for ids, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        ref = reference(ids)
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert entry[ids[i]].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)
            assert entry[ids[i]].rank == int((ref[i - 1] > ref[i - 1, ids[i]]).sum()) + 1
            top = ref[i - 1].topk(3).indices.tolist()
            assert set(entry) == set(top) | {ids[i]}
        assert [len(c.token_ids) for c in out.outputs] == [8, 8]


def test_prompts_preempted_mid_way_score_every_token(tiny_qwen):
    """A prompt preempted after some of its chunks is computed again in chunks that end elsewhere: every token
    after the first still has its logprob, as one uninterrupted pass gives it."""
    prompts = [[10 + (7 * i + 13 * j) % 300 for j in range(n)] for i, n in enumerate([150, 70, 90, 120])]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, prompt_logprobs=0)
    crowded = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=40,
                  num_kv_blocks=20)
    outs = crowded.generate(prompts, params, use_tqdm=False)
    assert crowded.llm_engine.scheduler.num_preemptions > 0
    alone = LLM(str(tiny_qwen), dtype="float32", max_model_len=256)
    for ids, out, ref in zip(prompts, outs, alone.generate(prompts, params, use_tqdm=False)):
        assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
        for i, (entry, expected) in enumerate(zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:]), start=1):
            assert entry[ids[i]].logprob == pytest.approx(expected[ids[i]].logprob, abs=1e-4)


def test_max_tokens_zero_returns_the_prompt_only(tiny_llm):
    ids = tiny_llm.tokenizer.encode(TEXTS[0])
    out = tiny_llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.finished and out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert [set(e) for e in out.prompt_logprobs[1:]] == [{t} for t in ids[1:]]


def test_a_cached_prefix_does_not_skip_prompt_logprobs(tiny_llm):
    ids = tiny_llm.tokenizer.encode(TEXTS[0] * 3)
    tiny_llm.generate([ids], SamplingParams(max_tokens=1), use_tqdm=False)  # caches the prompt's blocks
    first = tiny_llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    assert len(first.prompt_logprobs) == len(ids)


@pytest.mark.parametrize("block_size", [4, 16])
def test_prompt_logprobs_from_a_start_reuse_the_cached_context(tiny_qwen, reference, block_size):
    """prompt_logprobs_start=s: the blocks before row s-1 come from the prefix cache (counted as hits),
    the entries before s are None, and those from s on are transformers' values."""
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=128, block_size=block_size)
    context = llm.tokenizer.encode(TEXTS[0] * 2)
    ids = context + llm.tokenizer.encode(TEXTS[1])
    llm.generate([context], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)  # scores, caches
    hits = llm.llm_engine.stats().prefix_cache_hits
    params = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=len(context))
    out = llm.generate([ids], params, use_tqdm=False)[0]
    reused = llm.llm_engine.stats().prefix_cache_hits - hits
    assert reused == (len(context) - 1) // block_size * block_size > 0
    ref = reference(ids)
    assert len(out.prompt_logprobs) == len(ids) and all(e is None for e in out.prompt_logprobs[:reused + 1])
    for i in range(len(context), len(ids)):
        assert out.prompt_logprobs[i][ids[i]].logprob == pytest.approx(ref[i - 1, ids[i]].item(), abs=1e-4)


def test_bad_prompt_logprobs_start_is_one_clear_error():
    with pytest.raises(InvalidRequestError, match="prompt_logprobs_start must be an integer >= 0"):
        SamplingParams(prompt_logprobs=0, prompt_logprobs_start=-2)


@pytest.mark.parametrize("value", [-1, 1.5, "2"])
def test_bad_prompt_logprobs_is_one_clear_error(value):
    with pytest.raises(InvalidRequestError, match="prompt_logprobs must be an integer >= 0"):
        SamplingParams(prompt_logprobs=value)
