"""Lookahead decoding: the Jacobi window and the n-gram pool on made-up steps, and lossless output in the engine."""

import itertools

import pytest
import torch

from nimblelm import LLM, SamplingParams
from nimblelm.speculative.lookahead import LookaheadProposer
from nimblelm.speculative.seen import Seen

PROMPTS = ["one two three four", "The cat sat on the mat. The cat", "Rivers", "def add(a, b):\n    return"]


def _step(proposer, tokens, target):
    """One greedy step of a target whose next token depends on the newest one only (target(t)): propose for
    tokens, walk the tree as the verifier does, show the proposer what it saw; returns the tree, the nodes kept
    and the tokens after the step."""
    tree = proposer.propose_all({0: (tokens, 1, 15)})[0]
    outputs = [target(tokens[-1])] + [target(t) for t in tree.tokens]
    children, path, node = tree.children(), [], -1
    while (kept := next((c for c in children[node] if tree.tokens[c] == outputs[1 + node]), None)) is not None:
        path.append(kept)
        node = kept
    new = [tree.tokens[n] for n in path] + [outputs[1 + node]]
    proposer.observe({0: Seen(len(tokens) - 1, torch.zeros(1 + len(path), 4), new, tree, outputs)})
    return tree, path, tokens + new


def test_the_window_follows_the_jacobi_iterate_and_the_pool_learns_the_targets_n_grams():
    """A target that answers t + 1 (mod 5): the window takes the target's tokens at its guesses, the pool
    collects the runs of consecutive tokens along the iterates, and once the newest token begins one, the
    pooled run is the primary chain and every token of it is kept."""
    def target(t):
        return (t + 1) % 5

    proposer = LookaheadProposer(3)
    tree, path, tokens = _step(proposer, [2], target)
    assert tree.tokens == [2, 2, 2] and path == [] and tokens == [2, 3]  # the first window: the prompt's last token
    assert proposer.state[0].window == [3, 3, 3]  # the target's tokens after the guesses, past the newest token
    for _ in range(8):
        tree, path, tokens = _step(proposer, tokens, target)
    newest = tokens[-len(path) - 2]
    assert tree.tokens[:3] == [(newest + i) % 5 for i in (1, 2, 3)] and tree.chain_length() >= 3
    assert path[:3] == [0, 1, 2]
    assert all((b - a) % 5 == 1 for a, b in itertools.pairwise(tokens))
    proposer.forget([0])
    assert proposer.state == {}


@pytest.mark.parametrize("block_size,eager", [(4, True), (16, False)])
def test_lookahead_keeps_greedy_output_identical(tiny_qwen, block_size, eager):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, block_size=block_size, enforce_eager=eager)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, block_size=block_size, enforce_eager=eager,
              speculative_config={"method": "lookahead", "num_speculative_tokens": 4})
    llm.llm_engine.runner.step_cost = None  # every tree whole, whatever the start-up timings
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids
                                                     for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    spec = [o.metrics.spec for o in out]
    assert all(s.num_steps > 0 and s.num_draft_tokens > 0 for s in spec)
    assert sum(s.num_accepted_tokens for s in spec) > 0


def test_lookahead_sampling_is_reproducible_by_seed(tiny_qwen):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, speculative_config={"method": "lookahead", "num_speculative_tokens": 3})
    params = SamplingParams(temperature=0.9, max_tokens=32, seed=11, ignore_eos=True)
    first, again = (llm.generate(PROMPTS, params, use_tqdm=False) for _ in range(2))
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]


@pytest.mark.integration
def test_real_model_greedy_output_is_identical_with_lookahead_trees():
    """SmolLM2 with every node of each step's tree verified (window and pooled n-grams as branches): the same
    tokens as plain decoding at batch 1, with drafts kept off the primary chain too."""
    plain = LLM("smollm2-135m", dtype="float32", max_model_len=1024)
    spec = LLM("smollm2-135m", dtype="float32", max_model_len=1024,
               speculative_config={"method": "lookahead", "num_speculative_tokens": 4})
    runner = spec.llm_engine.runner
    runner.step_cost = None  # every node verified
    off_chain = []
    keep = runner._keep_branch
    runner._keep_branch = lambda layout, path: (
        off_chain.append(bool(path) and path[-1] >= layout.tree.chain_length()), keep(layout, path))
    params = SamplingParams(temperature=0, max_tokens=96)
    for q in ["List the planets of the solar system, one per line.", "Explain what a hash table is."]:
        prompt = plain.apply_chat_template([{"role": "user", "content": q}])
        ref = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        out = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert spec.llm_engine.stats().spec.num_accepted_tokens > 0 and any(off_chain)
