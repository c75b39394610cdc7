"""The rest of the suite: roofline arithmetic, prefix and HumanEval workloads, the vLLM peer's skip, the
survey report, plots, and a smoke run of every bench command on a tiny model with tiny sizes."""

from __future__ import annotations

import gzip
import json
import math

import pytest
import torch

from nimblelm import corpora
from nimblelm.bench import datasets, roofline
from nimblelm.bench.backends import BackendUnavailable, BenchContext, LatencyTest
from nimblelm.bench.latency import make_tests, run_latency
from nimblelm.config import ModelConfig
from nimblelm.errors import InvalidRequestError

SMOLLM2 = ModelConfig(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True)

# ------------------------------------------------------------------------------------------ roofline


def test_weights_per_token_and_limits_for_smollm2():
    w = roofline.matmul_weights_per_token(SMOLLM2)
    # 30 layers × (q 576² + k,v 2×576×192 + o 576² + 3×576×1536 + 2 norms) + LM head 49152×576 + final norm
    per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576
    assert w == 30 * per_layer + 49152 * 576 + 576
    assert 134e6 < w < 135e6  # SmolLM2-135M: every parameter but the (tied) embedding lookup
    lim = {d["format"]: d for d in roofline.decode_limits(SMOLLM2, 22.0)}
    assert lim["float32"]["max_tok_s"] == pytest.approx(22e9 / (4 * w))
    assert 40 < lim["float32"]["max_tok_s"] < 42  # peers.md: ~41 tok/s at 22 GB/s in fp32
    assert lim["float16"]["max_tok_s"] == pytest.approx(2 * lim["float32"]["max_tok_s"])
    assert roofline.prefill_limit(SMOLLM2, 213.0) == pytest.approx(213e9 / (2 * w))


def test_bandwidth_and_matmul_measurements_are_sane():
    bw = roofline.measure_bandwidth(4 << 20, repeats=3)
    assert bw["best_gbs"] > 0.1 and bw["best_gbs"] >= bw["median_gbs"] * 0.999 and bw["bytes"] == 4 << 20
    mm = roofline.measure_matmul("float32", (32, 64, 48), budget_s=0.01)
    assert mm["best_gflops"] > 0 and mm["repeats"] >= 3 and mm["shape"] == [32, 64, 48]


def test_roofline_report():
    rep = roofline.run_roofline(SMOLLM2, threads=torch.get_num_threads(), dtypes=("float32",), sizes_mib=(1, 2),
                                budget_s=0.01)
    assert rep["dram_bandwidth_gbs"] > 0 and set(rep["matmul_peak_gflops"]) == {"float32"}
    from nimblelm.bench import machine, report

    md = report.to_markdown({"kind": "roofline", "command": "x", "config": {"model": "smollm2-135m",
                                                                          "dtype": "float32"},
                             "machine": machine.machine_info(1), "roofline": rep, "results": []})
    assert "decode tok/s limit" in md and "| float32 |" in md and "| 2 MiB |" in md


# ------------------------------------------------------------------------------------------ workloads


def test_prefix_workload_shares_one_prefix():
    reqs = datasets.prefix_requests(5, 12, 8, 4, vocab_size=300, range_ratio=0.5, seed=2, exclude_ids=[0])
    prefix = reqs[0].prompt_token_ids[:12]
    assert all(r.prompt_token_ids[:12] == prefix for r in reqs)
    assert len({r.prompt_token_ids[12:] for r in reqs}) == 5
    assert all(4 <= r.prompt_len - 12 <= 12 and 2 <= r.output_len <= 6 for r in reqs)
    assert reqs == datasets.prefix_requests(5, 12, 8, 4, vocab_size=300, range_ratio=0.5, seed=2, exclude_ids=[0])
    assert datasets.prefix_requests(2, 0, 3, 2, vocab_size=50)[0].prompt_len == 3
    with pytest.raises(InvalidRequestError):
        datasets.prefix_requests(2, -1, 3, 2, vocab_size=50)


class CharTokenizer:
    all_special_ids = (0,)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 200 for c in t] for t in texts]}


def test_humaneval_loading_and_sampling(tmp_path):
    problems = [{"task_id": f"HumanEval/{i}", "prompt": "def f():\n" + "x" * (5 + i),
                 "canonical_solution": "    return 1\n" * (1 + i % 4), "entry_point": "f", "test": ""} for i in range(7)]
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")
    assert corpora.load_humaneval(path) == problems
    reqs = datasets.humaneval_requests(problems, CharTokenizer(), 10, seed=1, max_output_len=20)
    assert len(reqs) == 10  # more than the 7 problems: cycles through a reshuffle
    assert all(4 <= r.output_len <= 20 for r in reqs)
    assert {r.prompt_len for r in reqs} <= {len("def f():\n") + 5 + i for i in range(7)}
    assert reqs == datasets.humaneval_requests(problems, CharTokenizer(), 10, seed=1, max_output_len=20)
    with pytest.raises(InvalidRequestError):
        datasets.humaneval_requests([], CharTokenizer(), 1)


# ------------------------------------------------------------------------------------------ vLLM peer


def test_vllm_absent_is_skipped_with_one_line(tmp_path, monkeypatch):
    from nimblelm.bench import vllm_peer

    monkeypatch.setenv("NIMBLELM_VLLM_VENV", str(tmp_path / "nothing"))
    with pytest.raises(BackendUnavailable, match="no vLLM venv"):
        vllm_peer.check_vllm()
    (tmp_path / "nothing" / "bin").mkdir(parents=True)
    (tmp_path / "nothing" / "bin" / "python").write_text("")
    with pytest.raises(BackendUnavailable, match="vllm is not installed"):
        vllm_peer.check_vllm()
    lines = []
    out = run_latency(BenchContext(model="unused"), ["vllm"], make_tests([4], [4], [1]), repeat=1, warmup=0,
                      progress=False, logger=lines.append)
    assert out["results"] == [] and out["backends"]["vllm"]["status"] == "skipped"
    assert len(lines) == 1 and lines[0].startswith("skipping vllm: vllm is not installed")
    env = vllm_peer.vllm_env(2)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_vllm_worker_never_imports_nimblelm():
    """It runs in vLLM's venv, where nimblelm is not installed; and nothing beside it may be named vllm."""
    from pathlib import Path

    from nimblelm import bench

    src = (Path(bench.__file__).parent / "vllm_worker.py").read_text()
    assert "import nimblelm" not in src and "from nimblelm" not in src
    assert not (Path(bench.__file__).parent / "vllm.py").exists()


# ------------------------------------------------------------------------------------ survey and plots


def _metrics(req_s, tpot):
    from nimblelm.bench.metrics import RequestRecord, serving_metrics

    recs = [RequestRecord(10, 3, start=0.0, chunk_times=[0.5, 0.5 + tpot, 0.5 + 2 * tpot], end=0.5 + 2 * tpot,
                          output_tokens=3, success=True)]
    m = serving_metrics(recs, duration_s=1 / req_s)
    return m


def _survey_report():
    from nimblelm.bench import machine

    rows = [
        {"model": "m", "backend": "nimblelm", "inference_tok_s": 20.0, "inference_std": 1.0,
         "serving_req_s": 0.9, "serving": {"status": "ok", "method": "its OpenAI server", "max_req_s": 0.9,
                                           "output_tok_s": 100.0, "sustained_req_s": 0.5, "points": [
                                               {"rate": math.inf, "metrics": _metrics(0.9, 0.3)},
                                               {"rate": 0.45, "metrics": _metrics(0.44, 0.15)}]}},
        {"model": "m", "backend": "transformers", "inference_tok_s": 10.0, "inference_std": 0.5,
         "serving_req_s": 0.3, "serving": {"status": "ok", "method": "offline", "max_req_s": 0.3,
                                           "output_tok_s": 30.0}},
        {"model": "m", "backend": "llama.cpp", "inference_tok_s": 40.0, "inference_std": 0.5,
         "serving_req_s": 1.2, "serving": {"status": "ok", "method": "its OpenAI server", "max_req_s": 1.2,
                                           "output_tok_s": 140.0, "sustained_req_s": None}},
        {"model": "m", "backend": "vllm", "inference_skipped": "no vLLM venv",
         "serving": {"status": "skipped", "reason": "no vLLM venv at /x"}},
    ]
    from nimblelm.bench.survey import SURVEY_TABLE6

    return {"kind": "survey-engines", "command": "nimblelm bench survey engines",
            "config": {"model": "m", "dtype": "float32", "threads": 2, "prompt_len": 1024, "gen_len": 128,
                       "seed": 0}, "machine": machine.machine_info(2), "results": rows, "backends": {},
            "per_model": {}, "survey_table6": SURVEY_TABLE6, "slo": {"tpot_s": 0.2}}


def test_survey_report_labels_the_papers_numbers_and_records_targets(tmp_path):
    from nimblelm.bench import report

    rep = _survey_report()
    md = report.to_markdown(rep)
    assert "| m | nimblelm | 20.00 ± 1.00 | 0.900 | 100.0 | 0.500 |" in md
    assert "| m | vllm | skipped | – | – | – | skipped: no vLLM venv at /x |" in md
    assert "NOT this machine" in md and "| vLLM | 90.052 | 7.11 | paged |" in md and "A100" in md
    assert "nimblelm / transformers = 2.00× (target ≥ 1.8×): met" in md
    assert "nimblelm / llama.cpp = 0.50× (target ≥ 1.0×): missed by 0.50×" in md
    assert "nimblelm / llama.cpp max req/s = 0.75× (target ≥ 2.0×): missed by 1.25×" in md
    assert "| nimblelm | C++ kernels: paged decode attention" in md
    assert "| m | nimblelm | inf | 0.900 | 2.7 | 500 / 500 | 300 / 300 |" in md
    assert "| m | nimblelm | 0.450 | 0.440 |" in md
    _j, m = report.write_report(rep, tmp_path)
    assert (tmp_path / "survey_engines.png").stat().st_size > 1000
    assert "![survey_engines](survey_engines.png)" in m.read_text()


def test_latency_plots_include_a_speedup_heatmap(tmp_path):
    from nimblelm.bench import machine, report

    rows = [{"backend": b, "test": t, "batch": 1, "threads": 2, "samples_ts": [v], "mean_ts": v, "std_ts": 0.0}
            for b, t, v in (("nimblelm", "tg8", 20.0), ("llama.cpp", "tg8", 40.0), ("nimblelm", "pp16", 400.0),
                            ("llama.cpp", "pp16", 300.0))]
    rep = {"kind": "latency", "command": "x", "config": {"model": "m", "dtype": "float32", "repeat": 1, "warmup": 0},
           "machine": machine.machine_info(2), "backends": {}, "results": rows}
    report.write_report(rep, tmp_path)
    assert (tmp_path / "latency.png").is_file() and (tmp_path / "latency_speedup.png").is_file()
    report.write_report(rep, tmp_path / "noplots", plots=False)
    assert not list((tmp_path / "noplots").glob("*.png"))


# --------------------------------------------------------------------------- smoke runs on a tiny model


def test_prompt_gen_test_on_the_tiny_model(tiny_llama, tmp_path, monkeypatch):
    from nimblelm.models.loader import load_model

    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path))
    ctx = BenchContext(model=str(tiny_llama), threads=torch.get_num_threads(), max_model_len=64, max_num_seqs=4,
                       loaded=load_model(str(tiny_llama), progress=False))
    tests = make_tests([], [], [1], prompt_gen=[(16, 6)])
    assert tests == [LatencyTest("pg", 6, 1, n_prompt=16)] and tests[0].name == "pg16+6"
    out = run_latency(ctx, ["nimblelm", "transformers", "llama.cpp"], tests, repeat=1, warmup=0, progress=False,
                      logger=lambda s: None, bandwidth_gbs=10.0)
    assert {r["backend"] for r in out["results"]} == {"nimblelm", "transformers"}
    assert all(r["test"] == "pg16+6" and r["mean_ts"] > 0 for r in out["results"])
    with pytest.raises(InvalidRequestError):
        make_tests([], [], [1], prompt_gen=[(0, 6)])


def test_cli_smoke_latency_throughput_roofline(tiny_llama, tmp_path, monkeypatch):
    from nimblelm.bench.cli import main
    from nimblelm.bench.roofline import matmul_weights_per_token
    from nimblelm.models.loader import load_model

    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path / "nobin"))
    monkeypatch.setenv("NIMBLELM_VLLM_VENV", str(tmp_path / "novenv"))
    model = str(tiny_llama)
    assert main(["latency", "--model", model, "-p", "8", "-n", "4", "-pg", "8,4", "-r", "1", "--backends",
                 "nimblelm,vllm,llama.cpp", "--no-progress", "--output", str(tmp_path / "lat")]) == 0
    lat = json.loads((tmp_path / "lat" / "results.json").read_text())
    assert [r["test"] for r in lat["results"]] == ["pp8", "tg4", "pg8+4"]
    assert lat["machine"]["memory_bandwidth_gbs"] > 0 and lat["machine"]["matmul_peak_gflops"]["float32"] > 0
    pp, tg = lat["results"][:2]
    assert 0 < tg["pct_of_bw_limit"] and tg["bw_limit_ts"] > 0
    peak = lat["machine"]["matmul_peak_gflops"]["float32"]
    assert pp["peak_gflops"] == peak and pp["pct_of_peak"] == pytest.approx(100 * pp["gflops"] / peak)
    assert pp["gflops"] == pytest.approx(2 * matmul_weights_per_token(load_model(model, progress=False).config) * pp["mean_ts"] / 1e9)
    assert "pct_of_peak" not in tg and f"% of {peak:.0f})" in (tmp_path / "lat" / "report.md").read_text()
    assert lat["backends"]["vllm"]["status"] == "skipped" and lat["backends"]["llama.cpp"]["status"] == "skipped"
    assert (tmp_path / "lat" / "latency.png").is_file()

    for ds in ("prefix", "random"):
        assert main(["throughput", "--model", model, "--dataset", ds, "--num-prompts", "3", "--input-len", "6",
                     "--output-len", "3", "--prefix-len", "4", "--backends", "nimblelm", "--no-progress",
                     "--output", str(tmp_path / ds)]) == 0
        thr = json.loads((tmp_path / ds / "results.json").read_text())
        row = thr["results"][0]
        assert row["output_tokens"] == 9 and row["mean_gflops"] > 0 and row["pct_of_peak"] > 0
        assert (tmp_path / ds / "throughput.png").is_file()

    assert main(["roofline", "--model", model, "--dtypes", "float32", "--sizes-mib", "1,2", "--budget", "0.01",
                 "--output", str(tmp_path / "roof")]) == 0
    roof = json.loads((tmp_path / "roof" / "results.json").read_text())
    assert roof["roofline"]["model"]["decode_limits"][0]["max_tok_s"] > 0
    assert (tmp_path / "roof" / "roofline_bandwidth.png").is_file()


def test_cli_smoke_survey_engines(tiny_llama, tmp_path, monkeypatch):
    """(a) and (b) on a tiny model: nimblelm and transformers measured (offline where no server runs),
    llama.cpp and vLLM skipped with their reasons."""
    from nimblelm.bench import serve
    from nimblelm.bench.cli import main

    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path / "nobin"))
    monkeypatch.setenv("NIMBLELM_VLLM_VENV", str(tmp_path / "novenv"))
    monkeypatch.setattr(serve, "nimblelm_serve_available", lambda python=None, source=None: "no serve here")
    rc = main(["survey", "engines", "--model", str(tiny_llama), "--prompt-len", "8", "--gen-len", "4", "-r", "1",
               "--dataset", "random", "--num-prompts", "3", "--input-len", "6", "--output-len", "3",
               "--no-progress", "--no-measure", "--output", str(tmp_path / "sur")])
    assert rc == 0
    data = json.loads((tmp_path / "sur" / "results.json").read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == {"nimblelm", "transformers", "llama.cpp", "vllm"}
    for b in ("nimblelm", "transformers"):
        assert rows[b]["inference_tok_s"] > 0 and rows[b]["serving"]["status"] == "ok"
        assert rows[b]["serving"]["method"].startswith("offline") and rows[b]["serving_req_s"] > 0
    assert rows["llama.cpp"]["serving"]["status"] == "skipped" and rows["vllm"]["serving"]["status"] == "skipped"
    md = (tmp_path / "sur" / "report.md").read_text()
    assert "Theirs: the survey's Table 6 (NOT this machine)" in md and "Targets (recorded, not asserted)" in md


def test_survey_serving_interleaves_the_maximum_runs_across_servers(monkeypatch):
    """(b): every server up first, one untimed round, the rate-inf runs alternating over rounds (first server
    rotating), then each server's offered rates from the mean of its maxima; a server that fails mid-run is
    dropped. Each run replays its own workload, the same one on every server."""
    from nimblelm.bench import serve, survey
    from nimblelm.bench.metrics import SLO

    calls, stopped = [], []

    class FakeServer:
        def __init__(self, name):
            self.name, self.url, self.startup_s = name, name, 1.0
            self.extra_body, self.prefix_caching = None, True

        def start(self):
            calls.append(("start", self.name))

        def tree_cpu_s(self):
            return 0.0

        def stop(self):
            stopped.append(self.name)

    def fake_benchmark(url, model, workloads, rates, **kw):
        assert len(workloads) == len(rates)
        calls.append((url, tuple(rates)))
        used.append((url, [passes.index(w) for w in workloads]))
        if url == "vllm" and math.isinf(rates[0]) and sum(c[0] == "vllm" for c in calls) == 3:
            raise RuntimeError("server died")
        top = {"nimblelm": 3.0, "llama.cpp": 1.0, "vllm": 2.0}[url] + 0.5 * sum(c[0] == url for c in calls)
        m = {"request_throughput": top, "output_throughput": 10 * top, "total_token_throughput": 20 * top,
             "failed": 0, "tpot_s": {"p99": 0.1}}
        return [{"rate": r, "metrics": m, "prefix_cache": None} for r in rates]

    def fake_start(name, ctx, slots, opts):
        if name == "transformers":
            raise BackendUnavailable("no server")
        return FakeServer(name)

    monkeypatch.setattr(serve, "start_backend_server", fake_start)
    monkeypatch.setattr(serve, "benchmark_server", fake_benchmark)
    monkeypatch.setattr(survey, "_offline_req_s", lambda *a: {"status": "ok", "max_req_s": 0.5})
    used = []
    passes = [[object()] * 4 for _ in range(1 + 3 + 1)]  # the untimed run, 3 rounds, 1 fraction
    out = survey._serve_all(BenchContext(model="unused"), ["nimblelm", "transformers", "llama.cpp", "vllm"],
                            passes, [], {}, [0.5], SLO(tpot_s=0.2), 3, lambda s: None, False)
    inf = (math.inf,)
    assert calls == [("start", "nimblelm"), ("start", "llama.cpp"), ("start", "vllm"),
                     ("nimblelm", inf), ("llama.cpp", inf), ("vllm", inf),  # untimed
                     ("nimblelm", inf), ("llama.cpp", inf), ("vllm", inf),
                     ("llama.cpp", inf), ("vllm", inf), ("nimblelm", inf),  # vllm fails here: dropped
                     ("nimblelm", inf), ("llama.cpp", inf),
                     ("nimblelm", (0.5 * 4.5,)), ("llama.cpp", (0.5 * 2.5,))]
    assert [k for url, ks in used if url == "nimblelm" for k in ks] == [0, 1, 2, 3, 4]
    assert [k for url, ks in used if url == "llama.cpp" for k in ks] == [0, 1, 2, 3, 4]
    assert out["nimblelm"]["max_req_s_rounds"] == [4.0, 4.5, 5.0] and out["nimblelm"]["max_req_s"] == 4.5
    assert out["vllm"] == {"status": "failed", "reason": "RuntimeError: server died"}
    assert out["transformers"]["server_skipped"] == "no server"
    assert sorted(stopped) == ["llama.cpp", "nimblelm", "vllm"]


@pytest.mark.parametrize("argv, message", [
    (["serve", "--request-rate", "0"], "request rate must be > 0"),
    (["serve", "--slo", "ttft"], "bad SLO"),
    (["serve", "--burstiness", "0"], "--burstiness must be > 0"),
    (["serve", "--max-concurrency", "0"], "--max-concurrency must be >= 1"),
    (["serve", "--backends", "tgi"], "unknown backend 'tgi'"),
    (["serve", "--dataset", "prefix", "--prefix-len", "-1"], "--prefix-len must be >= 0"),
    (["survey", "engines", "--rate-fractions", "1.5"], "--rate-fractions must be in"),
    (["survey", "engines", "--tpot-slo", "0"], "--tpot-slo must be > 0"),
    (["roofline", "--dtypes", "int4"], "--dtypes"),
    (["latency", "-pg", "512"], "expected P,N"),
])
def test_new_invalid_options_raise_one_line(argv, message):
    import argparse

    from nimblelm.bench.cli import add_bench_subparser, run

    parser = argparse.ArgumentParser(prog="nimblelm")
    add_bench_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    with pytest.raises(InvalidRequestError, match=message) as e:
        run(args)
    assert "\n" not in str(e.value)


def test_finite_rates_survive_json():
    from nimblelm.bench.report import to_json

    assert json.loads(to_json({"rate": math.inf, "x": [1.0, math.nan]})) == {"rate": None, "x": [1.0, None]}


# ------------------------------------------------------------------------------ the real packaged model


@pytest.mark.integration
def test_serve_survey_roofline_and_ppl_on_the_packaged_model(tmp_path, capsys):
    """Each new command once on the default model with tiny sizes (a peer that is absent is skipped)."""
    from nimblelm.bench.cli import main
    from nimblelm.cli import main as nimblelm_main

    threads = str(torch.get_num_threads())
    assert main(["serve", "--backends", "nimblelm,llama.cpp", "--dataset", "random", "--num-prompts", "2",
                 "--input-len", "8", "--output-len", "4", "--request-rate", "inf", "-t", threads, "--no-progress",
                 "--output", str(tmp_path / "serve")]) == 0
    data = json.loads((tmp_path / "serve" / "results.json").read_text())
    assert data["backends"]["nimblelm"]["status"] == "ok"
    for row in data["results"]:
        assert row["metrics"]["completed"] == 2 and row["metrics"]["output_tokens"] == 8

    assert main(["survey", "engines", "--backends", "nimblelm,transformers", "--prompt-len", "16", "--gen-len", "4",
                 "-r", "1", "--num-prompts", "2", "--max-output-len", "4", "--rate-fractions", "0.5", "-t", threads,
                 "--no-progress", "--output", str(tmp_path / "survey")]) == 0
    data = json.loads((tmp_path / "survey" / "results.json").read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert rows["nimblelm"]["serving"]["method"].startswith("its OpenAI server")
    assert rows["transformers"]["serving"]["method"].startswith("offline")
    assert all(r["inference_tok_s"] > 0 and r["serving_req_s"] > 0 for r in rows.values())

    assert main(["roofline", "--dtypes", "float32", "--sizes-mib", "64", "--budget", "0.2", "-t", threads]) == 0
    assert "decode tok/s limit" in capsys.readouterr().out

    assert nimblelm_main(["eval", "ppl", "--window", "32", "--max-tokens", "64", "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


def test_disturbance_is_judged_against_the_cores_left_free(monkeypatch):
    from nimblelm.bench import machine

    monkeypatch.setattr(machine, "logical_cpus", lambda: 2)
    assert not machine.disturbed({"other_share": 0.48}, threads=1)  # the other core was free for them
    assert machine.disturbed({"other_share": 0.60}, threads=1)
    assert machine.disturbed({"other_share": 0.06}, threads=2)
    assert not machine.disturbed({}, threads=2)
    # The hypervisor's steal takes cores from the run as another process would.
    assert machine.disturbed({"other_share": 0.0, "steal_share": 0.12}, threads=2)
    assert not machine.disturbed({"other_share": 0.0, "steal_share": 0.01}, threads=2)


def test_activity_is_told_with_its_steal():
    from nimblelm.bench import machine

    assert machine.activity_text({}) is None
    assert machine.activity_text({"other_share": 0.001, "steal_share": 0.0}) == (
        "other processes took 0.1% of the machine")
    assert machine.activity_text({"other_share": 0.0005, "steal_share": 0.1212}) == (
        "other processes took 0.1% of the machine, the hypervisor 12.1% (steal)")


def test_process_tree_cpu_counts_grandchildren():
    """A server's engine may run in a grandchild whose CPU never reaches our rusage (vLLM's does)."""
    import subprocess
    import sys
    from pathlib import Path

    from nimblelm.bench import machine

    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'sum(range(5_000_000))']); input()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        deadline = 0
        while machine.process_tree_cpu(p.pid) < 0.05 and deadline < 600:
            __import__("time").sleep(0.05)
            deadline += 1
        assert machine.process_tree_cpu(p.pid) >= 0.05  # the waited-for grandchild's CPU is counted
    finally:
        p.communicate(b"\n", timeout=30)
    assert machine.process_tree_cpu(p.pid) == 0.0  # gone
