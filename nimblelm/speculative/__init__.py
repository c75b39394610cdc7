"""Speculative decoding: proposers (prompt lookup, a draft model, retrieval from a datastore, the target's own
layers, Medusa heads on its hidden state, an EAGLE draft layer on its features, lookahead's Jacobi window and
n-gram pool) draft tokens, as a chain or a token tree (tree.py); the target verifies them all in one step
(verifier.py).

A proposer runs in the model runner after each step's sampling and returns, per sequence, the drafts that
follow its new tokens; the engine hands them to the scheduler, which schedules them with the sequence's
next token; the runner verifies them as decode rows; the scheduler rolls back the rejected ones' slots.
"""

from __future__ import annotations

from nimblelm.sampling_params import SamplingParams
from nimblelm.speculative.config import SpeculativeConfig
from nimblelm.speculative.datastore import open_for_target
from nimblelm.speculative.draft_model import DraftModelProposer
from nimblelm.speculative.eagle import EagleProposer
from nimblelm.speculative.layer_skip import LayerSkipProposer
from nimblelm.speculative.layer_skip import scratch_blocks as layer_skip_scratch
from nimblelm.speculative.lookahead import LookaheadProposer
from nimblelm.speculative.medusa import MedusaProposer
from nimblelm.speculative.ngram import NgramProposer
from nimblelm.speculative.suffix import SuffixProposer
from nimblelm.speculative.tree import MAX_BRANCHES, DraftTree, blocks_per_branch

# Drafters that read layers tensor-parallel ranks split: the target's output layer (EAGLE its token table too),
# cut by vocabulary (medusa.DraftOutput gathers the logits), or its own decoder layers (layer_skip's, their
# all-reduces). Every rank of the last stage runs one, in step, on the sequences and room the output rank chose.
SPLIT_DRAFTERS = ("medusa", "eagle", "layer_skip")


def make_proposer(config: SpeculativeConfig, runner, num_blocks: int, max_num_seqs: int) -> Proposer:
    """The proposer of config.method for the target's model runner, whose KV cache holds num_blocks blocks
    for up to max_num_seqs sequences (a draft model sizes its own cache the same).

    A proposer's propose_all takes, per sequence, (its tokens, prompt length, room for drafts) and returns the
    drafts of the sequences that have any: a chain (list of tokens), or a token tree (tree.DraftTree) whose
    nodes the model runner cuts to the room. A proposer whose class sets observes is first shown, by
    observe, every sequence's rows the step computed: their hidden states, and the drafts verified with the
    target's token at each (seen.Seen). forget drops what it
    keeps of finished ones.
    pass_seconds: what one of its drafting passes costs, for those that draft a position per batched pass
    (the draft budget weighs it); 0 for lookups."""
    if config.method == "draft_model":
        return DraftModelProposer(
            config.model, config.num_speculative_tokens, quantization=config.quantization,
            vocab_size=runner.config.vocab_size, device=runner.device, dtype=runner.dtype,
            max_model_len=runner.max_model_len, block_size=runner.block_size, num_blocks=num_blocks,
            max_num_seqs=max_num_seqs)
    if config.method == "layer_skip":  # its drafts' K/V go to the blocks past the pad block
        return LayerSkipProposer(runner, config.skip_layers, config.num_speculative_tokens, num_blocks + 1)
    if config.method == "lookahead":
        return LookaheadProposer(config.num_speculative_tokens)
    if config.method == "medusa":
        return MedusaProposer(config.model, config.num_speculative_tokens, runner, config.speculative_token_tree)
    if config.method == "eagle":
        return EagleProposer(config.model, config.num_speculative_tokens, runner, config.speculative_token_tree)
    if config.method == "suffix":
        store = open_for_target(config.datastore, runner.config.vocab_size)
        return SuffixProposer(store, config.num_speculative_tokens, config.prompt_lookup_min,
                              config.prompt_lookup_max)
    return NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)


Proposer = (NgramProposer | DraftModelProposer | SuffixProposer | LayerSkipProposer | MedusaProposer
            | EagleProposer | LookaheadProposer)


def scratch_blocks(config: SpeculativeConfig | None, block_size: int, num_kv_groups: int) -> int:
    """KV blocks the target's runner reserves past its own: for the proposer's drafts (layer_skip's), or for
    the branches of token trees (the first tree_branches(config) * num_kv_groups * blocks_per_branch)."""
    if config is None:
        return 0
    if config.method == "layer_skip":
        return layer_skip_scratch(config.num_speculative_tokens, block_size, num_kv_groups)
    return tree_branches(config) * num_kv_groups * blocks_per_branch(block_size)


def tree_branches(config: SpeculativeConfig | None) -> int:
    """Branches of token trees a step may verify."""
    return MAX_BRANCHES if config is not None and config.proposes_trees else 0


def speculates(params: SamplingParams) -> bool:
    """Whether a sequence takes drafts. Penalties depend on every token before the one they shape, which a
    step's draft rows do not see yet: such sequences decode a token at a time. A grammar does not stop
    drafts: the engine gives each draft row the mask of the grammar advanced over the drafts before it."""
    return not params.has_penalties


__all__ = ["SPLIT_DRAFTERS", "DraftTree", "SpeculativeConfig", "make_proposer", "scratch_blocks", "speculates", "tree_branches"]
