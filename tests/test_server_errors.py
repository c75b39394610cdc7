"""Bad input: every case gets OpenAI's error body with the right status, and the next request still works.

One server with an API key and tight limits serves the whole module.
"""

import json
import signal
import time

import httpx2 as httpx
import openai
import pytest
from server_process import ServerProcess

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512
MAX_BYTES = 20000


@pytest.fixture(scope="module")
def server(tiny_qwen):
    server = ServerProcess(
        tiny_qwen, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "2",
        env={"NIMBLELM_API_KEY": KEY, "NIMBLELM_MAX_WAITING_REQUESTS": "1", "NIMBLELM_MAX_REQUEST_BYTES": str(MAX_BYTES),
             "NIMBLELM_SHUTDOWN_TIMEOUT": "5"},
    )
    yield server
    server.stop()


def chat(content="Hi", **fields):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def assert_serving(server):
    r = server.post("/v1/chat/completions", json=chat(), headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


CASES = [
    # name, route, body (dict: JSON; bytes: raw), status, type, code, param
    ("malformed JSON", "chat/completions", b'{"messages": [', 400, "invalid_request_error", "invalid_json", None),
    ("body not an object", "chat/completions", b"[1, 2]", 400, "invalid_request_error", "invalid_type", None),
    ("max_tokens a string", "chat/completions", chat(max_tokens="5"), 400, "invalid_request_error", "invalid_type",
     "max_tokens"),
    ("messages a string", "chat/completions", {"messages": "hello"}, 400, "invalid_request_error", "invalid_type",
     "messages"),
    ("temperature a string", "completions", {"prompt": "Hi", "temperature": "hot"}, 400, "invalid_request_error",
     "invalid_type", "temperature"),
    ("unknown model", "chat/completions", chat(model="gpt-4o"), 404, "invalid_request_error", "model_not_found",
     "model"),
    ("missing messages", "chat/completions", {"max_tokens": 2}, 400, "invalid_request_error",
     "missing_required_parameter", "messages"),
    ("empty messages", "chat/completions", {"messages": []}, 400, "invalid_request_error", "invalid_value",
     "messages"),
    ("missing prompt", "completions", {"max_tokens": 2}, 400, "invalid_request_error", "missing_required_parameter",
     "prompt"),
    ("bad role", "chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "invalid_request_error", "invalid_value", "messages.0.role"),
    ("tool role", "chat/completions", {"messages": [{"role": "tool", "content": "Hi"}]}, 400,
     "invalid_request_error", "invalid_value", "messages.0.role"),
    ("message without content", "chat/completions", {"messages": [{"role": "user"}]}, 400, "invalid_request_error",
     None, None),
    ("image content", "chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "invalid_request_error", None, None),
    ("negative max_tokens", "completions", {"prompt": "Hi", "max_tokens": -1}, 400, "invalid_request_error",
     "invalid_value", "max_tokens"),
    ("zero max_tokens", "chat/completions", chat(max_tokens=0), 400, "invalid_request_error", "invalid_value",
     "max_tokens"),
    ("temperature too high", "chat/completions", chat(temperature=2.5), 400, "invalid_request_error",
     "invalid_value", "temperature"),
    ("temperature negative", "completions", {"prompt": "Hi", "temperature": -0.1}, 400, "invalid_request_error",
     "invalid_value", "temperature"),
    ("top_p zero", "completions", {"prompt": "Hi", "top_p": 0}, 400, "invalid_request_error", "invalid_value",
     "top_p"),
    ("n zero", "chat/completions", chat(n=0), 400, "invalid_request_error", "invalid_value", "n"),
    ("empty stop string", "completions", {"prompt": "Hi", "stop": [""]}, 400, "invalid_request_error", None, None),
    ("too many logprobs", "completions", {"prompt": "Hi", "logprobs": 50}, 400, "invalid_request_error",
     "invalid_value", "logprobs"),
    ("top_logprobs without logprobs", "chat/completions", chat(top_logprobs=2), 400, "invalid_request_error", None,
     None),
    ("prompt over max_model_len", "completions", {"prompt": "word " * 600}, 400, "invalid_request_error",
     "context_length_exceeded", "prompt"),
    ("prompt plus max_tokens over max_model_len", "chat/completions", chat(max_tokens=MAX_MODEL_LEN), 400,
     "invalid_request_error", "context_length_exceeded", "max_tokens"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "invalid_request_error", None, "prompt"),
    ("token id out of vocabulary", "completions", {"prompt": [1, 2, 10**6]}, 400, "invalid_request_error", None,
     "prompt"),
    ("invalid JSON schema", "chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}), 400,
     "invalid_request_error", "invalid_json_schema", "response_format"),
    ("json_schema without schema", "chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "invalid_request_error",
     None, None),
    ("invalid regex", "completions", {"prompt": "Hi", "structured_outputs": {"regex": "(a|b"}}, 400,
     "invalid_request_error", "invalid_regex", "structured_outputs"),
    ("structured_outputs with two constraints", "completions",
     {"prompt": "Hi", "structured_outputs": {"regex": "a+", "choice": ["a"]}}, 400, "invalid_request_error", None,
     None),
    ("structured_outputs beside response_format", "chat/completions",
     chat(response_format={"type": "json_object"}, structured_outputs={"choice": ["a"]}), 400,
     "invalid_request_error", None, None),
    ("unknown response_format", "chat/completions", chat(response_format={"type": "yaml"}), 400,
     "invalid_request_error", "invalid_value", "response_format.type"),
    ("tools", "chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "invalid_request_error", None, None),
    ("logit_bias", "completions", {"prompt": "Hi", "logit_bias": {"5": 10}}, 400, "invalid_request_error", None,
     None),
    ("stream_options without stream", "chat/completions", chat(stream_options={"include_usage": True}), 400,
     "invalid_request_error", None, None),
    ("suffix", "completions", {"prompt": "Hi", "suffix": "!"}, 400, "invalid_request_error", None, None),
    ("seed out of range", "completions", {"prompt": "Hi", "seed": -1}, 400, "invalid_request_error", "invalid_value",
     "seed"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, case):
    _, route, body, status, type_, code, param = case
    kwargs = {"content": body, "headers": AUTH | {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body, "headers": AUTH}
    r = server.post("/v1/" + route, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert_serving(server)


def test_api_key_is_required_except_for_health_and_metrics(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = server.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert server.get("/v1/models").status_code == 401
    assert server.get("/props").status_code == 401
    assert server.get("/health").status_code == 200 and server.get("/metrics").status_code == 200
    client = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    good = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert good.models.list().data
    assert_serving(server)


def test_openai_client_maps_the_errors(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    assert_serving(server)


def test_body_size_limit(server):
    big = json.dumps(chat("x" * MAX_BYTES)).encode()
    r = server.post("/v1/chat/completions", content=big, headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit counts bytes as they arrive
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    r = server.post("/v1/chat/completions", content=chunks(), headers=AUTH | {"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert_serving(server)


def test_unknown_route_and_method(server):
    r = server.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = server.get("/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert_serving(server)


def test_too_many_waiting_requests_get_503(server):
    # max_num_seqs 2 + 1 waiting: three long generations fill the server; the fourth is refused at once.
    body = chat(max_tokens=480, ignore_eos=True, stream=True)
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
        streams = [http.stream("POST", "/chat/completions", json=body) for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]  # kept: dropping one closes its response
        try:
            for r, it in zip(responses, lines):
                assert r.status_code == 200
                next(it)  # the role chunk: the request is in flight (the third one waiting)
            start = time.monotonic()
            r = http.post("/chat/completions", json=chat())
            assert r.status_code == 503 and time.monotonic() - start < 5
            assert r.json()["error"]["code"] == "server_overloaded" and r.headers["retry-after"] == "1"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    m = server.wait_idle()
    assert m["nimblelm_kv_cache_used_blocks"] == 0
    # Closed mid-generation they are aborted; on a fast machine some finish their 480 tokens first.
    ended = [m.get(f'nimblelm_requests_finished_total{{reason="{r}"}}', 0) for r in ("abort", "length")]
    assert sum(ended) >= 3
    assert_serving(server)


def test_sigint_with_a_short_timeout_aborts_and_exits_0(tiny_qwen):
    # The whole request takes about 0.2 s on the tiny model (Xeon, 2 threads): the timeout must be far below.
    server = ServerProcess(tiny_qwen, "--max-model-len", str(MAX_MODEL_LEN), "--shutdown-timeout", "0.02")
    body = {"prompt": "Hello", "max_tokens": 480, "ignore_eos": True, "stream": True, "n": 4}
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGINT)
        with pytest.raises(httpx.RemoteProtocolError):  # cut off: the stream never ends with [DONE]
            for _ in lines:
                pass
    assert server.stop(timeout=30) == 0, server.errors()


def test_sigterm_finishes_in_flight_requests_and_exits_0(server):
    # Last in this module: it stops the module's server. In-flight requests get --shutdown-timeout (5 s).
    body = chat(max_tokens=200, ignore_eos=True, stream=True)
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"  # finished, not cut
    assert server.stop(timeout=30) == 0, server.errors()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
