"""Quantized benchmark runs: precision options, llama.cpp's matching GGUF types, and the float-only peers
skipped on quantized runs. Fast and offline (tiny random models)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

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
    (["latency", "--kv-cache-dtype", "fp8"], "--kv-cache-dtype must be one of auto, int8"),
    (["throughput", "--kv-cache-dtype", "int4"], "--kv-cache-dtype must be one of auto, int8"),
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
])
def test_auto_gguf_type_matches_nimblelms_precision(dtype, quantization, expected):
    assert auto_gguf_type(dtype, quantization) == expected
    ctx = BenchContext(model="unused", dtype=dtype, quantization=quantization)
    assert LlamaCppBackend(ctx, gguf_type="auto")._target_type() == expected
    assert LlamaCppBackend(ctx, gguf_type="q4_1")._target_type() == "q4_1"  # an explicit type wins


def test_no_gguf_type_for_an_unknown_quantization_skips_llama_cpp():
    with pytest.raises(BackendUnavailable, match="no GGUF type matches quantization 'nf4'"):
        auto_gguf_type("float32", "nf4")


def test_int8_kv_cache_gives_llama_cpp_a_q8_0_cache():
    assert LlamaCppBackend(BenchContext(model="unused")).kv_args() == []
    ctx = BenchContext(model="unused", kv_cache_dtype="int8")
    assert LlamaCppBackend(ctx).kv_args() == ["-ctk", "q8_0", "-ctv", "q8_0"]


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

    fp32_bytes = LLM(str(tiny_llama), max_model_len=64, max_num_seqs=2).weights_nbytes
    ctx = BenchContext(model=str(tiny_llama), threads=torch.get_num_threads(), max_model_len=64, max_num_seqs=2,
                       quantization="int8", kv_cache_dtype="int8")
    out = run_latency(ctx, ["nimblelm", "transformers"], make_tests([8], [6], [1]), repeat=1, warmup=0,
                      progress=False, logger=lambda s: None)
    assert out["backends"]["transformers"]["status"] == "skipped"
    info = out["backends"]["nimblelm"]["info"]
    assert (info["quantization"], info["kv_cache_dtype"]) == ("int8", "int8")
    tg = next(r for r in out["results"] if r["kind"] == "tg")
    assert tg["weights_nbytes"] == info["weights_nbytes"] < fp32_bytes
    assert tg["mean_gbps"] == pytest.approx(tg["weights_nbytes"] * tg["mean_ts"] / 1e9)
