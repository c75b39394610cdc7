"""16-bit weights with float32 activations (quantization/half.py) and what `dtype="bfloat16"` and
`dtype="float16"` mean on the CPU kernels. Oracle: the float32 engine on the same weights rounded to the
16-bit type, which multiplies by the very same float32 values, so tokens and log-probabilities agree to
float rounding (1e-5)."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_gguf

from nimblelm import LLM, SamplingParams
from nimblelm.kernels import cpu_ops, widens_in_registers
from nimblelm.layers.linear import Linear
from nimblelm.quantization import half
from nimblelm.quantization.half import HalfWeights

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog", "1 2 3 4"]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def linear_of(w, fmt, bias=None):
    layer = Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.prepare(HalfWeights(fmt))
    return layer


@pytest.fixture(params=["kernels", "torch"])
def kernels(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(half, "cpu_ops", lambda: None)
    return request.param


@pytest.mark.parametrize("fmt", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 33])
def test_the_linear_multiplies_by_the_rounded_weights(kernels, fmt, rows):
    torch.manual_seed(rows)
    w, b, x = torch.randn(40, 24), torch.randn(40), torch.randn(rows, 24)
    layer = linear_of(w, fmt, b)
    assert hasattr(layer, "panels") == (kernels == "kernels")
    rounded = w.to(DTYPES[fmt]).float()
    if kernels == "kernels" and fmt == "bf16" and 0 < cpu_ops().bf16_product_rows() <= rows:
        x = x.bfloat16().float()  # bfloat16 products round the activations (test_kernels tests every path)
    torch.testing.assert_close(layer(x), F.linear(x, rounded, b), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([[0, 15, 16], [39, 7, 32]])
    assert torch.equal(layer.method.rows(layer, ids), rounded[ids])


@pytest.mark.parametrize("fmt", DTYPES)
def test_stored_weights_adopt_back_unchanged(fmt):
    torch.manual_seed(0)
    layer = linear_of(torch.randn(37, 24), fmt)
    stored = layer.method.stored(layer)["weight"]
    assert stored.dtype == DTYPES[fmt] and stored.shape == (37, 24)
    again = Linear(24, 37)
    again.adopt(HalfWeights(fmt), {"weight": stored}, torch.float32)
    x = torch.randn(5, 24)
    assert torch.equal(again(x), layer(x))
    with pytest.raises(ValueError, match="shape"):
        Linear(24, 36).adopt(HalfWeights(fmt), {"weight": stored}, torch.float32)


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def rounded_qwen(request, tiny_qwen, tmp_path_factory):
    """(dtype, the tiny model with every weight rounded to that dtype and stored as float32)."""
    folder = tmp_path_factory.mktemp(request.param) / "qwen2"
    shutil.copytree(tiny_qwen, folder)
    path = folder / "model.safetensors"
    dtype = getattr(torch, request.param)
    save_file({name: t.to(dtype).float() for name, t in load_file(path).items()}, path)
    return request.param, folder


def test_16_bit_dtypes_on_the_cpu_kernels_store_weights_in_16_bits_and_compute_in_float32(rounded_qwen,
                                                                                          bf16_products):
    """With bfloat16 products off: float32 arithmetic throughout, the KV cache in the 16-bit type (auto, as vLLM's)
    (test_bf16_product_steps_... for the products). The oracle: float32 weights over the same cache."""
    dtype, folder = rounded_qwen
    if bf16_products:
        pytest.skip("bfloat16 products round activations: test_bf16_product_steps_multiply_bfloat16_activations")
    llm = LLM(str(folder), dtype=dtype, max_model_len=128)
    engine = llm.llm_engine
    assert engine.dtype == torch.float32 and engine.kv_dtype == getattr(torch, dtype)
    layers = [m for m in engine.runner.model.modules() if isinstance(m, Linear)]
    assert layers and all(isinstance(m.method, HalfWeights) for m in layers)
    assert {m.panels.dtype for m in layers} == {getattr(torch, dtype)}
    reference = LLM(str(folder), dtype="float32", max_model_len=128, kv_cache_dtype=dtype)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    for out, ref in zip(outs, reference.generate(PROMPTS, PARAMS, use_tqdm=False)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for top, ref_top in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert top.keys() == ref_top.keys()
            for token, lp in top.items():
                assert lp.logprob == pytest.approx(ref_top[token].logprob, abs=1e-5)


def test_bf16_product_steps_multiply_bfloat16_activations(rounded_qwen, bf16_products, monkeypatch):
    """Where the CPU has AMX or AVX-512 BF16, steps of several rows (here the batched prefill of the
    prompts) multiply bfloat16 weights by activations rounded to bfloat16, and nothing else changes.
    Oracle: the same engine with the products off, rounding the activations of those steps before its
    float32 panel kernel (the products of two bfloat16 values are exact in float32; the sums differ in
    order alone). Both keep a float32 cache: a bfloat16 one would turn those last-bit differences into whole
    bfloat16 steps where a value lies near a rounding boundary."""
    dtype, folder = rounded_qwen
    if dtype != "bfloat16" or not bf16_products:
        pytest.skip("bfloat16 products serve bfloat16 weights, where the machine has them")
    options = {"dtype": dtype, "max_model_len": 128, "kv_cache_dtype": "float32"}
    outs = LLM(str(folder), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    cpu_ops().set_bf16_products("off")
    apply = HalfWeights.apply
    monkeypatch.setattr(HalfWeights, "apply", lambda self, layer, x: apply(
        self, layer, x.bfloat16().float() if len(x) >= bf16_products else x))
    reference = LLM(str(folder), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    for out, ref in zip(outs, reference):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for top, ref_top in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert top.keys() == ref_top.keys()
            for token, lp in top.items():
                assert lp.logprob == pytest.approx(ref_top[token].logprob, abs=1e-4)


def test_a_16_bit_dtype_with_quantized_weights_runs_the_float32_kernels(tiny_qwen):
    """Quantized layers keep their format: the 16-bit dtype only sets the compute to float32 (and the cache
    to bfloat16), so the run is the float32 one's over that cache, kernels and all, rather than torch's slow
    16-bit path."""
    if cpu_ops() is None:
        pytest.skip("the C++ kernels did not build here")
    llm = LLM(str(tiny_qwen), dtype="bfloat16", quantization="int8", max_model_len=128)
    assert llm.llm_engine.dtype == torch.float32 and llm.llm_engine.runner.capture is not None
    assert llm.llm_engine.kv_dtype == torch.bfloat16
    reference = LLM(str(tiny_qwen), dtype="float32", quantization="int8", max_model_len=128, kv_cache_dtype="bfloat16")
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    for out, ref in zip(outs, reference.generate(PROMPTS, PARAMS, use_tqdm=False)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].logprobs == ref.outputs[0].logprobs


def test_without_the_kernels_a_16_bit_dtype_computes_in_it(rounded_qwen, monkeypatch):
    dtype, folder = rounded_qwen
    monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
    cpu_ops.cache_clear()
    try:
        llm = LLM(str(folder), dtype=dtype, max_model_len=128)
        assert llm.llm_engine.dtype == getattr(torch, dtype)
        assert len(llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)[0].outputs[0].token_ids) == 12
    finally:
        monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS")
        cpu_ops.cache_clear()


@pytest.mark.parametrize("stored", ["bfloat16", "float16", "float32", "mixed"])
def test_auto_serves_a_16_bit_checkpoint_as_stored_and_rounds_anything_else_to_bfloat16(tiny_qwen, tmp_path, stored):
    """dtype="auto" on the CPU kernels: a checkpoint whose matrices are all bfloat16 (or all float16) runs as
    dtype=that type does, rounding nothing; float32 or mixed storage runs as dtype="bfloat16" where the
    kernels widen 16-bit weights in vector registers, and in float32 on the scalar build, and says so."""
    if cpu_ops() is None:
        pytest.skip("the C++ kernels did not build here")
    folder = tmp_path / "qwen2"
    shutil.copytree(tiny_qwen, folder)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    if stored == "mixed":
        save_file({name: t.bfloat16() if "mlp" in name else t for name, t in tensors.items()}, path)
    else:
        save_file({name: t.to(getattr(torch, stored)) for name, t in tensors.items()}, path)
    auto = LLM(str(folder), max_model_len=128)
    as_stored = stored in ("bfloat16", "float16")
    expected = stored if as_stored else "bfloat16" if widens_in_registers() else "float32"
    rounded = "" if as_stored or expected == "float32" else " (auto: the checkpoint's float32 rounded)"
    assert auto.llm_engine.precision.startswith(f"{expected} weights{rounded}, float32 compute")
    layers = [m for m in auto.llm_engine.runner.model.modules() if isinstance(m, Linear)]
    assert {m.panels.dtype for m in layers} == {getattr(torch, expected)}
    explicit = LLM(str(folder), dtype=expected, max_model_len=128)
    outs = auto.generate(PROMPTS, PARAMS, use_tqdm=False)
    for out, ref in zip(outs, explicit.generate(PROMPTS, PARAMS, use_tqdm=False)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert out.outputs[0].logprobs == ref.outputs[0].logprobs


@pytest.mark.parametrize("quant, expected", [("F16", "float16"), ("BF16", "bfloat16")])
def test_auto_serves_a_16_bit_gguf_as_stored(tiny_qwen, tmp_path, quant, expected):
    """An F16 (or BF16) GGUF dequantizes to float32 values its type holds exactly: auto keeps that type
    rather than rounding float16's values to bfloat16."""
    if cpu_ops() is None:
        pytest.skip("the C++ kernels did not build here")
    path = make_tiny_gguf(tmp_path / f"tiny-{quant}.gguf", tiny_qwen, quant=quant)
    auto = LLM(str(path), max_model_len=64)
    assert auto.llm_engine.precision.startswith(f"{expected} weights, float32 compute")
    explicit = LLM(str(path), dtype=expected, max_model_len=64)
    for out, ref in zip(auto.generate(PROMPTS, PARAMS, use_tqdm=False),
                        explicit.generate(PROMPTS, PARAMS, use_tqdm=False)):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
