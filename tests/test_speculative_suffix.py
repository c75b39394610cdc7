"""Speculative method "suffix": the datastore's suffix array and lookups against brute force, its config
errors, `nimblelm spec build-datastore`, and greedy output identical to plain decoding with its drafts."""

import numpy as np
import pytest

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.cli import main
from nimblelm.speculative import SpeculativeConfig
from nimblelm.speculative.datastore import SEPARATOR, Datastore, suffix_array
from nimblelm.speculative.suffix import SuffixProposer

SHORT_PROMPTS = ["one two", "The cat", "Rivers"]


def _store(tokens: list[int]) -> Datastore:
    tokens = np.asarray(tokens, dtype=np.int32)
    return Datastore(tokens, suffix_array(tokens), 10, "digest", "test", "test")


def _random_corpus(rng, n: int, vocab: int) -> np.ndarray:
    tokens = rng.integers(0, vocab, n).astype(np.int32)
    tokens[rng.random(n) < 0.05] = SEPARATOR
    return tokens


def test_suffix_array_sorts_every_suffix():
    rng = np.random.default_rng(0)
    for n, vocab in [(1, 2), (2, 1), (30, 2), (200, 3), (500, 50)]:
        tokens = _random_corpus(rng, n, vocab)
        assert suffix_array(tokens).tolist() == sorted(range(n), key=lambda i: tokens[i:].tolist())
    repeats = np.tile(np.arange(3, dtype=np.int32), 100)  # a 297-token repeat: many doubling rounds
    assert suffix_array(repeats).tolist() == sorted(range(300), key=lambda i: repeats[i:].tolist())


def test_lookup_finds_every_occurrence_and_proposes_as_a_brute_force_scan(monkeypatch):
    from nimblelm.speculative import suffix

    monkeypatch.setattr(suffix, "MAX_OCCURRENCES", 10**9)  # every occurrence counted, as below
    rng = np.random.default_rng(1)
    corpus = _random_corpus(rng, 2000, 5)
    proposer = SuffixProposer(_store(corpus.tolist()), 3, match_min=2, match_max=6)
    for _ in range(100):
        sequence = rng.integers(0, 5, 14).tolist()
        for m in range(1, 7):
            lo, hi = proposer._occurrences(sequence[-m:])
            starts = [i for i in range(len(corpus) - m + 1) if corpus[i : i + m].tolist() == sequence[-m:]]
            assert sorted(proposer.store.suffix_array[lo:hi].tolist()) == starts
        assert proposer.propose(sequence) == _brute_force_proposal(corpus.tolist(), sequence, 3, 2, 6)


def _brute_force_proposal(corpus: list[int], seq: list[int], k: int, lo: int, hi: int) -> list[int]:
    own, own_drafts = 0, []
    for n in range(min(hi, len(seq) - 1), lo - 1, -1):
        ends = [j for j in range(n - 1, len(seq) - 1) if seq[j - n + 1 : j + 1] == seq[-n:]]
        if ends:
            own, own_drafts = n, seq[ends[-1] + 1 : ends[-1] + 1 + k]
            break
    for m in range(hi, max(lo, own + 1) - 1, -1):
        starts = [i for i in range(len(corpus) - m + 1) if corpus[i : i + m] == seq[-m:]]
        if not starts:
            continue
        rows = []
        for i in starts:
            row = corpus[i + m : i + m + k]
            rows.append(row[: row.index(SEPARATOR)] if SEPARATOR in row else row)
        drafts = []
        for j in range(k):
            column = [row[j] for row in rows if len(row) > j]
            if not column:
                break
            drafts.append(min(set(column), key=lambda t: (-column.count(t), t)))
            rows = [row for row in rows if len(row) > j and row[j] == drafts[-1]]
        return drafts or own_drafts
    return own_drafts


def test_drafts_follow_the_most_common_continuation_token_by_token():
    # After "1 2": "3 4" twice, "3 5" once, "6" three times: 3 is the most common first token (3 against 3,
    # the smaller id), and after "1 2 3" the next is 4. A document's end stops a continuation.
    store = _store([1, 2, 3, 4, 9, -1, 1, 2, 3, 4, 7, -1, 1, 2, 3, 5, -1, 1, 2, 6, -1, 1, 2, 6, -1, 1, 2, 6])
    proposer = SuffixProposer(store, 4, match_min=2, match_max=4)
    assert proposer.propose([8, 1, 2]) == [3, 4, 7]  # "1 2 3 4" then 9 or 7 (7 the smaller); then the end
    assert proposer.propose([8, 1, 2], max_tokens=1) == [3]
    assert proposer.propose([0, 3, 4]) == [7]  # "3 4" occurs twice: 9 or 7, then the documents end
    assert proposer.propose([5, 8, 2]) == []  # "8 2" is nowhere; one token is below match_min
    assert proposer.propose([0, 0, 2, 6]) == []  # "2 6" ends every document it is in


def test_the_sequences_own_match_wins_unless_the_store_matches_longer():
    store = _store([1, 2, 3, 4, -1])
    proposer = SuffixProposer(store, 2, match_min=2, match_max=6)
    assert proposer.propose([1, 2, 8, 8, 1, 2]) == [8, 8]  # both match "1 2": the sequence's own wins
    assert proposer.propose([2, 3, 7, 7, 1, 2, 3]) == [4]  # the store matches "1 2 3", the sequence "2 3"
    assert proposer.propose([5, 6, 7, 5, 6, 7]) == [5, 6]  # nothing in the store
    assert SuffixProposer(store, 2, 1, 1).propose([9, 4, 9]) == [4, 9]  # a 1-token own match with min 1


@pytest.fixture(scope="module")
def tiny_store(tiny_qwen, tmp_path_factory):
    """A datastore of the tiny model's own greedy continuations of SHORT_PROMPTS: what speculation on them
    must retrieve, as the prompts hold none of it."""
    import json

    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    outs = plain.generate(SHORT_PROMPTS, params, use_tqdm=False)
    folder = tmp_path_factory.mktemp("datastore")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p + o.outputs[0].text}) + "\n" for p, o in zip(SHORT_PROMPTS, outs)))
    path = folder / "tiny.npz"
    assert main(["spec", "build-datastore", "--model", str(tiny_qwen), "--corpus", str(corpus),
                 "--output", str(path)]) == 0
    return plain, path


def test_build_datastore_writes_the_tokens_and_a_suffix_array(tiny_store):
    from nimblelm.speculative.datastore import load

    plain, path = tiny_store
    store = load(path)
    assert store.vocab_size == plain.llm_engine.model_config.vocab_size
    assert (store.tokens == SEPARATOR).sum() == len(SHORT_PROMPTS)
    assert store.suffix_array.tolist() == sorted(range(len(store.tokens)), key=lambda i: store.tokens[i:].tolist())


def test_build_datastore_refuses_bad_input_in_one_line(tiny_qwen, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    text = tmp_path / "corpus.txt"
    text.write_text("some text\n\nmore text\n")
    cases = [
        (["--model", str(tiny_qwen), "--corpus", str(tmp_path / "missing.txt")], "corpus file not found"),
        (["--model", str(tiny_qwen), "--corpus", str(empty)], "has no text"),
        (["--model", str(tmp_path / "no-such-model"), "--corpus", str(text)], "neither a known alias"),
        (["--model", str(tiny_qwen), "--corpus", str(tmp_path / "corpus.csv")], "corpus file not found"),
        (["--model", str(tiny_qwen), "--corpus", str(text), "--max-tokens", "0"], "--max-tokens"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["spec", "build-datastore", *args, "--output", str(tmp_path / "x.npz")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    (tmp_path / "corpus.csv").write_text("a,b\n")
    assert main(["spec", "build-datastore", "--model", str(tiny_qwen), "--corpus", str(tmp_path / "corpus.csv")]) == 1
    assert ".txt, .jsonl or .json" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_bad_suffix_configs_are_refused(tiny_qwen, tiny_store, tmp_path, monkeypatch):
    _, path = tiny_store
    for options, message in [
        ({"method": "ngram", "num_speculative_tokens": 2, "datastore": str(path)}, "'datastore' applies"),
        ({"method": "suffix", "num_speculative_tokens": 2, "datastore": str(tmp_path / "nope.npz")}, "not found"),
        ({"method": "suffix", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup"),
        ({"method": "draft_model", "num_speculative_tokens": 2, "model": "x", "prompt_lookup_max": 4}, "apply to"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            SpeculativeConfig.from_dict(options)
    assert SpeculativeConfig.from_dict({"method": "suffix", "num_speculative_tokens": 2}).prompt_lookup_max == 16

    # No datastore given and none in the cache: the error says how to build one.
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InvalidRequestError, match="nimblelm spec build-datastore --model"):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "suffix", "num_speculative_tokens": 2})
    # A datastore of another tokenizer is refused, whether given or found by default.
    other = tmp_path / "cache" / "datastores" / "other.sharegpt.npz"
    other.parent.mkdir(parents=True)
    np.savez(other, tokens=np.zeros(1, np.int32), suffix_array=np.zeros(1, np.int32), vocab_size=7,
             tokenizer_digest="d", model="other", corpus="sharegpt")
    with pytest.raises(InvalidRequestError, match="7 tokens"):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=64,
            speculative_config={"method": "suffix", "num_speculative_tokens": 2, "datastore": str(other)})
    with pytest.raises(InvalidRequestError, match="found no ShareGPT datastore"):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "suffix", "num_speculative_tokens": 2})


def test_the_default_datastore_is_found_by_the_targets_vocabulary(tiny_qwen, tiny_store, tmp_path, monkeypatch):
    import shutil

    from nimblelm.speculative.datastore import default_path

    _, path = tiny_store
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path))
    default = default_path(str(tiny_qwen))
    assert default.name == f"{tiny_qwen.name}.sharegpt.npz"
    default.parent.mkdir(parents=True)
    shutil.copy(path, default)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "suffix", "num_speculative_tokens": 2})
    assert len(llm.llm_engine.runner.proposer.store.tokens) == len(np.load(path)["tokens"])


def test_greedy_output_is_identical_with_retrieved_drafts(tiny_qwen, tiny_store):
    plain, path = tiny_store
    spec = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, speculative_config={
        "method": "suffix", "num_speculative_tokens": 4, "datastore": str(path)})
    spec.llm_engine.runner.step_cost = None  # every draft verified, as in test_speculative.py
    for params in [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                   SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)]:
        ref = plain.generate(SHORT_PROMPTS, params, use_tqdm=False)
        out = spec.generate(SHORT_PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    stats = spec.llm_engine.stats().spec
    assert stats.num_accepted_tokens > 0 and stats.mean_acceptance_length > 1


@pytest.mark.integration
def test_real_model_greedy_output_is_identical_with_a_sharegpt_datastore(tmp_path):
    """SmolLM2 with a datastore of the first 300k tokens of ShareGPT's replies, on chat questions: the same
    tokens as plain decoding, and drafts kept."""
    path = tmp_path / "sharegpt.npz"
    assert main(["spec", "build-datastore", "--model", "smollm2-135m", "--max-tokens", "300000",
                 "--output", str(path)]) == 0
    questions = ["Explain what a hash table is.", "Write a Python function that reverses a string."]
    plain = LLM("smollm2-135m", dtype="float32", max_model_len=1024)
    spec = LLM("smollm2-135m", dtype="float32", max_model_len=1024, speculative_config={
        "method": "suffix", "num_speculative_tokens": 4, "datastore": str(path)})
    params = SamplingParams(temperature=0, max_tokens=64)
    for q in questions:  # one at a time: batch 1 on both sides, so only the drafts differ
        prompt = plain.apply_chat_template([{"role": "user", "content": q}])
        ref = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        out = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert spec.llm_engine.stats().spec.num_accepted_tokens > 0
