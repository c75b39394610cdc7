"""`nimblelm bench survey data` (bench/survey_data.py, bench/data_tasks.py, bench/lingua_peer.py): its
workloads, its grading and break-even arithmetic, its options' errors, and a whole run on a tiny model beside
the llmlingua package."""

from __future__ import annotations

import json
import re

import pytest

from nimblelm.bench import data_tasks
from nimblelm.bench.cli import main
from nimblelm.bench.survey_data import break_even


@pytest.fixture(scope="module")
def tok(tiny_qwen):
    from nimblelm.models.loader import load_model

    return load_model(str(tiny_qwen)).tokenizer


def test_qa_tasks_ask_about_a_function_their_document_describes(tok):
    tasks = data_tasks.doc_qa_tasks(tok, 6, [300, 600], seed=1)
    assert tasks == data_tasks.doc_qa_tasks(tok, 6, [300, 600], seed=1)
    assert tasks != data_tasks.doc_qa_tasks(tok, 6, [300, 600], seed=2)
    for i, t in enumerate(tasks):
        quoted = re.search(r'"(.*)"', t.question).group(1)
        # the answer is the one function whose documentation starts with the quoted sentence
        sections = t.context.split("\n\n")
        owners = [s for s in sections if " ".join(s.split("\n", 1)[1].split()).startswith(quoted)]
        assert len(owners) == 1 and re.match(rf"[\w.]*\b{t.answer}\(", owners[0]), (quoted, t.answer)
        n = len(tok.encode(t.context, add_special_tokens=False))
        assert n <= [300, 600][i % 2] + 2 * len(sections) or len(sections) == 1
    assert len(tok.encode(tasks[1].context)) > len(tok.encode(tasks[0].context))


def test_needle_tasks_plant_one_fact_at_the_depth_asked(tok):
    tasks = data_tasks.needle_tasks(tok, 5, [400], seed=0)
    for i, t in enumerate(tasks):
        sections = t.context.split("\n\n")
        planted = [j for j, s in enumerate(sections) if s.startswith("The ") and s.endswith(f" code is {t.answer}.")]
        assert len(planted) == 1 and t.answer.isdigit()
        assert planted[0] == round(data_tasks.NEEDLE_DEPTHS[i] * (len(sections) - 1))
        subject = sections[planted[0]].removeprefix("The ").removesuffix(f" code is {t.answer}.")
        assert t.question == f"Question: what is the {subject} code?"


def test_sharegpt_tasks_take_the_longest_prompts_that_fit(tok):
    pairs = [("short", "a"), ("a much longer prompt\n\nwith its ask last", "b"), ("x " * 500, "c"), ("mid one", "d")]
    tasks = data_tasks.sharegpt_tasks(pairs, tok, 2, max_prompt_tokens=100)
    assert [t.context for t in tasks] == ["a much longer prompt\n\nwith its ask last", "mid one"]
    assert tasks[0].rank_question == "with its ask last" and tasks[0].prompt() == tasks[0].context
    assert tasks[0].answer is None


def test_grading():
    qa = data_tasks.DataTask("qa", "", "", "q", "split", 8)
    assert data_tasks.grade(qa, "os.path.split", "") == 1.0
    assert data_tasks.grade(qa, "splitext", "") == 0.0
    chat = data_tasks.DataTask("sharegpt", "", "", "", None, 8)
    assert data_tasks.grade(chat, "the cat sat", "the cat sat") == 1.0
    assert data_tasks.grade(chat, "the dog", "the cat") == pytest.approx(0.5)
    assert data_tasks.grade(chat, "", "") == 1.0 and data_tasks.grade(chat, "x", "") == 0.0


def _record(item: int, n: int, saved: float, cost: float) -> tuple[dict, dict]:
    base = {"workload": "w", "item": item, "prompt_tokens": n, "e2e_s": 10.0}
    return {"workload": "w", "item": item, "e2e_s": 10.0 - saved, "compress_s": cost}, base


@pytest.mark.parametrize("saved, cost, expected", [
    (lambda n: 0.002 * n, lambda n: 0.5 + 0.001 * n, {"tokens": 500, "pays": "above"}),
    (lambda n: 0.002 * n, lambda n: 0.001 * n, {"tokens": 0, "pays": "always"}),
    (lambda n: 0.001 * n, lambda n: 1.0 + 0.002 * n, {"tokens": -1000, "pays": "never"}),
    (lambda n: 1.0 + 0.001 * n, lambda n: 0.002 * n, {"tokens": 1000, "pays": "below"}),
])
def test_break_even_is_where_the_saved_seconds_reach_the_compressors(saved, cost, expected):
    pairs = [_record(i, n, saved(n), cost(n)) for i, n in enumerate((200, 800, 1600))]
    records, baseline = [r for r, _ in pairs], {("w", b["item"]): b for _, b in pairs}
    assert break_even(records, baseline) == expected
    one = [_record(0, 500, 1.0, 0.1)]
    assert break_even([one[0][0]], {("w", 0): one[0][1]}) == {"tokens": None, "pays": None}


@pytest.mark.parametrize("extra, message", [
    (["--workloads", "qa,essay"], "--workloads: comma list of qa, needle, sharegpt, sot (unknown: essay)"),
    (["--methods", "zip"], "--methods: comma list of selective_context, llmlingua, longllmlingua (unknown: zip)"),
    (["--methods", "none", "--lingua-methods", "none"], "needs a compressor"),
    (["--ratios", "1,2"], "--ratios: compression ratios above 1"),
    (["--ratios", "two"], "--ratios: comma list of numbers"),
    (["--context-tokens", "8"], "--context-tokens values must be >= 16"),
])
def test_bad_options_fail_in_one_line(tiny_qwen, capsys, extra, message):
    assert main(["survey", "data", "--model", str(tiny_qwen), "--no-measure", *extra]) == 2
    assert message in capsys.readouterr().err


def _sharegpt_file(path):
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Some background {i}. " * (3 + i) + f"\n\nWhat follows {i}?"},
        {"from": "gpt", "value": "an answer"}]} for i in range(10)]
    path.write_text(json.dumps(records))
    return path


def test_a_whole_run_on_a_tiny_model_beside_llmlingua(tiny_qwen, tmp_path, capsys):
    pytest.importorskip("llmlingua", reason="the llmlingua peer is not installed")
    out = tmp_path / "report"
    code = main(["survey", "data", "--model", str(tiny_qwen), "--scorer", str(tiny_qwen), "--num-prompts", "2",
                 "--ratios", "2,4", "--context-tokens", "100,200", "--workloads", "qa,needle,sharegpt", "--threads", "1", "--no-measure", "--no-progress",
                 "--dataset-path", str(_sharegpt_file(tmp_path / "s.json")), "-o", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    rows = report["results"]
    assert not report["errors"] and not report["skipped"]
    kinds = {(r["workload"], r["backend"], r["method"], r["ratio"]) for r in rows}
    for workload in ("qa", "needle", "sharegpt"):
        assert (workload, "-", "uncompressed", 1.0) in kinds
        for backend, method in [("nimblelm", "selective_context"), ("nimblelm", "llmlingua"),
                                ("nimblelm", "longllmlingua"), ("llmlingua", "llmlingua"),
                                ("llmlingua", "longllmlingua")]:
            for ratio in (2.0, 4.0):
                assert (workload, backend, method, ratio) in kinds
    for r in rows:
        assert r["tasks"] == 2 and r["e2e_s"] > 0 and 0 <= r["accuracy"] <= 1
        if r["backend"] == "nimblelm":  # nimblelm's budgets are the scorer's tokens: the ratio is reached
            assert r["achieved_ratio"] >= 0.9 * r["ratio"]
    for r in report["records"]:
        if r["method"] != "uncompressed":  # (LongLLMLingua's "+100" context budget may keep a short context whole)
            assert r["compressed_tokens"] <= r["context_tokens"] and r["compress_s"] > 0
            assert r["compressed_tokens"] < r["context_tokens"] or r["backend"] == "llmlingua"
    assert len(report["break_even"]) == 10
    text = (out / "report.md").read_text()
    assert "| qa | llmlingua | longllmlingua | 4×" in text and "## Break-even prompt length" in text
    assert (out / "survey_data.png").stat().st_size > 0


def test_sot_questions_take_the_categories_in_turn_fixed_by_the_seed():
    from nimblelm.bench import sot_questions
    from nimblelm.prompting.skeleton import suits_skeleton

    qs = sot_questions.questions(12, seed=4)
    assert qs == sot_questions.questions(12, seed=4) and qs != sot_questions.questions(12, seed=5)
    assert [c for c, _ in qs[:6]] == list(sot_questions.CATEGORIES)
    # the rule router takes the list-like categories and leaves math and coding to plain decoding
    assert all(suits_skeleton(q) == (c not in ("math", "coding")) for c, q in qs)


@pytest.mark.parametrize("reply, expected", [
    ("A", "A"), (" b.", "B"), ("Tie", "tie"), ("Answer A is better", "A"), ("**B**", "B"),
    ("Both", "unclear"), ("", "unclear"), ("Absolutely", "unclear"),
])
def test_the_judges_reply_is_read_as_one_verdict(reply, expected):
    from nimblelm.bench.survey_sot import verdict

    assert verdict(reply) == expected


def test_sot_summary_counts_routed_questions_only():
    from nimblelm.bench.survey_sot import summarize_sot

    def q(routed, plain_s, sot_s, verdicts):
        return {"routed": routed, "plain_s": plain_s, "sot_s": sot_s, "verdicts": verdicts,
                "plain_text": "one two three four", "sot_text": "one two"}

    s = summarize_sot({"questions": [q(True, 6.0, 2.0, ["sot", "tie"]), q(True, 4.0, 4.0, ["plain", "unclear"]),
                                     q(False, 3.0, 3.0, [])],
                       "load": {"plain": {"seconds": 9.0}, "sot": {"seconds": 6.0}}})
    assert s["routed"] == 2 and s["speedup_routed"] == pytest.approx(10 / 6) and s["speedup_all"] == pytest.approx(13 / 9)
    assert s["verdicts"] == {"sot": 1, "plain": 1, "tie": 1, "unclear": 1} and s["sot_or_tie"] == 0.5
    # Two decisive verdicts, both with SoT's answer shown first: one picks it, one picks plain's; neither
    # question's two orders agree.
    assert s["first_picked"] == 0.5 and s["agreed"] == {"sot": 0, "plain": 0, "tie": 0, "split": 2}
    assert s["preference"] is None and s["balanced_sot_or_tie"] is None  # results from before the balanced judge
    rows = [q(True, 1.0, 1.0, ["sot", "plain"]) | {"preference": p} for p in (0.8, 0.52, 0.3, None)]
    judged = summarize_sot({"questions": rows, "load": {"plain": {"seconds": 1.0}, "sot": {"seconds": 1.0}}})
    assert judged["preference"] == pytest.approx(0.54) and judged["balanced"] == {"sot": 1, "plain": 1, "tie": 1}
    assert judged["balanced_sot_or_tie"] == pytest.approx(2 / 3)
    biased = summarize_sot({"questions": [q(True, 1.0, 1.0, ["sot", "plain"]), q(True, 1.0, 1.0, ["plain", "plain"])],
                            "load": {"plain": {"seconds": 1.0}, "sot": {"seconds": 1.0}}})
    assert biased["first_picked"] == 0.75 and biased["agreed"] == {"sot": 0, "plain": 1, "tie": 0, "split": 1}
    assert s["load_speedup"] == 1.5 and s["words_plain"] == 4 and s["words_sot"] == 2


def _fake_judge(first_token_probs):
    """A judge whose reply to the two orders (SoT's answer shown first, then plain's) starts with "A" and has
    P(A), P(B) = first_token_probs[order] at its first token."""
    import math
    from types import SimpleNamespace

    from nimblelm.outputs import Logprob

    class Tokenizer:
        chat_template = "plain"

        def encode(self, text, add_special_tokens=False):
            return {"A": [65], "B": [66]}.get(text) or [ord(c) for c in text[:50]]

        def apply_chat_template(self, messages, **kw):
            return messages[0]["content"]

    def generate(prompts, params, use_tqdm=False):
        assert len(prompts) == 2 and params.logprobs >= 2
        return [SimpleNamespace(outputs=[SimpleNamespace(text="A", logprobs=[
            {65: Logprob(math.log(pa), 1), 66: Logprob(math.log(pb), 2)}])]) for pa, pb in first_token_probs]

    return SimpleNamespace(tokenizer=Tokenizer(), generate=generate)


@pytest.mark.parametrize(("probs", "expected", "verdict"), [
    ([(0.9, 0.1), (0.9, 0.1)], 0.5, "tie"),  # it names whatever is shown first: the bias cancels
    ([(0.8, 0.2), (0.3, 0.7)], 0.75, "sot"),  # SoT's answer likelier in both orders
    ([(0.45, 0.45), (0.6, 0.2)], 0.375, "plain"),
])
def test_the_judges_preference_is_balanced_over_both_orders(probs, expected, verdict):
    from nimblelm.bench import survey_sot

    row = {"question": "q?", "sot_text": "1. a", "plain_text": "a"}
    verdicts, preference = survey_sot.judge_answers(_fake_judge(probs), row)
    assert verdicts == ["sot", "plain"] and preference == pytest.approx(expected)
    assert survey_sot.balanced(preference) == verdict


def test_a_judge_naming_neither_label_has_no_preference():
    from nimblelm.bench.survey_sot import first_choice_share
    from nimblelm.outputs import Logprob

    assert first_choice_share({7: Logprob(-0.1, 1)}, 65, 66) is None
    assert first_choice_share({65: Logprob(-0.1, 1)}, 65, 66) == 1.0


@pytest.mark.parametrize(("verdicts", "expected"), [(["sot", "sot"], "sot"), (["plain", "plain"], "plain"),
                                                    (["tie", "tie"], "tie"), (["sot", "plain"], "split"),
                                                    (["plain", "sot"], "split"), (["sot", "tie"], "split"),
                                                    (["unclear", "unclear"], "split")])
def test_a_questions_verdict_holds_only_when_both_orders_agree(verdicts, expected):
    from nimblelm.bench.survey_sot import agreed

    assert agreed(verdicts) == expected


def test_a_sot_run_on_a_tiny_model(tiny_qwen, tmp_path):
    out = tmp_path / "report"
    assert main(["survey", "data", "--workloads", "sot", "--model", str(tiny_qwen), "--judge", str(tiny_qwen),
                 "--num-prompts", "6", "--gen-len", "8", "--threads", "1", "--no-measure", "--no-progress",
                 "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = report["sot"]["questions"]
    assert [r["category"] for r in rows] == ["generic", "knowledge", "roleplay", "writing", "math", "coding"]
    for r in rows:
        assert r["plain_s"] > 0 and r["sot_s"] > 0 and r["plain_text"]
        assert len(r["verdicts"]) == (2 if r["routed"] else 0)
        assert (r["preference"] is None or 0 <= r["preference"] <= 1) and (r["routed"] or r["preference"] is None)
        if not r["routed"]:  # the fallback is plain decoding of the same prompt: the same greedy answer
            assert r["sot_text"] == r["plain_text"]
    assert report["sot"]["load"]["sot"]["output_tokens"] > 0
    assert "## Skeleton-of-Thought" in (out / "report.md").read_text()


def test_llmlingua_gets_its_kv_cache_as_pairs_per_layer(tiny_qwen):
    """llmlingua 0.2.2 passes and trims past_key_values as (key, value) pairs (transformers 4's format)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nimblelm.bench.lingua_peer import _PairsCache

    model = _PairsCache(AutoModelForCausalLM.from_pretrained(tiny_qwen).eval())
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 8, 61]])
    with torch.no_grad():
        whole = model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        first = model(ids[:, :5], attention_mask=torch.ones_like(ids[:, :5]), use_cache=True)
        pairs = first.past_key_values
        assert isinstance(pairs, list) and all(len(p) == 2 for p in pairs)
        trimmed = [(k[..., :4, :], v[..., :4, :]) for k, v in pairs]  # as llmlingua trims a cache
        rest = model(ids[:, 4:], attention_mask=torch.ones_like(ids), past_key_values=trimmed, use_cache=True)
    torch.testing.assert_close(rest.logits, whole.logits[:, 4:], rtol=1e-4, atol=1e-4)
    assert rest.past_key_values[0][0].shape[2] == 8
