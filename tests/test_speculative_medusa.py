"""Speculative method "medusa": the training data (questions apart from the benchmarks', the label offsets,
the hidden states), `nimblelm spec train` end to end on a tiny model, the heads' config errors, and output
with their drafts identical to plain decoding (greedy) or running (sampled)."""

import json
import shutil

import pytest
import torch

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.cli import main
from nimblelm.speculative import SpeculativeConfig, medusa
from nimblelm.speculative import medusa_train as mt
from nimblelm.speculative.seen import Seen

PROMPTS = ["one two three four", "The cat sat on the mat. The cat", "Rivers", "def add(a, b):\n    return"]


def _sharegpt_file(path, n: int = mt.BENCH_RESERVED + 200, distinct: int | None = None):
    """n records whose first question is one of `distinct` texts (all distinct by default)."""
    distinct = distinct or n
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"question {i % distinct}: what comes after {i % distinct}?"},
        {"from": "gpt", "value": f"{i % distinct + 1} comes after it."}]} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def test_label_rows_give_head_i_the_token_i_plus_2_places_on():
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]  # a prompt of 3, an answer of 5
    positions, labels = mt.label_rows(tokens, prompt_len=3, num_heads=3)
    # From the prompt's last position (its hidden state chose the first answer token, 13) while head 0 has a
    # label; head i at t learns token t + i + 2, none past the end.
    assert positions == [2, 3, 4, 5]
    assert labels == [[14, 15, 16], [15, 16, 17], [16, 17, -1], [17, -1, -1]]
    assert mt.label_rows([1, 2, 3], prompt_len=2, num_heads=2) == ([], [])  # one answer token: no head's label


def test_the_hidden_state_at_t_is_the_one_that_chose_token_t_plus_1(tiny_llm):
    """The features are the engine's convention: the target's logits from the hidden state at position t pick
    token t + 1 of its own greedy answer, as the row the runner hands the proposer picked the newest token."""
    prompt = tiny_llm.tokenizer("The cat sat", add_special_tokens=False)["input_ids"]
    answer = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
    runner = tiny_llm.llm_engine.runner
    tokens = prompt + list(answer)
    hidden = mt.hidden_states(runner, tokens, mt.scratch_kv(runner, len(tokens)))
    assert hidden.shape == (len(tokens), runner.config.hidden_size)
    with torch.inference_mode():
        chosen = runner.model.compute_logits(hidden[len(prompt) - 1 : -1]).argmax(-1)
    assert chosen.tolist() == list(answer)


def test_training_questions_are_none_of_the_benchmarks(tiny_qwen, tmp_path):
    """Questions repeat in ShareGPT: none the benchmarks' chat requests take (from the front of the seed-0
    order) is trained on, not even as the text of another record."""
    from nimblelm import corpora
    from nimblelm.bench import datasets
    from nimblelm.models.loader import load_model

    tok = load_model(str(tiny_qwen)).tokenizer
    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(_sharegpt_file(tmp_path / "s.json", 5000, distinct=3000)))
    questions = list(mt.training_questions(pairs))
    assert questions and len(set(questions)) == len(questions)
    bench = datasets.chat_requests(pairs, tok, 1000, seed=0, max_output_len=16)
    trained = mt.chat_prompts(iter(questions), tok, len(questions), 512)
    assert not {tuple(p) for p in trained} & {r.prompt_token_ids for r in bench}
    assert mt.draft_vocabulary([[5, 5, 7, 9], [7, 5]], 2, 384).tolist() == [5, 7]  # the most frequent, by id
    assert mt.draft_vocabulary([[5]], 0, 384) is None


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    """Heads trained by the CLI on the tiny model's answers to a small ShareGPT file."""
    folder = tmp_path_factory.mktemp("medusa")
    path = folder / "tiny.medusa.safetensors"
    assert main(["spec", "train", "--method", "medusa", "--model", str(tiny_qwen), "--prompts", "24",
                 "--max-new-tokens", "24", "--epochs", "2", "--vocab-size", "128", "--threads", "1",
                 "--dataset-path", str(_sharegpt_file(folder / "s.json")), "--output", str(path)]) == 0
    return path


def test_spec_train_writes_heads_and_what_they_cost(trained, tiny_qwen):
    tensors, meta = medusa.read(trained)
    assert tensors["resblock.weight"].shape == (4, 64, 64) and tensors["resblock.bias"].shape == (4, 64)
    assert len(tensors["vocab_ids"]) == meta["draft_vocab_size"] <= 128
    assert tensors["vocab_ids"].tolist() == sorted(set(tensors["vocab_ids"].tolist()))
    assert meta["model"] == str(tiny_qwen) and meta["vocab_size"] == 384 and meta["num_heads"] == 4
    assert len(meta["tokenizer_digest"]) == 16 and meta["prompts"] + meta["held_out_prompts"] == 24
    assert len(meta["held_out_accuracy"]) == 4 and all(0 <= a <= 1 for a in meta["held_out_accuracy"])
    assert meta["train_tokens"] > 0 and meta["held_out_tokens"] > 0
    cost = meta["cost"]
    assert cost["threads"] == 1 and cost["wall_s"] >= cost["generate_s"] + cost["train_s"] > 0
    assert cost["cpu_hours"] == pytest.approx(cost["wall_s"] / 3600, abs=1e-3)


@pytest.fixture(scope="module")
def tiny_norm(tiny_qwen):
    """The tiny model's final norm weights: what identifies it to its heads."""
    from nimblelm.models.loader import load_model

    return load_model(str(tiny_qwen)).weights["model.norm.weight"].float()


def _write(path, num_heads: int, norm: torch.Tensor, *, vocab_ids=None, scale: float = 0.0, **meta):
    """A heads file for the tiny model (norm: its final norm's weights): zero blocks (each head then guesses
    what the target itself would next), or random ones of the given scale."""
    g = torch.Generator().manual_seed(0)
    heads = mt._Heads(num_heads, 64, norm, 1e-6, torch.zeros(1, 64))
    with torch.no_grad():
        heads.weight.copy_(scale * torch.randn(heads.weight.shape, generator=g))
        heads.bias.copy_(scale * torch.randn(heads.bias.shape, generator=g))
    mt.write_heads(path, heads, vocab_ids, {"method": "medusa", "model": "tiny", "vocab_size": 384,
                                            "hidden_size": 64, "num_layers": 2, **meta})
    return path


def test_zero_heads_guess_the_targets_own_next_token_in_any_vocabulary(tiny_qwen, tiny_norm, tmp_path):
    """Blocks at zero leave the target's norm and output layer: every head's draft is the target's top token
    for the hidden state given, among the draft vocabulary's rows where there is one."""
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    subset = torch.arange(0, 384, 3)
    for vocab_ids in (None, subset):
        path = _write(tmp_path / "zero.medusa.safetensors", 3, tiny_norm, vocab_ids=vocab_ids)
        llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={
            "method": "medusa", "num_speculative_tokens": 3, "model": str(path)})
        runner = llm.llm_engine.runner
        with torch.inference_mode():
            logits = runner.model.compute_logits(h)
        best = logits.argmax(-1) if vocab_ids is None else vocab_ids[logits[:, vocab_ids].argmax(-1)]
        runner.proposer.observe({7: Seen(0, h[:1], [1]), 8: Seen(0, h[:2], [1, 1]), 9: Seen(0, h[2:], [1])})
        drafts = runner.proposer.propose_all({7: ([1], 1, 3), 8: ([1], 1, 1), 9: ([1], 1, 2)})
        assert drafts == {7: [best[0].item()] * 3, 8: [best[1].item()], 9: [best[2].item()] * 2}
        assert runner.proposer.propose_all({}) == {}


def test_bad_medusa_configs_are_refused_in_one_clear_line(tiny_qwen, tiny_norm, trained, tmp_path, monkeypatch):
    for options, message in [
        ({"method": "medusa", "num_speculative_tokens": 2, "model": str(tmp_path / "nope.safetensors")}, "not found"),
        ({"method": "ngram", "num_speculative_tokens": 2, "model": str(trained)}, "'model' names"),
        ({"method": "medusa", "num_speculative_tokens": 2, "datastore": str(trained)}, "'datastore' applies"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            SpeculativeConfig.from_dict(options)

    def refused(path, k: int = 2) -> str:
        with pytest.raises(InvalidRequestError) as e:
            LLM(str(tiny_qwen), dtype="float32", max_model_len=64,
                speculative_config={"method": "medusa", "num_speculative_tokens": k, "model": str(path)})
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "guess 4 tokens: ask for at most 4" in refused(trained, k=5)
    assert "tokenizer of 300 tokens" in refused(_write(tmp_path / "a.medusa.safetensors", 2, tiny_norm, vocab_size=300))
    assert "2 layers of 32" in refused(_write(tmp_path / "b.medusa.safetensors", 2, tiny_norm, hidden_size=32))
    assert "another model with the target's shapes" in refused(
        _write(tmp_path / "c.medusa.safetensors", 2, tiny_norm * 1.1))
    (tmp_path / "d.medusa.safetensors").write_text("not safetensors")
    assert "is not a heads file" in refused(tmp_path / "d.medusa.safetensors")

    # Nothing given and nothing trained for this model in the cache (a foreign file there is passed over).
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    medusa.heads_dir().mkdir(parents=True)
    shutil.copy(tmp_path / "a.medusa.safetensors", medusa.heads_dir())
    with pytest.raises(InvalidRequestError, match="nimblelm spec train --method medusa --model MODEL"):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "medusa", "num_speculative_tokens": 2})
    # The trained heads, where spec train writes them by default, are found by the target.
    default = medusa.default_path(str(tiny_qwen))
    assert default == medusa.heads_dir() / f"{tiny_qwen.name}.medusa.safetensors"
    shutil.copy(trained, default)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, speculative_config={"method": "medusa", "num_speculative_tokens": 2})
    assert llm.llm_engine.runner.proposer.meta["model"] == str(tiny_qwen)


@pytest.fixture(scope="module")
def plain(tiny_qwen):
    return LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8)


def _spec(tiny_qwen, path, k: int) -> LLM:
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8,
              speculative_config={"method": "medusa", "num_speculative_tokens": k, "model": str(path)})
    llm.llm_engine.runner.step_cost = None  # every draft verified, as in test_speculative.py
    return llm


@pytest.mark.parametrize("heads", ["trained", "random"])
def test_greedy_output_is_identical_with_medusa_drafts_in_a_batch(heads, tiny_qwen, tiny_norm, trained, plain,
                                                                  tmp_path):
    path = trained if heads == "trained" else _write(tmp_path / "r.medusa.safetensors", 4, tiny_norm, scale=0.5,
                                                     vocab_ids=torch.arange(0, 384, 2))
    for k in (4, 2):
        spec = _spec(tiny_qwen, path, k)
        for params in [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                       SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),  # room below k
                       SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["the"])]:
            ref = plain.generate(PROMPTS, params, use_tqdm=False)
            out = spec.generate(PROMPTS, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
            assert [o.outputs[0].text for o in out] == [r.outputs[0].text for r in ref]
        stats = spec.llm_engine.stats().spec
        assert stats.num_draft_tokens > 0 and len(stats.accepted_per_position) <= k


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["trained", "whole vocabulary", "vocabulary out of order"])
def test_medusa_trees_over_ranks(heads, tiny_qwen, tiny_norm, trained, plain, tmp_path):
    """The last of 2 stages drafts from its hidden states and output layer (every stage holds it); over 2
    tensor-parallel ranks each holds its vocabulary slice's output rows (of the whole vocabulary, or of a draft
    vocabulary however its file lists it), and both draft, their logits gathered: the drafts one process makes,
    and its output. Zero heads guess the target's own next token, so that many drafts are kept."""
    path = trained
    if heads != "trained":
        order = torch.randperm(384, generator=torch.Generator().manual_seed(0))[:192]
        path = _write(tmp_path / "zero.medusa.safetensors", 3, tiny_norm,
                      vocab_ids=None if heads == "whole vocabulary" else order)
    config = {"method": "medusa", "num_speculative_tokens": 3, "model": str(path),
              "speculative_token_tree": [[0], [0, 0], [0, 0, 0], [1], [1, 0], [2]]}
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    stats = []
    splits = ((1, 1), (1, 2), (2, 1)) if heads == "trained" else ((1, 1), (2, 1))
    for tp, pp in splits:  # eager: no step costs to prune the trees
        spec = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=8, tensor_parallel_size=tp,
                   pipeline_parallel_size=pp, enforce_eager=True, speculative_config=config)
        out = spec.generate(PROMPTS, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
        stats.append(spec.llm_engine.stats().spec)
    assert all(s == stats[0] for s in stats) and stats[0].num_accepted_tokens > 0


def test_sampling_with_medusa_drafts_runs_and_is_reproducible(tiny_qwen, trained):
    spec = _spec(tiny_qwen, trained, 3)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_tokens=30, seed=7, ignore_eos=True)
    a = spec.generate(PROMPTS, params, use_tqdm=False)
    b = spec.generate(PROMPTS, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    assert all(len(c.token_ids) == 30 for o in a for c in o.outputs)
    assert spec.llm_engine.stats().spec.num_draft_tokens > 0


@pytest.mark.parametrize("args, message", [
    (["--num-heads", "0"], "--num-heads must be in [1, 15]"),
    (["--num-heads", "16"], "--num-heads must be in [1, 15]"),
    (["--prompts", "1"], "--prompts must be at least 2"),
    (["--epochs", "0"], "--epochs >= 1"),
    (["--vocab-size", "-1"], "--vocab-size >= 0"),
    (["--prompts", "100000"], "fewer than the 100000 asked for"),
    (["--max-new-tokens", "600"], "leaves no room for a prompt"),
    (["--model", "no/such/model"], "neither a known alias"),
    (["--dataset-path", "/no/such/file.json"], "dataset file not found"),
])
def test_spec_train_refuses_bad_options_in_one_line(args, message, tiny_qwen, tmp_path, capsys):
    data = _sharegpt_file(tmp_path / "s.json")
    argv = ["spec", "train", "--method", "medusa", "--model", str(tiny_qwen), "--dataset-path", str(data),
            "--output", str(tmp_path / "x.medusa.safetensors"), "--threads", "1", *args]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.medusa.safetensors").exists()


def test_spec_train_usage_errors_exit_2(tiny_qwen):
    with pytest.raises(SystemExit) as e:
        main(["spec", "train", "--method", "hydra", "--model", str(tiny_qwen)])
    assert e.value.code == 2


@pytest.mark.integration
def test_real_model_greedy_output_is_identical_with_medusa_drafts(tmp_path):
    """SmolLM2 with heads trained in half a minute on its answers to 12 ShareGPT questions, none of which the
    benchmarks ask: the same tokens as plain decoding at batch 1, with drafts kept."""
    from nimblelm import corpora
    from nimblelm.bench import datasets

    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path()))
    path = tmp_path / "smollm2.medusa.safetensors"
    assert main(["spec", "train", "--method", "medusa", "--model", "smollm2-135m", "--prompts", "12",
                 "--max-new-tokens", "64", "--epochs", "2", "--threads", "1", "--output", str(path)]) == 0
    plain = LLM("smollm2-135m", dtype="float32", max_model_len=1024)
    bench = datasets.chat_requests(pairs, plain.tokenizer, 8 + 1 + 8 + 32, seed=0)  # the survey's defaults
    trained = mt.chat_prompts(mt.training_questions(pairs), plain.tokenizer, mt.DEFAULT_PROMPTS, mt.MAX_PROMPT_TOKENS)
    assert not {tuple(p) for p in trained} & {r.prompt_token_ids for r in bench}

    spec = LLM("smollm2-135m", dtype="float32", max_model_len=1024, speculative_config={
        "method": "medusa", "num_speculative_tokens": 4, "model": str(path)})
    spec.llm_engine.runner.step_cost = None  # every draft verified: the budget's timings would vary with the load
    params = SamplingParams(temperature=0, max_tokens=64)
    for request in bench[:3]:  # one at a time: batch 1 on both sides, so only the drafts differ
        ref = plain.generate([list(request.prompt_token_ids)], params, use_tqdm=False)[0].outputs[0]
        out = spec.generate([list(request.prompt_token_ids)], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == ref.token_ids and out.text == ref.text
    assert spec.llm_engine.stats().spec.num_accepted_tokens > 0


def test_survey_speculative_reports_the_heads_training_cost_or_that_there_are_none(tiny_qwen, trained, tmp_path,
                                                                                    monkeypatch):
    """The bench never trains: without heads the medusa row fails with the reason (and the run, with nothing
    measured), with the cached ones its extra cost is their training's CPU-hours, from the file."""
    from nimblelm.bench.cli import main as bench_main
    from nimblelm.engine import model_runner

    monkeypatch.setattr(model_runner, "StepCost", lambda seconds_by_rows: None)  # every draft verified
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    data = _sharegpt_file(tmp_path / "s.json", 40)

    def run(out, status=0):
        assert bench_main(["survey", "speculative", "--model", str(tiny_qwen), "--methods", "medusa", "--backends",
                           "nimblelm", "--workloads", "chat", "--num-prompts", "2", "--gen-len", "8", "--batch-sizes",
                           "1", "-t", "1", "--no-measure", "--no-progress", "--dataset-path", str(data), "--output",
                           str(out)]) == status
        return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()

    # No method ran, so nothing was measured beside plain decoding: exit status 1, the report says why.
    report, _ = run(tmp_path / "none", status=1)
    assert report["results"] == []
    status = report["backends"]["nimblelm medusa"]
    assert status["status"] == "failed" and "nimblelm spec train --method medusa" in status["reason"]
    medusa.heads_dir().mkdir(parents=True)
    shutil.copy(trained, medusa.default_path(str(tiny_qwen)))
    report, md = run(tmp_path / "heads")
    row = next(r for r in report["results"] if r["method"] == "medusa")
    assert row["identical"] == row["requests"] == 2
    cost = report["backends"]["nimblelm medusa"]["heads"]["cost"]
    assert f"| nimblelm | medusa | medusa heads: {cost['cpu_hours']:.2f} CPU-hours (" in md
