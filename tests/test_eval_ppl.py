"""`nimblelm eval ppl`: the window protocol, the fixed text set, and nimblelm's scorer against transformers."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nimblelm.errors import InvalidRequestError
from nimblelm.eval import load_text_set, perplexity, windows


def test_windows_protocol():
    ids = list(range(10))
    assert windows(ids, 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(ids, 4, 4, max_tokens=8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(list(range(9)), 4, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    assert windows(ids, 6, 3) == [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [6, 7, 8, 9]]
    with pytest.raises(InvalidRequestError):
        windows(ids, 1, 1)
    with pytest.raises(InvalidRequestError):
        windows(ids, 4, 0)


def test_pydoc_text_set_is_fixed():
    a = load_text_set("pydoc")
    assert a == load_text_set("pydoc", seed=5)  # the seed does not apply to pydoc
    assert len(a) > 400_000 and a.startswith("The ")
    assert hashlib.sha256(a.encode()).hexdigest() == hashlib.sha256(load_text_set("pydoc").encode()).hexdigest()
    assert load_text_set("pydoc", max_chars=100) == a[:100]
    with pytest.raises(InvalidRequestError, match="unknown text set"):
        load_text_set("wikitext")


def test_uniform_scorer_gives_the_vocabulary_size():
    """A model that predicts uniformly over V tokens has perplexity exactly V."""
    import torch

    from nimblelm.eval.ppl import nll_of_logits

    V = 37

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % V for c in text]}

    def scorer(ids):
        return nll_of_logits(torch.zeros(len(ids), V), ids)

    res = perplexity("fake", scorer=scorer, tokenizer=Tok(), text="hello world " * 20, window=16, max_tokens=100)
    assert res.ppl == pytest.approx(V, rel=1e-6)
    assert res.num_windows == 7 and res.scored_tokens == 6 * 15 + 3
    assert res.num_tokens == 100 and len(res.window_nll) == 7
    assert res.text_sha256 == hashlib.sha256(("hello world " * 20).encode()).hexdigest()
    with pytest.raises(InvalidRequestError):
        perplexity("fake", scorer=scorer, text="abc")  # a custom scorer needs its tokenizer


def test_nimblelm_scorer_matches_transformers_on_a_tiny_model(tiny_llama):
    from nimblelm.eval.ppl import NimbleLMScorer, TransformersScorer

    text = "The quick brown fox jumps over the lazy dog. " * 8
    ours = perplexity(str(tiny_llama), backend="nimblelm", text=text, window=24, max_tokens=80)
    ref_scorer = TransformersScorer(str(tiny_llama))
    ref = perplexity(str(tiny_llama), scorer=ref_scorer, tokenizer=ref_scorer.tokenizer, text=text, window=24,
                     max_tokens=80)
    assert ours.backend == "nimblelm" and ours.scored_tokens == ref.scored_tokens > 0
    assert ours.ppl == pytest.approx(ref.ppl, rel=1e-4)
    assert ours.window_nll == pytest.approx(ref.window_nll, abs=1e-4)
    assert math.isfinite(ours.ppl) and ours.ppl > 1
    # the scorer keeps working window after window (the KV pages are rewritten each time)
    s = NimbleLMScorer(str(tiny_llama), max_len=24)
    ids = list(range(5, 29))
    assert s(ids) == pytest.approx(s(ids))


def test_eval_cli(tiny_llama, tmp_path, capsys):
    from nimblelm.cli import main

    rc = main(["eval", "ppl", "--model", str(tiny_llama), "--window", "16", "--max-tokens", "40", "--no-progress",
               "--output", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ") and "text set pydoc" in out and "40 tokens" not in out
    assert "quantization none" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["result"]["num_windows"] == 3 and data["result"]["scored_tokens"] == 15 + 15 + 7
    assert main(["eval", "ppl", "--model", str(tiny_llama), "--window", "1"]) == 1
    assert "--window" in capsys.readouterr().err


def test_eval_ppl_json_is_the_only_thing_on_stdout(tiny_llama):
    """A script reads stdout as one JSON object: the progress bar goes to stderr. Run as a user runs it (a
    process, so that output written below Python's sys.stdout would show too)."""
    proc = subprocess.run(
        [sys.executable, "-m", "nimblelm", "eval", "ppl", "--model", str(tiny_llama), "--window", "16",
         "--max-tokens", "40", "--json"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # fails on anything beside one JSON value
    assert out["perplexity"] == pytest.approx(math.exp(out["nll"])) and out["perplexity"] > 1
    assert out["num_tokens"] == 40 and out["num_windows"] == 3 and out["scored_tokens"] == 15 + 15 + 7
    assert (out["model"], out["backend"], out["dtype"], out["quantization"], out["kv_cache_dtype"]) == (
        str(tiny_llama), "nimblelm", "float32", "none", "auto")
    assert (out["text_set"], out["seed"], out["window"], out["stride"]) == ("pydoc", 0, 16, 16)
    assert "window_nll" not in out
    assert "perplexity" in proc.stderr  # the progress bar


def test_eval_ppl_json_names_a_quantized_folders_format(tiny_qwen, tmp_path, capsys):
    from nimblelm.cli import main
    from nimblelm.quantization.quantize import quantize_model

    quantize_model(str(tiny_qwen), "rtn", 4, tmp_path / "rtn4", group_size=32, progress=False)
    capsys.readouterr()
    assert main(["eval", "ppl", "--model", str(tmp_path / "rtn4"), "--window", "16", "--max-tokens", "32",
                 "--no-progress", "--json", "--output", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["quantization"] == "int4" and out["num_tokens"] == 32
    assert "results.json" in captured.err
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["result"]
    assert saved["ppl"] == out["perplexity"] and saved["extra"]["quantization"] == "int4"
