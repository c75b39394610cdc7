"""The engine on tiny random models: Hugging Face transformers is the oracle, and greedy output must
not depend on batching, chunking or preemption."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.engine.llm_engine import LLMEngine

PROMPTS = [
    "The quick brown fox",
    "Hello world! How are you today?",
    "def add(a, b):",
    "A small language model reads a prompt, predicts the next token, and repeats until it is done.",
    "Rivers",
    "Numbers like 12, 345 and 6789 appear in text",
    "The scheduler decides which sequences run",
    "Every morning the baker opens the shop",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def hf_greedy(folder, token_ids, n):
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    out = model.generate(torch.tensor([token_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(token_ids) :].tolist()


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen"])
def test_greedy_and_logits_match_transformers(arch, request):
    folder = request.getfixturevalue(arch)
    llm = LLM(str(folder), dtype="float32", max_model_len=256)
    ids = llm.tokenizer.encode(PROMPTS[3])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=5), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(folder, ids, 32)

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    first = out[0].outputs[0].logprobs[0]
    for token_id, lp in first.items():
        assert lp.logprob == pytest.approx(ref[token_id].item(), abs=1e-4)


def test_batch_chunking_and_preemption_do_not_change_greedy_output(tiny_qwen):
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(16)]
    alone = [LLM(str(tiny_qwen), dtype="float32", max_model_len=256).generate(p, GREEDY, use_tqdm=False)[0] for p in prompts[:3]]
    alone_ids = [o.outputs[0].token_ids for o in alone]

    batched = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=16).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched[:3]] == alone_ids

    # A 16-token step budget splits every long prompt into chunks that share steps with decodes.
    chunked_llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=16, max_num_batched_tokens=16, block_size=4)
    chunked = chunked_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in chunked] == [o.outputs[0].token_ids for o in batched]

    # 70 blocks of 4 tokens cannot hold 16 sequences of ~40-100 tokens: requests get preempted and resumed.
    tight = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=16, block_size=4, num_kv_blocks=70)
    preempted = tight.generate(prompts, GREEDY, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in preempted] == [o.outputs[0].token_ids for o in batched]
    assert tight.llm_engine.kv_cache_manager.num_free_blocks == 70


def test_seeded_sampling_is_reproducible_regardless_of_batch(tiny_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = tiny_llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = tiny_llm.generate(PROMPTS, [others, others] + [params] * 0 + [others] * 5 + [params], use_tqdm=False)
    assert alone == tiny_llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    seeded_in_batch = tiny_llm.generate([PROMPTS[1], PROMPTS[0]], [others, params], use_tqdm=False)
    assert seeded_in_batch[1].outputs[0].token_ids == alone
    assert len(mixed) == len(PROMPTS)


def test_n_completions(tiny_llm):
    out = tiny_llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8), use_tqdm=False)
    completions = out[0].outputs
    assert [c.index for c in completions] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in completions}) > 1


def test_stop_string_across_token_boundary_is_cut(tiny_llm):
    base = tiny_llm.generate(PROMPTS[1], GREEDY, use_tqdm=False)[0].outputs[0]
    tokenizer = tiny_llm.tokenizer
    # A stop string made of the end of one token and the start of the next.
    pieces = [tokenizer.decode(base.token_ids[: i + 1]) for i in range(len(base.token_ids))]
    boundary = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    prev = pieces[boundary - 1]
    stop = prev[-1:] + pieces[boundary][len(prev) : len(prev) + 1]
    cut = pieces[boundary].find(stop)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = tiny_llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == pieces[boundary][:cut]
    assert stop not in out.text


def test_stop_token_ids_eos_and_length(tiny_llm):
    base = tiny_llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0].outputs[0]
    stop_token = base.token_ids[5]
    first = base.token_ids.index(stop_token)
    out = tiny_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_token

    eos = tiny_llm.model_config.eos_token_ids[0]
    engine = tiny_llm.llm_engine
    engine.add_request("eos", [eos, eos, eos], SamplingParams(temperature=0, max_tokens=5))
    short = tiny_llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    engine.abort_request("eos")


def test_logprobs_count_and_sampled_token_first(tiny_llm):
    out = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)
    completion = out[0].outputs[0]
    assert len(completion.logprobs) == 4
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry and entry[token].rank == 1 and len(entry) == 3


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "empty"),
        ([[]], "empty"),
        ("word " * 400, "max_model_len"),
        ([1, 2, 10**6], "token ids"),
        (3.5, "string or a list of token ids"),
    ],
)
def test_bad_prompts_get_one_clear_error_and_the_engine_keeps_serving(tiny_llm, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        tiny_llm.generate(prompt, GREEDY, use_tqdm=False)
    engine: LLMEngine = tiny_llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks
    assert tiny_llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_a_bad_request_in_a_batch_leaves_nothing_behind(tiny_llm):
    with pytest.raises(InvalidRequestError):
        tiny_llm.generate([PROMPTS[0], ""], GREEDY, use_tqdm=False)
    assert tiny_llm.llm_engine.num_unfinished_requests == 0


def test_abort_frees_blocks(tiny_llm):
    engine = tiny_llm.llm_engine
    engine.add_request("x", PROMPTS[3], GREEDY)
    engine.step()
    assert engine.kv_cache_manager.num_free_blocks < engine.kv_cache_manager.num_blocks
    engine.abort_request("x")
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_model_len": 10**6}, "exceeds the model's context length"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"num_kv_blocks": 2}, "KV cache holds"),
        ({"dtype": "float8"}, "unknown dtype"),
        ({"device": "tpu"}, "device"),
        ({"bogus_option": 1}, "unknown engine option"),
        ({"enable_chunked_prefill": False, "max_num_batched_tokens": 64}, "chunked prefill"),
    ],
)
def test_impossible_engine_options(tiny_qwen, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        LLM(str(tiny_qwen), **options)


def test_chat_applies_the_template(tiny_llm):
    out = tiny_llm.chat([{"role": "user", "content": "Hello world!"}], GREEDY, use_tqdm=False)[0]
    assert out.prompt.startswith("<|im_start|>user\nHello world!<|im_end|>")
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    with pytest.raises(InvalidRequestError, match="conversation"):
        tiny_llm.chat([{"content": "no role"}], GREEDY, use_tqdm=False)


def test_cpu_kernels_match_the_torch_reference_path(tiny_qwen, monkeypatch):
    from nimblelm.kernels import cpu_ops

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    prompts = PROMPTS[:4]
    fast = LLM(str(tiny_qwen), dtype="float32", max_model_len=256).generate(prompts, params, use_tqdm=False)
    assert cpu_ops() is not None, "the C++ kernels did not build"
    monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
    cpu_ops.cache_clear()
    try:
        reference = LLM(str(tiny_qwen), dtype="float32", max_model_len=256).generate(prompts, params, use_tqdm=False)
    finally:
        monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS")
        cpu_ops.cache_clear()
    for a, b in zip(fast, reference):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_replayed_decode_steps_match_the_layer_by_layer_path(tiny_qwen, quantization, replays):
    # Decode-only steps replay a trace of the model (engine/step_capture.py); the same model run layer by
    # layer from Python (as mixed and prefill steps are) is its oracle, on single and batched decodes.
    # Without prefix caching, so that the second run's first tokens come from the same prefill as the first's.
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=16, quantization=quantization,
              enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    for prompts in (PROMPTS[:1], PROMPTS):
        fast = llm.generate(prompts, params, use_tqdm=False)
        capture, runner.capture = runner.capture, None
        try:
            reference = llm.generate(prompts, params, use_tqdm=False)
        finally:
            runner.capture = capture
        assert replays and max(replays) == len(prompts)
        replays.clear()
        for a, b in zip(fast, reference):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert ea.keys() == eb.keys()
                assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-5 for t in ea)
