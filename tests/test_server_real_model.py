"""The server on the default packaged model (SmolLM2-135M-Instruct): greedy answers equal LLM.chat's,
and structured output parses and validates with a model that writes real JSON."""

import json

import jsonschema
import openai
import pytest
from server_process import ServerProcess

from nimblelm import LLM, SamplingParams

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
QUESTIONS = ["What is the capital of France? Answer in one word.", "Explain in two sentences why the sky is blue."]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(MODEL, "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "8")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_greedy_chat_equals_llm_chat(client):
    llm = LLM(MODEL, dtype="float32", max_model_len=1024, max_num_seqs=8)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    for conversation, want in zip(conversations, expected):
        got = client.chat.completions.create(model=MODEL, messages=conversation, temperature=0, max_tokens=32)
        assert got.choices[0].message.content == want.outputs[0].text
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
    assert expected[0].outputs[0].text.startswith("The capital of France is Paris")
    stream = client.chat.completions.create(model=MODEL, messages=conversations[1], temperature=0, max_tokens=32,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected[1].outputs[0].text


def test_json_object_parses(client):
    got = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=120, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as a JSON object with its name and color."}],
    )
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(got.choices[0].message.content), dict)


def test_json_schema_validates(client):
    got = client.chat.completions.create(
        model=MODEL, temperature=0.7, seed=1, n=2, max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        messages=[{"role": "user", "content": "Invent a person: name, age and city, as JSON."}],
    )
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_multibyte_characters_are_never_split(client):
    messages = [{"role": "user", "content": "Write the French words café, crème brûlée and naïve, then a ☕ emoji."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=48)
    text = whole.choices[0].message.content
    assert any(ord(ch) > 127 for ch in text)  # the answer has multi-byte characters to split
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=48, stream=True)]
    assert "".join(deltas) == text and "\ufffd" not in text

