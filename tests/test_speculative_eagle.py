"""Speculative method "eagle": `nimblelm spec train --method eagle` end to end on a tiny model, the training rows,
the draft layer's K/V per sequence (kept, cut back, dropped), its config errors, and output with its drafts
identical to plain decoding (greedy: batched, in small blocks, in chunked prefills, through preemption) or
reproducible (sampled)."""

import shutil

import pytest
import torch
from test_speculative_medusa import _sharegpt_file

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.cli import main
from nimblelm.speculative import SpeculativeConfig, eagle, medusa
from nimblelm.speculative import eagle_train as et
from nimblelm.speculative.seen import Seen
from nimblelm.speculative.tree import DraftTree

PROMPTS = ["one two three four", "The cat sat on the mat. The cat", "Rivers", "def add(a, b):\n    return"]


def test_text_rows_learn_the_token_two_places_on_from_the_answers_first():
    labels, counted = et.text_rows([10, 11, 12, 13, 14, 15], prompt_len=3)
    # Row p reads (f_p, x_{p+1}) and learns x_{p+2}; it counts from the row whose token is the answer's first.
    assert labels.tolist() == [12, 13, 14, 15, -1]
    assert counted.tolist() == [False, True, True, True, True]


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    """A draft layer trained by the CLI on the tiny model's answers to a small ShareGPT file."""
    folder = tmp_path_factory.mktemp("eagle")
    path = folder / "tiny.eagle.safetensors"
    assert main(["spec", "train", "--method", "eagle", "--model", str(tiny_qwen), "--prompts", "24",
                 "--max-new-tokens", "24", "--epochs", "2", "--vocab-size", "128", "--threads", "1",
                 "--dataset-path", str(_sharegpt_file(folder / "s.json")), "--output", str(path)]) == 0
    return path


def test_spec_train_writes_a_draft_layer_and_what_it_cost(trained, tiny_qwen, capsys):
    tensors, meta = medusa.read(trained, eagle.EAGLE)
    assert tensors["fc.weight"].shape == (64, 128) and tensors["fc.bias"].shape == (64,)
    assert any(name.startswith("layer.self_attn.") for name in tensors)
    assert all(t.dtype == torch.float32 for name, t in tensors.items() if name != "vocab_ids")
    assert len(tensors["vocab_ids"]) == meta["draft_vocab_size"] <= 128
    assert meta["method"] == "eagle" and meta["model"] == str(tiny_qwen) and meta["vocab_size"] == 384
    assert len(meta["tokenizer_digest"]) == 16 and meta["prompts"] + meta["held_out_prompts"] == 24
    assert 0 <= meta["held_out_accuracy"] <= 1 and meta["train_tokens"] > 0 and meta["held_out_tokens"] > 0
    cost = meta["cost"]
    assert cost["threads"] == 1 and cost["wall_s"] >= cost["generate_s"] + cost["train_s"] > 0
    assert cost["cpu_hours"] == pytest.approx(cost["wall_s"] / 3600, abs=1e-3)


@pytest.fixture(scope="module")
def plain(tiny_qwen):
    return LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8)


def _spec(tiny_qwen, path, k: int, speculative_token_tree=None, **options) -> LLM:
    config = {"method": "eagle", "num_speculative_tokens": k, "model": str(path)}
    if speculative_token_tree is not None:
        config["speculative_token_tree"] = speculative_token_tree
    llm = LLM(str(tiny_qwen), dtype="float32", **{"max_model_len": 256, "max_num_seqs": 8, **options}, speculative_config=config)
    llm.llm_engine.runner.step_cost = None  # every draft verified, as in test_speculative.py
    return llm


def _same(plain, spec, params, prompts=PROMPTS):
    ref = plain.generate(prompts, params, use_tqdm=False)
    out = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    assert [o.outputs[0].text for o in out] == [r.outputs[0].text for r in ref]
    return out


@pytest.mark.parametrize("options", [{}, {"block_size": 4}, {"max_num_batched_tokens": 8, "block_size": 4}],
                         ids=["default", "block_size=4", "chunked_prefill"])
def test_greedy_output_is_identical_with_eagle_drafts_in_a_batch(options, tiny_qwen, trained, plain):
    for k in (3, 1):
        spec = _spec(tiny_qwen, trained, k, **options)
        for params in [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                       SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),  # room below k
                       SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["the"])]:
            _same(plain, spec, params)
        stats = spec.llm_engine.stats().spec
        assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
        assert len(stats.accepted_per_position) <= k
        spec.llm_engine.step()  # hands the runner the last finished sequences
        assert not spec.llm_engine.runner.proposer.seqs  # every finished sequence forgotten


@pytest.mark.slow
def test_eagle_trees_over_ranks(tiny_qwen, trained, plain):
    """The last of 2 stages drafts from its hidden states, token table and output layer (every stage holds the
    last two); over 2 tensor-parallel ranks both run the whole draft layer, their token table and output rows
    split: the drafts one process makes, and its output."""
    config = {"method": "eagle", "num_speculative_tokens": 3, "model": str(trained),
              "speculative_token_tree": [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 1]]}
    stats = []
    for tp, pp in ((1, 1), (1, 2), (2, 1)):  # eager: no step costs to prune the trees
        spec = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, tensor_parallel_size=tp,
                   pipeline_parallel_size=pp, enforce_eager=True, speculative_config=config)
        _same(plain, spec, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        stats.append(spec.llm_engine.stats().spec)
    assert stats[0] == stats[1] == stats[2] and stats[0].num_draft_tokens > 0


def test_greedy_output_is_identical_with_eagle_trees(tiny_qwen, trained, plain):
    """Each depth's second candidate beside the chain, as a leaf, verified in the same step; where the target
    takes a leaf, the next step's rows follow it."""
    tree = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [0, 0, 1]]
    spec = _spec(tiny_qwen, trained, 3, speculative_token_tree=tree)
    proposer = spec.llm_engine.runner.proposer
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    proposer.observe({1: Seen(0, h, [5, 6])})
    drafted = proposer.propose_all({1: ([4, 5, 6], 2, 6)})[1]
    assert drafted.parents == [-1, 0, 1, -1, 0, 1] and drafted.chain_length() == 3
    assert len(set(zip(drafted.parents, drafted.tokens))) == 6  # a leaf is another token than its sibling
    proposer.observe({1: Seen(0, h, [5, 6])})
    assert proposer.propose_all({1: ([4, 5, 6], 2, 2)})[1].parents == [-1, 0, -1, 0]  # room for 2: 2 deep
    proposer.forget([1])
    for params in [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]:
        _same(plain, spec, params)
    assert spec.llm_engine.stats().spec.num_accepted_tokens > 0

    # The first depth's best candidate swapped with its leaf: the target takes the leaf wherever it would have
    # taken the first draft, and the sequence goes on from there.
    proposed, leaves_taken = {}, []
    propose_all, observe = proposer.propose_all, proposer.observe

    def swapped(requests):
        out = {}
        for req_id, t in propose_all(requests).items():
            tokens = list(t.tokens)
            leaf = t.parents.index(-1, 1)
            tokens[0], tokens[leaf] = tokens[leaf], tokens[0]
            out[req_id] = proposed[req_id] = DraftTree(tokens, t.parents)
        return out

    def checking(seen):
        for req_id, s in seen.items():
            t = proposed.pop(req_id, None)
            if t is not None and len(s.next_tokens) > 1:  # its decode row, then the kept drafts
                leaves_taken.append(s.next_tokens[0] == t.tokens[t.parents.index(-1, 1)])
        observe(seen)

    proposer.propose_all, proposer.observe = swapped, checking
    _same(plain, spec, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert any(leaves_taken)


def test_greedy_output_is_a_kv_policys_own_with_eagle_drafts(tiny_qwen, trained):
    """The draft layer keeps its K/V of every position while streaming compacts the target's cache every block
    past its budget: the drafts follow the whole context, the output the policy's."""
    policy = {"method": "streaming", "budget": 32}
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    alone = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, kv_policy=policy)
    out = _same(alone, _spec(tiny_qwen, trained, 3, kv_policy=policy), params)
    assert sum(o.metrics.spec.num_accepted_tokens for o in out) > 0


def test_greedy_output_survives_preemption(tiny_qwen, trained):
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    # Few blocks: sequences are preempted and recomputed while they hold drafts (and draft K/V).
    tight = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, max_num_seqs=4, num_kv_blocks=12, block_size=8,
                speculative_config={"method": "eagle", "num_speculative_tokens": 3, "model": str(trained)})
    tight.llm_engine.runner.step_cost = None
    ref = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, max_num_seqs=4).generate(PROMPTS, params, use_tqdm=False)
    out = tight.generate(PROMPTS, params, use_tqdm=False)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    assert tight.llm_engine.stats().spec.num_accepted_tokens > 0


def test_seeded_sampling_with_eagle_drafts_is_reproducible(tiny_qwen, trained):
    spec = _spec(tiny_qwen, trained, 3)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True)
    a = spec.generate(PROMPTS, params, use_tqdm=False)
    b = spec.generate(PROMPTS, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert all(len(c.token_ids) == 30 for o in a for c in o.outputs)
    assert spec.llm_engine.stats().spec.num_draft_tokens > 0


def test_the_draft_layers_kv_is_kept_cut_back_at_the_seen_position_and_dropped(tiny_qwen, trained):
    """Drafting appends K/V past the seen pairs; the next rows seen from a position replace everything from
    there (drafts, or after a preemption the whole sequence); forget returns a sequence's blocks to the pool."""
    llm = _spec(tiny_qwen, trained, 3, block_size=4)
    proposer = llm.llm_engine.runner.proposer
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 64, generator=g)
    free = len(proposer.free)
    proposer.observe({1: Seen(0, h[:6], [5, 6, 7, 8, 9, 10]), 2: Seen(0, h[6:7], [3])})
    assert proposer.seqs[1].keys == list(range(6)) and len(proposer.seqs[1].blocks) == 2
    tokens = [4, 5, 6, 7, 8, 9, 10]  # the pair at key 5 carries the newest token, 10
    drafts = proposer.propose_all({1: (tokens, 2, 3), 2: ([9, 3], 1, 2), 3: ([1, 2], 1, 2)})
    assert len(drafts[1]) == 3 and len(drafts[2]) == 2 and 3 not in drafts  # nothing seen of sequence 3
    assert proposer.seqs[1].keys == list(range(8)) and proposer.seqs[2].keys == [0, 1]
    # The next step: the newest token's row and one kept draft. The drafts' K/V are replaced.
    proposer.observe({1: Seen(6, h[7:9], [drafts[1][0], 11])})
    assert proposer.seqs[1].keys == list(range(8)) and proposer.seqs[1].token == 11
    # The same pairs seen again give the same drafts: nothing of the replaced K/V is left.
    again = proposer.propose_all({1: (tokens + [drafts[1][0], 11], 2, 3)})
    proposer.observe({1: Seen(6, h[7:9], [drafts[1][0], 11])})
    assert proposer.propose_all({1: (tokens + [drafts[1][0], 11], 2, 3)}) == again
    # A drafted sequence whose newest token is not the last seen one's drafts nothing.
    assert proposer.propose_all({1: (tokens + [drafts[1][0], 12], 2, 3)}) == {}
    proposer.observe({1: Seen(0, h[:2], [5, 6])})  # preempted: seen again from position 0
    assert proposer.seqs[1].keys == [0, 1] and len(proposer.seqs[1].blocks) == 1
    proposer.forget([1, 2, 99])
    assert not proposer.seqs and len(proposer.free) == free


def test_the_pool_of_kv_blocks_grows_when_full(tiny_qwen, trained):
    llm = _spec(tiny_qwen, trained, 2, block_size=4)
    proposer = llm.llm_engine.runner.proposer
    h = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    first = proposer.kv.values.shape[1]
    proposer.observe({1: Seen(0, h[:100], list(range(100))), 2: Seen(0, h[100:], list(range(100)))})
    assert proposer.kv.values.shape[1] >= 50 and proposer.kv.values.shape[1] >= first
    # Rows seen alike in both sequences give the same drafts, before and after the pool grew.
    proposer.observe({3: Seen(0, h[:100], list(range(100)))})
    drafts = proposer.propose_all({s: ([0, *range(100)], 1, 2) for s in (1, 3)})
    assert len(drafts[1]) == 2 and drafts[1] == drafts[3]


def test_bad_eagle_configs_are_refused_in_one_clear_line(tiny_qwen, tiny_llama, trained, tmp_path, monkeypatch):
    for options, message in [
        ({"method": "eagle", "num_speculative_tokens": 2, "model": str(tmp_path / "no.safetensors")}, "not found"),
        ({"method": "eagle", "num_speculative_tokens": 16, "model": str(trained)}, "num_speculative_tokens must"),
        ({"method": "eagle", "num_speculative_tokens": 2, "speculative_token_tree": [[0], [1], [1, 0]]},
         "eagle's trees branch off the primary chain only"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            SpeculativeConfig.from_dict(options)

    def refused(model, path) -> str:
        with pytest.raises(InvalidRequestError) as e:
            LLM(str(model), dtype="float32", max_model_len=64,
                speculative_config={"method": "eagle", "num_speculative_tokens": 2, "model": str(path)})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "were trained on" in refused(tiny_llama, trained)  # another model's file
    medusa_file = tmp_path / "m.medusa.safetensors"
    assert main(["spec", "train", "--method", "medusa", "--model", str(tiny_qwen), "--prompts", "4",
                 "--max-new-tokens", "8", "--epochs", "1", "--threads", "1", "--dataset-path",
                 str(_sharegpt_file(tmp_path / "s.json")), "--output", str(medusa_file)]) == 0
    assert "is not a heads file of `nimblelm spec train --method eagle`" in refused(tiny_qwen, medusa_file)

    # Nothing given and nothing trained for this model in the cache: how to train one.
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InvalidRequestError, match="nimblelm spec train --method eagle --model MODEL"):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    # The trained layer, where spec train writes it by default, is found by the target.
    default = medusa.default_path(str(tiny_qwen), eagle.EAGLE)
    assert default == medusa.heads_dir() / f"{tiny_qwen.name}.eagle.safetensors"
    default.parent.mkdir(parents=True)
    shutil.copy(trained, default)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    assert llm.llm_engine.runner.proposer.meta["model"] == str(tiny_qwen)


@pytest.mark.parametrize("args, message", [
    (["--prompts", "1"], "--prompts must be at least 2"),
    (["--epochs", "0"], "--epochs >= 1"),
    (["--vocab-size", "-1"], "--vocab-size >= 0"),
    (["--max-new-tokens", "600"], "leaves no room for a prompt"),
])
def test_spec_train_eagle_refuses_bad_options_in_one_line(args, message, tiny_qwen, tmp_path, capsys):
    argv = ["spec", "train", "--method", "eagle", "--model", str(tiny_qwen), "--dataset-path",
            str(_sharegpt_file(tmp_path / "s.json")), "--output", str(tmp_path / "x.eagle.safetensors"), "--threads",
            "1", *args]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.eagle.safetensors").exists()


@pytest.mark.integration
def test_real_model_greedy_output_is_identical_with_eagle_drafts(tmp_path):
    """SmolLM2 (its Q4_1 weights, the C++ kernels) with a draft layer trained for 2 epochs on its answers to 8
    ShareGPT questions: the same tokens as plain decoding at batch 1, with drafts kept."""
    from nimblelm import corpora
    from nimblelm.bench import datasets

    path = tmp_path / "smollm2.eagle.safetensors"
    assert main(["spec", "train", "--method", "eagle", "--model", "smollm2-135m", "--prompts", "8",
                 "--max-new-tokens", "64", "--epochs", "2", "--threads", "1", "--output", str(path)]) == 0
    plain = LLM("smollm2-135m", dtype="float32", max_model_len=1024)
    spec = LLM("smollm2-135m", dtype="float32", max_model_len=1024, speculative_config={
        "method": "eagle", "num_speculative_tokens": 3, "model": str(path)})
    spec.llm_engine.runner.step_cost = None  # every draft verified
    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path()))
    params = SamplingParams(temperature=0, max_tokens=48)
    for request in datasets.chat_requests(pairs, plain.tokenizer, 3, seed=0):  # batch 1: only the drafts differ
        ref = plain.generate([list(request.prompt_token_ids)], params, use_tqdm=False)[0].outputs[0]
        out = spec.generate([list(request.prompt_token_ids)], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert spec.llm_engine.stats().spec.num_accepted_tokens > 0
