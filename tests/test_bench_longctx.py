"""`nimblelm bench survey longctx` (bench/survey_longctx.py, data_tasks.needle_prompt): its prompts' exact
lengths and needle depths, its options' one-line errors, and each workload run through the report writer on the
tiny model; beside kvpress on the packaged SmolLM2-135M in the integration test."""

from __future__ import annotations

import json

import pytest

from nimblelm.bench import data_tasks
from nimblelm.bench.cli import main
from nimblelm.bench.survey_longctx import Engines, needle_summary, run_requests


@pytest.fixture(scope="module")
def tok(tiny_qwen):
    from nimblelm.models.loader import load_model

    return load_model(str(tiny_qwen)).tokenizer


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_prompts_are_exact_in_length_and_depth(tok, depth):
    p = data_tasks.needle_prompt(tok, 300, depth, seed=3)
    context = p.token_ids[p.context_start : p.context_start + p.context_tokens]
    needle = context[p.position : p.position + p.needle_tokens]
    subject = tok.decode(needle).strip().removeprefix("The ").removesuffix(f" code is {p.answer}.")
    assert subject in data_tasks.NEEDLE_SUBJECTS and p.answer.isdigit()
    assert needle == _encode(tok, f"\nThe {subject} code is {p.answer}.\n")
    assert p.context_tokens == 300 and len(p.token_ids) > 300
    assert p.depth_asked == depth and abs(p.depth - depth) <= 64 / (300 - p.needle_tokens)
    if depth in (0.0, 1.0):  # the ends are exact; between them the needle starts a line
        assert p.depth == depth
    elif p.position:
        assert tok.decode(context[p.position - 1 : p.position]).endswith("\n")
    question = tok.decode(p.token_ids[p.context_start + p.context_tokens :])
    assert question.endswith(f"Question: what is the {subject} code?\nAnswer: The {subject} code is")
    assert p == data_tasks.needle_prompt(tok, 300, depth, seed=3)
    assert p.found(f" {p.answer}.") and not p.found(f"{p.answer}7")


def test_one_contexts_depths_share_their_haystack(tok):
    a, b = (data_tasks.needle_prompt(tok, 200, d) for d in (0.0, 1.0))
    hay_a = a.token_ids[a.context_start + a.needle_tokens : a.context_start + a.context_tokens]
    hay_b = b.token_ids[b.context_start : b.context_start + b.context_tokens - b.needle_tokens]
    n = min(len(hay_a), len(hay_b))  # the needles' lengths differ with their subjects
    assert n >= 200 - 2 * max(a.needle_tokens, b.needle_tokens) and hay_a[:n] == hay_b[:n]
    assert data_tasks.needle_prompt(tok, 200, 0.0, seed=1).token_ids != a.token_ids
    with pytest.raises(ValueError, match="cannot hold the needle"):
        data_tasks.needle_prompt(tok, 4, 0.5)


def test_a_haystack_longer_than_the_documentation_repeats_it(tok, monkeypatch):
    pool = data_tasks._sections()[:2]
    monkeypatch.setattr(data_tasks, "_sections", lambda: list(pool))
    one_pass = sum(len(_encode(tok, s.text + "\n\n")) for s in pool)
    ids = data_tasks.haystack_ids(tok, 3 * one_pass + 5)
    assert len(ids) == 3 * one_pass + 5


def test_the_needle_summary_compares_with_kvpress_cell_by_cell():
    def rec(engine, method, depth, correct, answer):
        return {"engine": engine, "method": method, "ratio": 0.5, "context": 100, "depth": depth, "correct": correct,
                "answer": answer, "compacted": True if engine == "nimblelm" else None}

    rows = needle_summary([rec("nimblelm", "snapkv", 0, True, " 1234."), rec("nimblelm", "snapkv", 100, False, " 99"),
                           rec("kvpress", "snapkv", 0, True, "1234. "), rec("kvpress", "snapkv", 100, False, " 98")],
                          [100], [0, 100])
    ours, theirs = rows
    assert ours["accuracy"] == 0.5 and ours["by_depth"] == [1.0, 0.0] and ours["by_context"] == [0.5]
    assert ours["same_as_kvpress"] == 0.5 and ours["compacted"] == 1.0
    assert theirs["same_as_kvpress"] is None and theirs["compacted"] is None


TINY = ["--threads", "1", "--no-measure", "--no-progress", "--kvpress-methods", "none", "--context-tokens", "160",
        "--depths", "0,100", "--ratios", "0.5", "--ppl-tokens", "300", "--ppl-budgets", "64,128", "--chunk", "64",
        "--speed-contexts", "80,200", "--budget", "80", "--num-prompts", "3", "--serve-context", "400",
        "--serve-budget", "64", "--gen-len", "6"]


@pytest.mark.parametrize("extra, message", [
    (["--workloads", "needle,essay"], "--workloads: comma list of needle, ppl, speed, serve (unknown: essay)"),
    (["--methods", "lru"], "(unknown: lru)"),
    (["--kvpress-methods", "tova"], "--kvpress-methods: comma list of snapkv, pyramidkv, streaming (unknown: tova)"),
    (["--ratios", "0.2,1"], "--ratios: kept fractions in (0, 1)"),
    (["--ratios", "half"], "--ratios: comma list of numbers"),
    (["--depths", "0,120"], "--depths: percentages from 0 to 100"),
    (["--context-tokens", "32"], "must be >= 64"),
    (["--ppl-budgets", "300"], "--ppl-budgets must stay below --ppl-tokens (300)"),
    (["--chunk", "32"], "--chunk must be >= snapkv's window (64)"),
    (["--ppl-budgets", "32"], "budget must be an integer of at least window_size (64)"),
    (["--context-tokens", "600"], "go beyond"),
    (["--workloads", "speed", "--speed-contexts", "4096"], "--speed-contexts: none fits"),
    (["--speed-batch", "0"], "--speed-batch must be >= 1"),
])
def test_bad_options_fail_in_one_line(tiny_qwen, capsys, extra, message):
    assert main(["survey", "longctx", "--model", str(tiny_qwen), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("step_tokens, steady_steps", [(2048, 5), (128, 3)])
def test_decode_counts_the_steps_the_whole_batch_decodes_in(tiny_qwen, step_tokens, steady_steps):
    """Three prompts of 100 tokens, 6 tokens each. In one step all three are in: 5 steps of 3 tokens. At 128
    tokens a step they are in at steps 1 to 3 (100 + 28, 72 + 55, 45), the first having its third token when the
    last has its first: 3 steps of 3."""
    from nimblelm import SamplingParams

    llm = Engines(str(tiny_qwen), "float32", 1, None, "auto").llm(None, 128, max_num_seqs=3,
                                                                  max_num_batched_tokens=step_tokens)
    prompts = [[5 + k + i % 50 for i in range(100)] for k in range(3)]
    run = run_requests(llm, prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in run.outputs] == [6, 6, 6]
    assert run.decode_tokens == 3 * steady_steps and 0 < run.decode_seconds < run.seconds


def test_every_workload_on_the_tiny_model(tiny_qwen, tmp_path):
    out = tmp_path / "report"
    assert main(["survey", "longctx", "--model", str(tiny_qwen), *TINY, "--methods", "streaming,snapkv,full-int4",
                 "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["kind"] == "survey-longctx" and not report["errors"] and not report["skipped"]
    assert set(report["timings"]) == {"needle", "ppl", "speed", "serve"}
    assert report["machine"]["nimblelm_commit"] and report["precision"].startswith("float32")
    rows = {w: [r for r in report["results"] if r["workload"] == w] for w in report["timings"]}

    assert [(r["engine"], r["method"], r["ratio"]) for r in rows["needle"]] == [
        ("nimblelm", "full", 1.0), ("nimblelm", "streaming", 0.5), ("nimblelm", "snapkv", 0.5),
        ("nimblelm", "full-int4", 1.0)]
    assert all(r["cells"] == 2 and len(r["by_depth"]) == 2 for r in rows["needle"])
    assert [r["compacted"] for r in rows["needle"][1:]] == [1.0, 1.0, 0.0]
    assert {(r["context"], r["depth"]) for r in report["records"]} == {(160, 0), (160, 100)}

    ppl = {(r["method"], r["budget"]): r for r in rows["ppl"]}
    assert set(ppl) == {("full", None), ("full-int4", None), *((m, b) for m in ("streaming", "snapkv") for b in (64, 128))}
    assert ppl[("full-int4", None)]["ppl"] != ppl[("full", None)]["ppl"]
    assert ppl[("full", None)]["compactions"] == 0 and ppl[("streaming", 64)]["compactions"] >= 3
    # at most the budget and a chunk (8 blocks: without prefix caching a compaction is in place, no copy), against
    # the text's 19
    assert ppl[("streaming", 64)]["kv_peak_bytes"] == 8 / 19 * ppl[("full", None)]["kv_peak_bytes"]
    assert all(r["ppl"] > 1 and r["tail_from"] == 128 for r in rows["ppl"])

    speed = {(r["method"], r["context"]): r for r in rows["speed"]}
    # 80: within the budget; a full cache has none
    assert set(speed) == {("full", 80), ("full", 200), ("streaming", 200), ("snapkv", 200), ("full-int4", 80),
                          ("full-int4", 200)}
    assert speed[("full-int4", 200)]["kv_decode_bytes"] < speed[("full", 200)]["kv_decode_bytes"] / 4
    for method in ("streaming", "snapkv"):
        ours, full = speed[(method, 200)], speed[("full", 200)]
        assert ours["compactions"] >= 1 and ours["kv_decode_bytes"] < full["kv_decode_bytes"]
        assert ours["kv_peak_bytes"] > full["kv_decode_bytes"] * 0.9  # the whole prompt was in before compacting
        assert ours["decode_tok_s"] > 0 and ours["prefill_vs_full"] > 0

    serve = {r["method"]: r for r in rows["serve"]}
    assert set(serve) == {"full", "streaming", "snapkv", "full-int4"}
    assert serve["full-int4"]["peak_running"] == 3 and serve["full-int4"]["budget"] is None
    assert serve["full"]["requests"] == 3 and serve["full"]["peak_running"] <= 2  # memory for two whole requests
    assert serve["snapkv"]["compactions"] >= 1 and serve["full"]["vs_full"] == 1.0

    text = (out / "report.md").read_text()
    for heading in ("## Needle in a haystack", "## Perplexity in the streaming setting", "## Speed and KV memory",
                    "## Serving long requests", "- took: needle"):
        assert heading in text
    assert "| nimblelm | snapkv | 0.5 |" in text and "| nimblelm | full-int4 | all |" in text
    assert "- kvpress: not run" in text
    for png in ("longctx_needle_nimblelm.png", "longctx_ppl.png", "longctx_speed.png"):
        assert (out / png).stat().st_size > 0


def test_full_caches_alone_plot_and_report(tiny_qwen, tmp_path):
    """Methods that are all full caches (no budgets to plot against) still give every file; speed at batch 2."""
    assert main(["survey", "longctx", "--model", str(tiny_qwen), *TINY, "--methods", "full-int8", "--workloads",
                 "ppl,speed", "--speed-batch", "2", "-o", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {(r["workload"], r["method"]) for r in report["results"]} == {
        (w, m) for w in ("ppl", "speed") for m in ("full", "full-int8")}
    assert all(r["batch"] == 2 and r["decode_tok_s"] > 0 for r in report["results"] if r["workload"] == "speed")
    assert (tmp_path / "longctx_ppl.png").stat().st_size > 0 and "full-int8" in (tmp_path / "report.md").read_text()


@pytest.mark.integration
def test_beside_kvpress_on_smollm2(tmp_path):
    """The packaged SmolLM2-135M's needle beside kvpress on its float32 weights: every row there, the full
    caches' answers (one set of weights, greedy) the same."""
    out = tmp_path / "report"
    assert main(["survey", "longctx", "--model", "smollm2-135m", "--workloads", "needle", "--threads", "2",
                 "--no-measure", "--no-progress", "--context-tokens", "512", "--depths", "0,100", "--ratios", "0.25",
                 "-o", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert not report["errors"] and not report["skipped"]
    rows = {(r["engine"], r["method"]): r for r in report["results"]}
    assert set(rows) == {(e, m) for e in ("nimblelm", "kvpress") for m in ("full", "streaming", "snapkv")}
    assert rows[("nimblelm", "full")]["same_as_kvpress"] == 1.0
    assert (out / "longctx_needle_kvpress.png").stat().st_size > 0
