"""The server against the official `openai` client: a real `nimblelm serve` process on loopback, tiny model.

Greedy answers must equal LLM.generate's for the same prompt; usage, finish reasons, streaming
chunks and logprobs must have OpenAI's shapes and exact values.
"""

import asyncio
import json
import re

import httpx2 as httpx
import jsonschema
import openai
import pytest

from nimblelm import SamplingParams

PROMPTS = ["The quick brown fox", "Hello world! How are you today?", "def add(a, b):"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primes."}]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, tiny_server, tiny_qwen):
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_qwen)]
    assert client.models.retrieve(str(tiny_qwen)).id == str(tiny_qwen)
    assert tiny_server.get("/health").json() == {"status": "ok"}


def test_greedy_completions_equal_llm_generate(client, model, tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = tiny_llm.generate(PROMPTS, params, use_tqdm=False)
    got = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == [o.outputs[0].text for o in expected]
    assert [c.finish_reason for c in got.choices] == [o.outputs[0].finish_reason for o in expected]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in expected)
    completion_tokens = sum(len(o.outputs[0].token_ids) for o in expected)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert got.usage.total_tokens == prompt_tokens + completion_tokens
    assert got.object == "text_completion" and got.id.startswith("cmpl-")


def test_greedy_chat_equals_llm_chat(client, model, tiny_llm):
    expected = tiny_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    got = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert choice.finish_reason == expected.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_length_and_max_completion_tokens(client, model):
    got = client.chat.completions.create(
        model=model, messages=MESSAGES, max_completion_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 7


def test_streamed_completion_equals_the_whole_one(client, model):
    whole = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)  # no usage without stream_options.include_usage


def test_streamed_chat_role_first_usage_last(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_framing(tiny_server, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", tiny_server.base_url + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_choices_with_seed_are_reproducible(client, model):
    def ask():
        return client.chat.completions.create(
            model=model, messages=MESSAGES, n=3, temperature=1.0, seed=7, max_tokens=10, extra_body={"ignore_eos": True}
        )

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1  # seed + index: the choices differ
    assert first.usage.completion_tokens == 30


def test_n_choices_stream(client, model):
    chunks = list(client.completions.create(model=model, prompt="Hello", n=2, max_tokens=6, temperature=0.8, seed=1,
                                            stream=True, extra_body={"ignore_eos": True}))
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason == "length")
    assert finished == [0, 1]


def test_stop_string_cuts_the_text_streamed_or_not(client, model):
    text = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=24, temperature=0).choices[0].text
    stop = text[6:9]
    assert len(stop) == 3 and text.find(stop) >= 3
    got = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == text[: text.find(stop)]
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=model, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text


def test_completion_logprobs_match_the_engine(client, model, tiny_llm):
    expected = tiny_llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3), use_tqdm=False)
    out = expected[0].outputs[0]
    lp = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3)
    lp = lp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(out.token_ids)
    for i, token in enumerate(out.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(out.logprobs[i][token].logprob, abs=1e-5)
        assert 1 <= len(lp.top_logprobs[i]) <= 4
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_returns_the_prompt_scored(client, model, tiny_llm):
    # What lm-evaluation-harness's loglikelihood requests send: the text, echo, logprobs, max_tokens 0.
    prompt = PROMPTS[1]
    ids = tiny_llm.tokenizer.encode(prompt)
    expected = tiny_llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    choice = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0).choices[0]
    lp = choice.logprobs
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected.prompt_logprobs[i][ids[i]].logprob, abs=1e-5)
        assert 1 <= len(lp.top_logprobs[i]) <= 2
    assert "".join(lp.tokens) == prompt and lp.text_offset == sorted(lp.text_offset)
    # With a completion, echoed or streamed, the prompt comes first and the offsets run on.
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=0,
                                      temperature=0).choices[0]
    streamed = client.completions.create(model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=0,
                                         temperature=0, stream=True)
    parts = [c.choices[0] for c in streamed if c.choices]
    assert whole.text.startswith(prompt) and "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.logprobs.tokens] == whole.logprobs.tokens
    assert [o for p in parts for o in p.logprobs.text_offset] == whole.logprobs.text_offset
    assert whole.logprobs.text_offset[len(ids)] == len(prompt)


def test_tokenizer_routes_use_the_served_tokenizer(tiny_server, tiny_llm):
    tokenizer = tiny_llm.tokenizer
    ids = tiny_server.post("/tokenize", json={"prompt": PROMPTS[1], "add_special_tokens": False}).json()
    assert ids["tokens"] == tokenizer.encode(PROMPTS[1], add_special_tokens=False) and ids["count"] == len(ids["tokens"])
    assert tiny_server.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": PROMPTS[1]}
    info = tiny_server.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == 512
    bad = tiny_server.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_chat_logprobs_shape(client, model):
    got = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top-1 token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert isinstance(entry.bytes, list) and entry.bytes
    streamed = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_extra_sampling_fields_are_accepted(client, model):
    greedy = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=8, temperature=0)
    top1 = client.completions.create(
        model=model, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, extra_body={"top_k": 1}
    )
    assert top1.choices[0].text == greedy.choices[0].text
    other = client.completions.create(
        model=model, prompt=PROMPTS[2], max_tokens=8, temperature=0.5, presence_penalty=0.5, frequency_penalty=0.5,
        user="someone", extra_body={"min_p": 0.1, "repetition_penalty": 1.2},
    )
    assert other.choices[0].finish_reason in ("stop", "length")


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


def test_json_schema_output_validates(client, model):
    got = client.chat.completions.create(
        model=model, messages=MESSAGES, n=4, temperature=1.0, seed=3, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=60, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed)), SCHEMA)


def test_structured_outputs_regex_and_choice(client, model):
    """vLLM's `structured_outputs` field, as its users pass it through the openai client."""
    regex = r"[0-9]{3}-[a-z]{2,4}"
    got = client.completions.create(model=model, prompt="Hi", n=3, temperature=1.0, seed=2, max_tokens=20,
                                    extra_body={"structured_outputs": {"regex": regex}})
    assert all(re.fullmatch(regex, c.text) for c in got.choices)
    chat = client.chat.completions.create(model=model, messages=MESSAGES, temperature=1.0, seed=2, max_tokens=20,
                                          extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert chat.choices[0].message.content in ("red", "green")


def test_async_client_concurrent_requests(tiny_server, model, tiny_llm):
    expected = [o.outputs[0].text for o in tiny_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10),
                                                                use_tqdm=False)]

    async def main():
        client = openai.AsyncOpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0)

        async def whole(prompt):
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
            return r.choices[0].text

        async def streamed(prompt):
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0,
                                                     stream=True)
            return "".join([c.choices[0].text async for c in stream])

        async def chat():
            r = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5)
            return r.choices[0].finish_reason

        results = await asyncio.gather(*[whole(p) for p in PROMPTS], *[streamed(p) for p in PROMPTS], chat(), chat())
        await client.close()
        return results

    results = asyncio.run(main())
    assert results[:3] == expected and results[3:6] == expected
    assert all(r in ("stop", "length") for r in results[6:])


def test_props_and_metrics(tiny_server, model):
    props = tiny_server.get("/props").json()
    assert props["model"] == model
    assert props["engine"]["max_model_len"] == 512 and props["engine"]["max_num_seqs"] == 16
    assert props["server"]["host"] == "127.0.0.1" and props["server"]["api_key_required"] is False
    assert props["structured_output"] == {"backend": "llguidance", "available": True}
    metrics = tiny_server.wait_idle()
    assert metrics["nimblelm_generation_tokens_total"] > 0 and metrics["nimblelm_prompt_tokens_total"] > 0
    assert metrics["nimblelm_time_to_first_token_seconds_count"] > 0
    assert metrics["nimblelm_inter_token_latency_seconds_count"] > 0
    assert metrics['nimblelm_requests_finished_total{reason="length"}'] > 0
    assert metrics["nimblelm_kv_cache_used_blocks"] == 0
    assert metrics["nimblelm_kv_cache_blocks"] == props["engine"]["num_kv_blocks"]
    schema = tiny_server.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_prefix_cache_counters_in_tokens(tiny_server, client, model):
    before = tiny_server.wait_idle()
    prompt = "A shared preamble that spans several KV blocks of the tiny model. " * 2
    for _ in range(2):
        client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    after = tiny_server.wait_idle()
    queried = after["nimblelm_prefix_cache_queries_total"] - before["nimblelm_prefix_cache_queries_total"]
    hits = after["nimblelm_prefix_cache_hits_total"] - before["nimblelm_prefix_cache_hits_total"]
    # Both prompts are looked up in full; the second finds all of the first's full blocks but its last.
    assert queried > 100 and queried / 2 - 16 <= hits < queried / 2
