"""Structured output in the engine: grammar masks in the sampler keep every sequence inside its JSON schema."""

import json

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
    words = grammar_bitmask([_Allow(1, 33, 69), _Allow(), _Allow()], 70)
    words[1] = -1  # the runner's row for a sequence without a grammar: every token allowed
    masked = apply_bitmask(logits, words)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [1, 33, 69]
    assert torch.isfinite(masked[1]).all()  # no grammar: untouched
    assert torch.isfinite(masked[2]).all()  # a matcher that allows nothing leaves the row alone, never NaN
