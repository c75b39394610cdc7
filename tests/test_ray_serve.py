"""Engine replicas behind one endpoint on Ray Serve (server/ray_serve.py): `nimblelm serve --data-parallel-size 2`
on a local Ray cluster, against one engine in this process as the oracle."""

import concurrent.futures

import httpx2 as httpx
import pytest
from server_process import ServerProcess

from nimblelm import SamplingParams
from nimblelm.server.ray_serve import PREFIX_CHARS, PrefixAffinityRouter, prompt_prefix

pytest.importorskip("ray.serve")


class _Replica:
    def __init__(self, replica_id):
        self.replica_id = replica_id


class _Pending:
    def __init__(self, prefix):
        self.kwargs = {"prefix": prefix}


def test_prompt_prefix_reads_completions_and_chats():
    assert prompt_prefix(b'{"prompt": "abc"}') == "abc"
    assert prompt_prefix(b'{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}') \
        == "be briefhi"
    assert prompt_prefix(("{\"prompt\": \"" + "x" * 2000 + "\"}").encode()) == "x" * PREFIX_CHARS
    assert prompt_prefix(b"not json") == "" and prompt_prefix(b"[1, 2]") == ""


def test_router_ranks_the_prefix_owner_first():
    import asyncio

    router = object.__new__(PrefixAffinityRouter)  # the policy alone, without Ray Serve's routing loop
    router.initialize_state(max_prefixes=2)
    a, b, c = _Replica("a"), _Replica("b"), _Replica("c")
    ranks = asyncio.run(router.choose_replicas([a, b, c], _Pending("shared system prompt")))
    assert len(ranks) == 1 and {r.replica_id for r in ranks[0]} == {"a", "b", "c"}  # unknown: the shortest queue
    router.on_request_routed(_Pending("shared system prompt"), "b", None)
    ranks = asyncio.run(router.choose_replicas([a, b, c], _Pending("shared system prompt")))
    assert [r.replica_id for r in ranks[0]] == ["b"] and {r.replica_id for r in ranks[1]} == {"a", "c"}
    for prefix in ("p1", "p2"):  # the least recently routed prefix is forgotten
        router.on_request_routed(_Pending(prefix), "a", None)
    assert len(asyncio.run(router.choose_replicas([a, b, c], _Pending("shared system prompt")))) == 1


@pytest.fixture(scope="module")
def replicas(tiny_qwen):
    server = ServerProcess(tiny_qwen, "--dtype", "float32", "--max-model-len", "128", "--data-parallel-size", "2",
                           "--shutdown-timeout", "1")
    server.model_name = str(tiny_qwen)
    yield server
    assert server.stop() == 0


def _complete(server, prompt: str, **extra) -> httpx.Response:
    body = {"model": server.model_name, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(server.base_url + "/completions", json=body, timeout=120)


@pytest.mark.slow
def test_replicas_answer_as_one_engine(replicas, tiny_llm):
    expected = tiny_llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    response = _complete(replicas, "Hello world")
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == expected[0].outputs[0].text
    chunks = []
    with httpx.stream("POST", replicas.base_url + "/chat/completions", timeout=120, json={
            "model": replicas.model_name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        chunks = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and len(chunks) >= 3
    bad = _complete(replicas, "Hello", temperature=-1)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"


@pytest.mark.slow
def test_requests_sharing_a_prefix_go_to_one_replica(replicas):
    system = "You are a helpful assistant who answers questions about rivers and mountains. " * 8
    owners = {_complete(replicas, system + f"Question {i}?").headers["x-nimblelm-replica"] for i in range(4)}
    assert len(owners) == 1
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda i: _complete(replicas, f"Distinct prompt {i}", max_tokens=24), range(12)))
    assert all(a.status_code == 200 for a in answers)
    assert len({a.headers["x-nimblelm-replica"] for a in answers}) == 2  # the rest spread over both
