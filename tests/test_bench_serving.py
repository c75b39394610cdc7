"""The serving benchmark: metric math on synthetic timelines, arrival statistics, SLO parsing, and the
streaming client against a fake OpenAI-compatible server on 127.0.0.1 (no model needed)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nimblelm.bench import arrivals, metrics
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.metrics import SLO, RequestRecord, parse_slo, percentile, serving_metrics, summarize

# ------------------------------------------------------------------------------------------ metrics


def _rec(start, chunks, end=None, tokens=None, prompt=10, ok=True):
    return RequestRecord(prompt_len=prompt, expected_output_len=tokens or len(chunks), start=start,
                         chunk_times=list(chunks), end=chunks[-1] if end is None else end,
                         output_tokens=len(chunks) if tokens is None else tokens, success=ok)


def test_request_timeline_metrics():
    r = _rec(1.0, [1.5, 1.6, 1.8, 2.1], end=2.2)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.2)
    assert r.tpot == pytest.approx((2.1 - 1.5) / 3)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    one = _rec(0.0, [0.4])
    assert one.tpot is None and one.itls == [] and one.ttft == pytest.approx(0.4)
    # A chunk may carry several tokens: TPOT uses the server's token count, ITL the chunk gaps.
    multi = _rec(0.0, [0.2, 0.6], tokens=5)
    assert multi.tpot == pytest.approx(0.4 / 4)
    assert multi.itls == pytest.approx([0.4])
    bad = RequestRecord(prompt_len=3, start=0.0, end=1.0, error="HTTP 500")
    assert bad.ttft is None and bad.e2e is None and bad.tpot is None and bad.itls == []


def test_percentiles_match_linear_interpolation():
    xs = [5, 1, 4, 2, 3]
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 5
    assert percentile(xs, 50) == 3
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["p50"] == 2.5 and s["n"] == 4 and s["min"] == 1 and s["max"] == 4
    assert s["std"] == pytest.approx(statistics.pstdev([1, 2, 3, 4]))
    assert math.isnan(summarize([])["mean"])


def test_serving_metrics_on_a_synthetic_run():
    recs = [
        _rec(0.0, [0.1, 0.2, 0.3], prompt=10),             # ttft .1, tpot .1, e2e .3
        _rec(0.5, [0.9, 1.3, 1.7, 2.1], prompt=20),        # ttft .4, tpot .4, e2e 1.6
        _rec(1.0, [1.2, 1.25], end=1.3, prompt=30),        # ttft .2, tpot .05, e2e .3
        RequestRecord(prompt_len=40, expected_output_len=4, start=1.1, end=1.2, error="HTTP 503: busy"),
    ]
    m = serving_metrics(recs, slo=SLO(ttft_s=0.3, tpot_s=0.2))
    assert m["duration_s"] == pytest.approx(2.1)  # first start .. last end
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["prompt_tokens"] == 60 and m["output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(3 / 2.1)
    assert m["output_throughput"] == pytest.approx(9 / 2.1)
    assert m["total_token_throughput"] == pytest.approx(69 / 2.1)
    assert m["ttft_s"]["mean"] == pytest.approx((0.1 + 0.4 + 0.2) / 3)
    assert m["ttft_s"]["p50"] == pytest.approx(0.2)
    assert m["tpot_s"]["p99"] == pytest.approx(percentile([0.1, 0.4, 0.05], 99))
    assert m["itl_s"]["n"] == 2 + 3 + 1
    assert m["e2e_s"]["max"] == pytest.approx(1.6)
    # goodput: request 1 meets both bounds, request 2 fails TTFT and TPOT, request 3 meets both
    assert m["good_requests"] == 2 and m["goodput"] == pytest.approx(2 / 2.1)
    assert m["errors"] == ["HTTP 503: busy"]
    m2 = serving_metrics(recs, duration_s=3.0)
    assert m2["request_throughput"] == pytest.approx(1.0) and "goodput" not in m2


def test_slo_parsing_and_sustained_rate():
    assert parse_slo("ttft:2,tpot:200ms,e2e=30s") == SLO(ttft_s=2.0, tpot_s=0.2, e2e_s=30.0)
    assert parse_slo(None).empty and parse_slo("").empty
    for bad in ("ttft", "foo:1", "tpot:-1", "tpot:abc"):
        with pytest.raises(ValueError):
            parse_slo(bad)

    def point(rate, p99, failed=0, thr=1.0):
        return {"rate": rate, "metrics": {"tpot_s": {"p99": p99}, "failed": failed, "request_throughput": thr}}

    pts = [point(math.inf, 0.5, thr=3.0), point(1.0, 0.1), point(2.0, 0.15), point(2.5, 0.3), point(2.2, 0.1, 1)]
    assert metrics.max_sustained_rate(pts, 0.2) == 2.0
    assert metrics.max_sustained_rate(pts, 0.6) == 3.0  # inf met the bound: its achieved rate counts
    assert metrics.max_sustained_rate(pts, 0.01) is None


# ----------------------------------------------------------------------------------------- arrivals


def test_poisson_arrivals_have_the_right_rate_and_spread():
    t = arrivals.arrival_times(4000, rate=4.0, burstiness=1.0, seed=3)
    assert t[0] == 0.0 and t == sorted(t)
    gaps = [b - a for a, b in itertools.pairwise(t)]
    mean = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / mean
    assert mean == pytest.approx(0.25, rel=0.05)
    assert cv == pytest.approx(1.0, rel=0.08)  # exponential gaps: coefficient of variation 1
    assert t == arrivals.arrival_times(4000, rate=4.0, seed=3)
    assert t != arrivals.arrival_times(4000, rate=4.0, seed=4)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_arrivals_keep_the_mean_and_change_the_spread(burstiness):
    t = arrivals.arrival_times(4000, rate=2.0, burstiness=burstiness, seed=1)
    gaps = [b - a for a, b in itertools.pairwise(t)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.5, rel=0.1)
    cv = statistics.pstdev(gaps) / mean
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.12)  # gamma: CV = 1/sqrt(shape)


def test_rate_parsing_and_infinite_rate():
    assert arrivals.arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrivals.parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    assert arrivals.arrival_times(0, 1.0) == []
    for bad in ("0", "-1", "x"):
        with pytest.raises(ValueError):
            arrivals.parse_rate(bad)
    with pytest.raises(ValueError):
        arrivals.arrival_times(3, 1.0, burstiness=0)


# ------------------------------------------------------------------------ client against a fake server


class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams one '.' per token every `token_s`, with usage in the last chunk; 'fail' in a text prompt -> 500."""

    token_s = 0.01
    seen: typing.ClassVar[list] = []

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake-model"}]}).encode() if self.path == "/v1/models" else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(req)
        if req.get("prompt") == "fail":
            self.send_response(500)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"boom")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(obj):
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        n = int(req["max_tokens"])
        for _ in range(n):
            time.sleep(self.token_s)
            chunk({"choices": [{"index": 0, "text": ".", "finish_reason": None}]})
        chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        chunk(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture()
def fake_server():
    FakeOpenAI.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_streaming_client_records_every_token(fake_server):
    from nimblelm.bench.serve import send_request, served_model_name

    assert served_model_name(fake_server) == "fake-model"
    rec = send_request(fake_server, "fake-model", BenchRequest((1, 2, 3), 5))
    assert rec.success and rec.output_tokens == 5 and len(rec.chunk_times) == 5
    assert rec.ttft >= 0.009 and rec.tpot == pytest.approx(0.01, abs=0.02) and rec.e2e >= rec.ttft
    body = FakeOpenAI.seen[-1]
    assert body["prompt"] == [1, 2, 3] and body["stream"] and body["ignore_eos"] and body["temperature"] == 0
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"
    bad = send_request(fake_server, "fake-model", BenchRequest((1,), 2), prompt_text="fail")
    assert not bad.success and bad.error.startswith("RuntimeError: HTTP 500")
    gone = send_request("http://127.0.0.1:9", "m", BenchRequest((1,), 2), timeout=2)
    assert not gone.success and gone.error


def test_run_serving_respects_concurrency_and_arrivals(fake_server):
    from nimblelm.bench.serve import benchmark_server, run_serving

    reqs = [BenchRequest((i, i + 1), 3) for i in range(6)]
    records, duration = run_serving(fake_server, "fake-model", reqs, rate=math.inf, max_concurrency=2)
    assert all(r.success for r in records) and [r.prompt_len for r in records] == [2] * 6
    starts = sorted(r.start for r in records)
    ends = sorted(r.end for r in records)
    # with 2 in flight, the 3rd request starts only after the 1st finished
    assert starts[2] >= ends[0] - 1e-3
    assert duration >= 3 * 3 * 0.01
    records, _ = run_serving(fake_server, "fake-model", reqs[:3], rate=20.0, seed=0)
    offsets = [r.start - records[0].start for r in records]
    expected = arrivals.arrival_times(3, 20.0, seed=0)
    assert offsets == pytest.approx(expected, abs=0.03)
    pts = benchmark_server(fake_server, "fake-model", [reqs, reqs], [math.inf, 50.0], warm=reqs[:2],
                           slo=SLO(tpot_s=1.0))
    assert [p["rate"] for p in pts] == [math.inf, 50.0]
    for p in pts:
        m = p["metrics"]
        assert m["completed"] == 6 and m["output_tokens"] == 18 and m["good_requests"] == 6
        assert len(p["records"]) == 6 and len(p["records"][0]["chunk_offsets_s"]) == 3


def test_serve_command_against_a_base_url(fake_server, tmp_path, tiny_llama, capsys):
    """`bench serve --base-url` end to end: workload from the model's tokenizer, report, JSON and plots."""
    from nimblelm.bench.cli import main

    rc = main(["serve", "--model", str(tiny_llama), "--base-url", fake_server, "--dataset", "random",
               "--num-prompts", "4", "--input-len", "8", "--output-len", "3", "--request-rate", "inf,40",
               "--slo", "ttft:5,tpot:1", "--no-progress", "--no-measure", "--output", str(tmp_path / "srv")])
    assert rc == 0
    data = json.loads((tmp_path / "srv" / "results.json").read_text())
    assert data["kind"] == "serve" and [r["rate"] for r in data["results"]] == [None, 40.0]  # inf -> null
    assert data["backends"]["openai"]["status"] == "ok"
    md = (tmp_path / "srv" / "report.md").read_text()
    assert md.startswith("## nimblelm bench serve") and "| openai | inf | 4/4 |" in md and "goodput" in md
    assert (tmp_path / "srv" / "serve_vs_rate.png").stat().st_size > 1000
    assert (tmp_path / "srv" / "serve_e2e_cdf.png").is_file()
    assert capsys.readouterr().out.startswith("## nimblelm bench serve")


def test_serve_backends_without_a_server_are_skipped_with_one_line(tmp_path, monkeypatch, tiny_llama):
    from nimblelm.bench import serve
    from nimblelm.bench.backends import BenchContext

    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path))
    monkeypatch.setenv("NIMBLELM_VLLM_VENV", str(tmp_path / "no-venv"))
    monkeypatch.setattr(serve, "nimblelm_serve_available",
                        lambda python=None, source=None: "`nimblelm serve` is not in this checkout (issue #3)")
    lines = []
    out = serve.run_serve(BenchContext(model=str(tiny_llama), max_model_len=32, max_num_seqs=2),
                          ["nimblelm", "transformers", "llama.cpp", "vllm", "openai"], [[BenchRequest((1, 2), 2)]],
                          [math.inf], progress=False, logger=lines.append)
    assert out["results"] == []
    assert {k: v["status"] for k, v in out["backends"].items()} == dict.fromkeys(
        ("nimblelm", "transformers", "llama.cpp", "vllm", "openai"), "skipped")
    assert len(lines) == 5 and all(line.startswith("skipping ") and "\n" not in line for line in lines)
    assert "issue #3" in lines[0] and "llama-bench not found" in lines[2] and "no vLLM venv" in lines[3]
    assert "--base-url" in lines[4]


def test_nimblelm_serve_detection_matches_this_checkout():
    from nimblelm import cli
    from nimblelm.bench.serve import nimblelm_serve_available

    reason = nimblelm_serve_available()  # runs `python -m nimblelm serve --help` on this checkout
    has_serve = "serve" in cli.build_parser()._subparsers._group_actions[0].choices
    assert (reason is None) == has_serve
    if reason:
        assert "nimblelm serve" in reason and "--nimblelm-source" in reason and "\n" not in reason
