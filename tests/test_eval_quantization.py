"""`nimblelm eval quantization`: every setting measured against fp32 on the same inputs, on a tiny model."""

import json

import pytest

from nimblelm.cli import main
from nimblelm.eval.ppl import perplexity
from nimblelm.eval.quant_table import SETTINGS, matched_prefix


def test_matched_prefix():
    assert matched_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert matched_prefix([1, 2], [1, 2]) == 2
    assert matched_prefix([5], [6]) == 0


def test_every_setting_on_a_tiny_model(tiny_qwen, tmp_path, capsys):
    rc = main(["eval", "quantization", "--model", str(tiny_qwen), "--window", "32", "--max-tokens", "96",
               "--greedy-prompts", "2", "--greedy-tokens", "8", "--repeat", "1", "--calib-samples", "8",
               "--calib-seq-len", "32", "--threads", "1", "--no-progress", "--no-plots", "--output", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {r["setting"]: r for r in data["results"]}
    assert list(rows) == list(SETTINGS)
    # The tiny model's 64-wide layers take no group of 128.
    assert data["group_size"] == 64 and rows["gptq-int4"]["label"] == "GPTQ int4 g64"
    fp32 = rows["fp32"]
    assert fp32["delta_pct"] == 0 and fp32["agreement"] == 1 and fp32["identical"] == 2
    # The reference row is the plain perplexity of the model under the same protocol.
    assert fp32["ppl"] == pytest.approx(perplexity(str(tiny_qwen), window=32, max_tokens=96).ppl, rel=1e-6)
    for r in rows.values():
        assert r["scored_tokens"] == fp32["scored_tokens"] and 0 <= r["agreement"] <= 1
        assert r["delta_pct"] == pytest.approx(100 * (r["ppl"] / fp32["ppl"] - 1))
    assert rows["int4-g32"]["weights_nbytes"] < rows["int8"]["weights_nbytes"] < fp32["weights_nbytes"]
    assert rows["kv-int8"]["weights_nbytes"] == fp32["weights_nbytes"]
    assert rows["kv-int8"]["ppl"] != fp32["ppl"]  # the int8 cache is really in the path
    assert rows["kv-int8"]["float_kv_layers"] == [] and len(rows["kv-int8"]["int8_kv_errors"]) == 2
    assert all("float_kv_layers" not in r for name, r in rows.items() if name != "kv-int8")
    # A window of 32 tokens seals blocks 0 and 1: with a residual of one block the low-bit caches are in the path;
    # the default residual, 128 tokens, holds the whole window at full precision.
    assert rows["kv-int4-r16"]["ppl"] != fp32["ppl"] and rows["kv-int2-r16"]["ppl"] != rows["kv-int4-r16"]["ppl"]
    assert rows["kv-int4"]["ppl"] == pytest.approx(fp32["ppl"], rel=1e-5) != rows["kv-int4-r16"]["ppl"]
    # bfloat16 weights' residual is bfloat16, as their auto cache is: the window reads the very same K/V.
    assert rows["bf16-kv-int4"]["ppl"] == pytest.approx(rows["bf16"]["ppl"], rel=1e-5) != rows["kv-int4"]["ppl"]
    assert rows["kv-fp16"]["ppl"] != rows["kv-bf16"]["ppl"] != fp32["ppl"]
    assert rows["kv-fp16"]["kv_bytes_per_token"] == rows["kv-bf16"]["kv_bytes_per_token"]
    kv = [rows[name]["kv_bytes_per_token"] for name in ("fp32", "kv-fp16", "kv-int8", "kv-int4", "kv-int2")]
    assert kv == sorted(kv, reverse=True) and kv[0] == 2 * 2 * 2 * 16 * 4  # layers, K and V, KV heads, channels
    # Longer blocks share a key scale and minimum among more tokens; the residual is a sequence's, not a token's.
    assert rows["kv-int4-b32"]["kv_bytes_per_token"] < rows["kv-int4"]["kv_bytes_per_token"]
    assert rows["kv-int2-b32"]["kv_bytes_per_token"] < rows["kv-int2"]["kv_bytes_per_token"]
    assert rows["kv-int2-r16"]["kv_bytes_per_token"] == rows["kv-int2"]["kv_bytes_per_token"]
    report = (tmp_path / "report.md").read_text()
    assert "KV cache int8: all 2 layers int8 (the probe's largest change: " in report
    assert "| GPTQ int4 g64 |" in report and "groups of 64 (asked 128" in report
    assert "SmoothQuant W8A8 changes perplexity by under 3%" in report
    assert "KV cache int4 (KIVI) changes perplexity by under 1%" in report
    assert capsys.readouterr().out.startswith("# Quantization quality")


def test_bad_settings_are_one_line(tiny_qwen, capsys):
    assert main(["eval", "quantization", "--model", str(tiny_qwen), "--settings", "fp32,fp8"]) == 1
    assert "unknown setting fp8" in capsys.readouterr().err
    assert main(["eval", "quantization", "--model", str(tiny_qwen), "--group-size", "48"]) == 1
    assert "--group-size must be one of" in capsys.readouterr().err
