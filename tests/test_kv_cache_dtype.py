"""kv_cache_dtype="float16" (K/V rounded to float16) and "int8" (int8 with a float32 scale per token and KV head).

The decode kernels against SDPA over the cache they read are in test_attention.py; here: the rounding,
the writes, the kernels against the float32 cache, and the engine with each cache."""

import subprocess
import sys

import pytest
import torch
from test_attention import int8_decode, random_paged_cache, reference
from test_engine import PROMPTS

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.kernels import cpu_ops
from nimblelm.layers.attention import dequantize_kv, quantize_kv

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def tiny_qwen_head32(tmp_path_factory):
    """Two query heads of 32 on one KV head: a head size the bfloat16 cache's tile scores take."""
    from tiny_models import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "qwen2-head32", arch="qwen2", initializer_range=0.3,
                              num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def ops():
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    return ops


def test_quantize_round_trip_is_within_half_a_step():
    torch.manual_seed(0)
    # Heads of very different magnitudes (each gets its own scale), and one all-zero head.
    x = torch.randn(50, 4, 64) * torch.tensor([1e-3, 1.0, 30.0, 0.0])[None, :, None]
    q, scale = quantize_kv(x)
    assert q.dtype == torch.int8 and scale.shape == (50, 4)
    assert torch.equal(scale, x.abs().amax(-1) / 127)
    err = (dequantize_kv(q, scale, torch.float32) - x).abs()
    assert (err <= scale[..., None] * 0.5 * (1 + 1e-5)).all()  # round to nearest: half a step at most
    assert torch.equal(q[:, :3].abs().amax(-1), torch.full((50, 3), 127, dtype=torch.int8))  # the full range
    assert not q[:, 3].any() and not scale[:, 3].any()


def test_write_kv_cache_int8_stores_what_the_torch_path_stores(ops):
    torch.manual_seed(0)
    blocks, block_size, kv_heads, dim = 6, 4, 2, 72
    qkv = torch.randn(5, (3 + 2 * kv_heads) * dim) * 4  # k and v are strided views into fused rows
    k = qkv[:, 3 * dim : (3 + kv_heads) * dim].view(5, kv_heads, dim)
    v = qkv[:, (3 + kv_heads) * dim :].view(5, kv_heads, dim)
    slots = torch.tensor([17, 0, 5, 23, 9])
    shape = (blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
    k_scales, v_scales = torch.zeros(shape[:-1]), torch.zeros(shape[:-1])
    ops.write_kv_cache_int8_(k_cache, v_cache, k_scales, v_scales, k, v, slots)
    for cache, scales, x in ((k_cache, k_scales, k), (v_cache, v_scales, v)):
        q, s = quantize_kv(x)
        expected_q, expected_s = torch.zeros_like(cache), torch.zeros_like(scales)
        expected_q.view(-1, kv_heads, dim)[slots] = q
        expected_s.view(-1, kv_heads)[slots] = s
        assert torch.equal(cache, expected_q) and torch.equal(scales, expected_s)  # bit for bit
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.write_kv_cache_int8_(k_cache, v_cache, k_scales, v_scales, k, v, torch.tensor([0, 1, 2, 3, 24]))


@pytest.mark.parametrize("window", [0, 300])
@pytest.mark.parametrize("dim", [64, 128])
def test_int8_decode_kernel_is_close_to_the_float32_cache(ops, window, dim):
    # Each K/V value moves by at most half a step, max|x| / 254. On N(0, 1) keys and values that moved
    # outputs of magnitude ~3 by at most 0.019 (0.8% of their norm) when this test was written.
    q, k_cache, v_cache, tables, lens = random_paged_cache(dim + window + 1, dim)
    out, _, _ = int8_decode(ops, q, k_cache, v_cache, tables, lens, window)
    ref = reference(q, k_cache, v_cache, tables, lens, window)
    assert (out - ref).abs().max() < 0.05
    assert (out - ref).norm() / ref.norm() < 0.02


def _token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_write_kv_cache_float16_stores_what_torch_rounds(ops):
    torch.manual_seed(0)
    blocks, block_size, kv_heads, dim = 6, 4, 2, 72
    qkv = torch.randn(5, (3 + 2 * kv_heads) * dim) * 1e3  # magnitudes where float16 rounds coarsely
    k = qkv[:, 3 * dim : (3 + kv_heads) * dim].view(5, kv_heads, dim)
    v = qkv[:, (3 + kv_heads) * dim :].view(5, kv_heads, dim)
    slots = torch.tensor([17, 0, 5, 23, 9])
    shape = (blocks, block_size, kv_heads, dim)
    k_cache, v_cache = torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16)
    ops.write_kv_cache_(k_cache, v_cache, k, v, slots)
    for cache, x in ((k_cache, k), (v_cache, v)):
        expected = torch.zeros_like(cache)
        expected.view(-1, kv_heads, dim)[slots] = x.half()
        assert torch.equal(cache, expected)  # bit for bit: round to nearest even, as torch does


@pytest.mark.parametrize("window", [0, 300])
def test_float16_decode_kernel_is_close_to_the_float32_cache(ops, window):
    # float16 keeps 11 significant bits: each K/V value moves by at most 2^-11 of itself.
    q, k_cache, v_cache, tables, lens = random_paged_cache(window + 2, 64)
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, k_cache.half(), v_cache.half(), tables, lens, 64**-0.5, window)
    ref = reference(q, k_cache, v_cache, tables, lens, window)
    assert (out - ref).abs().max() < 2e-3
    assert (out - ref).norm() / ref.norm() < 5e-4


@pytest.mark.parametrize("kv", ["float16", "bfloat16", "int8"])
def test_rounded_kv_greedy_output_does_not_depend_on_batching_chunking_or_preemption(tiny_qwen, kv):
    prompts = [PROMPTS[i % len(PROMPTS)] * (1 + i % 3) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    def run(prompts, **options):
        llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_cache_dtype=kv, **options)
        return llm, _token_ids(llm.generate(prompts, params, use_tqdm=False))

    alone = [run(p)[1][0] for p in prompts[:3]]
    batched = run(prompts, max_num_seqs=16)[1]
    assert batched[:3] == alone
    # 16-token steps cut the long prompts into chunks that attend to their earlier chunks' rounded pages.
    assert run(prompts, max_num_seqs=16, max_num_batched_tokens=16, block_size=4)[1] == batched
    tight, preempted = run(prompts, max_num_seqs=16, block_size=4, num_kv_blocks=70)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert preempted == batched
    assert tight.llm_engine.kv_cache_manager.num_free_blocks == 70


def _assert_same_greedy_outputs(a, b, logprob_tol, near_ties=False):
    """Equal tokens and close log-probabilities; with near_ties, two outputs may part where the first's two
    choices were within logprob_tol of each other (and are compared up to there), and the top log-probabilities
    may differ in their last rank."""
    if not near_ties:
        assert _token_ids(a) == _token_ids(b)
    for x, y in zip(a, b):
        for tx, ty, ex, ey in zip(x.outputs[0].token_ids, y.outputs[0].token_ids, x.outputs[0].logprobs,
                                  y.outputs[0].logprobs):
            if tx != ty:
                assert near_ties and ty in ex and abs(ex[tx].logprob - ex[ty].logprob) < logprob_tol
                break
            assert len(ex.keys() ^ ey.keys()) <= (2 if near_ties else 0)
            assert all(abs(ex[t].logprob - ey[t].logprob) < logprob_tol for t in ex.keys() & ey.keys())


@pytest.mark.parametrize("kv", ["float16", "bfloat16", "int8", "bfloat16-tiles"])
def test_rounded_kv_kernels_match_the_torch_reference_path(tiny_qwen, tiny_qwen_head32, monkeypatch, kv):
    # Both paths round alike (bit for bit, above), but their K/V come from different kernels a rounding
    # error apart, which can put a value on either side of a rounding boundary: one int8 step, ~1% of the
    # head's largest value. Such flips moved logprobs by up to 0.01 here (fp32 KV: 2e-5). bfloat16-tiles: a
    # model whose heads of 32 take the bfloat16 cache's tile scores where the CPU has AMX, or its dot products
    # where it has AVX-512 BF16 and the linears use them (the query rounded to bfloat16 there, and with dot
    # products the softmax weights too; not in torch's path).
    model = tiny_qwen_head32 if kv == "bfloat16-tiles" else tiny_qwen
    kv = kv.removesuffix("-tiles")
    fast = LLM(str(model), dtype="float32", max_model_len=256, kv_cache_dtype=kv).generate(PROMPTS[:4], GREEDY, use_tqdm=False)
    assert cpu_ops() is not None, "the C++ kernels did not build"
    monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
    cpu_ops.cache_clear()
    try:
        llm = LLM(str(model), dtype="float32", max_model_len=256, kv_cache_dtype=kv)
        reference_outputs = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False)
    finally:
        monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS")
        cpu_ops.cache_clear()
    # The rounded query keeps 8 significant bits: on this random model's large scores that moved logprobs by
    # up to 0.071 against the float path over the same cache, and tipped a near tie (0.008 apart) one way; with
    # dot products, which round the prefill's queries and weights as well, by up to 0.102 (EPYC Zen 4).
    tiles = model is tiny_qwen_head32
    _assert_same_greedy_outputs(fast, reference_outputs, 0.15 if tiles else 0.05, near_ties=tiles)


@pytest.mark.parametrize(("kv", "quantization"), [("int8", None), ("int8", "int8"), ("float16", None),
                                                   ("bfloat16", None)])
def test_replayed_decodes_with_rounded_kv_match_the_layer_by_layer_path(tiny_qwen, kv, quantization, replays):
    # Without the prefix cache both passes compute each prompt in the same steps: a quantized prefill's
    # numbers depend on its rows (from 128, bfloat16 products where the CPU has them), and the second pass
    # would otherwise reuse blocks the first computed in a larger step.
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, max_num_seqs=16, kv_cache_dtype=kv, quantization=quantization,
              enable_prefix_caching=False)
    runner = llm.llm_engine.runner
    for prompts in (PROMPTS[:1], PROMPTS):
        fast = llm.generate(prompts, GREEDY, use_tqdm=False)
        capture, runner.capture = runner.capture, None
        try:
            reference_outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        finally:
            runner.capture = capture
        assert replays and max(replays) == len(prompts)
        replays.clear()
        _assert_same_greedy_outputs(fast, reference_outputs, 1e-5)


def test_rounded_kv_holds_more_blocks_in_the_same_memory(tiny_qwen):
    budget = 256 << 10  # below the ceiling of max_num_seqs full-length sequences, so the budget decides
    blocks = {}
    for kv in ("auto", "float16", "bfloat16", "int8"):
        llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=64, kv_cache_memory_bytes=budget, kv_cache_dtype=kv)
        blocks[kv] = llm.llm_engine.kv_cache_manager.num_blocks
        cfg = llm.model_config
    # Per token, layer and KV head: K and V of head_dim float32 or float16 values, or of head_dim int8 values
    # and a scale.
    per_token = {"auto": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4,
                 "float16": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2,
                 "bfloat16": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2,
                 "int8": 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim + 4)}
    assert blocks == {kv: budget // (16 * n) for kv, n in per_token.items()}  # 3.2x at the tiny head_dim of 16


def test_bad_kv_cache_dtype_is_one_clear_error(tiny_qwen):
    with pytest.raises(InvalidRequestError, match="unknown kv_cache_dtype 'fp8': use auto, float32, float16, bfloat16, int8, int4, int2"):
        LLM(str(tiny_qwen), dtype="float32", kv_cache_dtype="fp8")
    result = subprocess.run([sys.executable, "-m", "nimblelm", "generate", "--model", str(tiny_qwen),
                             "--kv-cache-dtype", "int3", "hi"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: unknown kv_cache_dtype 'int3': use auto, float32, float16, bfloat16, int8, int4, int2"]


def test_eval_ppl_scores_through_the_int8_cache(tiny_llama, capsys):
    from nimblelm.cli import main
    from nimblelm.eval.ppl import perplexity

    text = "The quick brown fox jumps over the lazy dog. " * 8
    fp32, int8 = (perplexity(str(tiny_llama), text=text, window=24, max_tokens=80, kv_cache_dtype=kv)
                  for kv in ("auto", "int8"))
    # Whole-window prefills attend to the rounded K/V, so the option shows in the score, and only a little.
    assert fp32.ppl != int8.ppl and int8.ppl == pytest.approx(fp32.ppl, rel=0.02)
    assert int8.extra["kv_cache_dtype"] == "int8"
    with pytest.raises(InvalidRequestError, match="nimblelm backend only"):
        perplexity(str(tiny_llama), backend="transformers", text=text, kv_cache_dtype="int8")
    assert main(["eval", "ppl", "--model", str(tiny_llama), "--kv-cache-dtype", "int3"]) == 1
    assert "unknown kv_cache_dtype 'int3'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def qwen_with_huge_logits(tmp_path_factory, tiny_qwen):
    """tiny_qwen with a key channel of layer 1 offset by 100 and its queries scaled 5x, as in the few layers
    of Qwen2.5-Coder whose logits span hundreds. The offset adds the same to a query's every logit, which
    softmax ignores, but it sets each key's int8 step, so the channels that matter round coarsely."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("huge_logits") / "qwen2"
    shutil.copytree(tiny_qwen, path)
    weights = load_file(path / "model.safetensors")
    prefix = "model.layers.1.self_attn."
    weights[prefix + "k_proj.bias"].view(2, 16)[:, 0] += 100  # channel 0 of both KV heads
    for name in ("q_proj.weight", "q_proj.bias"):
        weights[prefix + name] = weights[prefix + name] * 5
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_int8_cache_keeps_the_layers_it_would_distort_in_float(qwen_with_huge_logits, monkeypatch):
    from nimblelm.eval.ppl import perplexity
    from nimblelm.quantization import kv_int8

    llm = LLM(str(qwen_with_huge_logits), dtype="float32", max_model_len=64, kv_cache_memory_bytes=256 << 10, kv_cache_dtype="int8")
    runner = llm.llm_engine.runner
    errors = runner.int8_kv_errors
    assert errors[0] < kv_int8.MAX_ERROR < errors[1]
    assert list(runner.kv_dtypes.values()) == [torch.int8, torch.float32]
    assert runner.kv_caches[0].scales is not None and runner.kv_caches[0].values.dtype == torch.int8
    assert runner.kv_caches[1].scales is None and runner.kv_caches[1].values.dtype == torch.float32
    cfg = llm.model_config
    per_token = 2 * cfg.num_kv_heads * ((cfg.head_dim + 4) + cfg.head_dim * 4)  # layer 0 int8, layer 1 float32
    assert llm.llm_engine.kv_cache_manager.num_blocks == (256 << 10) // (16 * per_token)

    text = "The quick brown fox jumps over the lazy dog. " * 8
    score = {}
    for name, kv in (("fp32", "auto"), ("probed", "int8")):
        score[name] = perplexity(str(qwen_with_huge_logits), text=text, window=24, max_tokens=80, kv_cache_dtype=kv).ppl
    monkeypatch.setattr(kv_int8, "MAX_ERROR", float("inf"))
    score["all int8"] = perplexity(str(qwen_with_huge_logits), text=text, window=24, max_tokens=80,
                                   kv_cache_dtype="int8").ppl
    # Layer 0's rounding still shows; layer 1's, which moved its attention output by errors[1], is gone.
    assert score["probed"] != score["fp32"]
    assert abs(score["probed"] / score["fp32"] - 1) < abs(score["all int8"] / score["fp32"] - 1) / 3


def test_the_quality_report_names_the_layers_kept_in_float():
    from nimblelm.eval.quant_table import kv_layers_line

    row = {"label": "KV cache int8", "int8_kv_errors": [0.42, 0.01, 0.13, 0.02], "float_kv_layers": [0, 2]}
    assert kv_layers_line(row) == ("KV cache int8: 2 of 4 layers keep K/V in float; int8 would move their attention "
                                   "output by layer 0 42.0%, layer 2 13.0% (the int8 layers: at most 2.0%).")
