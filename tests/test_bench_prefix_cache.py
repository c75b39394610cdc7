"""Prefix caching in the benchmarks: the shared-prefix and multi-turn workloads, the order of a conversation's
turns, the hit-rate accounting (engine stats, /metrics, per-response counts), and the report's columns.

Everything runs on a tiny tokenizer and model, a fake OpenAI server on 127.0.0.1, in seconds.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from tiny_models import IM_END_ID, TRAINING_TEXT, make_tokenizer

from nimblelm import corpora
from nimblelm.bench import datasets, prefix_cache, report
from nimblelm.bench.backends import BenchContext
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.metrics import RequestRecord
from nimblelm.errors import InvalidRequestError

LINES = [ln for ln in TRAINING_TEXT.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(384)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _pairs(n: int) -> list[tuple[str, str]]:
    return [(f"question {i}: {LINES[i % len(LINES)]}", " ".join(LINES[(i + k) % len(LINES)] for k in range(1 + i % 3)))
            for i in range(n)]


# ---------------------------------------------------------------------------------------- shared prefix


def test_shared_prefix_prompts_share_the_system_turn_token_for_token(tok):
    pairs = _pairs(40)
    reqs = datasets.shared_prefix_requests(pairs, tok, 12, prefix_len=120, seed=3, max_output_len=20,
                                           max_total_len=400)
    assert len(reqs) == 12
    end = reqs[0].prompt_token_ids.index(IM_END_ID) + 1  # the system turn ends with <|im_end|>
    head = reqs[0].prompt_token_ids[:end]
    assert all(r.prompt_token_ids[:end] == head for r in reqs)
    assert datasets.common_prefix_len(reqs) >= end
    head_text = tok.decode(list(head))
    assert head_text.startswith("<|im_start|>system\n") and head_text.endswith("<|im_end|>")
    system = head_text.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>")
    assert 110 <= len(_ids(tok, system)) <= 120  # cut at 120 tokens, re-encoded whole
    by_question = {q: c for q, c in pairs}
    for r in reqs:
        tail = tok.decode(list(r.prompt_token_ids[end:]))
        question = tail.removeprefix("\n<|im_start|>user\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n")
        assert tail == f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        assert r.output_len == min(20, len(_ids(tok, by_question[question])))
        assert r.prompt_len + r.output_len <= 400 and r.conversation is None
    assert len({r.prompt_token_ids for r in reqs}) == 12
    assert reqs == datasets.shared_prefix_requests(pairs, tok, 12, prefix_len=120, seed=3, max_output_len=20,
                                                   max_total_len=400)
    other = datasets.shared_prefix_requests(pairs, tok, 12, prefix_len=120, seed=4, max_output_len=20,
                                            max_total_len=400)
    assert other[0].prompt_token_ids[:end] != head  # another seed, another system prompt


def test_shared_prefix_refuses_what_it_cannot_build(tok):
    with pytest.raises(InvalidRequestError, match="fewer than"):
        datasets.shared_prefix_requests(_pairs(40), tok, 12, prefix_len=120, max_total_len=150)
    with pytest.raises(InvalidRequestError, match="fewer than --prefix-len"):
        datasets.shared_prefix_requests(_pairs(2), tok, 1, prefix_len=100_000)
    plain = make_tokenizer(384)
    plain.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat\\s+template"):
        datasets.shared_prefix_requests(_pairs(40), plain, 2, prefix_len=50)


# ------------------------------------------------------------------------------------------ multi-turn


def _dialogues(n: int) -> list[list[tuple[str, str]]]:
    # conversation i has 1 + i % 5 exchanges: every fifth has one and must be skipped
    return [[(f"human {i}.{k}: {LINES[(i + k) % len(LINES)]}", f"reply {i}.{k}: {LINES[(i + 2 * k + 1) % len(LINES)]}")
             for k in range(1 + i % 5)] for i in range(n)]


def test_multiturn_prompts_grow_by_exactly_the_previous_turns(tok):
    dialogues = _dialogues(30)
    reqs = datasets.multiturn_requests(dialogues, tok, 6, seed=1, max_turns=3, max_output_len=12,
                                       max_total_len=512)
    chains = datasets.chains(reqs)
    assert len(chains) == 6 and all(2 <= len(c) <= 3 for c in chains)
    assert [reqs[c[0]].conversation for c in chains] == list(range(6))
    for chain in chains:
        turns = [reqs[i] for i in chain]
        first = tok.decode(list(turns[0].prompt_token_ids))
        human0 = first.removeprefix("<|im_start|>user\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n")
        d = next(d for d in dialogues if d[0][0] == human0)
        for k, (prev, cur) in enumerate(itertools.pairwise(turns)):
            assert cur.prompt_token_ids[:prev.prompt_len] == prev.prompt_token_ids
            added = tok.decode(list(cur.prompt_token_ids[prev.prompt_len:]))
            assert added == (f"{d[k][1]}<|im_end|>\n<|im_start|>user\n{d[k + 1][0]}<|im_end|>\n"
                             "<|im_start|>assistant\n")
        for k, t in enumerate(turns):
            assert t.output_len == min(12, len(_ids(tok, d[k][1])))
            assert t.prompt_len + t.output_len <= 512
    assert reqs == datasets.multiturn_requests(dialogues, tok, 6, seed=1, max_turns=3, max_output_len=12,
                                               max_total_len=512)


def test_multiturn_bounds_turns_and_context(tok):
    dialogues = _dialogues(30)
    whole = datasets.multiturn_requests(dialogues, tok, 10, seed=1, max_turns=8, max_total_len=2048)
    assert max(len(c) for c in datasets.chains(whole)) == 5
    short = datasets.multiturn_requests(dialogues, tok, 10, seed=1, max_turns=8, max_total_len=250)
    assert all(r.prompt_len + r.output_len <= 250 for r in short)
    assert {len(c) for c in datasets.chains(short)} <= {2, 3}
    with pytest.raises(InvalidRequestError, match="fewer than the 40 requested"):
        datasets.multiturn_requests(dialogues, tok, 40)
    with pytest.raises(InvalidRequestError, match="--max-turns"):
        datasets.multiturn_requests(dialogues, tok, 1, max_turns=1)
    odd = make_tokenizer(384)  # renders the newest message first: earlier text moves when a turn is added
    odd.chat_template = ("{% for m in messages|reverse %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(InvalidRequestError, match="rewrites earlier turns"):
        datasets.multiturn_requests(dialogues, odd, 1)


def test_sharegpt_dialogues_take_alternating_exchanges():
    records = [
        {"conversations": [{"from": "gpt", "value": "greeting"}, {"from": "human", "value": "h1"},
                           {"from": "gpt", "value": "m1"}, {"from": "human", "value": "h2"},
                           {"from": "gpt", "value": "m2"}, {"from": "human", "value": "h3"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                           {"from": "gpt", "value": "c"}]},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
                           {"from": "gpt", "value": "z"}, {"from": "human", "value": "w"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]},
    ]
    assert corpora.sharegpt_dialogues(records) == [[("h1", "m1"), ("h2", "m2")], [("x", "y")]]


def test_chains_keep_conversation_order_and_independent_requests():
    reqs = [BenchRequest((1,), 2, conversation=0), BenchRequest((2,), 2), BenchRequest((1, 3), 2, conversation=0),
            BenchRequest((4,), 2, conversation=1), BenchRequest((1, 3, 5), 2, conversation=0)]
    assert datasets.chains(reqs) == [[0, 2, 4], [1], [3]]
    assert datasets.common_prefix_len(reqs) == 0
    assert datasets.common_prefix_len([reqs[0], reqs[2], reqs[4]]) == 1


# ------------------------------------------------------------------------- a fake server with counters


class CountingOpenAI(BaseHTTPRequestHandler):
    """Streams `max_tokens` tokens; counts every prompt token as looked up and the first half as cached, in
    /metrics (Prometheus counters, two label sets) or, with `timings`, in llama.cpp's timings of the last
    chunk. Logs (prompt, body) of every request as it arrives."""

    token_s = 0.005
    timings = False
    queries = hits = 0
    log: typing.ClassVar[list] = []
    lock = threading.Lock()

    def log_message(self, *a):
        pass

    def do_GET(self):
        cls = type(self)
        if self.path == "/metrics":
            half = cls.hits // 2
            body = ("# HELP vllm:prefix_cache_queries Prefix cache queries.\n# TYPE vllm:prefix_cache_queries counter\n"
                    f'vllm:prefix_cache_queries_total{{engine="0"}} {cls.queries}\n'
                    f'vllm:prefix_cache_hits_total{{engine="0"}} {half}\n'
                    f'vllm:prefix_cache_hits_total{{engine="1"}} {cls.hits - half}\n').encode()
            if cls.timings:
                body = b"# no prefix cache counters here\n"
        else:
            body = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        cls = type(self)
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n_prompt = len(req["prompt"])
        with cls.lock:
            cls.queries += n_prompt
            cls.hits += n_prompt // 2
            cls.log.append((tuple(req["prompt"]), req))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(obj):
            data = b"data: " + json.dumps(obj).encode() + b"\n\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        for _ in range(int(req["max_tokens"])):
            time.sleep(cls.token_s)
            chunk({"choices": [{"index": 0, "text": "."}]})
        last = {"choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": int(req["max_tokens"])}}
        if cls.timings:
            last["timings"] = {"cache_n": n_prompt // 2, "prompt_n": n_prompt - n_prompt // 2}
        chunk(last)
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture()
def counting_server():
    CountingOpenAI.log, CountingOpenAI.queries, CountingOpenAI.hits, CountingOpenAI.timings = [], 0, 0, False
    srv = ThreadingHTTPServer(("127.0.0.1", 0), CountingOpenAI)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_conversation_turn_is_sent_only_after_the_one_before_it_finished(counting_server):
    from nimblelm.bench.serve import run_serving

    reqs = []
    for c in range(3):
        reqs += [BenchRequest((100 + c,) * (t + 1), 3, conversation=c) for t in range(3)]
    reqs += [BenchRequest((7, 7), 3), BenchRequest((8, 8), 3)]
    records, _ = run_serving(counting_server, "fake", reqs, rate=math.inf, max_concurrency=2)
    assert all(r.success for r in records)
    assert sorted(prompt for prompt, _ in CountingOpenAI.log) == sorted(r.prompt_token_ids for r in reqs)
    for c in range(3):  # as the client saw it: sent after the previous turn's response was complete
        turns = [records[3 * c + t] for t in range(3)]
        assert all(nxt.start >= prev.end for prev, nxt in itertools.pairwise(turns))
    # never more than two conversations (or independent requests) in flight at once
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    in_flight = peak = 0
    for _, d in events:
        in_flight += d
        peak = max(peak, in_flight)
    assert peak <= 2


def test_a_pass_counts_the_servers_metrics_of_that_pass_only(counting_server):
    from nimblelm.bench.serve import benchmark_server

    a = [BenchRequest((1,) * 10, 2), BenchRequest((2,) * 6, 2)]
    b = [BenchRequest((3,) * 4, 2)]
    warm = [BenchRequest((9,) * 30, 1)]  # counted by the server, not by any pass
    pts = benchmark_server(counting_server, "fake", [a, b], [math.inf, 10.0], warm=warm, warmup=1)
    assert pts[0]["prefix_cache"] == {"queries": 16, "hits": 8, "hit_rate": 0.5, "source": "/metrics"}
    assert pts[1]["prefix_cache"] == {"queries": 4, "hits": 2, "hit_rate": 0.5, "source": "/metrics"}
    off = benchmark_server(counting_server, "fake", [a], [math.inf], warm=warm, warmup=0, prefix_caching=False)
    assert off[0]["prefix_cache"] == {"enabled": False}
    body = CountingOpenAI.log[-1][1]
    assert "cache_prompt" not in body
    benchmark_server(counting_server, "fake", [b], [math.inf], warm=warm, warmup=0, extra_body={"cache_prompt": True})
    assert CountingOpenAI.log[-1][1]["cache_prompt"] is True


def test_a_server_without_counters_is_counted_from_its_responses(counting_server):
    from nimblelm.bench.serve import benchmark_server

    CountingOpenAI.timings = True
    pts = benchmark_server(counting_server, "fake", [[BenchRequest((1,) * 9, 2), BenchRequest((2,) * 5, 2)]],
                           [math.inf], warm=[], warmup=0)
    assert pts[0]["prefix_cache"] == {"queries": 14, "hits": 6, "hit_rate": 6 / 14, "source": "per-response counts"}
    assert pts[0]["records"][0]["cache_hit_tokens"] == 4 and pts[0]["records"][0]["cache_query_tokens"] == 9


def test_hit_rate_accounting_units():
    text = ('# HELP x\nnimblelm_prefix_cache_queries_total{model_name="m"} 120.0\n'
            'nimblelm_prefix_cache_hits_total{model_name="m"} 90.0\nother_total 3\n'
            'nimblelm_prefix_cache_hits_total{model_name="n"} 6\n')
    assert prefix_cache.parse_prometheus(text) == {"nimblelm_prefix_cache_queries_total": 120.0,
                                                   "nimblelm_prefix_cache_hits_total": 96.0, "other_total": 3.0}
    assert prefix_cache.delta((100, 10), (140, 40), "s") == {"queries": 40, "hits": 30, "hit_rate": 0.75,
                                                             "source": "s"}
    assert prefix_cache.delta(None, (1, 1), "s") is None
    assert prefix_cache.response_counts({"timings": {"cache_n": 30, "prompt_n": 10}}) == (40, 30)
    assert prefix_cache.response_counts({"usage": {"prompt_tokens": 50,
                                                   "prompt_tokens_details": {"cached_tokens": 32}}}) == (50, 32)
    assert prefix_cache.response_counts({"usage": {"prompt_tokens": 50}}) is None
    done = RequestRecord(5, success=True, cache_query_tokens=10, cache_hit_tokens=4)
    silent = RequestRecord(5, success=True)
    failed = RequestRecord(5, success=False)
    assert prefix_cache.from_records([done, failed])["hits"] == 4
    assert prefix_cache.from_records([done, silent]) is None
    assert [prefix_cache.cell(f) for f in (prefix_cache.counted(8, 7, "s"), prefix_cache.disabled(),
                                           prefix_cache.unavailable("no"), None, prefix_cache.counted(0, 0, "s"))] \
        == ["87.5%", "off", "n/a", "n/a", "n/a"]
    assert prefix_cache.total([prefix_cache.counted(10, 5, "a"), prefix_cache.counted(30, 25, "a")]) == \
        prefix_cache.counted(40, 30, "a")
    assert prefix_cache.total([prefix_cache.disabled()] * 2) == prefix_cache.disabled()
    assert prefix_cache.total([prefix_cache.counted(1, 1, "a"), prefix_cache.unavailable("x")]) is None


# ------------------------------------------------------------------ in process: nimblelm with and without


@pytest.fixture(scope="module")
def tiny_ctx(tiny_llama):
    from nimblelm.models.loader import load_model

    return BenchContext(model=str(tiny_llama), threads=torch.get_num_threads(), max_model_len=512, max_num_seqs=8,
                        loaded=load_model(str(tiny_llama), progress=False))


def test_nimblelm_hit_rate_with_and_without_its_prefix_cache(tiny_ctx):
    """Conversations in rounds: turn t finds every full block of turn t-1's prompt cached (block size 16) and
    nothing more, since the generated tokens that followed it are not the dataset's reply."""
    from nimblelm.bench.throughput import run_throughput

    reqs = datasets.multiturn_requests(_dialogues(30), tiny_ctx.tokenizer, 3, seed=2, max_turns=3, max_output_len=4,
                                       max_total_len=500)
    expected_hits = sum(reqs[prev].prompt_len // 16 * 16 for c in datasets.chains(reqs)
                        for prev in c[:-1])
    out = run_throughput(tiny_ctx, ["nimblelm", "nimblelm-nocache"], [reqs], warmup=1, progress=False,
                         logger=lambda s: None)
    rows = {r["backend"]: r for r in out["results"]}
    assert rows["nimblelm"]["prefix_cache"] == prefix_cache.counted(sum(r.prompt_len for r in reqs), expected_hits,
                                                                    "LLMEngine.stats()")
    assert len(rows["nimblelm"]["extra"][0]["rounds"]) == 3
    assert rows["nimblelm-nocache"]["prefix_cache"] == {"enabled": False}
    assert out["backends"]["nimblelm-nocache"]["info"]["prefix_caching"] is False
    assert out["backends"]["nimblelm"]["prefix_cache"]["hits"] == expected_hits  # the warm-up hit nothing
    assert out["workload"]["conversations"] == 3
    rep = {"kind": "throughput", "command": "x", "config": {"model": "tiny", "dtype": "float32", "repeat": 1,
                                                             "warmup": 1, "dataset": "sharegpt-multiturn", "seed": 2},
           "machine": {"threads": 1}, **out}
    md = report.to_markdown(rep)
    hit = prefix_cache.cell(rows["nimblelm"]["prefix_cache"])
    assert f"| nimblelm | {len(reqs)} | 3 | {tiny_ctx.threads} | {hit} |" in md
    assert f"| nimblelm-nocache | {len(reqs)} | 3 | {tiny_ctx.threads} | off |" in md
    w = out["workload"]
    assert f"3 conversations of {w['turns_min']}–{w['turns_max']} turns" in md and "prefix caching off" in md


# ----------------------------------------------------------------------------------------- the command


def _sharegpt_file(path, n: int = 60):
    records = [{"id": str(i), "conversations": [
        {"from": "human" if k % 2 == 0 else "gpt",
         "value": (f"question {i}.{k}: " if k % 2 == 0 else f"answer {i}.{k}: ") + LINES[(i + k) % len(LINES)]}
        for k in range(2 + 2 * (i % 3))]} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


def test_serve_command_on_the_shared_prefix_workload(counting_server, tmp_path, tiny_llama):
    from nimblelm.bench.cli import main

    data = _sharegpt_file(tmp_path / "sharegpt.json")
    rc = main(["serve", "--model", str(tiny_llama), "--base-url", counting_server, "--dataset", "shared-prefix",
               "--dataset-path", str(data), "--prefix-len", "64", "--num-prompts", "4", "--max-output-len", "3",
               "--request-rate", "inf,50", "--no-progress", "--no-measure", "--no-plots", "-t", "1",
               "--output", str(tmp_path / "srv")])
    assert rc == 0
    rep = json.loads((tmp_path / "srv" / "results.json").read_text())
    assert rep["config"]["prefix_len"] == 64 and rep["workload"]["common_prefix_tokens"] >= 64
    assert [p["prefix_cache"]["hit_rate"] for p in rep["results"]] == [pytest.approx(0.5, abs=0.05)] * 2
    sent = [prompt for prompt, _ in CountingOpenAI.log[2:]]  # after the two warm-up requests
    first, second = sent[:4], sent[4:]
    shared = rep["workload"]["common_prefix_tokens"]
    assert len({p[:shared] for p in first}) == 1 and len({p[:shared] for p in second}) == 1
    assert first[0][:shared] != second[0][:shared]  # the second pass has its own system prompt
    md = (tmp_path / "srv" / "report.md").read_text()
    assert "| prefix cache hit |" in md and f"every prompt starts with the same {shared} tokens" in md


def test_throughput_command_on_the_multiturn_workload(tmp_path, tiny_llama):
    from nimblelm.bench.cli import main

    data = _sharegpt_file(tmp_path / "sharegpt.json")
    rc = main(["throughput", "--model", str(tiny_llama), "--dataset", "sharegpt-multiturn", "--dataset-path",
               str(data), "--num-prompts", "3", "--max-output-len", "3", "--max-turns", "3", "-r", "2",
               "--backends", "nimblelm,nimblelm-nocache", "--no-progress", "--no-measure", "--no-plots", "-t", "1",
               "--output", str(tmp_path / "thr")])
    assert rc == 0
    rep = json.loads((tmp_path / "thr" / "results.json").read_text())
    rows = {r["backend"]: r for r in rep["results"]}
    per_pass = [e["prefix_cache"] for e in rows["nimblelm"]["extra"]]
    assert len(per_pass) == 2 and all(0 < f["hit_rate"] < 1 for f in per_pass)
    assert rows["nimblelm-nocache"]["prefix_cache"] == {"enabled": False}
    assert rep["config"]["max_turns"] == 3 and rep["workload"]["conversations"] == 3


def test_latency_prompts_never_repeat_so_no_prefill_is_served_from_the_cache(tiny_ctx):
    """The same length and seed twice (a test's repetitions, or pp16 then pp32) must still be two prompts:
    with the prefix cache on, a repeated prompt's prefill would have been timed on its last token only."""
    from nimblelm.bench.latency import make_tests, run_latency

    assert tiny_ctx.prompt(32, 5) != tiny_ctx.prompt(32, 5)
    out = run_latency(tiny_ctx, ["nimblelm"], make_tests([16, 32], [4], [1, 2]), repeat=2, warmup=1,
                      progress=False, logger=lambda s: None)
    pc = out["backends"]["nimblelm"]["prefix_cache"]
    assert pc["queries"] > 0 and pc["hits"] == 0


def test_serve_report_records_the_prefix_caching_targets():
    from nimblelm.bench.serve import prefix_caching_targets

    def point(backend, rate, ttft_p50, req_s):
        return {"backend": backend, "rate": rate,
                "metrics": {"ttft_s": {"p50": ttft_p50}, "request_throughput": req_s}}

    results = [point("nimblelm", None, 1.0, 2.0), point("nimblelm", 0.5, 0.1, 0.4),
               point("nimblelm-nocache", None, 5.0, 0.5), point("nimblelm-nocache", 0.5, 0.3, 0.4),
               point("vllm", None, 2.0, 1.6), point("vllm", 0.5, 0.2, 0.4)]
    assert prefix_caching_targets(results) == [
        "- rate inf: TTFT p50 without / with the prefix cache = 5.00× (target ≥ 4×): met",
        "- rate inf: served req/s nimblelm / vllm = 1.25× (target ≥ 1.5×): missed by 0.25×",
        "- rate 0.5: TTFT p50 without / with the prefix cache = 3.00× (target ≥ 4×): missed by 1.00×"]
    assert prefix_caching_targets(results[:2]) == []  # nothing to compare with
