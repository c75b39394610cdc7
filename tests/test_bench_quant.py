"""Quantized benchmark runs: precision options, llama.cpp's matching GGUF types, and the float-only peers
skipped on quantized runs. Fast and offline (tiny random models)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIG

from nimblelm.bench.backends import BackendUnavailable, BenchContext, TransformersBackend
from nimblelm.bench.cli import add_bench_subparser, main, run
from nimblelm.bench.latency import make_tests, run_latency
from nimblelm.bench.llamacpp import LlamaCppBackend, auto_gguf_type
from nimblelm.errors import InvalidRequestError


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="nimblelm")
    add_bench_subparser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


# ---------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, message", [
    (["latency", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype must be one of auto, float32, float16, bfloat16, int8, int4, int2"),
    (["throughput", "--kv-cache-dtype", "int3"], "--kv-cache-dtype must be one of auto, float32, float16, bfloat16, int8, int4, int2"),
    (["latency", "--quantization", "int3"], "unknown quantization 'int3'"),  # the engine's own message
])
def test_bad_precision_options_raise_one_line(argv, message):
    args = _parse([*argv, "-t", "1", "--no-measure"])
    with pytest.raises(InvalidRequestError, match=message) as e:
        run(args)
    assert "\n" not in str(e.value)


def test_a_bad_quantization_exits_non_zero_with_one_line(capsys):
    rc = main(["latency", "--quantization", "int3", "-t", "1", "--no-measure", "--backends", "nimblelm"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("error: unknown quantization 'int3'") and "\n" not in err


def test_an_unknown_gguf_type_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["latency", "--llamacpp-gguf", "q5_0"])
    assert e.value.code != 0
    assert "--llamacpp-gguf" in capsys.readouterr().err


# ------------------------------------------------------------------------------ llama.cpp's GGUF type


@pytest.mark.parametrize("dtype, quantization, expected", [
    ("float32", None, "f32"),
    ("bfloat16", None, "f16"),
    ("float32", "int8", "q8_0"),
    ("float32", "int4", "q4_0"),
    ("float32", "w8a8", "q8_0"),
    ("float32", "gguf", "source"),  # both engines run the packaged file's own tensors
])
def test_auto_gguf_type_matches_nimblelms_precision(dtype, quantization, expected):
    assert auto_gguf_type(dtype, quantization) == expected
    ctx = BenchContext(model="unused", dtype=dtype, quantization=quantization)
    assert LlamaCppBackend(ctx, gguf_type="auto")._target_type() == expected
    assert LlamaCppBackend(ctx, gguf_type="q4_1")._target_type() == "q4_1"  # an explicit type wins


def test_no_gguf_type_for_an_unknown_quantization_skips_llama_cpp():
    with pytest.raises(BackendUnavailable, match="no GGUF type matches quantization 'nf4'"):
        auto_gguf_type("float32", "nf4")


def test_llama_cpp_gets_a_q8_0_cache_for_int8_kv_q4_0_for_int4_and_its_f16_default_otherwise():
    for kv, kind in (("auto", "f16"), ("float16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")):
        assert LlamaCppBackend(BenchContext(model="unused", kv_cache_dtype=kv)).kv_args() == ["-ctk", kind, "-ctv", kind]


def test_llama_cpp_has_no_2_bit_kv_cache():
    with pytest.raises(BackendUnavailable, match="llama.cpp has no 2-bit KV cache type"):
        LlamaCppBackend(BenchContext(model="unused", kv_cache_dtype="int2")).check()


@pytest.mark.parametrize("kv", ["int8", "int4", "int2"])
def test_float_peers_skip_an_integer_kv_cache(kv):
    with pytest.raises(BackendUnavailable, match=f"no CPU KV cache matching nimblelm's {kv} one"):
        TransformersBackend(BenchContext(model="unused", threads=1, kv_cache_dtype=kv)).check()


def test_float_peers_run_beside_a_float16_kv_cache_with_their_own():
    backend = TransformersBackend(BenchContext(model="unused", threads=1, kv_cache_dtype="float16"))
    backend.check()  # no skip: a float16 cache is not an integer format
    assert backend.info()["kv_cache_dtype"] == "float32"


# Largest error one value of a block may have after a round trip through the format: one quantization
# step (rounding is half a step; the fp16 scale and Q4_0's clamp of the side opposite the extreme add
# less than another half).
def _step(block: np.ndarray, kind: str) -> np.ndarray:
    if kind == "q8_0":
        return np.abs(block).max(-1) / 127
    if kind == "q4_0":
        return np.abs(block).max(-1) / 8
    return (block.max(-1) - block.min(-1)) / 15  # q4_1


@pytest.mark.parametrize("kind, file_type", [("q8_0", 7), ("q4_0", 2), ("q4_1", 3)])
def test_quantized_gguf_dequantizes_to_the_source_within_one_step(tmp_path, tiny_llama, kind, file_type):
    import gguf
    from tiny_models import make_tiny_gguf

    from nimblelm.bench.gguf_convert import convert_gguf, ensure_converted

    src = make_tiny_gguf(tmp_path / "tiny.F32.gguf", tiny_llama, quant="F32")
    dst = convert_gguf(src, tmp_path / f"tiny.{kind}.gguf", kind)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert b.fields["general.file_type"].contents() == file_type
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    for ta, tb in zip(a.tensors, b.tensors):
        assert list(ta.shape) == list(tb.shape), ta.name
        ref = np.asarray(ta.data, dtype=np.float32).reshape(tuple(reversed([int(d) for d in ta.shape])))
        if ref.ndim == 1:
            assert tb.tensor_type == gguf.GGMLQuantizationType.F32, ta.name
            np.testing.assert_array_equal(np.asarray(tb.data), ref)
            continue
        assert tb.tensor_type == qtype, ta.name
        got = gguf.quants.dequantize(tb.data, tb.tensor_type).reshape(ref.shape)
        blocks, err = ref.reshape(-1, 32), np.abs(got - ref).reshape(-1, 32)
        assert (err.max(-1) <= _step(blocks, kind) * 1.001 + 1e-7).all(), ta.name
        assert err.max() > 0  # it really was quantized
    cached = ensure_converted(src, kind, tmp_path / "cache")
    assert f".{kind.upper()}." in cached.name  # one cached file per type, beside the F32 one
    mtime = cached.stat().st_mtime_ns
    assert ensure_converted(src, kind, tmp_path / "cache") == cached and cached.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------------------- quantized runs


def test_float_only_peers_are_skipped_with_one_line_on_quantized_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_VLLM_VENV", str(tmp_path))
    for opts, said in (({"quantization": "int8"}, "int8 weights"), ({"kv_cache_dtype": "int8"}, "KV cache")):
        ctx = BenchContext(model="unused", threads=1, **opts)
        with pytest.raises(BackendUnavailable, match=said):
            TransformersBackend(ctx).check()
        lines = []
        out = run_latency(ctx, ["transformers", "vllm"], make_tests([16], [8], [1]), repeat=1, warmup=0,
                          progress=False, logger=lines.append)
        assert out["results"] == []
        for name in ("transformers", "vllm"):
            st = out["backends"][name]
            assert st["status"] == "skipped" and said in st["reason"] and "\n" not in st["reason"]
        assert len(lines) == 2 and all(line.startswith("skipping ") for line in lines)


def test_int8_latency_reports_gbps_from_the_quantized_weight_bytes(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_LLAMA_CPP_BIN", str(tmp_path))  # llama.cpp skipped, whatever is installed
    from nimblelm import LLM

    fp32_bytes = LLM(str(tiny_llama), dtype="float32", max_model_len=64, max_num_seqs=2).weights_nbytes
    ctx = BenchContext(model=str(tiny_llama), threads=torch.get_num_threads(), max_model_len=64, max_num_seqs=2,
                       quantization="int8", kv_cache_dtype="int8")
    out = run_latency(ctx, ["nimblelm", "transformers"], make_tests([8], [6], [1]), repeat=1, warmup=0,
                      progress=False, logger=lambda s: None)
    assert out["backends"]["transformers"]["status"] == "skipped"
    info = out["backends"]["nimblelm"]["info"]
    assert (info["quantization"], info["kv_cache_dtype"]) == ("int8", "int8")
    tg = next(r for r in out["results"] if r["kind"] == "tg")
    # int8 keeps the tied token table in fp32 beside the int8 output layer; a step reads one row of it.
    table_bytes = TINY_CONFIG["vocab_size"] * TINY_CONFIG["hidden_size"] * 4
    assert tg["token_nbytes"] == info["token_nbytes"] == info["weights_nbytes"] - table_bytes
    assert info["weights_nbytes"] < fp32_bytes
    assert tg["mean_gbps"] == pytest.approx(tg["token_nbytes"] * tg["mean_ts"] / 1e9)


def test_a_decode_step_reads_an_untied_token_table_one_row_at_a_time(tiny_qwen):
    from nimblelm import LLM

    runner = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, max_num_seqs=2).llm_engine.runner
    table = runner.model.embed_tokens.weight
    assert runner.token_nbytes == runner.weights_nbytes - table.nbytes
    ctx = BenchContext(model=str(tiny_qwen), threads=1, max_model_len=64, max_num_seqs=2)
    hf = TransformersBackend(ctx)
    hf.load()
    assert hf.token_nbytes() == hf.weights_nbytes() - table.nbytes


# ------------------------------------------------------------------------------ survey quantization


@pytest.mark.parametrize("argv, message", [
    (["--methods", "none"], "--methods: give one or more quantization methods"),
    (["--batch-sizes", "1,0"], "--batch-sizes and --input-lens values must be >= 1"),
    (["--input-lens", "x"], "--input-lens: expected comma-separated integers"),
    (["--output-len", "1"], "--output-len must be >= 2"),
    (["--quantization", "int8"], "drop --quantization"),
    (["--resume"], "give --output"),
])
def test_survey_quantization_options_raise_one_line(argv, message):
    args = _parse(["survey", "quantization", *argv, "-t", "1", "--no-measure"])
    with pytest.raises(InvalidRequestError, match=message) as e:
        run(args)
    assert "\n" not in str(e.value)


def _row(model, method, batch, input_len, prefill, decode):
    return {"model": model, "method": method, "batch": batch, "input_len": input_len,
            "mean_prefill_s": prefill, "mean_decode_s": decode, "mean_e2e_s": prefill + decode}


def test_speedups_are_unquantized_time_over_quantized_time_per_phase_and_cell():
    from nimblelm.bench.survey_quant import speedups

    rows = [_row("m", "none", 1, 128, 1.0, 8.0), _row("m", "int4", 1, 128, 1.25, 2.0),
            _row("m", "none", 4, 128, 4.0, 10.0), _row("m", "int4", 4, 128, 4.0, 5.0),
            _row("other", "int4", 1, 128, 1.0, 1.0)]  # no unquantized run of that model: no speedup
    got = speedups(rows)
    assert [(s["model"], s["batch"]) for s in got] == [("m", 1), ("m", 4)]
    assert got[0]["prefill"] == pytest.approx(0.8) and got[0]["decode"] == pytest.approx(4.0)
    assert got[0]["e2e"] == pytest.approx(9.0 / 3.25)
    assert (got[1]["prefill"], got[1]["decode"], got[1]["e2e"]) == pytest.approx((1.0, 2.0, 14.0 / 9.0))
    for s in got:  # end to end = prefill + decode: its speedup lies between theirs
        assert min(s["prefill"], s["decode"]) <= s["e2e"] <= max(s["prefill"], s["decode"])


def test_observations_are_written_from_the_measured_numbers():
    from nimblelm.bench.survey_quant import observations

    def sp(model, batch, n, prefill, decode):
        return {"model": model, "method": "int4", "batch": batch, "input_len": n, "prefill": prefill,
                "decode": decode, "e2e": (prefill + decode) / 2}

    cells = [sp("small", 1, 128, 1.1, 2.4), sp("small", 16, 128, 0.9, 1.4), sp("small", 1, 2048, 0.8, 2.0),
             sp("small", 16, 2048, 0.7, 1.2), sp("big", 1, 128, 1.0, 3.0)]
    lines = observations(cells, {"small": 100 * 2**20, "big": 300 * 2**20})
    assert len(lines) == 4
    assert "W4A16 on small: decode 1.20×–2.40× (median 1.70×)" in lines[0]
    assert "W4A16 on small: prefill 0.70×–1.10×, slower than unquantized in 3 of 4 cells" in lines[1]
    assert ("W4A16 on small: decode speedup at batch 1 / batch 16 (input 128): 2.40× / 1.40×, "
            "at input 128 / input 2048 (batch 1): 2.40× / 2.00×") in lines[2]
    assert "W4A16 on big: one batch size and one input length measured" in lines[2]
    assert "small (100 MiB) 1.70×, big (300 MiB) 3.00×" in lines[3]
    one = observations([c for c in cells if c["model"] == "small"], {"small": 1})
    assert "One model measured" in one[3] and "W4A16: decode" in one[0]


def test_survey_quantization_smoke_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    import json

    out = tmp_path / "sq"
    rc = main(["survey", "quantization", "--model", str(tiny_llama), "--batch-sizes", "1", "--input-lens", "8",
               "--output-len", "4", "--methods", "int8,nf4", "-r", "1", "-t", "1", "--no-measure", "--no-progress",
               "--output", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["output_len"] == 4 and data["config"]["batch_sizes"] == [1]
    assert [(r["method"], r["batch"], r["input_len"]) for r in data["results"]] == [("none", 1, 8), ("int8", 1, 8)]
    for r in data["results"]:
        assert len(r["prefill_s"]) == len(r["decode_s"]) == len(r["e2e_s"]) == 1
        assert r["e2e_s"][0] == pytest.approx(r["prefill_s"][0] + r["decode_s"][0], abs=1e-4)
    (s,) = data["speedups"]
    assert s["decode"] == pytest.approx(data["results"][0]["mean_decode_s"] / data["results"][1]["mean_decode_s"])
    status = data["methods"][str(tiny_llama)]
    assert status["int8"]["weights_nbytes"] < status["none"]["weights_nbytes"]
    assert status["nf4"]["status"] == "skipped" and "unknown quantization 'nf4'" in status["nf4"]["reason"]
    md = (out / "report.md").read_text()
    assert "W8A16 (int8) over unquantized" in md and "| B \\ input | 8 |" in md
    assert f"| 1 | {s['prefill']:.2f}/{s['decode']:.2f}/{s['e2e']:.2f} |" in md
    assert "3. *As batch size and input length grow, the speedup shrinks.*" in md
    assert {p.name for p in out.glob("*.png")} == {f"survey_quant_{p}.png" for p in ("prefill", "decode", "e2e")}
    assert capsys.readouterr().out.startswith("## nimblelm bench survey quantization")


def _survey(model, out, *extra):
    return main(["survey", "quantization", "--model", str(model), "--batch-sizes", "1", "--output-len", "4",
                 "--methods", "int8", "-r", "1", "-t", "1", "--no-measure", "--no-progress", "--no-plots",
                 "--output", str(out), *extra])


def test_an_interrupted_survey_quantization_resumes_where_it_stopped(tiny_llama, tmp_path, monkeypatch, capsys):
    import json

    from nimblelm.bench.backends import NimbleLMBackend

    out = tmp_path / "sq"
    timed = NimbleLMBackend.phase_times
    calls = []

    def interrupted(self, batch, input_len, output_len, seed):
        calls.append(input_len)
        if len(calls) == 3:  # the warm-up, cell (1, 8), then the run dies in cell (1, 12)
            raise RuntimeError("killed")
        return timed(self, batch, input_len, output_len, seed)

    monkeypatch.setattr(NimbleLMBackend, "phase_times", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        _survey(tiny_llama, out, "--input-lens", "8,12")
    kept = json.loads((out / "results.json").read_text())  # the checkpoint after the one finished cell
    assert [(r["method"], r["input_len"], r["run"]) for r in kept["results"]] == [("none", 8, 0)]

    monkeypatch.setattr(NimbleLMBackend, "phase_times", timed)
    assert _survey(tiny_llama, out, "--input-lens", "8,12", "--resume") == 0
    data = json.loads((out / "results.json").read_text())
    assert sorted((r["method"], r["input_len"], r["run"]) for r in data["results"]) == [
        ("int8", 8, 1), ("int8", 12, 1), ("none", 8, 0), ("none", 12, 1)]
    assert data["results"][0] == kept["results"][0]  # kept as measured, not measured again
    assert len(data["runs"]) == 2 and data["config"]["input_lens"] == [8, 12]
    assert {(s["method"], s["input_len"]) for s in data["speedups"]} == {("int8", 8), ("int8", 12)}
    assert "cells from 2 runs" in (out / "report.md").read_text()

    assert _survey(tiny_llama, out, "--input-lens", "8,12,16", "--methods", "int4", "--resume") == 0
    grown = json.loads((out / "results.json").read_text())
    assert grown["results"][:4] == data["results"]  # only this command's missing cells were measured
    assert sorted((r["method"], r["input_len"]) for r in grown["results"][4:]) == [
        ("int4", 8), ("int4", 12), ("int4", 16), ("none", 16)]
    assert grown["config"]["methods"] == ["int8", "int4"] and grown["config"]["input_lens"] == [8, 12, 16]
    assert "every cell is already measured" not in capsys.readouterr().err
    assert _survey(tiny_llama, out, "--input-lens", "8", "--resume") == 0
    assert "every cell is already measured" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == grown  # a run that measured nothing changes nothing


def test_resume_refuses_a_report_it_could_not_continue(tiny_llama, tmp_path):
    out = tmp_path / "sq"
    assert _survey(tiny_llama, out, "--input-lens", "8") == 0
    with pytest.raises(InvalidRequestError, match="measured with output_len 4, this run has 5") as e:
        run(_parse(["survey", "quantization", "--model", str(tiny_llama), "--batch-sizes", "1", "--input-lens", "8",
                    "--output-len", "5", "-t", "1", "--no-measure", "--output", str(out), "--resume"]))
    assert "\n" not in str(e.value)
    (out / "results.json").write_text('{"kind": "latency"}')
    with pytest.raises(InvalidRequestError, match="is not a survey quantization report"):
        run(_parse(["survey", "quantization", "--model", str(tiny_llama), "--input-lens", "8", "-t", "1",
                    "--no-measure", "--output", str(out), "--resume"]))
