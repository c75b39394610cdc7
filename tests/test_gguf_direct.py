"""quantization="gguf": a GGUF's quantized linear layers served as stored, in nimblelm's int8/int4 formats.

Exactness: what nimblelm stores dequantizes (int8.dequantize_int8 / int4.dequantize_int4) to exactly
what gguf.quants.dequantize gives (torch.equal), per GGUF type, on real tensors of the packaged models
and on tensors gguf.quants.quantize writes. Generation is compared with the same model in fp32 (its
weights are those same dequantized values).
"""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import assert_first_tokens_close, make_tiny_gguf, make_tiny_hf_model

from nimblelm import LLM, SamplingParams
from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import cpu_ops
from nimblelm.layers.linear import Linear, RowsEmbedding
from nimblelm.models import gguf_file
from nimblelm.models.loader import load_model
from nimblelm.quantization import formats, stacked, tiles
from nimblelm.quantization.gguf_direct import blocks_to_q4_k, convert, fuse, q4_k_to_blocks
from nimblelm.quantization.int4 import dequantize_int4, unpack_int4
from nimblelm.quantization.int8 import dequantize_int8, plain_scales, quantize_int8

Q = gguf.GGMLQuantizationType
ROWS = 48  # rows of each real tensor checked: enough blocks, a fraction of a second


def dequantized(c) -> torch.Tensor:
    t = plain_scales(c.tensors)
    return dequantize_int8(t["qweight"], t["scales"]) if c.kind == "int8" else dequantize_int4(
        t["qweight"], t["scales"], t["mins"])


def check_exact(data: np.ndarray, qtype, shape, kind: str, group: int) -> None:
    c = convert(data, qtype, shape)
    assert (c.kind, c.group) == (kind, group)
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(shape).copy())
    assert torch.equal(dequantized(c), expected)


@pytest.mark.parametrize(("qtype", "kind", "group"), [(Q.Q8_0, "int8", 32), (Q.Q4_0, "int4", 32),
                                                      (Q.Q4_1, "int4", 32), (Q.Q5_0, "int8", 32)])
def test_quantize_made_tensors_dequantize_exactly(qtype, kind, group):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 256)) * rng.uniform(0.01, 2, (40, 1))).astype(np.float32)
    w[3] = 0  # an all-zero row: scale 0
    data = gguf.quants.quantize(w, qtype)
    check_exact(data, qtype, w.shape, kind, group)


def real_tensor(alias: str, qtype) -> gguf_file.GGUFTensor:
    from nimblelm.models.registry import resolve

    model_file = gguf_file.open_gguf(resolve(alias, progress=False))
    return next(t for t in model_file.tensors if t.qtype == qtype and len(t.shape) == 2)


@pytest.mark.integration
@pytest.mark.parametrize(("alias", "qtype", "kind", "group"), [
    ("smollm2-135m", Q.Q4_1, "int4", 32),
    ("smollm2-135m", Q.Q8_0, "int8", 32),
    ("qwen2.5-coder-0.5b", Q.Q5_0, "int8", 32),
    ("qwen2.5-coder-0.5b", Q.Q8_0, "int8", 32),
    ("qwen2.5-coder-0.5b", Q.Q4_K, "int4", 32),
    ("qwen2.5-coder-0.5b", Q.Q6_K, "int8", 16),
])
def test_packaged_model_tensors_dequantize_exactly(alias, qtype, kind, group):
    tensor = real_tensor(alias, qtype)
    check_exact(tensor.data[:ROWS], qtype, (ROWS, tensor.shape[1]), kind, group)


def test_q4_k_nibble_reorder_round_trips_and_puts_weights_in_order():
    rng = np.random.default_rng(1)
    qs = rng.integers(0, 256, (6, 128), dtype=np.uint8)
    packed = q4_k_to_blocks(qs)
    assert np.array_equal(blocks_to_q4_k(packed), qs)
    # Q4_K order: chunk j of 32 bytes, low nibbles are weights 64j..64j+31, high nibbles 64j+32..64j+63.
    chunks = qs.reshape(6, 4, 32)
    in_order = np.concatenate([np.concatenate([c & 0x0F, c >> 4], axis=-1) for c in chunks.transpose(1, 0, 2)], -1)
    assert torch.equal(unpack_int4(torch.from_numpy(packed)), torch.from_numpy(in_order))


def test_fused_int8_parts_take_the_finest_group_exactly():
    torch.manual_seed(0)
    from nimblelm.quantization.gguf_direct import Converted

    def part(n, group):
        q, s = quantize_int8(torch.randn(n, 64), group)
        return Converted("int8", group, {"qweight": q, "scales": s})

    parts = [part(8, 32), part(4, 16), part(4, 32)]
    fused = fuse(parts)
    assert (fused.kind, fused.group, fused.tensors["scales"].shape) == ("int8", 16, (16, 4))
    assert torch.equal(dequantized(fused), torch.cat([dequantized(p) for p in parts]))
    int4 = Converted("int4", 32, {"qweight": torch.zeros(4, 32, dtype=torch.uint8),
                                  "scales": torch.ones(4, 2), "mins": torch.zeros(4, 2)})
    assert fuse([parts[0], int4]) is None  # mixed families: the layer falls back to fp32


@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize(("n", "k"), [(8, 64), (37, 128), (70, 256)])
def test_int8_kernel_with_group_16_matches_its_emulation(rows, n, k):
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    torch.manual_seed(rows * n + k)
    x, bias = torch.randn(rows, k), torch.randn(n)
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8)  # Q6_K's range
    s = torch.rand(n, k // 16) * 0.01
    y = ops.int8_linear(x, q, s, bias, 16)
    # The kernel's arithmetic: activations rounded to int8 per block of 32, exact integer dots per 16.
    blocks = x.reshape(rows, -1, 32)
    dx = blocks.abs().amax(-1) / 127
    xq = torch.round(blocks / dx[..., None]).reshape(rows, -1, 16)
    dots = torch.einsum("mgk,ngk->mng", xq.double(), q.double().reshape(n, -1, 16))
    want = (dots * dx.repeat_interleave(2, dim=1)[:, None].double() * s[None].double()).sum(-1).float() + bias
    # Tolerance: float32 accumulation order only (relative 1e-5 of the outputs' scale).
    assert torch.allclose(y, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    exact = F.linear(x, dequantize_int8(q, s), bias)
    assert (y - exact).norm() / exact.norm() < 0.02  # what int8 activations cost


# ---------------------------------------------------------------- whole models


def mixed_types(name: str) -> str:
    """Per-tensor GGUF types for a tiny model: int8 and int4 families, fused and falling back."""
    if name.startswith("blk.0."):
        return {"attn_q": "Q8_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "ffn_gate": "Q4_0", "ffn_up": "Q4_1"}.get(
            name.split(".")[2], "Q4_0")
    if name.startswith("blk.1."):  # q/k int8, v int4: qkv is stacked; gate F16: gate_up falls back
        return {"attn_v": "Q4_0", "ffn_gate": "F16", "attn_output": "F32"}.get(name.split(".")[2], "Q8_0")
    return "Q8_0" if name.startswith("token_embd") else "Q4_1"


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def mixed_gguf(request, tmp_path_factory):
    folder = make_tiny_hf_model(tmp_path_factory.mktemp("hf") / request.param, arch=request.param,
                                initializer_range=0.3)
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", folder, quant=mixed_types)


def test_direct_layers_hold_exactly_the_dequantized_weights(mixed_gguf):
    direct = load_model(str(mixed_gguf), progress=False, gguf_direct=True)
    assert set(direct.fallbacks) == {"layers.1.mlp.gate_up_proj", "layers.1.self_attn.o_proj"}
    fp32 = LLM(str(mixed_gguf), dtype="float32", max_model_len=64).llm_engine.runner.model
    said = r"2 linear layers dequantized to float, their fused GGUF parts \(F16 \+ Q8_0, F32\)"
    with pytest.warns(UserWarning, match=said):
        engine = LLM(str(mixed_gguf), dtype="float32", max_model_len=64, quantization="gguf").llm_engine
    assert "2 linear layers dequantized" in engine.precision  # and the server's ready line says it
    model = engine.runner.model

    def dequantized_layer(module):
        if module.method.name == "stacked":
            return torch.cat([dequantized_layer(part) for part in module.parts])
        # Q8_0, Q5_0, Q4_0 and Q4_1 scale blocks by float16 values: the layer keeps them so (2 bytes a group)
        assert module.scales.dtype == torch.float16
        t = module.method.stored(module)
        return dequantize_int8(t["qweight"], t["scales"]) if module.method.name == "int8" else dequantize_int4(**t)

    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and ".parts." not in name:
            kinds[name] = module.method.name
            if module.method.name == "none":
                continue
            w = dequantized_layer(module)
            reference = fp32.get_submodule(name) if name != "embed_tokens" else None
            if reference is None:
                assert torch.equal(w, fp32.embed_tokens.weight)
            else:  # the fp32 model's layer, read back exactly from its packed panels
                ids = torch.arange(reference.out_features)
                assert torch.equal(w, reference.method.rows(reference, ids)), name
    assert kinds["layers.0.self_attn.qkv_proj"] == "int8" and kinds["layers.0.mlp.gate_up_proj"] == "int4"
    assert kinds["layers.1.self_attn.qkv_proj"] == "stacked" and kinds["layers.1.mlp.down_proj"] == "int8"
    assert [part.method.name for part in model.get_submodule("layers.1.self_attn.qkv_proj").parts] == ["int8", "int4"]
    # No fp32 weight anywhere for the direct layers, and the embedding is read back from int8 storage.
    assert all(m.weight is None for m in model.modules() if isinstance(m, Linear) and m.method.name != "none")
    ids = torch.tensor([3, 7, 100])
    assert torch.equal(model.embed_tokens(ids), fp32.embed_tokens(ids))
    if model.config.tie_word_embeddings:
        assert type(model.embed_tokens).__name__ == "TiedEmbedding"
    else:
        assert isinstance(model.embed_tokens, RowsEmbedding)


def test_direct_model_generates_close_to_the_fp32_model(mixed_gguf):
    """Same weights; only the decode kernels' int8 activations differ. As in test_quantization: the first
    token agrees and its log-probabilities within 0.3 (a wrong scale or layout moves them by whole nats);
    exact greedy agreement over 32 tokens is checked on the real SmolLM2 below."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
    prompts = ["Hello world", "The quick brown fox", "1 2 3 4"]
    fp32 = LLM(str(mixed_gguf), dtype="float32", max_model_len=128).generate(prompts, params, use_tqdm=False)
    with pytest.warns(UserWarning, match="2 linear layers dequantized to float"):
        direct = LLM(str(mixed_gguf), dtype="float32", max_model_len=128, quantization="gguf")
    assert_first_tokens_close(fp32, direct.generate(prompts, params, use_tqdm=False))


def test_gguf_quantization_needs_a_gguf_file(tiny_qwen, tmp_path):
    with pytest.raises(InvalidRequestError, match=r"\.gguf file"):
        LLM(str(tiny_qwen), dtype="float32", quantization="gguf")
    from nimblelm.quantization.quantize import quantize_model

    quantize_model(str(tiny_qwen), "rtn", 8, tmp_path / "rtn8", group_size=32, progress=False)
    with pytest.raises(InvalidRequestError, match=r"\.gguf file"):
        LLM(str(tmp_path / "rtn8"), dtype="float32", quantization="gguf")


SMOLLM2_SCRIPT = """
import json, sys
from nimblelm import LLM, SamplingParams
prompts = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain in two sentences why the sky is blue.", "List five tips for writing clear documentation."]
out = {}
for quantization in [None if q == "none" else q for q in sys.argv[1:]]:
    llm = LLM("smollm2-135m", max_model_len=256, quantization=quantization)
    chats = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    results = llm.generate(chats, SamplingParams(temperature=0, max_tokens=32, logprobs=2), use_tqdm=False)
    out[str(quantization)] = [o.outputs[0].token_ids for o in results]
    # per token: how far the chosen token's log-probability is above the runner-up's
    out[f"{quantization}-margins"] = [[max(lp.values(), key=lambda v: v.logprob).logprob
                                       - min(lp.values(), key=lambda v: v.logprob).logprob for lp in o.outputs[0].logprobs]
                                      for o in results]
print(json.dumps(out))
"""


def smollm2_tokens(disable_kernels: bool, quantizations: tuple[str, ...]) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = os.environ | {"NIMBLELM_DISABLE_KERNELS": "1" if disable_kernels else "0",
                        "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", SMOLLM2_SCRIPT, *quantizations], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_smollm2_direct_greedy_tokens_match_the_dequantized_reference():
    """SmolLM2's Q4_1 layers and tied Q8_0 embedding served as stored, against the same weights in fp32.

    On the reference path (NIMBLELM_DISABLE_KERNELS=1: dequantize + F.linear) the two are the same
    weights, so all 32 greedy tokens of 3 open questions must match. With the C++ kernels the direct model
    rounds activations to int8 (llama.cpp's Q8 x Q4 product), which moves logits by up to about half a nat
    (and a float-rounding change anywhere flips some of those roundings, so which near-tie moves is not
    stable): its answers must follow fp32's until a token where fp32's own choice was a near-tie, its
    runner-up within 1 nat (token 23 of the first answer: 0.63 nats; token 11 of the second: 0.39).
    """
    reference = smollm2_tokens(disable_kernels=True, quantizations=("none", "gguf"))
    assert all(len(tokens) == 32 for tokens in reference["None"])  # open questions: no early end of turn
    assert reference["gguf"] == reference["None"]
    kernels = smollm2_tokens(disable_kernels=False, quantizations=("gguf",))
    for want, got, margins in zip(reference["None"], kernels["gguf"], reference["None-margins"]):
        first_difference = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if first_difference is not None:
            assert margins[first_difference] < 1.0, (first_difference, margins[first_difference])


@pytest.mark.integration
@pytest.mark.slow
def test_qwen_15b_serves_every_linear_layer_as_stored():
    """Qwen2.5-Coder-1.5B's Q4_K_M file: no layer falls back to float. The 14 q/k/v whose v is Q6_K beside Q4_K q and
    k are stacked, the K-quants keep their two-level scales (int8 values, a float16 factor per 256 weights) and Q6_K
    layers their 6 bits a value."""
    loaded = load_model("qwen2.5-coder-1.5b", progress=False, gguf_direct=True)
    assert not loaded.fallbacks
    stacks = {name: fmt for name, (fmt, _) in loaded.quantized.items() if stacked.is_stacked(fmt)}
    assert len(stacks) == 14 and all(name.endswith("qkv_proj") for name in stacks)
    assert set(stacks.values()) == {"stack:int4-g32x1792+int8-g16x256"}
    fmt, head = loaded.quantized["lm_head"]  # Q6_K
    assert fmt == "int8-g16" and head["scales"].dtype == torch.int8 and head["scale_factors"].shape == (151936, 6)
    with torch.device("meta"):
        layer = Linear(1536, 151936)
    layer.adopt(formats.linear_method(fmt), head, torch.float32)
    assert tiles.is_six_bit(layer) and layer.qweight.numel() == 151936 * 1536 * 3 // 4  # held in Q6_K's 6 bits
