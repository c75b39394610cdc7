"""Skeleton-of-Thought (nimblelm/prompting/skeleton.py): parsing, routing, the batched expansion against each
point expanded alone, the assembly order, the fallback to plain decoding, errors; and SmolLM2 end to end."""

import pytest

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.prompting import skeleton

LIST_QUESTION = "What are some tips for sleeping better?"


@pytest.fixture(scope="module")
def llm(tiny_qwen):
    return LLM(str(tiny_qwen), dtype="float32", max_model_len=512)  # rows alone and batched compute alike


@pytest.mark.parametrize("text, points", [
    ("1. Keep a schedule\n2. Dim the lights\n3. Skip late coffee", ["Keep a schedule", "Dim the lights", "Skip late coffee"]),
    ("1) one\n\n2) two\nThat is all.\n3) three", ["one", "two"]),
    ("1. one\n3. three", ["one"]),
    ("Sure! Here it is:\n1. one", []),
    ("1.\n2. two", []),
    ("1. rest\n2. eat well\n3. rest\n4. run", ["rest", "eat well"]),
    ("\n".join(f"{i}. p{i}" for i in range(1, 15)), [f"p{i}" for i in range(1, 11)]),
])
def test_parse_points_follows_the_numbering_from_one(text, points):
    assert skeleton.parse_points(text) == points


@pytest.mark.parametrize("text, part", [
    (" keeps the body's clock steady.\n2. Dim the lights", " keeps the body's clock steady."),
    (": it helps.\n\nSkeleton:\n3. x", ": it helps."),
    ("\nA steady hour to rise.\n\nMore", "\nA steady hour to rise."),
    ("\n\nSkeleton:\n2. x", ""),
    ("", ""),
])
def test_an_expansion_is_its_first_paragraph_before_the_next_point(text, part):
    assert skeleton.own_part(text, 1) == part


@pytest.mark.parametrize("question, suits", [
    (LIST_QUESTION, True),
    ("How can I improve my time management skills?", True),
    ("Compare the advantages of trains and planes for travel.", True),
    ("Who wrote Hamlet?", False),
    ("Write a Python function that lists the primes below n.", False),
    ("What are the solutions of 3 + 4 = x?", False),
])
def test_the_rule_router(question, suits):
    assert skeleton.suits_skeleton(question) is suits


def test_points_expand_in_one_batch_equal_to_each_alone_sharing_their_prefix(llm, monkeypatch):
    points = ["Keep a schedule", "Dim the lights", "Skip late coffee"]
    monkeypatch.setattr(skeleton, "parse_points", lambda text: points)
    params = SamplingParams(temperature=0, max_tokens=12)
    calls = []
    generate = llm.generate
    monkeypatch.setattr(llm, "generate", lambda prompts, *a, **k: calls.append(len(prompts)) or generate(prompts, *a, **k))
    hits = llm.llm_engine.stats().prefix_cache_hits
    out = skeleton.generate(llm, [LIST_QUESTION], params, router="always")[0]
    assert calls == [1, 3]  # the skeleton, then every point at once
    # The points' prompts differ only at their ends: the later ones find the shared start cached.
    assert llm.llm_engine.stats().prefix_cache_hits - hits >= 2 * 16
    alone = [generate(skeleton.point_prompt(llm.tokenizer, LIST_QUESTION, points, i), params, use_tqdm=False)[0]
             for i in (1, 2, 3)]
    assert out.outputs[0].text == "\n".join(skeleton.point_line(points, i, o) for i, o in enumerate(alone, start=1))
    assert [line[:2] for line in out.outputs[0].text.split("\n") if line[:1].isdigit()] == ["1.", "2.", "3."]
    assert out.prompt_token_ids == skeleton.skeleton_prompt(llm.tokenizer, LIST_QUESTION)["prompt_token_ids"]


def test_an_expansion_stops_where_its_point_ends_and_keeps_the_callers_stops():
    """own_part keeps a point's text up to a blank line or the next point's number: decoding stops there."""
    params = SamplingParams(temperature=0, max_tokens=64, stop="THE END")
    assert skeleton.point_params(params, 2).stop_strings == ("THE END", "\n\n", "\n3.")
    assert skeleton.point_params(params, 2).max_tokens == 64


def test_a_question_the_router_refuses_is_plain_decoding(llm):
    params = SamplingParams(temperature=0, max_tokens=10)
    out = llm.generate(["Who wrote Hamlet?"], params, use_tqdm=False, output_organization="skeleton")[0]
    plain = llm.generate(skeleton._chat(llm.tokenizer, "Who wrote Hamlet?", ""), params, use_tqdm=False)[0]
    assert out.skeleton.routed is False and out.outputs[0].text == plain.outputs[0].text
    assert out.prompt == "Who wrote Hamlet?" and out.prompt_token_ids == plain.prompt_token_ids


def test_a_skeleton_of_fewer_than_two_points_falls_back(llm, monkeypatch):
    monkeypatch.setattr(skeleton, "parse_points", lambda text: ["only one"])
    params = SamplingParams(temperature=0, max_tokens=10)
    out = llm.generate([LIST_QUESTION], params, use_tqdm=False, output_organization="skeleton",
                       skeleton_router="always")[0]
    plain = llm.generate(skeleton._chat(llm.tokenizer, LIST_QUESTION, ""), params, use_tqdm=False)[0]
    assert out.skeleton.routed is False and out.outputs[0].text == plain.outputs[0].text


def test_routed_questions_are_answered_point_by_point_in_order(llm, monkeypatch):
    monkeypatch.setattr(skeleton, "parse_points", lambda text: ["Keep a schedule", "Dim the lights"])
    params = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate([LIST_QUESTION, "Who wrote Hamlet?", "How can I learn to cook?"], params, use_tqdm=False,
                        output_organization="skeleton")
    assert [o.skeleton.routed for o in outs] == [True, False, True]
    for out in (outs[0], outs[2]):
        assert out.outputs[0].text.startswith("1. **Keep a schedule**:") and "\n2. **Dim the lights**:" in out.outputs[0].text
        assert out.skeleton.points == ["Keep a schedule", "Dim the lights"]
        assert out.skeleton.skeleton_seconds > 0 and out.skeleton.expansion_seconds > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"output_organization": "tree"}, "the one organization is 'skeleton'"),
    ({"output_organization": "skeleton", "skeleton_router": "coin"}, "router 'coin' is not one of"),
    ({"output_organization": "skeleton", "sampling_params": SamplingParams(n=2)}, "n=1"),
])
def test_impossible_options_are_one_clear_error(llm, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate([LIST_QUESTION], use_tqdm=False, **kwargs)
    with pytest.raises(InvalidRequestError, match="answers text questions"):
        llm.generate([[1, 2, 3]], use_tqdm=False, output_organization="skeleton")


@pytest.mark.integration
def test_smollm2_answers_a_list_question_point_by_point():
    llm = LLM("smollm2-135m", dtype="float32", max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=48)
    out = llm.generate([LIST_QUESTION], params, use_tqdm=False, output_organization="skeleton")[0]
    points = out.skeleton.points
    assert out.skeleton.routed and 2 <= len(points) <= skeleton.MAX_POINTS
    starts = [out.outputs[0].text.index(skeleton.point_head(points, i)) for i in range(1, len(points) + 1)]
    assert starts == sorted(starts) and starts[0] == 0
    # Points stop decoding where their own part ends: the answer of expansions decoded to max_tokens, then cut.
    whole = llm.generate([skeleton.point_prompt(llm.tokenizer, LIST_QUESTION, points, i)
                          for i in range(1, len(points) + 1)], params, use_tqdm=False)
    assert out.outputs[0].text == "\n".join(skeleton.point_line(points, i, o) for i, o in enumerate(whole, start=1))
    assert all(skeleton.own_part(o.outputs[0].text, i) for i, o in enumerate(whole, 1))  # every point expanded
    assert any("\n\n" in o.outputs[0].text or f"\n{i + 1}." in o.outputs[0].text for i, o in enumerate(whole, 1))


def test_generate_sot_on_the_command_line(tiny_qwen, capsys):
    from nimblelm.cli import main

    assert main(["generate", "--model", str(tiny_qwen), "--max-model-len", "512", "--max-tokens", "4",
                 "--threads", "1", "--sot", "Who wrote Hamlet?"]) == 0
    assert "skeleton-of-thought: not used (plain decoding)" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_qwen), "--sot", "--chat", "x"]) == 1
    assert "leave out --chat" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sot_server(tiny_qwen):
    from server_process import ServerProcess

    server = ServerProcess(tiny_qwen, "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16")
    yield server
    server.stop()


def _client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _stage_tokens(llm, question: str, params: SamplingParams) -> int:
    """The tokens every stage of the question's plan generates (router "always")."""
    plan, total = skeleton.plan(llm.tokenizer, question, params, "always"), 0
    stage = next(plan)
    while True:
        outs = llm.generate(stage.prompts, stage.params, use_tqdm=False)
        total += sum(len(o.outputs[0].token_ids) for o in outs)
        try:
            stage = plan.send(outs)
        except StopIteration:
            return total


def test_the_server_answers_as_the_offline_api_streamed_or_not(sot_server, llm):
    client = _client(sot_server)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": LIST_QUESTION}]
    extra = {"output_organization": "skeleton", "skeleton_router": "always"}
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, extra_body=extra)
    expected = skeleton.generate(llm, [LIST_QUESTION], SamplingParams(temperature=0, max_tokens=8), "always")[0]
    assert got.choices[0].message.content == expected.outputs[0].text
    assert got.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert got.usage.completion_tokens == _stage_tokens(llm, LIST_QUESTION, SamplingParams(temperature=0, max_tokens=8))
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                                 extra_body=extra, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.total_tokens == got.usage.total_tokens


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "answers one user message"),
    ({"n": 2}, "n=1"),
    ({"logprobs": True}, "logprobs are not given"),
    ({"skeleton_router": "coin"}, "skeleton_router"),
])
def test_the_servers_skeleton_errors_are_clear_400s(sot_server, body, message):
    import httpx2 as httpx

    request = {"messages": [{"role": "user", "content": LIST_QUESTION}], "output_organization": "skeleton",
               "max_tokens": 4, **body}
    r = httpx.post(f"{sot_server.base_url}/chat/completions", json=request, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


@pytest.mark.integration
def test_smollm2_server_streams_each_point_whole_and_in_order():
    from server_process import ServerProcess

    server = ServerProcess("smollm2-135m", "--max-model-len", "2048")
    try:
        client = _client(server)
        chunks = list(client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": LIST_QUESTION}], max_tokens=48,
            temperature=0, stream=True, extra_body={"output_organization": "skeleton"}))
    finally:
        server.stop()
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    offline = LLM("smollm2-135m", max_model_len=2048).generate(
        [LIST_QUESTION], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False, output_organization="skeleton")[0]
    assert "".join(pieces) == offline.outputs[0].text
    assert [p.lstrip("\n").split(". ")[0] for p in pieces] == [str(i) for i in range(1, len(offline.skeleton.points) + 1)]
