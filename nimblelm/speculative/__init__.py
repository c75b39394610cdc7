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
from nimblelm.speculative.medusa import MedusaProposer
from nimblelm.speculative.ngram import NgramProposer
from nimblelm.speculative.suffix import SuffixProposer


def make_proposer(config: SpeculativeConfig, runner, num_blocks: int, max_num_seqs: int) -> Proposer:
    """The proposer of config.method for the target's model runner, whose KV cache holds num_blocks blocks
    for up to max_num_seqs sequences (a draft model sizes its own cache the same).

    A proposer's propose_all takes, per sequence, (its tokens, prompt length, room for drafts), and, when its
    class sets uses_hidden, the target's last hidden state of each of those sequences (rows in that order);
    it returns the drafts of the sequences that have any. forget drops what it keeps of finished ones."""
    if config.method == "draft_model":
        return DraftModelProposer(
            config.model, config.num_speculative_tokens, quantization=config.quantization,
            vocab_size=runner.config.vocab_size, device=runner.device, dtype=runner.dtype,
            max_model_len=runner.max_model_len, block_size=runner.block_size, num_blocks=num_blocks,
            max_num_seqs=max_num_seqs)
    if config.method == "medusa":
        return MedusaProposer(config.model, config.num_speculative_tokens, runner)
    if config.method == "suffix":
        store = open_for_target(config.datastore, runner.config.vocab_size)
        return SuffixProposer(store, config.num_speculative_tokens, config.prompt_lookup_min,
                              config.prompt_lookup_max)
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)


Proposer = NgramProposer | DraftModelProposer | SuffixProposer | MedusaProposer


def speculates(params: SamplingParams) -> bool:
    """Whether a sequence takes drafts. Penalties and grammars depend on every token before the one they
    shape, which a step's draft rows do not see yet: such sequences decode a token at a time."""
    return not params.has_penalties and params.structured_output is None


__all__ = ["SpeculativeConfig", "make_proposer", "speculates"]
