"""`nimblelm bench scale` (bench/scale.py) on the tiny model: every configuration runs its requests to the end in
processes of its own, the tensor-parallel row counts its all-reduces, and the report is written; its options fail
with one line."""

from __future__ import annotations

import json

import pytest

from nimblelm.bench.cli import main
from nimblelm.bench.scale import all_reduce_at, predict_tp


@pytest.mark.slow
def test_one_process_and_two_ranks_serve_the_workload(tiny_qwen, tmp_path):
    out = tmp_path / "scale"
    code = main(["scale", "--model", str(tiny_qwen), "--dtype", "float32", "--dataset", "random", "--num-prompts", "4",
                 "--input-len", "16", "--output-len", "8", "--alone-len", "8", "--configurations", "single,tp",
                 "-o", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in report["scale"]["rows"]}
    assert set(rows) == {"single", "tp"}
    for r in rows.values():
        assert r["output_tokens"] == 4 * 8 and r["output_tok_s"] > 0 and r["alone_decode_tok_s"] > 0
    assert rows["tp"]["processes"] == 2 and len(rows["tp"]["collective_s_per_step"]) == 2
    assert all(s > 0 for s in rows["tp"]["collective_s_per_step"])
    assert set(report["scale"]["all_reduce_s"]) == {"1", "8", "64", "512"}
    check = report["scale"]["model_check"]
    assert check["predicted_step_ms"] > 0 and set(check["predicted_tok_s"]) == {"2", "4", "8"}
    assert "| tp | 2 × 1 |" in (out / "report.md").read_text()


def test_the_cost_model_adds_the_collectives_to_the_shared_work():
    # 30 layers: 62 all-reduces of 1 ms beside a 20 ms step split in two
    assert predict_tp(0.020, 30, 0.001, 2) == pytest.approx(0.010 + 0.062)
    assert all_reduce_at(0.001, 2) == 0.001 and all_reduce_at(0.001, 8) == pytest.approx(0.007)


@pytest.mark.parametrize("args,message", [
    (["--configurations", "single,pp"], "unknown pp"),
    (["--size", "1"], "--size must be >= 2"),
    (["--alone-len", "1"], "--alone-len must be >= 2"),
])
def test_bad_options_are_one_line(tiny_qwen, capsys, args, message):
    assert main(["scale", "--model", str(tiny_qwen), *args]) == 2
    assert message in capsys.readouterr().err
