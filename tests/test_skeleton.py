"""Skeleton-of-Thought (nimblelm/prompting/skeleton.py): parsing, routing, the batched expansion against each
point expanded alone, the assembly order, the fallback to plain decoding, errors; and SmolLM2 end to end."""

import pytest

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.prompting import skeleton

LIST_QUESTION = "What are some tips for sleeping better?"


@pytest.fixture(scope="module")
def llm(tiny_qwen):
    return LLM(str(tiny_qwen), max_model_len=512)


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
    assert skeleton._own_part(text, 1) == part


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


def test_expansion_is_one_batch_equal_to_each_point_alone_and_shares_its_prefix(llm):
    points = ["Keep a schedule", "Dim the lights", "Skip late coffee"]
    params = SamplingParams(temperature=0, max_tokens=12)
    hits = llm.llm_engine.stats().prefix_cache_hits
    ((text, outs),) = skeleton.expand(llm, [(LIST_QUESTION, points)], params)
    # The points' prompts differ only at their ends: the later ones find the shared start cached.
    assert llm.llm_engine.stats().prefix_cache_hits - hits >= 2 * 16
    alone = [llm.generate(skeleton.point_prompt(llm, LIST_QUESTION, points, i), params, use_tqdm=False)[0]
             for i in (1, 2, 3)]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in alone]
    lines = text.split("\n")
    for i, point in enumerate(points, start=1):
        assert any(line.startswith(f"{i}. {point}") for line in lines)
    assert [line[:2] for line in lines if line[:1].isdigit()] == ["1.", "2.", "3."]


def test_a_question_the_router_refuses_is_plain_decoding(llm):
    params = SamplingParams(temperature=0, max_tokens=10)
    out = llm.generate(["Who wrote Hamlet?"], params, use_tqdm=False, output_organization="skeleton")[0]
    plain = llm.generate(skeleton._chat(llm, "Who wrote Hamlet?", ""), params, use_tqdm=False)[0]
    assert out.skeleton.routed is False and out.outputs[0].text == plain.outputs[0].text
    assert out.prompt == "Who wrote Hamlet?"


def test_a_skeleton_of_fewer_than_two_points_falls_back(llm, monkeypatch):
    monkeypatch.setattr(skeleton, "parse_points", lambda text: ["only one"])
    params = SamplingParams(temperature=0, max_tokens=10)
    out = llm.generate([LIST_QUESTION], params, use_tqdm=False, output_organization="skeleton",
                       skeleton_router="always")[0]
    plain = llm.generate(skeleton._chat(llm, LIST_QUESTION, ""), params, use_tqdm=False)[0]
    assert out.skeleton.routed is False and out.outputs[0].text == plain.outputs[0].text


def test_routed_questions_are_answered_point_by_point_in_order(llm, monkeypatch):
    monkeypatch.setattr(skeleton, "parse_points", lambda text: ["Keep a schedule", "Dim the lights"])
    params = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate([LIST_QUESTION, "Who wrote Hamlet?", "How can I learn to cook?"], params, use_tqdm=False,
                        output_organization="skeleton")
    assert [o.skeleton.routed for o in outs] == [True, False, True]
    for out in (outs[0], outs[2]):
        assert out.outputs[0].text.startswith("1. Keep a schedule") and "\n2. Dim the lights" in out.outputs[0].text
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
    llm = LLM("smollm2-135m", max_model_len=2048)
    out = llm.generate([LIST_QUESTION], SamplingParams(temperature=0, max_tokens=48), use_tqdm=False,
                       output_organization="skeleton")[0]
    points = out.skeleton.points
    assert out.skeleton.routed and 2 <= len(points) <= skeleton.MAX_POINTS
    starts = [out.outputs[0].text.index(f"{i}. {p}") for i, p in enumerate(points, start=1)]
    assert starts == sorted(starts) and starts[0] == 0


def test_generate_sot_on_the_command_line(tiny_qwen, capsys):
    from nimblelm.cli import main

    assert main(["generate", "--model", str(tiny_qwen), "--max-model-len", "512", "--max-tokens", "4",
                 "--threads", "1", "--sot", "Who wrote Hamlet?"]) == 0
    assert "skeleton-of-thought: not used (plain decoding)" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_qwen), "--sot", "--chat", "x"]) == 1
    assert "leave out --chat" in capsys.readouterr().err
