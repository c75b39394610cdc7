"""Speculative decoding: proposers (prompt lookup, a draft model, retrieval from a datastore) draft tokens, the target verifies them all in
one step (verifier.py).

A proposer runs in the model runner after each step's sampling and returns, per sequence, the drafts that
follow its new tokens; the engine hands them to the scheduler, which schedules them with the sequence's
next token; the runner verifies them as decode rows; the scheduler rolls back the rejected ones' slots.
"""

from __future__ import annotations

from nimblelm.sampling_params import SamplingParams
from nimblelm.speculative.config import SpeculativeConfig
from nimblelm.speculative.datastore import open_for_target
from nimblelm.speculative.draft_model import DraftModelProposer
from nimblelm.speculative.ngram import NgramProposer
from nimblelm.speculative.suffix import SuffixProposer


def make_proposer(config: SpeculativeConfig, **target) -> NgramProposer | DraftModelProposer | SuffixProposer:
    """The proposer of config.method; `target` says what a draft model must fit (DraftModelProposer's
    keyword arguments: vocabulary, device, dtype, lengths and KV cache size) and a datastore must match
    (the vocabulary)."""
    if config.method == "draft_model":
        return DraftModelProposer(config.model, config.num_speculative_tokens, quantization=config.quantization,
                                  **target)
    if config.method == "suffix":
        store = open_for_target(config.datastore, target["vocab_size"])
        return SuffixProposer(store, config.num_speculative_tokens, config.prompt_lookup_min,
                              config.prompt_lookup_max)
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)


def speculates(params: SamplingParams) -> bool:
    """Whether a sequence takes drafts. Penalties and grammars depend on every token before the one they
    shape, which a step's draft rows do not see yet: such sequences decode a token at a time."""
    return not params.has_penalties and params.structured_output is None


__all__ = ["SpeculativeConfig", "make_proposer", "speculates"]
