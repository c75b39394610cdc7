"""Self-speculation by layer skipping: drafts from a subset of the target's layers over its own KV cache,
lossless inside continuous batching, and the search that chooses the layers."""

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import TRAINING_TEXT, make_tiny_hf_model

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.cli import main
from nimblelm.speculative import SpeculativeConfig
from nimblelm.speculative.layer_skip import expected_tokens, search

PROMPTS = [
    "one two three four five six one two three four five six one two three",
    "def add(a, b):\n    return a + b\n\ndef add(",
    "The cat sat on the mat. The cat sat",
    "Rivers",
]
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def hollow_qwen(tmp_path_factory):
    """Four layers, of which 1 and 2 add nothing to the residual stream (their output projections are zero):
    skipping them drafts exactly what the whole model decodes."""
    path = make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "hollow", arch="qwen2", num_hidden_layers=4,
                              initializer_range=0.3)
    weights = load_file(path / "model.safetensors")
    for i in (1, 2):
        for name in (f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"):
            weights[name].zero_()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _layer_skip(model, skip_layers=None, k=3, **engine):
    config = {"method": "layer_skip", "num_speculative_tokens": k}
    if skip_layers is not None:
        config["skip_layers"] = skip_layers
    llm = LLM(str(model), **{"dtype": "float32", "max_model_len": 256, "max_num_seqs": 8, **engine},
              speculative_config=config)
    llm.llm_engine.runner.step_cost = None  # every draft verified, whatever a step costs
    return llm


@pytest.mark.parametrize("block_size", [4, 16])
def test_skipping_layers_that_add_nothing_keeps_every_draft(hollow_qwen, block_size):
    """Drafts cross block boundaries into scratch blocks (block size 4, k = 3) or start mid-block in a copy
    of the sequence's own: any K/V misplaced would change a draft, and every one is kept."""
    ref = LLM(str(hollow_qwen), dtype="float32", max_model_len=256).generate(PROMPTS, GREEDY, use_tqdm=False)
    spec = _layer_skip(hollow_qwen, [1, 2], block_size=block_size)
    out = spec.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    stats = spec.llm_engine.stats().spec
    assert stats.num_draft_tokens > 50 and stats.acceptance_rate == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hollow", "tiny"])
def test_layer_skip_over_tensor_parallel_ranks(model, hollow_qwen, tiny_qwen):
    """Both ranks draft with their slices of the kept layers (the layers' all-reduces, the logits gathered), each
    into its own KV heads' scratch blocks, drafts crossing blocks of 4: one process's drafts and output. Eager
    steps: no step costs to weigh the drafts by."""
    path, skip = (hollow_qwen, [1, 2]) if model == "hollow" else (tiny_qwen, [1])
    ref = LLM(str(path), dtype="float32", max_model_len=256).generate(PROMPTS, GREEDY, use_tqdm=False)
    stats = []
    for tp in (1, 2):
        spec = LLM(str(path), dtype="float32", max_model_len=256, max_num_seqs=8, block_size=4, enforce_eager=True,
                   tensor_parallel_size=tp, speculative_config={"method": "layer_skip", "num_speculative_tokens": 3,
                                                                "skip_layers": skip})
        out = spec.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
        stats.append(spec.llm_engine.stats().spec)
    assert stats[0] == stats[1] and stats[0].num_accepted_tokens > 0
    if model == "hollow":
        assert stats[0].acceptance_rate == 1.0


@pytest.mark.parametrize("eager", [False, True], ids=["replayed", "eager"])
@pytest.mark.parametrize("model", ["hollow", "tiny"])
def test_layer_skip_over_a_low_bit_cache(model, eager, hollow_qwen, tiny_qwen):
    """Over an int2 cache of one-block residuals, each draft row writes the sequence's residual ring (where the
    verifying row writes the same entry again) and seals the blocks it completes into the scratch blocks: plain
    low-bit decoding's tokens (tests/test_kv_lowbit.py checks those against the rule's oracle), every draft kept
    where the skipped layers add nothing. Rows that wrote another sequence's ring fail it."""
    path, skip = (hollow_qwen, [1, 2]) if model == "hollow" else (tiny_qwen, [1])
    prompts = [[(7 * i + 13 * n) % 290 + 10 for i in range(n)] for n in (40, 75, 90)]
    options = {"dtype": "float32", "max_model_len": 256, "kv_cache_dtype": "int2", "kv_residual_length": 16,
               "enforce_eager": eager}
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    ref = LLM(str(path), **options).generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    spec = _layer_skip(path, skip, **options)
    out = spec.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    stats = spec.llm_engine.stats().spec
    assert stats.num_draft_tokens > 100
    assert stats.acceptance_rate == 1.0 if model == "hollow" else stats.acceptance_rate < 1.0


def test_greedy_output_is_identical_and_sampling_runs_with_real_skipping(tiny_qwen):
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256)
    spec = _layer_skip(tiny_qwen, [1], block_size=4)
    ref = plain.generate(PROMPTS, GREEDY, use_tqdm=False)
    out = spec.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    assert spec.llm_engine.stats().spec.num_draft_tokens > 0
    sampled = SamplingParams(temperature=0.8, max_tokens=20, seed=3, ignore_eos=True)
    a = spec.generate(PROMPTS, sampled, use_tqdm=False)
    b = spec.generate(PROMPTS, sampled, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 20 for o in a)


@pytest.mark.parametrize("options, message", [
    ({"method": "ngram", "num_speculative_tokens": 2, "skip_layers": [1]}, "layer_skip only"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "skip_layers": []}, "non-empty list"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "skip_layers": "1"}, "non-empty list"),
    ({"method": "layer_skip", "num_speculative_tokens": 2, "skip_layers": [-1]}, "non-empty list"),
])
def test_bad_layer_skip_configs_are_refused(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        SpeculativeConfig.from_dict(options)


def test_layers_the_model_lacks_or_no_saved_search_are_refused(tiny_qwen):
    with pytest.raises(InvalidRequestError, match="some, not all"):
        _layer_skip(tiny_qwen, [0, 1])
    with pytest.raises(InvalidRequestError, match="some, not all"):
        _layer_skip(tiny_qwen, [7])
    with pytest.raises(InvalidRequestError, match="nimblelm spec search-layers --model"):
        _layer_skip(tiny_qwen)


def test_expected_tokens_counts_the_kept_run_and_the_targets_token():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_search_skips_the_layers_that_add_nothing_and_the_engine_finds_its_result(hollow_qwen, tmp_path):
    corpus = tmp_path / "calibration.txt"
    corpus.write_text(TRAINING_TEXT)
    path, found = search(str(hollow_qwen), num_speculative_tokens=3, corpus=str(corpus), tokens=96, window=32,
                         progress=False)
    assert path == hollow_qwen / "layer_skip.json" and json.loads(path.read_text()) == found
    first = found["path"][1]
    assert first["skip_layers"] == [1, 2] and first["agreement"] == 1.0
    assert found["skip_layers"] == [1, 2] and found["modeled_speedup"] > 1.0
    assert found["calibration_tokens"] == 96
    spec = _layer_skip(hollow_qwen)  # no skip_layers: the saved search's
    assert spec.llm_engine.runner.proposer.layers == [0, 3]
    path.unlink()


def test_search_layers_cli_reports_in_one_line(hollow_qwen, tmp_path, capsys):
    corpus = tmp_path / "calibration.txt"
    corpus.write_text(TRAINING_TEXT)
    out = tmp_path / "found.json"
    assert main(["spec", "search-layers", "-m", str(hollow_qwen), "--corpus", str(corpus), "--tokens", "64",
                 "-o", str(out)]) == 0
    assert "skip 2 of 4 layers [1, 2]" in capsys.readouterr().out and out.is_file()
    assert main(["spec", "search-layers", "-m", str(hollow_qwen), "--corpus", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corpus file not found" in err


@pytest.mark.integration
def test_real_model_greedy_output_is_identical_with_layer_skip():
    questions = ["What is the capital of France? Answer in one word.",
                 "Write a Python function that returns the square of a number."]
    plain = LLM("smollm2-135m", dtype="float32", max_model_len=512)
    spec = LLM("smollm2-135m", dtype="float32", max_model_len=512, speculative_config={
        "method": "layer_skip", "num_speculative_tokens": 3, "skip_layers": [20, 22, 24, 26]})
    spec.llm_engine.runner.step_cost = None  # every draft verified: the budget would turn these off
    prompts = [plain.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(temperature=0, max_tokens=48)
    ref = plain.generate(prompts, params, use_tqdm=False)
    out = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == [r.outputs[0].token_ids for r in ref]
    assert spec.llm_engine.stats().spec.num_accepted_tokens > 0
