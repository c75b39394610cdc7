"""The C++ DecodeStack (every decoder layer of a decode step in one call) against the same model run
layer by layer from Python, directly on random models of several shapes, linear methods, KV cache dtypes
and batch sizes.

The Python path calls the same kernels in the same order, so outputs and written caches must be equal
bit for bit; each kernel is tested against torch on its own (test_kernels.py, test_attention.py,
test_quantization.py, test_quant_methods.py, test_kv_cache_dtype.py), and the whole engine against its
torch reference path (test_kv_cache_dtype.py)."""

import functools

import pytest
import torch

from nimblelm.config import ModelConfig
from nimblelm.kernels import cpu_ops
from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.models import loader
from nimblelm.models.decoder import DecoderLM
from nimblelm.quantization import W8A8, Int4WeightOnly, Int8WeightOnly

# Outputs not multiples of the 16-column panels (qkv 56, gate_up 74), a depth of 37 (down_proj), q/k/v
# biases, a head size of 8 (none of the attention kernel's 64-wide value path).
ODD = ModelConfig(architecture="qwen2", vocab_size=50, hidden_size=40, intermediate_size=37, num_layers=2,
                  num_heads=5, num_kv_heads=1, head_dim=8, attention_bias=True)
# SmolLM2-135M's layer, two of them.
SMOLLM2 = ModelConfig(architecture="llama", vocab_size=50, hidden_size=576, intermediate_size=1536, num_layers=2,
                      num_heads=9, num_kv_heads=3, head_dim=64)
MODELS = {
    "odd-fp32": (ODD, None),
    "smollm2-fp32": (SMOLLM2, None),
    "smollm2-int8": (SMOLLM2, Int8WeightOnly(group_size=32)),
    "smollm2-int8-g16": (SMOLLM2, Int8WeightOnly(group_size=16)),
    "smollm2-int4": (SMOLLM2, Int4WeightOnly(group_size=32)),
    "smollm2-int4-mins": (SMOLLM2, Int4WeightOnly(group_size=64, symmetric=False)),
    "smollm2-w8a8": (SMOLLM2, W8A8()),
}
BLOCK_SIZE, NUM_BLOCKS = 4, 1280  # room for 33 sequences of 150 positions


@functools.cache
def model(name: str) -> DecoderLM:
    assert cpu_ops() is not None, "the C++ kernels did not build"
    cfg, method = MODELS[name]
    torch.manual_seed(0)
    weights = {}
    for key, shape in loader.expected_shapes(cfg).items():
        if key.endswith("norm.weight"):
            weights[key] = 1 + 0.1 * torch.randn(shape)
        else:  # matrices scaled to keep activations near 1; embeddings and biases N(0, 1)
            weights[key] = torch.randn(shape) * (shape[1] ** -0.5 if "layers" in key and len(shape) == 2 else 1)
    with torch.device("meta"):
        decoder = DecoderLM(cfg, max_positions=512)
    decoder = decoder.materialize(torch.device("cpu"), torch.float32, weights, method)
    assert decoder.decode_stack is not None  # every layer has a kernel spec
    return decoder


def decode_step(cfg: ModelConfig, batch: int, kv_dtype: torch.dtype, window: int | None, seed: int):
    """Token ids, positions, per-layer caches (random earlier K/V) and metadata of `batch` decodes whose
    contexts (the new token included) run from 1 to 150 positions, on scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 151, (batch,), generator=g)
    lens[0] = 1  # a sequence's first token: it attends only to itself
    max_blocks = -(-int(lens.max()) // BLOCK_SIZE)
    free = torch.randperm(NUM_BLOCKS, generator=g)
    tables = free[: batch * max_blocks].view(batch, max_blocks).clone()
    last = lens - 1
    slots = tables[torch.arange(batch), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    caches = []
    for _ in range(cfg.num_layers):
        if kv_dtype == torch.int8:
            caches.append(KVCache(torch.randint(-127, 128, shape, dtype=torch.int8, generator=g),
                                  torch.rand(shape[:-1], generator=g) * 0.02))
        else:
            caches.append(KVCache(torch.randn(shape, generator=g).to(kv_dtype)))
    meta = AttentionMetadata(
        slot_mapping=slots, num_decodes=batch, decode_block_tables=tables, decode_context_lens=lens,
        decode_mask=None, prefill_query_lens=[], prefill_context_lens=[], prefill_block_tables=[],
        prefill_masks=[], sliding_window=window,
    )
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    return ids, last, caches, [meta] * cfg.num_layers


def assert_stack_matches_the_layers(name, batch, kv_dtype=torch.float32, window=None):
    decoder = model(name)
    ids, positions, caches, metas = decode_step(decoder.config, batch, kv_dtype, window, seed=batch)
    fresh = [KVCache(c.values.clone(), None if c.scales is None else c.scales.clone()) for c in caches]
    stack = decoder.decode_stack
    with torch.inference_mode():
        fast = decoder(ids, positions, caches, metas)
        decoder.decode_stack = None
        try:
            reference = decoder(ids, positions, fresh, metas)
        finally:
            decoder.decode_stack = stack
    assert fast.shape == (batch, decoder.config.hidden_size) and fast.abs().max() > 0
    assert torch.equal(fast, reference)
    for written, expected in zip(caches, fresh):  # the new tokens' K/V, in the same slots
        assert torch.equal(written.values, expected.values)
        assert written.scales is None or torch.equal(written.scales, expected.scales)


# Batches around the fp32 linear's tiles (1-2 rows: the skinny path; 12 rows with AVX-512, 6 with AVX2),
# and over 32 rows.
@pytest.mark.parametrize("batch", [1, 3, 17, 33])
@pytest.mark.parametrize("name", list(MODELS))
def test_decode_stack_matches_the_python_layers(name, batch):
    assert_stack_matches_the_layers(name, batch)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize(("name", "batch"), [("odd-fp32", 3), ("smollm2-int8", 17)])
def test_decode_stack_matches_the_python_layers_with_each_cache_and_a_window(name, batch, kv_dtype, window):
    assert_stack_matches_the_layers(name, batch, kv_dtype, window)
