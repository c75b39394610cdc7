"""Gemma 3 against Hugging Face transformers' Gemma3ForCausalLM on the same weights.

Unit tests use a tiny random Gemma 3 (tiny_models.TINY_GEMMA3: five sliding layers with a window of 8
tokens and their own rope base, then a global one), prompts several windows long and decodes that go far
past the window. Tolerance: both run fp32, so log-probabilities agree to float rounding (1e-4 here); a
wrong window, rope base, norm or scale moves them by tenths of a nat or more.

The integration test runs the packaged gemma3-270m (Q4_K_M GGUF) against transformers loading the same
file, on a short prompt and on one of ~1,300 tokens (the sliding layers' window is 512).
"""

import functools
import json
import shutil

import pytest
import torch
from hf_reference import model_from_gguf
from tiny_models import TINY_GEMMA3, assert_first_tokens_close, make_tiny_gguf, make_tiny_hf_model
from transformers import AutoModelForCausalLM

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.bench.backends import hf_model_from
from nimblelm.chat import run_chat
from nimblelm.kernels import cpu_ops
from nimblelm.models import gguf_file, registry
from nimblelm.models.loader import load_model

PROMPTS = [
    "A small language model reads a prompt, predicts the next token, and repeats until it is done.",
    "The scheduler decides which sequences run, and the model runner decides how they run on the device.",
    "Hello world!",
    "Rivers flow to the sea, mountains rise toward the sky, and forests cover the rolling hills. " * 3,
]
NEW_TOKENS = 32  # four windows past the prompt
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def private_cache(request, tmp_path, monkeypatch):
    """Unit tests get a private cache; the integration test shares the user's, so the model is pulled once."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    # An attention scalar other than the head size (32), so that using the wrong one shows.
    return make_tiny_hf_model(tmp_path_factory.mktemp("gemma3") / "hf", "gemma3", initializer_range=0.05,
                              query_pre_attn_scalar=24)


@pytest.fixture(scope="module")
def tiny_global_gemma(tmp_path_factory):
    """Every layer global: one KV group, as a Llama model has."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("gemma3") / "global", "gemma3", initializer_range=0.05,
                              sliding_window_pattern=1)


@functools.cache
def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_reference(folder, prompt_ids, n):
    """transformers' greedy continuation, and its log-probabilities at every position of prompt + continuation."""
    model = hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        logprobs = model(out).logits[0].log_softmax(-1)
    return out[0, len(prompt_ids):].tolist(), logprobs[len(prompt_ids) - 1 : -1]


def check_against_reference(llm, folder, prompts):
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    ids = [llm.tokenizer.encode(p) for p in prompts]
    outputs = llm.generate(ids, params, use_tqdm=False)
    for prompt_ids, out in zip(ids, outputs):
        tokens, ref_logprobs = hf_reference(folder, prompt_ids, NEW_TOKENS)
        assert out.outputs[0].token_ids == tokens
        for position, top in enumerate(out.outputs[0].logprobs):
            for token, lp in top.items():
                assert lp.logprob == pytest.approx(ref_logprobs[position, token].item(), abs=TOLERANCE), position


@pytest.fixture(params=["kernels", "torch"])
def kernels(request, monkeypatch):
    """Both paths: the C++ kernels (CPU fp32) and torch's ops, the reference path."""
    if request.param == "kernels":
        yield request.param
        return
    monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
    cpu_ops.cache_clear()
    yield request.param
    monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS")
    cpu_ops.cache_clear()


def test_config_of_the_tiny_model(tiny_gemma):
    config = load_model(str(tiny_gemma)).config
    assert config.architecture == "gemma3" and config.layer_windows == [8] * 5 + [None]
    assert (config.rope_theta, config.sliding_rope_theta, config.query_pre_attn_scalar) == (1e6, 100.0, 24.0)
    assert config.qk_norm and config.sandwich_norms and config.scale_embeddings and config.norm_weight_offset == 1.0
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings


def test_greedy_and_logprobs_match_transformers(tiny_gemma, kernels):
    llm = LLM(str(tiny_gemma), dtype="float32", max_model_len=256)
    check_against_reference(llm, tiny_gemma, PROMPTS[:1])


def test_chunked_prefill_batches_and_small_blocks(tiny_gemma):
    """Prompts cut into chunks of 8 tokens that share steps with other sequences' decodes, blocks of 4: the
    sliding layers' masks must hold for every chunk and decode."""
    llm = LLM(str(tiny_gemma), dtype="float32", max_model_len=256, max_num_batched_tokens=8, block_size=4, max_num_seqs=4)
    check_against_reference(llm, tiny_gemma, PROMPTS)


def test_sliding_tables_hold_only_the_window(tiny_gemma, kernels, monkeypatch):
    """A sliding group's table drops the blocks behind its window, so its K/V entries are no longer at
    their positions: before every step, every block no table holds is filled with NaN, and the output
    still matches transformers, while no decoding sequence's sliding table exceeds the window's blocks."""
    llm = LLM(str(tiny_gemma), dtype="float32", max_model_len=256, block_size=4, enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    window_blocks = [-(-g.window // 4) + 1 if g.window else None for g in runner.kv_groups]
    longest = [0] * len(window_blocks)
    execute = runner.execute

    def poisoned(sched):
        held = {b for state in runner.seqs.values() for table in state.block_ids for b in table}
        held |= {b for new in sched.new_requests for table in new.block_ids for b in table}
        held |= {b for run in sched.running_requests for table in run.new_block_ids for b in table}
        free = torch.tensor(sorted(set(range(runner.num_blocks)) - held))
        for cache in runner.kv_caches:
            cache.values[:, free] = float("nan")
        out = execute(sched)
        for state in runner.seqs.values():
            if state.num_computed_tokens > state.num_prompt_tokens:
                longest[:] = [max(m, len(t)) for m, t in zip(longest, state.block_ids)]
        return out

    monkeypatch.setattr(runner, "execute", poisoned)
    check_against_reference(llm, tiny_gemma, PROMPTS[3:])
    *sliding, full = longest
    assert sliding == window_blocks[:-1] and full > 2 * window_blocks[0]


def test_all_global_layers(tiny_global_gemma):
    llm = LLM(str(tiny_global_gemma), dtype="float32", max_model_len=256)
    assert set(llm.model_config.layer_windows) == {None}
    check_against_reference(llm, tiny_global_gemma, PROMPTS[:1])


def test_decode_steps_replay_from_their_traces(tiny_gemma, replays):
    """The decode steps that check_against_reference compares to transformers are replayed from traces of
    the Python layers, sliding and global ones alike."""
    llm = LLM(str(tiny_gemma), dtype="float32", max_model_len=256)
    check_against_reference(llm, tiny_gemma, PROMPTS[:2])
    assert len(replays) == NEW_TOKENS - 1  # every step after the prompt's


def test_rope_scaling_applies_to_the_global_layers_only(tmp_path):
    """Gemma 3 4B and larger scale their global layers' rope (linear, factor 8); the sliding layers keep theirs."""
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    folder = make_tiny_hf_model(tmp_path / "hf", "gemma3", initializer_range=0.05, rope_parameters=rope)
    llm = LLM(str(folder), dtype="float32", max_model_len=256)
    config = llm.model_config
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0} and config.sliding_rope_theta == 100.0
    check_against_reference(llm, folder, PROMPTS[:1])


@pytest.mark.parametrize("rope", [None, {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}])
def test_the_transformers_model_built_from_the_engine_weights(tiny_gemma, tmp_path, rope):
    """hf_model_from (the transformers and kvpress peers' model) is the folder's model: window, layer types, both
    rope bases, the rope scaling of the global layers and the attention scalar map back, and the logits agree."""
    folder = tiny_gemma if rope is None else make_tiny_hf_model(tmp_path / "hf", "gemma3", initializer_range=0.05,
                                                                 query_pre_attn_scalar=24, rope_parameters=rope)
    loaded = load_model(str(folder))
    ids = torch.tensor([loaded.tokenizer.encode(PROMPTS[3])])
    with torch.no_grad():
        ours = hf_model_from(loaded.config, loaded.weights)(ids).logits
        reference = hf_model(folder)(ids).logits
    assert ids.shape[1] > 3 * TINY_GEMMA3["sliding_window"]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_transformers_4_config_keys(tiny_gemma, tmp_path):
    """Configs on the Hub (transformers 4) name the rope bases rope_theta and rope_local_base_freq and may give
    the layer pattern instead of layer_types: the same model as transformers 5's keys."""
    folder = shutil.copytree(tiny_gemma, tmp_path / "v4")
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        del config[key]
    config |= {"rope_theta": 1e6, "rope_local_base_freq": 100.0, "rope_scaling": None, "sliding_window_pattern": 6}
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder)).config == load_model(str(tiny_gemma)).config


def test_gguf_holds_the_folder_weights(tiny_gemma, tmp_path):
    """A GGUF written as llama.cpp writes Gemma 3 (norms + 1, Gemma 2's tensor names, no q/k permutation)
    loads to the folder's config and weights, and to what transformers reads from the same file."""
    folder = make_tiny_hf_model(tmp_path / "hf", "gemma3")  # query_pre_attn_scalar = head_dim, as GGUF implies
    path = make_tiny_gguf(tmp_path / "tiny.gguf", folder)
    reference, model = load_model(str(folder)), load_model(str(path), progress=False)
    assert model.config == reference.config
    hf_state = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    for name, weight in reference.weights.items():
        assert torch.equal(model.weights[name], weight), name
        assert torch.equal(hf_state[name], weight), name


@pytest.mark.parametrize("gguf_name, arch, hf_name", [
    # llama.cpp's ffn_norm is the norm before the MLP, whose Hugging Face name depends on the architecture.
    ("blk.2.ffn_norm.weight", "gemma3", "model.layers.2.pre_feedforward_layernorm.weight"),
    ("blk.2.ffn_norm.weight", "llama", "model.layers.2.post_attention_layernorm.weight"),
    ("blk.0.post_attention_norm.weight", "gemma3", "model.layers.0.post_attention_layernorm.weight"),
    ("blk.1.post_ffw_norm.weight", "gemma3", "model.layers.1.post_feedforward_layernorm.weight"),
    ("blk.1.attn_k_norm.weight", "gemma3", "model.layers.1.self_attn.k_norm.weight"),
])
def test_gguf_names(gguf_name, arch, hf_name):
    assert gguf_file.hf_name(gguf_name, arch) == hf_name


def test_gguf_served_as_stored(tmp_path):
    """quantization="gguf": the Q8_0 matrices as int8, the norms (vectors) read as Gemma's, not Llama's."""
    folder = make_tiny_hf_model(tmp_path / "hf", "gemma3", initializer_range=0.05)
    path = make_tiny_gguf(tmp_path / "tiny-q8.gguf", folder, quant="Q8_0")
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5)
    ref = LLM(str(folder), dtype="float32", max_model_len=256).generate(PROMPTS, params, use_tqdm=False)
    out = LLM(str(path), dtype="float32", max_model_len=256, quantization="gguf").generate(PROMPTS, params, use_tqdm=False)
    assert_first_tokens_close(ref, out)


def test_a_base_model_cannot_chat(tmp_path):
    """Without a chat template (gemma3-270m is a base model), `generate --chat` and `chat` stop with one
    clear error (the CLI prints a NimbleLMError as one line)."""
    folder = make_tiny_hf_model(tmp_path / "hf", "gemma3")
    (folder / "chat_template.jinja").unlink()
    llm = LLM(str(folder), dtype="float32", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="no chat template"):
        llm.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        run_chat(llm, SamplingParams())


# ---------------------------------------------------------------- the packaged model


def long_prompt() -> str:
    """~1,300 tokens of a regular ledger: the continuation is predictable (clear greedy margins), and the
    sliding layers (window 512) see only its last part while the global layers see all of it."""
    days = [f"On day {d}, the bakery sold {d * 7 % 50 + 10} loaves of bread and {d * 3 % 20 + 5} cakes."
            for d in range(1, 61)]
    return "Sales ledger of a small bakery.\n" + "\n".join(days) + "\nOn day 61, the bakery sold"


# transformers' AutoTokenizer (a GemmaTokenizer built from the GGUF, transformers 5.2) on these texts: <bos> first.
REFERENCE_IDS = {
    "Hello world": [2, 9259, 1902],
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "  leading spaces\nand\ttabs <bos> é 12345": [
        2, 138, 26016, 9952, 107, 624, 255968, 39218, 236743, 2, 1559, 236743, 236770, 236778, 236800, 236812, 236810
    ],
}


@pytest.mark.integration
def test_gemma3_270m_matches_transformers():
    """Greedy continuations and their log-probabilities against transformers on the same GGUF (fp32). The
    reference is teacher-forced: one forward pass over prompt + our continuation must pick each of our tokens
    as its argmax (the same as its own greedy decoding) with log-probabilities within 2e-3."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    path = registry.pull("gemma3-270m", progress=False)
    # Prefill chunks of 512 tokens: the long prompt is cut across the window's edge.
    llm = LLM("gemma3-270m", max_model_len=2048, max_num_batched_tokens=512, dtype="float32")
    assert {text: llm.tokenizer.encode(text) for text in REFERENCE_IDS} == REFERENCE_IDS
    prompts = ["The capital of France is", "def fibonacci(n):", long_prompt()]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    assert len(ids[2]) > 1200

    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outputs = llm.generate(ids, params, use_tqdm=False)
    model = model_from_gguf(path)
    for prompt_ids, out in zip(ids, outputs):
        tokens = out.outputs[0].token_ids
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
        ref_logprobs = logits.log_softmax(-1)
        assert logits.argmax(-1).tolist() == tokens
        for position, top in enumerate(out.outputs[0].logprobs):
            for token, lp in top.items():
                assert abs(lp.logprob - ref_logprobs[position, token].item()) < 2e-3, position
    assert outputs[1].outputs[0].text.startswith("\n    if n == 0:\n        return 0")
