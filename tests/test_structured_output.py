"""Structured output in the engine: grammar masks in the sampler keep every sequence inside its JSON schema."""

import json
import re

import jsonschema
import pytest
import torch

from nimblelm import InvalidRequestError, SamplingParams
from nimblelm.engine.structured import apply_bitmask, grammar_bitmask
from nimblelm.sampling_params import StructuredOutputParams

SCHEMA = {
    "type": "object",
    "properties": {
        "tag": {"type": "string", "maxLength": 5},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b", "c"]},
    },
    "required": ["tag", "count", "ok", "kind"],
    "additionalProperties": False,
}


def test_every_sampled_output_validates(tiny_llm):
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=80,
                            structured_output=StructuredOutputParams(json_schema=SCHEMA))
    outputs = tiny_llm.generate(["Hello world", "def add(a, b):"], params, use_tqdm=False)
    for output in outputs:
        for completion in output.outputs:
            assert completion.finish_reason == "stop"  # ended by the grammar, not by max_tokens
            jsonschema.validate(json.loads(completion.text), SCHEMA)
    # Without the grammar the tiny random model writes no JSON at all.
    free = tiny_llm.generate("Hello world", SamplingParams(temperature=1.0, seed=11, max_tokens=80), use_tqdm=False)
    with pytest.raises(ValueError):
        json.loads(free[0].outputs[0].text)


def test_greedy_structured_output_is_deterministic_and_leaves_others_alone(tiny_llm):
    constrained = SamplingParams(temperature=0, max_tokens=80, structured_output=StructuredOutputParams(json_schema=SCHEMA))
    plain = SamplingParams(temperature=0, max_tokens=12)
    alone = tiny_llm.generate("The quick brown fox", plain, use_tqdm=False)[0].outputs[0].text
    # A constrained and a plain request in one batch: the mask applies to its own row only.
    mixed = tiny_llm.generate(["Rivers", "The quick brown fox"], [constrained, plain], use_tqdm=False)
    assert mixed[1].outputs[0].text == alone
    again = tiny_llm.generate("Rivers", constrained, use_tqdm=False)
    assert mixed[0].outputs[0].text == again[0].outputs[0].text
    jsonschema.validate(json.loads(again[0].outputs[0].text), SCHEMA)


def test_invalid_schemas_are_refused_before_anything_runs(tiny_llm):
    for bad in ({"type": "strng"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}):
        with pytest.raises(InvalidRequestError, match="invalid JSON schema"):
            tiny_llm.generate("Hi", SamplingParams(structured_output=StructuredOutputParams(json_schema=bad)))
    assert not tiny_llm.llm_engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputParams()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputParams(json_schema={"type": "object"}, json_object=True)
    with pytest.raises(InvalidRequestError, match="invalid regex"):
        tiny_llm.generate("Hi", SamplingParams(structured_output=StructuredOutputParams(regex="(a|b")))
    with pytest.raises(InvalidRequestError, match="non-empty list of strings"):
        StructuredOutputParams(choice=[])
    assert not tiny_llm.llm_engine.has_unfinished_requests()


def test_regex_and_choice_bound_the_whole_text(tiny_llm):
    """Sampled freely, the tiny random model matches neither; every sample does under the grammar."""
    regex = r"(Mon|Tue)day: [0-9]{1,2} (cats|dogs)( and [a-z]{2,8})?\."
    choice = ["yes", "no", "not sure (ask again)"]
    for spec, fits in ((StructuredOutputParams(regex=regex), lambda t: re.fullmatch(regex, t)),
                       (StructuredOutputParams(choice=choice), lambda t: t in choice)):
        params = SamplingParams(n=6, temperature=1.0, seed=5, max_tokens=40, structured_output=spec)
        for completion in tiny_llm.generate(["Hello world", "def add(a, b):"], params, use_tqdm=False)[0].outputs:
            assert fits(completion.text) and completion.finish_reason == "stop"
    free = tiny_llm.generate("Hello world", SamplingParams(n=6, temperature=1.0, seed=5, max_tokens=40), use_tqdm=False)
    assert not any(re.fullmatch(regex, c.text) or c.text in choice for c in free[0].outputs)


class _Allow:
    """A stand-in matcher that allows the given token ids."""

    def __init__(self, *ids):
        self.ids = ids

    def fill_bitmask(self, words):
        words.zero_()
        for i in self.ids:
            words[i // 32] |= 1 << (i % 32)


def test_bitmasks_mask_only_their_rows():
    logits = torch.zeros(3, 70)
    words = grammar_bitmask([_Allow(1, 33, 69), _Allow(), _Allow()], [[], [], []], 70)
    words[1] = -1  # the runner's row for a sequence without a grammar: every token allowed
    masked = apply_bitmask(logits, words)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [1, 33, 69]
    assert torch.isfinite(masked[1]).all()  # no grammar: untouched
    assert torch.isfinite(masked[2]).all()  # a matcher that allows nothing leaves the row alone, never NaN


@pytest.mark.parametrize("drafter", ["ngram", "draft_model"])
def test_drafts_are_verified_under_the_grammar_and_change_nothing(drafter, tiny_llm, tiny_qwen):
    """Drafts take structured sequences too: each draft row is masked by the grammar advanced over the
    drafts before it, so a draft the grammar refuses is rejected, and the output is the same valid JSON as
    without drafts, greedy or sampled. Prompt lookup copies JSON from the prompt; the target itself as a
    drafter, with no grammar, proposes its unconstrained choices, some of which the grammar refuses."""
    from nimblelm import LLM

    config = {"method": "ngram", "num_speculative_tokens": 4} if drafter == "ngram" else {
        "method": "draft_model", "model": str(tiny_qwen), "num_speculative_tokens": 3}
    spec = LLM(str(tiny_qwen), max_model_len=256, speculative_config=config)
    spec.llm_engine.runner.step_cost = None  # every draft verified
    grammar = StructuredOutputParams(json_schema=SCHEMA)
    prompts = ['{"tag": "ab", "count": 12, "ok": true, "kind": "a"} {"tag": "ab", "count": 12, "ok": true, "kind": "a"} ',
               "Rivers", "def add(a, b):"]
    greedy = SamplingParams(temperature=0, max_tokens=80, structured_output=grammar)
    ref = tiny_llm.generate(prompts, greedy, use_tqdm=False)
    out = spec.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    stats = spec.llm_engine.stats().spec
    assert stats.num_draft_tokens > 20 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    sampled = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=80, structured_output=grammar)
    for output in spec.generate(prompts, sampled, use_tqdm=False):
        for completion in output.outputs:
            assert completion.finish_reason == "stop"
            jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_draft_bitmasks_advance_over_the_drafts_and_leave_the_state_alone():
    from nimblelm.engine.structured import GrammarMatcher

    class _Stub:  # allows a token t only as the next in 1, 2, 3, ...
        def __init__(self):
            self.pos = 0

        def unsafe_compute_mask_ptr(self, ptr, nbytes):
            words = torch.zeros(nbytes // 4, dtype=torch.int32)
            words[(self.pos + 1) // 32] = 1 << ((self.pos + 1) % 32)
            torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=torch.int32).copy_(words)

        def try_consume_tokens(self, tokens):
            if tokens[0] != self.pos + 1:
                return 0
            self.pos += 1
            return 1

        def rollback(self, n):
            self.pos -= n

    import ctypes

    stub = _Stub()
    words = torch.zeros(4, 2, dtype=torch.int32)
    GrammarMatcher(stub).fill_draft_bitmasks([1, 2, 9], words)  # the third draft is refused
    allowed = [[i for i in range(64) if words[r, i // 32] >> (i % 32) & 1] for r in range(4)]
    assert allowed[:3] == [[1], [2], [3]] and len(allowed[3]) == 64 and stub.pos == 0
