"""Token trees: their structure, the verifier's walk (greedy, and sampled with several candidates), and the
model runner's layout (a branch's own KV blocks, kept branches copied into the sequence's slots), checked
against plain decoding."""

import pytest
import torch

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.layers.sampler import Sampler, SamplingBatch
from nimblelm.speculative import SpeculativeConfig
from nimblelm.speculative.tree import DraftTree
from nimblelm.speculative.verifier import verify

CHI2_5_DOF_AT_0_001 = 20.515  # chi-square with 5 degrees of freedom: exceeded with probability 0.001


def test_a_tree_from_paths_merges_common_prefixes_and_keeps_the_first_path_as_its_chain():
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9, 6]])
    assert tree.tokens == [5, 6, 7, 8, 9, 6] and tree.parents == [-1, 0, 1, 0, -1, 4]
    assert tree.chain_length() == 3 and tree.depths() == [1, 2, 3, 2, 1, 2]
    assert tree.branches() == [[0, 3], [4, 5]]  # the leaves off the chain, with their ancestors
    assert tree.children()[-1] == [0, 4]
    assert tree.limited(4, 3).tokens == [5, 6, 7, 8]
    cut = tree.limited(5, 1)  # nothing deeper than 1: the roots' children only
    assert cut.tokens == [5, 9] and cut.parents == [-1, -1]
    with pytest.raises(ValueError):
        DraftTree([1, 2], [-1, 1])  # a node its own parent


def _batch(rows: int, temperature: float, vocab: int, generator=None) -> SamplingBatch:
    params = [SamplingParams(temperature=temperature)] * rows
    return SamplingBatch.build(params, [[0]] * rows, [1] * rows, [generator] * rows, vocab, torch.device("cpu"))


def test_greedy_verification_walks_the_tree_along_the_targets_tokens():
    vocab = 10
    tree = DraftTree.from_paths([[1, 2, 3], [4, 5], [4, 6, 7]])  # nodes 1 2 3 4 5 6 7
    greedy = {-1: 4, 0: 2, 1: 3, 2: 9, 3: 6, 4: 8, 5: 7, 6: 1}  # per node (row), the target's token
    logits = torch.full((len(tree) + 1, vocab), -5.0)
    for node, token in greedy.items():
        logits[node + 1, token] = 5.0
    out = verify(Sampler(), logits, _batch(len(tree) + 1, 0.0, vocab), [tree])
    assert out.paths == [[3, 5, 6]] and out.token_ids == [[4, 6, 7, 1]]  # off the chain from the first node


def test_sampled_verification_of_several_candidates_emits_the_targets_distribution():
    """Two candidates for the next token, drawn without replacement from a poor drafter's q: the first token
    emitted is distributed as the target's p (chi-square, significance level 0.001), and one of the two is
    kept as often as p puts on them."""
    vocab, trials = 6, 4000
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    p = p_logits.softmax(-1)
    q = torch.tensor([0.05, 0.05, 0.4, 0.3, 0.1, 0.1])
    trees = [DraftTree(torch.multinomial(q, 2, generator=g).tolist(), [-1, -1]) for _ in range(trials)]
    logits = p_logits.repeat(3 * trials, 1)
    out = verify(Sampler(), logits, _batch(3 * trials, 1.0, vocab, g), trees)
    counts = torch.bincount(torch.tensor([ids[0] for ids in out.token_ids]), minlength=vocab).double()
    expected = p.double() * trials
    assert ((counts - expected) ** 2 / expected).sum() < CHI2_5_DOF_AT_0_001
    kept = sum(bool(path) for path in out.paths) / trials
    expected_kept = sum(p[t.tokens].sum().item() for t in trees) / trials
    assert kept == pytest.approx(expected_kept, abs=0.03)


class _Oracle:
    """A tree proposer that knows the plain greedy answers: each step's tree mixes them with wrong tokens so
    that in turn the primary chain, a branch off its first node, and a branch off the root are the ones kept."""

    observes = False
    pass_seconds = 0.0

    def __init__(self, answers: dict[tuple[int, ...], list[int]], vocab: int):
        self.answers, self.vocab = answers, vocab
        self.steps = 0

    def propose_all(self, requests):
        out = {}
        for req_id, (tokens, prompt_len, room) in requests.items():
            answer = self.answers[tuple(tokens[:prompt_len])]
            truth = answer[len(tokens) - prompt_len:][:3]
            if len(truth) < 3:
                continue
            wrong = [(t + 1) % self.vocab for t in truth]
            self.steps += 1
            paths = [
                [[wrong[0], truth[1], truth[2]], truth, [truth[0], wrong[1]]],  # a branch off the root
                [truth, [wrong[0], wrong[1]]],  # the chain
                [[truth[0], wrong[1], truth[2]], [truth[0], truth[1], wrong[2]], [wrong[0]]],  # off node 0
            ][self.steps % 3]
            out[req_id] = DraftTree.from_paths(paths)
        return out

    def forget(self, req_ids):
        pass


PROMPTS = ["one two three four", "The cat sat on the mat. The cat", "Rivers", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def medusa_heads(tiny_qwen, tmp_path_factory):
    from test_speculative_medusa import _write

    from nimblelm.models.loader import load_model

    norm = load_model(str(tiny_qwen)).weights["model.norm.weight"].float()
    return _write(tmp_path_factory.mktemp("tree") / "zero.medusa.safetensors", 3, norm)


@pytest.mark.parametrize("block_size,eager", [(4, True), (16, True), (16, False)])
def test_trees_keep_greedy_output_identical_whichever_branch_is_kept(tiny_qwen, medusa_heads, block_size, eager,
                                                                     monkeypatch):
    """Kept branches off the chain are copied into the sequence's own slots: the tokens after them, computed
    on those K/V, are plain decoding's. Block size 4 puts a step's rows across several blocks."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, block_size=block_size, enforce_eager=eager)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    tree = [[0], [0, 0], [0, 0, 0], [1], [1, 0], [1, 0, 0], [2]]
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, block_size=block_size, enforce_eager=eager, speculative_config={
        "method": "medusa", "num_speculative_tokens": 3, "model": str(medusa_heads), "speculative_token_tree": tree})
    runner = llm.llm_engine.runner
    answers = {tuple(o.prompt_token_ids): list(o.outputs[0].token_ids) for o in ref}
    runner.proposer = _Oracle(answers, runner.config.vocab_size)
    runner.step_cost = None  # every tree whole: the budget would trim them by start-up timings
    kept_off_chain = []
    keep = runner._keep_branch
    monkeypatch.setattr(runner, "_keep_branch", lambda layout, path: (
        kept_off_chain.append(bool(path) and path[-1] >= layout.tree.chain_length()), keep(layout, path)))
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
    assert sum(kept_off_chain) >= 10 and not all(kept_off_chain)
    spec = out[0].metrics.spec
    assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens > 0


def test_medusa_trees_are_lossless_and_reproducible_when_sampled(tiny_qwen, medusa_heads):
    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, speculative_config={
        "method": "medusa", "num_speculative_tokens": 3, "model": str(medusa_heads), "speculative_token_tree": tree})
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in plain.generate(PROMPTS, greedy, use_tqdm=False)])
    sampled = SamplingParams(temperature=0.8, max_tokens=32, seed=3, ignore_eos=True)
    first, again = (llm.generate(PROMPTS, sampled, use_tqdm=False) for _ in range(2))
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]


@pytest.mark.parametrize("tree,message", [
    ([[0], [0, 0]], "set num_speculative_tokens to 2"),
    ([[0], [1, 0]], "parent path"),
    ([[0], [0]], "each node once"),
    ("[[0]]", "rank paths"),
    ([[i] for i in range(16)], "at most 15"),
])
def test_bad_token_trees_are_refused_with_what_is_wrong(tree, message):
    with pytest.raises(InvalidRequestError, match=message):
        SpeculativeConfig.from_dict({"method": "medusa", "num_speculative_tokens": 3, "speculative_token_tree": tree})
    with pytest.raises(InvalidRequestError, match="applies to medusa"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 1, "speculative_token_tree": [[0]]})
