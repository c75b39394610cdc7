"""`nimblelm bench survey speculative` (bench/survey_spec.py): its workloads, its arithmetic, its options'
errors, and a whole run on a tiny model (llama.cpp skipped where it is not built)."""

from __future__ import annotations

import gzip
import json

import pytest

from nimblelm.bench import datasets
from nimblelm.bench.cli import main
from nimblelm.errors import InvalidRequestError

PROBLEMS = [{"task_id": f"HumanEval/{i}",
             "prompt": f"def f{i}(xs: list[int], k: int = {i}) -> int:\n    \"\"\"Sum of xs plus k.\"\"\"\n",
             "canonical_solution": "    return sum(xs) + k\n", "entry_point": f"f{i}", "test": ""} for i in range(6)]


def _humaneval_file(path):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for p in PROBLEMS:
            f.write(json.dumps(p) + "\n")
    return path


def _sharegpt_file(path, n: int = 40):
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"question {i}: list the numbers from {i} to {i + 5}, then repeat them"},
        {"from": "gpt", "value": " ".join(str(j) for j in range(i, i + 6)) * 2}]} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def test_the_edit_workload_asks_to_put_back_the_type_hints_it_removed(tiny_qwen):
    from nimblelm.models.loader import load_model

    tok = load_model(str(tiny_qwen)).tokenizer
    reqs = datasets.edit_requests(PROBLEMS, tok, 4, seed=3, max_output_len=32)
    assert len(reqs) == 4 and all(r.output_len == 32 for r in reqs)
    text = tok.decode(list(reqs[0].prompt_token_ids))
    assert datasets.EDIT_INSTRUCTION in text and "return sum(xs) + k" in text
    assert "def f" in text and "xs: list[int]" not in text and "-> int" not in text
    assert reqs == datasets.edit_requests(PROBLEMS, tok, 4, seed=3, max_output_len=32)
    with pytest.raises(InvalidRequestError, match="only 0 HumanEval problems fit"):
        datasets.edit_requests(PROBLEMS, tok, 1, max_output_len=32, max_total_len=40)


def test_mt_questions_are_two_turn_chats_fixed_by_the_seed(tiny_qwen):
    from nimblelm.bench import mt_questions
    from nimblelm.models.loader import load_model

    chats = mt_questions.conversations(10, seed=2)
    assert [c[0] for c in chats[:8]] == list(mt_questions.CATEGORIES) and chats == mt_questions.conversations(10, 2)
    assert chats != mt_questions.conversations(10, 3) and all(q and follow for _, q, follow in chats)
    tok = load_model(str(tiny_qwen)).tokenizer
    asked = []

    def answer(prompts):  # the model's first answers, as the bench's plain engine would give them
        asked.extend(prompts)
        return [f"answer number {i}" for i in range(len(prompts))]

    reqs = datasets.mt_requests(tok, 5, answer, seed=2, max_output_len=16)
    assert len(reqs) == 5 and len(asked) == 3 and {r.output_len for r in reqs} == {16}
    assert [list(r.prompt_token_ids) for r in reqs[0::2]] == asked  # turn 1 of each, then its turn 2
    second = tok.decode(list(reqs[1].prompt_token_ids))
    assert chats[0][1] in second and "answer number 0" in second and chats[0][2] in second


def test_chat_requests_render_the_question_alone_in_the_chat_template(tiny_qwen, tmp_path):
    from nimblelm import corpora
    from nimblelm.models.loader import load_model

    tok = load_model(str(tiny_qwen)).tokenizer
    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(_sharegpt_file(tmp_path / "s.json")))
    reqs = datasets.chat_requests(pairs, tok, 5, seed=1, max_output_len=16)
    assert len({r.prompt_token_ids for r in reqs}) == 5 and {r.output_len for r in reqs} == {16}
    text = tok.decode(list(reqs[0].prompt_token_ids))
    assert text.startswith("<|im_start|>user\nquestion ") and text.endswith("<|im_start|>assistant\n")


def _records(lengths_and_seconds, accepted=None):
    return [{"tokens": list(range(n)), "seconds": s, "accepted": None if accepted is None else a,
             "drafted": None if accepted is None else 4 * a, "draft_seconds": None} for (n, s), a in
            zip(lengths_and_seconds, accepted or [0] * len(lengths_and_seconds))]


def test_summary_speedup_is_tokens_per_second_over_plain_and_steps_count_decode_steps():
    from nimblelm.bench.survey_spec import _summary

    plain = _records([(11, 2.0), (21, 4.0)])
    spec = _records([(11, 1.0), (21, 1.0)], accepted=[5, 10])
    row = _summary(spec, plain)
    assert row["speedup"] == pytest.approx((32 / 2.0) / (32 / 6.0))
    assert row["identical"] == 2 and row["output_tokens"] == 32
    # 30 tokens after the first ones, 15 of them drafts the target kept: 15 decode steps
    assert row["tokens_per_step"] == pytest.approx(30 / 15) and row["draft_acceptance"] == pytest.approx(0.25)
    other = _summary(_records([(10, 1.0), (21, 1.0)]), plain)
    assert other["identical"] == 1 and "tokens_per_step" not in other


def test_runs_in_turn_rotate_which_goes_first():
    from nimblelm.bench.survey_spec import _in_turn

    order = []
    out = _in_turn({name: (lambda item, name=name: order.append((item, name)) or f"{name}{item}")
                    for name in ("a", "b", "c")}, [0, 1, 2, 3])
    assert out == {name: [f"{name}{i}" for i in range(4)] for name in ("a", "b", "c")}
    assert [name for _, name in order] == list("abc" "bca" "cab" "abc")


@pytest.mark.parametrize("argv, message", [
    (["--methods", "plain"], "give one or more speculative methods"),
    (["--methods", "draft_model"], "method draft_model needs --draft-model"),
    (["--methods", "ngram", "--draft-model", "x"], "belong to method draft_model"),
    (["--draft-model", "no/such/model"], "'no/such/model' is neither a known alias"),
    (["--methods", "hydra"], "method 'hydra' is not one of"),
    (["--num-speculative-tokens", "99"], "num_speculative_tokens must be an integer in"),
    (["--workloads", "chat,poems"], "unknown: poems"),
    (["--batch-sizes", "0,4"], "--batch-sizes values must be >= 1"),
    (["--request-rates", "0"], "--request-rates: request rate must be > 0"),
    (["--request-rates", "1,inf"], "--request-rates: give finite rates"),
    (["--resume"], "survey speculative always runs whole"),
])
def test_survey_speculative_options_fail_in_one_line(argv, message, capsys):
    assert main(["survey", "speculative", "-t", "1", "--no-measure", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_survey_speculative_on_a_tiny_model(tiny_llama, tmp_path, monkeypatch, capsys):
    """Every workload and method on nimblelm and transformers; the drafter is the target itself, so every
    draft is kept; suffix's datastore and layer_skip's layers come from the ShareGPT file in the run; llama.cpp (not built here)
    and vLLM are skipped with their reasons."""
    from nimblelm.engine import model_runner

    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path / "nobin"))
    # Every draft verified: no step costs (a tiny model's start-up timings would turn most drafts down).
    monkeypatch.setattr(model_runner, "StepCost", lambda seconds_by_rows: None)
    out = tmp_path / "spec"
    rc = main(["survey", "speculative", "--model", str(tiny_llama), "--draft-model", str(tiny_llama),
               "--methods", "ngram,draft_model,suffix,layer_skip", "--num-prompts", "2", "--gen-len", "6",
               "--batch-sizes", "1,3", "--request-rates", "50", "-t", "1", "--no-measure",
               "--no-progress", "--dataset-path", str(_sharegpt_file(tmp_path / "s.json")),
               "--humaneval-path", str(_humaneval_file(tmp_path / "h.jsonl.gz")), "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    got = {(r["backend"], r["method"], r["workload"]): r for r in data["results"]}
    methods = {"nimblelm": ("plain", "ngram", "draft_model", "suffix", "layer_skip"),
               "transformers": ("plain", "prompt lookup", "assisted generation")}
    assert set(got) == {(b, m, w) for b, ms in methods.items() for m in ms for w in ("humaneval", "chat", "mt", "edit")}
    # nimblelm's plain row pools its runs beside each of the 4 methods; every run gave the same tokens.
    runs = {"nimblelm": 4, "transformers": 1}
    for (backend, method, _), r in got.items():
        n = 2 * runs[backend] if method == "plain" else 2
        assert r["requests"] == n and r["identical"] == n and r["tok_s"] > 0
        if method == "plain":
            assert r["speedup"] == pytest.approx(1.0)
    for w in ("humaneval", "chat", "mt", "edit"):
        dm = got["nimblelm", "draft_model", w]
        assert dm["draft_acceptance"] == pytest.approx(1.0) and dm["tokens_per_step"] > 1
        assert 0 < dm["drafting_share"] < 1
    assert [(r["method"], r["batch"], r["requests"]) for r in data["load"]] == [
        (m, b, 4 * b if m == "plain" else b) for m in ("plain", "ngram", "draft_model", "suffix", "layer_skip")
        for b in (1, 3)]
    assert all(r["identical"] == r["requests"] for r in data["load"])
    # Two requests per prompt count at the rate, every one answered as plain decoding at that rate answers it.
    assert [(r["method"], r["rate"], r["requests"]) for r in data["rates"]] == [
        (m, 50.0, 16 if m == "plain" else 4) for m in ("plain", "ngram", "draft_model", "suffix", "layer_skip")]
    assert all(r["identical"] == r["requests"] and r["mean_latency_s"] > 0 for r in data["rates"])
    assert data["backends"]["llama.cpp"]["status"] == "skipped"
    assert "does not run speculative decoding" in data["backends"]["vllm"]["reason"]
    md = (out / "report.md").read_text()
    assert data["datastore"]["tokens"] > 0 and not list(out.glob("*.npz"))  # the run's own, removed after it
    assert data["config"]["methods"]["suffix"]["datastore"].startswith("built in the run from ")
    assert "| nimblelm | suffix | datastore: 0.0M tokens in " in md
    # The tiny model's two layers: the search takes one out, and the run drafts with the other.
    assert data["layer_search"]["path"][1]["kept"] == 1 and len(data["config"]["methods"]["layer_skip"]["skip_layers"]) == 1
    assert "| nimblelm | layer_skip | layer search: " in md and "## layer_skip's search" in md
    assert "## The survey's Table 5 (theirs" in md and "| Eagle | one Transformer Layer |" in md
    assert "| batch 1 | batch 3 |" in md and "| 50 req/s |" in md and "ngram on the editing workload" in md
    assert (out / "survey_speculative.png").is_file()
    assert capsys.readouterr().out.startswith("# bench survey speculative")
