"""The server under load and abuse, on loopback only, bounded in count and time: cancellation bursts,
a mixed soak, and property-based fuzzing of the published OpenAPI schema. Afterwards the engine
must be idle with every KV block free, and the server's memory flat."""

import asyncio
import json
import random
import time

import httpx2 as httpx
import jsonschema
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

CHAT = [{"role": "user", "content": "Tell me a story."}]
SCHEMA = {
    "type": "object",
    "properties": {"word": {"type": "string", "maxLength": 6}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["word", "n"],
    "additionalProperties": False,
}
CANCELLED_TOKENS = 480  # the tiny server's context (512) less the prompts'
BAD = [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": CHAT, "temperature": 5},
    {"messages": CHAT, "max_tokens": -3},
    {"messages": CHAT, "model": "not-this-one"},
    {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 1}}}},
]


def finished(metrics, reason):
    return metrics.get(f'nimblelm_requests_finished_total{{reason="{reason}"}}', 0.0)


async def stream_lines(http, route, body, keep=None):
    """The SSE data lines of one streamed request; with `keep`, stop (and close the response) after that many."""
    lines = []
    async with http.stream("POST", route, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line:
                lines.append(line[len("data: ") :])
                if keep is not None and len(lines) >= keep:
                    break
    return lines


def test_cancel_and_disconnect_burst_frees_every_block(tiny_server):
    before = tiny_server.wait_idle()
    # Requests whose clients hang up ask for the whole context: run to their end they would take about a second,
    # ten times the moment their clients go, so a loaded machine's pauses cannot let them finish first.
    long = {"max_tokens": CANCELLED_TOKENS, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=60) as http:
            # Two non-streaming clients that give up once their requests run: the disconnect must abort them.
            gone = [asyncio.create_task(http.post("/completions", json={
                "prompt": f"Story {i}", "max_tokens": CANCELLED_TOKENS, "ignore_eos": True})) for i in range(2)]
            while tiny_server.metrics()["nimblelm_requests_running"] < 2:
                await asyncio.sleep(0.005)
            for task in gone:
                task.cancel()

            async def full(i):
                lines = await stream_lines(http, "/completions", {"prompt": f"Story {i}", "max_tokens": 30,
                                                                  "stream": True})
                assert lines[-1] == "[DONE]"

            async def cancelled(i):  # read the role chunk and one token, then hang up
                await stream_lines(http, "/chat/completions", {"messages": CHAT, **long}, keep=2)

            await asyncio.gather(*[full(i) for i in range(8)], *[cancelled(i) for i in range(6)])
            for task in gone:
                with pytest.raises(asyncio.CancelledError):
                    await task

    asyncio.run(asyncio.wait_for(main(), 60))
    after = tiny_server.wait_idle(timeout=10)
    assert after["nimblelm_kv_cache_used_blocks"] == 0
    ended = {reason: finished(after, reason) - finished(before, reason) for reason in ("abort", "length", "stop")}
    assert ended["abort"] == 8, ended  # aborted, not run to the end (the counts say which way the others ended)
    assert finished(after, "length") + finished(after, "stop") - finished(before, "length") - finished(
        before, "stop") == 8


def test_a_client_that_does_not_read_holds_up_nobody(tiny_server):
    body = {"prompt": "Slow", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", tiny_server.base_url + "/completions", json=body, timeout=60) as slow:
        start = time.monotonic()
        r = tiny_server.post("/v1/completions", json={"prompt": "Fast", "max_tokens": 8})
        assert r.status_code == 200 and time.monotonic() - start < 5
        tiny_server.wait_idle(timeout=10)  # the slow request is generated to its end while nobody reads it
        lines = [line for line in slow.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_soak_mixed_traffic_loses_nothing_and_leaks_nothing(tiny_server):
    """16 concurrent clients, mixed requests (streaming, cancelled, bad, structured), two rounds; the
    second must not grow the server's memory."""
    process = psutil.Process(tiny_server.proc.pid)

    async def round_(num_requests, seed):
        rng = random.Random(seed)
        outcomes = []
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=60) as http:
            async def one(i):
                kind = i % 6
                if kind == 0:
                    max_tokens = rng.randint(1, 24)
                    r = await http.post("/completions", json={"prompt": f"Number {i}", "max_tokens": max_tokens,
                                                               "temperature": 0.7})
                    assert r.status_code == 200, r.text
                    choice, usage = r.json()["choices"][0], r.json()["usage"]
                    assert usage["completion_tokens"] <= max_tokens
                    assert choice["finish_reason"] == "stop" or usage["completion_tokens"] == max_tokens
                    outcomes.append(("ok", 1))
                elif kind == 1:
                    lines = await stream_lines(http, "/chat/completions", {
                        "messages": CHAT, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}})
                    assert lines[-1] == "[DONE]"
                    chunks = [json.loads(line) for line in lines[:-1]]
                    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
                    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 16
                    outcomes.append(("ok", 1))
                elif kind == 2:
                    await stream_lines(http, "/chat/completions", {"messages": CHAT, "max_tokens": CANCELLED_TOKENS,
                                                                   "ignore_eos": True, "stream": True}, keep=2)
                    outcomes.append(("cancelled", 1))
                elif kind == 3:
                    r = await http.post("/chat/completions", json=rng.choice(BAD))
                    assert r.status_code in (400, 404) and r.json()["error"]["message"], r.text
                    outcomes.append(("bad", 0))
                elif kind == 4:
                    r = await http.post("/chat/completions", json={"messages": CHAT, "n": 2, "max_tokens": 8,
                                                                    "seed": i, "temperature": 1.0})
                    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
                    outcomes.append(("ok", 2))
                else:
                    r = await http.post("/chat/completions", json={
                        "messages": CHAT, "max_tokens": 40, "temperature": 1.0, "seed": i,
                        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}})
                    assert r.status_code == 200, r.text
                    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMA)
                    outcomes.append(("ok", 1))

            queue = list(range(num_requests))

            async def client():
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*[client() for _ in range(16)])
        return outcomes

    def run(num_requests, seed):
        before = tiny_server.wait_idle()
        outcomes = asyncio.run(asyncio.wait_for(round_(num_requests, seed), 120))
        after = tiny_server.wait_idle(timeout=10)
        assert len(outcomes) == num_requests  # every request got its answer
        choices = sum(n for kind, n in outcomes if kind == "ok")
        done = sum(finished(after, r) - finished(before, r) for r in ("stop", "length"))
        assert done == choices
        cancelled = sum(1 for kind, _ in outcomes if kind == "cancelled")
        assert finished(after, "abort") - finished(before, "abort") == cancelled
        assert after["nimblelm_kv_cache_used_blocks"] == 0

    run(96, seed=1)  # warm-up: allocator pools and caches reach their size
    rss = process.memory_info().rss
    run(192, seed=2)
    growth = process.memory_info().rss - rss
    assert growth < 48 << 20, f"the server grew by {growth >> 20} MiB over 192 requests"


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_openapi_schema_never_gets_a_5xx(tiny_server, mode):
    """Property-based requests from the server's own OpenAPI schema: valid ones (positive) must be
    served, invalid ones (negative) refused with a documented 4xx; nothing may be a 5xx."""
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")
    generation = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    if mode == "negative":  # only the bodies have something to get wrong (any string is a valid model id)
        operations = [op for op in operations if op.method.upper() == "POST"]
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(base_url=tiny_server.url, checks=[not_a_server_error, status_code_conformance],
                                   timeout=60)

        check()
    assert tiny_server.get("/health").status_code == 200
    assert tiny_server.wait_idle(timeout=30)["nimblelm_kv_cache_used_blocks"] == 0
