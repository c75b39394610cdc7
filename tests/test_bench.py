"""The benchmark suite: workloads, reports, machine info, backend skipping, and a smoke run on a tiny model.

Everything here is fast and offline except the test marked integration (the real packaged model).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from nimblelm import corpora
from nimblelm.bench import datasets, machine, report
from nimblelm.bench.backends import (
    BackendUnavailable,
    BenchContext,
    LatencyTest,
    TransformersBackend,
    hf_model_from,
    mean_std,
    parse_backends,
)
from nimblelm.bench.cli import add_bench_subparser, run
from nimblelm.bench.datasets import BenchRequest
from nimblelm.bench.latency import make_tests, run_latency
from nimblelm.bench.llamacpp import LlamaCppBackend, parse_batched_bench_jsonl, parse_llama_bench_json
from nimblelm.bench.runner import interleave
from nimblelm.bench.throughput import run_throughput
from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import kernels_in_use

# ------------------------------------------------------------------------------------------- ShareGPT


def _conversation(i: int) -> dict:
    # Values full of JSON-significant characters, so a naive splitter would break.
    return {
        "id": f"conv-{i}",
        "conversations": [
            {"from": "human", "value": f'question {i}: what is {{"a": [1, 2]}}, "quoted", \\ and ü? ' * (i % 3 + 1)},
            {"from": "gpt", "value": f"answer {i} ] }} , [ " + "word " * (i % 5 + 4)},
        ],
    }


def _write_truncated(path: Path, n_complete: int, cut_into_next: bool = True) -> list[dict]:
    records = [_conversation(i) for i in range(n_complete + 1)]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    if cut_into_next:
        # Cut in the middle of the last record (inside a string value).
        last = json.dumps(records[-1], indent=2, ensure_ascii=False)
        start = text.rindex('"conv-')  # inside the last record
        text = text[: start + len(last) // 2]
        assert not text.rstrip().endswith("]")
    path.write_text(text, encoding="utf-8")
    return records[:n_complete]


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_streaming_reader_recovers_every_complete_record_of_a_truncated_file(tmp_path, chunk):
    path = tmp_path / "sharegpt.json"
    expected = _write_truncated(path, 25)
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text(encoding="utf-8"))
    got = list(corpora.iter_json_array(path, chunk_chars=chunk))
    assert got == expected


def test_streaming_reader_reads_a_whole_file_and_a_file_cut_after_a_comma(tmp_path):
    records = [_conversation(i) for i in range(10)]
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(records), encoding="utf-8")
    assert list(corpora.iter_json_array(whole, chunk_chars=16)) == records
    cut = tmp_path / "cut.json"
    text = json.dumps(records)
    cut.write_text(text[: text.index(', {"id": "conv-4"') + 2], encoding="utf-8")
    assert corpora.load_sharegpt(cut) == records[:4]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert corpora.load_sharegpt(empty) == []


def test_sharegpt_pairs_take_the_first_human_turn_and_the_next_model_turn():
    records = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                           {"from": "human", "value": "more"}, {"from": "gpt", "value": "sure"}]},
        {"conversations": [{"from": "gpt", "value": "unprompted"}, {"from": "human", "value": "q"},
                           {"from": "human", "value": "q2"}, {"from": "chatgpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "no answer"}]},
        {"conversations": []},
        {"id": "no conversations key"},
    ]
    assert corpora.sharegpt_pairs(records) == [("hi", "hello"), ("q", "a")]


def test_sharegpt_filter_bounds():
    assert datasets.keep_pair(4, 4)
    assert not datasets.keep_pair(3, 100)
    assert not datasets.keep_pair(100, 3)
    assert datasets.keep_pair(1024, 1024)
    assert not datasets.keep_pair(1025, 10)
    assert not datasets.keep_pair(1024, 1025)  # total over 2048


class WordTokenizer:
    """One token per whitespace-separated word (ids from a hash), enough to test filtering and sampling."""

    all_special_ids = (0,)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + (hash(w) % 1000) for w in t.split()] for t in texts]}


def _pairs(n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        prompt_words = [3, 10, 40, 2000][i % 4]  # every 4th prompt too short, every 4th too long
        out.append((" ".join(["p"] * prompt_words), " ".join(["o"] * (5 + i % 300))))
    return out


def test_sharegpt_sampling_is_seeded_filtered_and_capped():
    pairs = _pairs(400)
    tok = WordTokenizer()
    a = datasets.sample_sharegpt(pairs, tok, 20, seed=1, max_output_len=128)
    b = datasets.sample_sharegpt(pairs, tok, 20, seed=1, max_output_len=128)
    c = datasets.sample_sharegpt(pairs, tok, 20, seed=2, max_output_len=128)
    assert a == b
    assert a != c
    assert len(a) == 20
    for r in a:
        assert r.prompt_len in (10, 40)
        assert 5 <= r.output_len <= 128
    assert max(r.output_len for r in datasets.sample_sharegpt(pairs, tok, 50, seed=3)) > 128  # uncapped
    with pytest.raises(InvalidRequestError, match="fewer than"):
        datasets.sample_sharegpt(pairs[:8], tok, 20)
    with pytest.raises(InvalidRequestError):
        datasets.sample_sharegpt(pairs, tok, 0)


def test_random_workload_is_seeded_and_in_range():
    a = datasets.random_requests(50, 100, 20, vocab_size=500, range_ratio=0.5, seed=7, exclude_ids=[0, 1, 2])
    assert a == datasets.random_requests(50, 100, 20, vocab_size=500, range_ratio=0.5, seed=7, exclude_ids=[0, 1, 2])
    assert a != datasets.random_requests(50, 100, 20, vocab_size=500, range_ratio=0.5, seed=8, exclude_ids=[0, 1, 2])
    for r in a:
        assert 50 <= r.prompt_len <= 150 and 10 <= r.output_len <= 30
        assert all(3 <= t < 500 for t in r.prompt_token_ids)
    fixed = datasets.random_requests(3, 16, 8, vocab_size=100)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(16, 8)] * 3
    with pytest.raises(InvalidRequestError):
        datasets.random_requests(3, 16, 8, vocab_size=100, range_ratio=1.0)
    with pytest.raises(InvalidRequestError):
        datasets.random_requests(3, 0, 8, vocab_size=100)


def test_sharegpt_path_errors_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path))
    with pytest.raises(InvalidRequestError, match="not in the cache"):
        corpora.sharegpt_path(download=False)
    with pytest.raises(InvalidRequestError, match="not found"):
        corpora.sharegpt_path(tmp_path / "missing.json")


# ------------------------------------------------------------------------------- report and machine


def test_mean_std_formatting():
    assert report.fmt_mean_std(31.4167, 0.3512) == "31.42 ± 0.35"
    assert report.fmt_mean_std(1234.5, 12.25, 1) == "1234.5 ± 12.2"
    assert report.fmt_mean_std(float("nan"), 0.0) == "n/a"
    assert report.fmt_mean_std(5.0) == "5.00"
    m, s = mean_std([10.0, 12.0, 14.0])
    assert m == 12.0 and s == pytest.approx(2.0)
    assert mean_std([3.0]) == (3.0, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))


CPUINFO_SMT = "\n\n".join(
    f"processor\t: {i}\nmodel name\t: Test CPU 9000\nphysical id\t: 0\ncore id\t\t: {i // 2}\n" for i in range(8)
)


def test_machine_info_fields():
    info = machine.machine_info(threads=3)
    for key in ("cpu_model", "physical_cores", "logical_cpus", "threads", "memory_total_bytes", "torch",
                "nimblelm_commit", "date", "python"):
        assert key in info
    assert info["kernels"] == kernels_in_use()  # the variant the CPU's features chose (test_kernels)
    assert info["threads"] == 3
    assert info["physical_cores"] >= 1 and info["logical_cpus"] >= info["physical_cores"]
    assert info["torch"] == torch.__version__
    assert machine.physical_cores(CPUINFO_SMT) == 4
    assert machine.cpu_model(CPUINFO_SMT) == "Test CPU 9000"
    assert machine.cpu_features("processor : 0\nflags : fpu avx2 fma avx512f sse\n") == ["avx2", "fma", "avx512f"]
    assert machine.memory_total_bytes("MemTotal:       1024 kB\n") == 1024 * 1024
    assert machine.default_threads() >= 1


def test_cpu_monitor_reports_other_activity():
    mon = machine.CpuMonitor()
    sum(i * i for i in range(200_000))  # some CPU of our own
    act = mon.stop()
    assert act["wall_s"] >= 0 and act["own_cpu_s"] >= 0
    if Path("/proc/stat").exists():
        assert act["other_cpu_s"] >= 0 and 0 <= act["other_share"] <= 1.5
        assert 0 <= act["steal_share"] <= 1 and act["steal_s"] >= 0


def _fake_report(kind: str) -> dict:
    meta = {"command": "nimblelm bench x", "machine": machine.machine_info(2),
            "backends": {"nimblelm": {"status": "ok", "info": {"weights": "float32", "weights_nbytes": 2**20},
                                      "other_activity": {"other_cpu_s": 1.5, "other_share": 0.02, "steal_s": 0.0},
                                      "prefix_cache": {"queries": 40, "hits": 0, "hit_rate": 0.0, "source": "x"}},
                         "llama.cpp": {"status": "skipped", "reason": "llama-bench not found"}}}
    if kind == "latency":
        return {"kind": "latency", "config": {"model": "m", "dtype": "float32", "repeat": 2, "warmup": 1}, **meta,
                "results": [{"backend": "nimblelm", "test": "tg8", "kind": "tg", "n_tokens": 8, "batch": 1,
                             "threads": 2, "samples_ts": [10.0, 12.0], "mean_ts": 11.0, "std_ts": 1.414,
                             "mean_gbps": 0.5, "std_gbps": 0.01}]}
    return {"kind": "throughput", "config": {"model": "m", "dtype": "float32", "repeat": 1, "warmup": 1,
                                             "dataset": "random", "seed": 0}, **meta,
            "workload": {"num_requests": 2, "prompt_tokens": 10, "output_tokens": 6, "prompt_len_min": 4,
                         "prompt_len_mean": 5, "prompt_len_max": 6, "output_len_min": 3, "output_len_mean": 3,
                         "output_len_max": 3},
            "results": [{"backend": "nimblelm", "num_requests": 2, "concurrency": 2, "threads": 2,
                         "elapsed_s": [2.0], "mean_total_tok_s": 8.0, "std_total_tok_s": 0.0,
                         "mean_output_tok_s": 3.0, "std_output_tok_s": 0.0, "mean_req_s": 1.0, "std_req_s": 0.0,
                         "prefix_cache": {"queries": 10, "hits": 6, "hit_rate": 0.6, "source": "x"}}]}


@pytest.mark.parametrize("kind", ["latency", "throughput"])
def test_report_markdown_and_files(tmp_path, kind):
    rep = _fake_report(kind)
    md = report.to_markdown(rep)
    assert "AMD" in md or machine.cpu_model() in md
    assert "2 threads used" in md and "nimblelm commit" in md
    assert f"- kernels: {kernels_in_use()}" in md
    assert "llama.cpp: skipped: llama-bench not found" in md
    assert "other processes during its run: 1.5 CPU-s (2.0% of the machine)" in md
    assert "prefix cache over the whole run, warm-up included: 0 of 40 prompt tokens found cached (0.0%)" in md
    if kind == "latency":
        assert "| nimblelm | tg8 | 1 | 2 | 11.00 ± 1.41 | 0.50 ± 0.01 |" in md
    else:
        assert "| nimblelm | 2 | 2 | 2 | 60.0% | 8.0 | 3.0 | 1.000 | 2.00 |" in md  # one pass: no ± shown
    j, m = report.write_report(rep, tmp_path / "out", plots=False)
    data = json.loads(j.read_text())
    assert data["machine"]["threads"] == 2 and data["results"][0]["backend"] == "nimblelm"
    assert m.read_text() == md


# ------------------------------------------------------------------------------- options and skipping


def test_parse_backends():
    assert parse_backends("nimblelm,hf,llamacpp") == ["nimblelm", "transformers", "llama.cpp"]
    assert parse_backends("llama.cpp, llama.cpp") == ["llama.cpp"]
    with pytest.raises(InvalidRequestError, match="unknown backend 'vllm2'"):
        parse_backends("nimblelm,vllm2")
    with pytest.raises(InvalidRequestError):
        parse_backends(",")


def test_make_tests_matrix_and_validation():
    tests = make_tests([16, 32], [8], [1, 4])
    assert [(t.name, t.batch) for t in tests] == [("pp16", 1), ("pp16", 4), ("pp32", 1), ("pp32", 4),
                                                  ("tg8", 1), ("tg8", 4)]
    for bad in (([0], [8], [1]), ([16], [-1], [1]), ([16], [8], [0]), ([16], [1], [1])):
        with pytest.raises(InvalidRequestError):
            make_tests(*bad)


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="nimblelm")
    add_bench_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


@pytest.mark.parametrize("argv, message", [
    (["latency", "-p", "0"], "-p values must be > 0"),
    (["latency", "-p", "abc"], "expected comma-separated integers"),
    (["latency", "-b", "1,-8"], "-b values must be > 0"),
    (["latency", "-r", "0"], "--repeat must be >= 1"),
    (["latency", "--backends", "nimblelm,foo"], "unknown backend 'foo'"),
    (["latency", "--dtype", "int3"], "--dtype must be one of"),
    (["latency", "--threads", "0"], "--threads must be >= 1"),
    (["throughput", "--num-prompts", "0"], "--num-prompts must be > 0"),
    (["throughput", "--dataset", "random", "--random-range-ratio", "1.5"], "--random-range-ratio"),
    (["throughput", "--backends", "tgi"], "unknown backend 'tgi'"),
])
def test_invalid_options_raise_one_line(argv, message):
    args = _parse(argv)
    assert args.func is run
    with pytest.raises(InvalidRequestError, match=message) as e:
        run(args)
    assert "\n" not in str(e.value)


def test_missing_llama_cpp_is_skipped_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path))  # an empty folder: no binaries
    ctx = BenchContext(model="unused", threads=1)
    with pytest.raises(BackendUnavailable, match="llama-bench not found"):
        LlamaCppBackend(ctx).check()
    lines = []
    out = run_latency(ctx, ["llama.cpp"], make_tests([16], [8], [1]), repeat=1, warmup=0, progress=False,
                      logger=lines.append)
    assert out["results"] == []
    assert out["backends"]["llama.cpp"]["status"] == "skipped"
    assert len(lines) == 1 and lines[0].startswith("skipping llama.cpp: llama-bench not found")
    assert "nimblelm bench setup llama.cpp" in lines[0]


def test_missing_transformers_is_skipped(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    lines = []
    statuses = interleave(BenchContext(model="unused"), ["transformers"], 1, lambda b, i: None,
                          logger=lines.append)
    assert statuses["transformers"]["status"] == "skipped"
    assert lines == [f"skipping transformers: {statuses['transformers']['reason']}"]


def test_a_failing_backend_does_not_stop_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path))
    class Boom(TransformersBackend):
        def load(self):
            raise RuntimeError("out of memory\nlong traceback text")

    lines, seen = [], []
    from nimblelm.bench import runner

    orig = runner.make_backend
    try:
        runner.make_backend = lambda name, ctx, **kw: Boom(ctx) if name == "transformers" else orig(name, ctx, **kw)
        statuses = interleave(BenchContext(model="unused"), ["transformers", "llama.cpp"], 1,
                              lambda b, i: seen.append(b.name), logger=lines.append)
    finally:
        runner.make_backend = orig
    assert statuses["transformers"] == {"status": "failed", "reason": "RuntimeError: out of memory"}
    assert statuses["llama.cpp"]["status"] == "skipped"
    assert lines[0] == "transformers failed: RuntimeError: out of memory" and len(lines) == 2


def test_interleave_rotates_backends_each_step_and_drops_one_that_fails(monkeypatch):
    from nimblelm.bench import runner
    from nimblelm.bench.backends import Backend

    calls, closed = [], []

    class Fake(Backend):
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    def step(backend, i):
        if backend.name == "transformers" and i == 2:
            raise RuntimeError("worker died\nmore")
        calls.append((i, backend.name))

    monkeypatch.setattr(runner, "make_backend", lambda name, ctx, **kw: Fake(name))
    lines = []
    statuses = interleave(BenchContext(model="unused"), ["nimblelm", "transformers", "llama.cpp"], 4, step,
                          logger=lines.append)
    assert calls == [(0, "nimblelm"), (0, "transformers"), (0, "llama.cpp"),
                     (1, "transformers"), (1, "llama.cpp"), (1, "nimblelm"),
                     (2, "llama.cpp"), (2, "nimblelm"),  # transformers failed at step 2: dropped
                     (3, "llama.cpp"), (3, "nimblelm")]
    assert statuses["transformers"] == {"status": "failed", "reason": "RuntimeError: worker died"}
    assert statuses["nimblelm"]["status"] == statuses["llama.cpp"]["status"] == "ok"
    assert sorted(closed) == ["llama.cpp", "nimblelm", "transformers"]
    assert "transformers failed: RuntimeError: worker died" in lines


# ---------------------------------------------------------------------------------------- llama.cpp


def test_parse_llama_cpp_outputs():
    bench = 'build: 123\n[\n  {\n    "build_commit": "abc", "n_prompt": 512, "n_gen": 0, "avg_ts": 396.1,\n' \
            '    "stddev_ts": 2.5, "samples_ts": [ 394.0, 398.2 ]\n  }\n]\n'
    rows = parse_llama_bench_json(bench)
    assert rows[0]["samples_ts"] == [394.0, 398.2]
    jsonl = 'main: n_kv_max = 4096\n{"n_kv_max": 4096, "pp": 1, "tg": 128, "pl": 8, "speed_pp": 10.0, ' \
            '"speed_tg": 93.5, "t": 11.0, "speed": 93.0}\n'
    assert parse_batched_bench_jsonl(jsonl)[0]["speed_tg"] == 93.5


def test_f32_gguf_copy_keeps_metadata_and_dequantizes_every_tensor(tmp_path, tiny_llama):
    import gguf
    import numpy as np
    from tiny_models import make_tiny_gguf

    from nimblelm.bench.gguf_convert import convert_gguf, ensure_converted

    src = make_tiny_gguf(tmp_path / "tiny.Q8_0.gguf", tiny_llama, quant="Q8_0")
    dst = convert_gguf(src, tmp_path / "tiny.F32.gguf", "f32")
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert set(a.fields) | {"general.file_type"} == set(b.fields)
    assert b.fields["general.file_type"].contents() == 0  # ALL_F32
    for name, field in a.fields.items():
        if not name.startswith("GGUF.") and name != "general.file_type":
            assert b.fields[name].contents() == field.contents(), name
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(ta.shape) == list(tb.shape)
        ref = gguf.quants.dequantize(ta.data, ta.tensor_type)
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(ref.shape), ref)
    cached = ensure_converted(src, "f16", tmp_path / "cache")
    assert cached == ensure_converted(src, "f16", tmp_path / "cache")
    types = {t.tensor_type for t in gguf.GGUFReader(cached).tensors if len(t.shape) > 1}
    assert types == {gguf.GGMLQuantizationType.F16}


# --------------------------------------------------------------------------------- tiny-model smoke


@pytest.fixture(scope="module")
def tiny_ctx(tiny_llama):
    from nimblelm.models.loader import load_model

    return BenchContext(model=str(tiny_llama), threads=torch.get_num_threads(), max_model_len=64, max_num_seqs=8,
                        loaded=load_model(str(tiny_llama), progress=False))


def test_transformers_peer_holds_exactly_the_loaders_weights(tiny_llama, tiny_ctx):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ours = hf_model_from(tiny_ctx.config, tiny_ctx.load().weights)
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_transformers_throughput_counts_only_each_requests_own_tokens(tiny_ctx):
    be = TransformersBackend(tiny_ctx)
    be.load()
    reqs = [BenchRequest((5, 6, 7), 2), BenchRequest((8, 9, 10, 11, 12), 6), BenchRequest((13,), 4)]
    run_ = be.throughput(reqs)
    assert (run_.prompt_tokens, run_.output_tokens, run_.num_requests) == (9, 12, 3)
    assert run_.extra["computed_output_tokens"] == 18 and run_.extra["computed_prompt_positions"] == 15
    assert be.latency(LatencyTest("tg", 4, 2), repeat=2, warmup=0)[0] > 0


def test_latency_and_throughput_smoke_on_a_tiny_model(tiny_ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path))  # llama.cpp: skipped, whatever is installed
    names = ["nimblelm", "transformers", "llama.cpp"]
    lat = run_latency(tiny_ctx, names, make_tests([16], [8], [1, 2]), repeat=2, warmup=1, progress=False,
                      logger=lambda s: None)
    assert {(r["backend"], r["test"], r["batch"]) for r in lat["results"]} == {
        (b, t, n) for b in ("nimblelm", "transformers") for t in ("pp16", "tg8") for n in (1, 2)}
    for r in lat["results"]:
        assert len(r["samples_ts"]) == 2 and r["mean_ts"] > 0
        assert ("mean_gbps" in r) == (r["test"] == "tg8" and r["batch"] == 1)
    assert lat["backends"]["llama.cpp"]["status"] == "skipped"

    reqs = datasets.random_requests(4, 12, 6, vocab_size=tiny_ctx.config.vocab_size, range_ratio=0.5, seed=0)
    thr = run_throughput(tiny_ctx, names, [reqs], warmup=1, progress=False, logger=lambda s: None)
    rows = {r["backend"]: r for r in thr["results"]}
    assert set(rows) == {"nimblelm", "transformers"}
    for r in rows.values():
        assert r["output_tokens"] == sum(q.output_len for q in reqs)
        assert r["prompt_tokens"] == sum(q.prompt_len for q in reqs)
        assert r["mean_total_tok_s"] > r["mean_output_tok_s"] > 0
    rep = {"kind": "throughput", "command": "x", "config": {"model": "tiny", "dtype": "float32", "repeat": 1,
                                                             "warmup": 1, "dataset": "random", "seed": 0},
           "machine": machine.machine_info(tiny_ctx.threads), **thr}
    assert "| nimblelm | 4 | 4 |" in report.to_markdown(rep)
    assert thr["backends"]["nimblelm"]["info"]["kv_cache_type"] == tiny_ctx.dtype  # what auto became


# ------------------------------------------------------------------------------ the real packaged model


@pytest.mark.integration
def test_bench_commands_on_the_packaged_model(tmp_path, capsys):
    from nimblelm.bench.cli import main

    threads = str(torch.get_num_threads())
    rc = main(["latency", "-p", "16", "-n", "8", "-r", "1", "--backends", "nimblelm,transformers,llama.cpp",
               "-t", threads, "--no-progress", "--no-measure", "--output", str(tmp_path / "lat")])
    assert rc == 0
    data = json.loads((tmp_path / "lat" / "results.json").read_text())
    assert {r["backend"] for r in data["results"]} >= {"nimblelm", "transformers"}
    assert data["machine"]["threads"] == int(threads)
    assert (tmp_path / "lat" / "report.md").read_text().startswith("## nimblelm bench latency")
    assert capsys.readouterr().out.startswith("## nimblelm bench latency")

    rc = main(["throughput", "--dataset", "random", "--num-prompts", "4", "--input-len", "16", "--output-len", "8",
               "--backends", "nimblelm,transformers", "-t", threads, "--no-progress", "--no-measure", "--format", "json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in data["results"]] == ["nimblelm", "transformers"]
    assert all(r["output_tokens"] == 32 for r in data["results"])


def test_llama_cpp_build_takes_extra_cmake_flags_and_records_them(tmp_path, monkeypatch):
    """NIMBLELM_LLAMA_CPP_CMAKE_FLAGS reaches cmake after the defaults (later -D options win) and the
    installed tools' VERSION names them, so reports say how the peer was built. No real build."""
    from nimblelm.bench import llamacpp_build

    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path))
    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_CMAKE_FLAGS", "-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
    src = tmp_path / "peers" / "llama.cpp" / "src" / "llama.cpp"
    (src / "ggml").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("")
    monkeypatch.setattr(llamacpp_build.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    commands = []

    def run(cmd, check):
        commands.append(cmd)
        if "--build" in cmd:
            build = Path(cmd[cmd.index("--build") + 1]) / "bin"
            build.mkdir(parents=True, exist_ok=True)
            for target in llamacpp_build.TARGETS:
                (build / target).write_text("")

    monkeypatch.setattr(llamacpp_build.subprocess, "run", run)
    bins = llamacpp_build.build_llama_cpp(nice=False)
    configure = commands[0]
    assert configure[-2:] == ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON"] and "-DGGML_NATIVE=ON" in configure
    assert (bins / "VERSION").read_text() == f"{llamacpp_build.LLAMA_CPP_SDIST} (cmake -DGGML_NATIVE=OFF -DGGML_AVX2=ON)\n"
