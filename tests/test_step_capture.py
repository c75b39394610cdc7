"""A decode step replayed from its trace (engine/step_capture.py) against the same model run layer by
layer from Python, on random models of several shapes (Llama, Qwen2, Gemma 3 with sliding and global
layers), linear methods (a toy one among them), KV cache dtypes, windows and batch sizes.

The replay calls the same kernels and torch ops in the same order, so outputs and written caches must be
equal bit for bit; each kernel is tested against torch on its own (test_kernels.py, test_attention.py,
test_quantization.py, test_quant_methods.py, test_kv_cache_dtype.py), and the whole engine against its
torch reference path (test_kv_cache_dtype.py)."""

import functools

import pytest
import torch
import torch.nn.functional as F

from nimblelm import LLM, SamplingParams
from nimblelm.config import ModelConfig
from nimblelm.engine.kv_cache.manager import kv_groups
from nimblelm.engine.step import NewRequest, RunningRequest, SchedulerOutput
from nimblelm.engine.step_capture import BUCKETS, StepCapture
from nimblelm.kernels import cpu_ops
from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.kivi import LowBitKV, LowBitPlan
from nimblelm.layers.linear import Linear, LinearMethod
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
# Gemma 3's layer options, sliding layers (window 5) around a global one: two KV groups.
GEMMA3 = ModelConfig(architecture="gemma3", vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=3,
                     num_heads=4, num_kv_heads=1, head_dim=16, sliding_window=5,
                     layer_types=("sliding_attention", "full_attention", "sliding_attention"),
                     hidden_act="gelu_pytorch_tanh", qk_norm=True, sandwich_norms=True, norm_weight_offset=1.0,
                     scale_embeddings=True, query_pre_attn_scalar=16, sliding_rope_theta=100.0)


class HalfWeights(LinearMethod):
    """A linear method the kernels know nothing about: weights kept in float16, widened at each multiply."""

    name = "toy-float16"

    def process(self, layer: Linear) -> None:
        layer.register_buffer("weight16", layer.weight.detach().half())
        layer.weight = None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight16.float(), layer.bias)


MODELS = {
    "odd-fp32": (ODD, None),
    "smollm2-fp32": (SMOLLM2, None),
    "smollm2-int8": (SMOLLM2, Int8WeightOnly(group_size=32)),
    "smollm2-int8-g16": (SMOLLM2, Int8WeightOnly(group_size=16)),
    "smollm2-int4": (SMOLLM2, Int4WeightOnly(group_size=32)),
    "smollm2-int4-mins": (SMOLLM2, Int4WeightOnly(group_size=64, symmetric=False)),
    "smollm2-w8a8": (SMOLLM2, W8A8()),
    "odd-toy": (ODD, HalfWeights()),
    "gemma3-fp32": (GEMMA3, None),
    "gemma3-int4": (GEMMA3, Int4WeightOnly(group_size=32)),
}
PROMPT = "A small language model reads a prompt, predicts the next token, and repeats until it is done."
BLOCK_SIZE, NUM_BLOCKS = 4, 1280  # room for 33 sequences of 150 positions
RESIDUAL = 3  # blocks of a low-bit cache's residual ring


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
    return decoder.materialize(torch.device("cpu"), torch.float32, weights, method)


def decode_step(cfg: ModelConfig, batch: int, kv_dtype: torch.dtype, window: int | None, seed: int):
    """Token ids, positions, per-layer caches (random earlier K/V) and per KV group the metadata of `batch`
    decode rows whose contexts (the row included) run from 1 to 150 positions, on scattered blocks; the
    last rows are three consecutive tokens of one sequence (a k-token query). `window` replaces the
    model's own."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 151, (batch,), generator=g)
    lens[0] = 1  # a sequence's first token: it attends only to itself
    max_blocks = -(-int(lens.max()) // BLOCK_SIZE)
    free = torch.randperm(NUM_BLOCKS, generator=g)
    tables = free[: batch * max_blocks].view(batch, max_blocks).clone()
    if batch >= 4:
        tables[-3:] = tables[-1]
        lens[-3:] = lens[-1] - torch.arange(2, -1, -1).clamp(max=int(lens[-1]) - 1)
    last = lens - 1
    slots = tables[torch.arange(batch), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    shape = (2, NUM_BLOCKS + 1, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)  # + the scratch block
    caches = []
    for _ in range(cfg.num_layers):
        if kv_dtype == torch.int8:
            caches.append(KVCache(torch.randint(-127, 128, shape, dtype=torch.int8, generator=g),
                                  torch.rand(shape[:-1], generator=g) * 0.02))
        else:
            caches.append(KVCache(torch.randn(shape, generator=g).to(kv_dtype)))
    groups = kv_groups(cfg.layer_windows if window is None else [window] * cfg.num_layers)
    group_metas = [AttentionMetadata.decodes(slots, tables, lens, group.window) for group in groups]
    group_of_layer = [next(i for i, group in enumerate(groups) if layer in group.layers) for layer in range(cfg.num_layers)]
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    return ids, last, caches, group_metas, group_of_layer


def assert_replay_matches_the_layers(name, batch, kv_dtype=torch.float32, window=None):
    """Bit for bit against the Python layers on the same rows, padding included; within float rounding of
    them on the step's own rows (a kernel may sum in another order for another row count)."""
    decoder = model(name)
    ids, positions, caches, group_metas, group_of_layer = decode_step(decoder.config, batch, kv_dtype, window, seed=batch)
    fresh = [KVCache(c.values.clone(), None if c.scales is None else c.scales.clone()) for c in caches]
    unpadded = [KVCache(c.values.clone(), None if c.scales is None else c.scales.clone()) for c in caches]
    capture = StepCapture(decoder, caches, [m.sliding_window for m in group_metas], group_of_layer, NUM_BLOCKS,
                          BLOCK_SIZE)
    assert capture.applies(batch, group_metas)
    bucket = next(b for b in BUCKETS if b >= batch)
    padded_ids, padded_positions, *padded = capture._padded(ids, positions, group_metas, bucket)
    padded_metas = [AttentionMetadata.decodes(*tensors, m.sliding_window) for *tensors, m in zip(*padded, group_metas)]
    with torch.inference_mode():
        replayed = capture(ids, positions, group_metas)
        again = capture(ids, positions, group_metas)  # from the trace made by the first call
        reference = decoder(padded_ids, padded_positions, fresh, [padded_metas[g] for g in group_of_layer])
        own_rows = decoder(ids, positions, unpadded, [group_metas[g] for g in group_of_layer])
    assert list(capture.traces) == [bucket]
    assert replayed.shape == (batch, decoder.config.hidden_size) and replayed.abs().max() > 0
    assert torch.equal(replayed, reference[:batch]) and torch.equal(again, reference[:batch])
    torch.testing.assert_close(replayed, own_rows, rtol=1e-4, atol=1e-4)
    for written, expected in zip(caches, fresh):  # the new tokens' K/V, in the same slots
        assert torch.equal(written.values, expected.values)
        assert written.scales is None or torch.equal(written.scales, expected.scales)


# Batches around the fp32 linear's tiles (1-2 rows: the skinny path; 12 rows with AVX-512, 6 with AVX2),
# and over 32 rows.
@pytest.mark.parametrize("batch", [1, 3, 17, 33])
@pytest.mark.parametrize("name", list(MODELS))
def test_replay_matches_the_python_layers(name, batch):
    assert_replay_matches_the_layers(name, batch)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize(("name", "batch"), [("odd-fp32", 3), ("smollm2-int8", 17)])
def test_replay_matches_the_python_layers_with_each_cache_and_a_window(name, batch, kv_dtype, window):
    assert_replay_matches_the_layers(name, batch, kv_dtype, window)


def lowbit_decode_step(cfg: ModelConfig, batch: int, bits: int, seed: int):
    """As decode_step, over an int4 or int2 cache (random levels, scales and residuals) with one row per sequence,
    as a low-bit cache steps; sequence r's residual rings are row r + 1's (row 0 is the padding rows'), of
    RESIDUAL blocks, each at a phase of its own (a table that dropped blocks from its front)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 151, (batch,), generator=g)
    lens[0] = BLOCK_SIZE  # a row that completes its block: the step seals it
    max_blocks = -(-int(lens.max()) // BLOCK_SIZE)
    tables = torch.randperm(NUM_BLOCKS, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    last = lens - 1
    slots = tables[torch.arange(batch), last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE
    groups = kv_groups(cfg.layer_windows)
    shape = (2, NUM_BLOCKS + 1, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim * bits // 8)
    phases = torch.randint(0, RESIDUAL, (batch,), generator=g)
    caches = []
    for _ in range(cfg.num_layers):
        lowbit = LowBitKV.empty(bits, NUM_BLOCKS + 1, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim,
                                (batch + 1) * len(groups), RESIDUAL * BLOCK_SIZE, torch.float32, "cpu")
        for t in (lowbit.k_scale, lowbit.v_scale):
            t.copy_(torch.rand(t.shape, generator=g) * 0.1)
        for t in (lowbit.k_min, lowbit.v_min, lowbit.residual):
            t.copy_(torch.randn(t.shape, generator=g))
        caches.append(KVCache(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), lowbit=lowbit))
    group_metas = [
        AttentionMetadata.decodes(slots, tables, lens, group.window, lowbit=LowBitPlan.decodes(
            ((torch.arange(batch) + 1) * len(groups) + i) * RESIDUAL * BLOCK_SIZE + phases * BLOCK_SIZE))
        for i, group in enumerate(groups)
    ]
    group_of_layer = [next(i for i, group in enumerate(groups) if layer in group.layers) for layer in range(cfg.num_layers)]
    return torch.randint(0, cfg.vocab_size, (batch,), generator=g), last, caches, group_metas, group_of_layer


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize(("name", "batch"), [("smollm2-fp32", 1), ("smollm2-int8", 17), ("gemma3-fp32", 5)])
def test_replay_over_a_low_bit_cache_matches_the_python_layers(name, batch, bits):
    """Bit for bit, padding rows included, and every tensor of the cache written alike: the residuals, and the
    levels, scales and minimums of the block the first row seals."""
    decoder = model(name)
    ids, positions, caches, group_metas, group_of_layer = lowbit_decode_step(decoder.config, batch, bits, seed=batch)

    def copy(cache):
        lowbit = cache.lowbit
        return KVCache(cache.values.clone(), lowbit=LowBitKV(bits, *(t.clone() for t in (
            lowbit.k_scale, lowbit.k_min, lowbit.v_scale, lowbit.v_min, lowbit.residual)), lowbit.residual_length, lowbit.ring_length))

    before, fresh = [copy(c) for c in caches], [copy(c) for c in caches]
    capture = StepCapture(decoder, caches, [m.sliding_window for m in group_metas], group_of_layer, NUM_BLOCKS,
                          BLOCK_SIZE)
    bucket = next(b for b in BUCKETS if b >= batch)
    padded_ids, padded_positions, *padded = capture._padded(ids, positions, group_metas, bucket)
    padded_metas = [AttentionMetadata.decodes(slots, tables, lens, m.sliding_window, lowbit=LowBitPlan.decodes(res))
                    for slots, tables, lens, res, m in zip(*padded, group_metas)]
    with torch.inference_mode():
        replayed = capture(ids, positions, group_metas)
        reference = decoder(padded_ids, padded_positions, fresh, [padded_metas[g] for g in group_of_layer])
    assert list(capture.traces) == [bucket]
    assert replayed.abs().max() > 0 and torch.equal(replayed, reference[:batch])
    for written, expected, old in zip(caches, fresh, before):
        assert torch.equal(written.values, expected.values) and not torch.equal(written.values, old.values)
        for tensor in ("k_scale", "k_min", "v_scale", "v_min", "residual"):
            assert torch.equal(getattr(written.lowbit, tensor), getattr(expected.lowbit, tensor)), tensor


def test_a_trace_serves_other_block_tables_and_context_lengths():
    """Same row count, new step: a longer context (wider block tables), other slots."""
    decoder = model("smollm2-int4")
    ids, positions, caches, metas, group_of_layer = decode_step(decoder.config, 8, torch.float32, None, seed=1)
    capture = StepCapture(decoder, caches, [None], group_of_layer, NUM_BLOCKS, BLOCK_SIZE)
    with torch.inference_mode():
        capture(ids, positions, metas)
        wider = torch.cat([metas[0].decode_block_tables, metas[0].decode_block_tables[:, :3] + 1], dim=1)
        lens = metas[0].decode_context_lens + 2 * BLOCK_SIZE
        slots = wider[torch.arange(8), (lens - 1) // BLOCK_SIZE] * BLOCK_SIZE + (lens - 1) % BLOCK_SIZE
        step = [AttentionMetadata.decodes(slots, wider, lens, None)]
        fresh = [KVCache(c.values.clone()) for c in caches]
        replayed = capture(ids + 1, positions + 2 * BLOCK_SIZE, step)
        reference = decoder(ids + 1, positions + 2 * BLOCK_SIZE, fresh, step * decoder.config.num_layers)
    assert list(capture.traces) == [8]
    assert torch.equal(replayed, reference)


def test_a_linear_method_the_kernels_do_not_know_is_in_the_trace():
    decoder = model("odd-toy")
    ids, positions, caches, metas, group_of_layer = decode_step(decoder.config, 2, torch.float32, None, seed=2)
    capture = StepCapture(decoder, caches, [None], group_of_layer, NUM_BLOCKS, BLOCK_SIZE)
    with torch.inference_mode():
        capture(ids, positions, metas)
    graph = str(capture.traces[2].graph)
    assert "aten::linear" in graph and "nimblelm::packed_linear" not in graph


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_tokens_after_the_prompt_computed_at_once_equal_their_prefill(tiny_qwen, enforce_eager):
    """A step of k tokens after a prompt (as speculative verification sends: the sampled token and drafts)
    runs as k decode rows, replayed from a trace; its last token's log-probabilities equal those of the
    same tokens computed as one prompt."""
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=128, max_num_seqs=1, enforce_eager=enforce_eager)
    runner = llm.llm_engine.runner
    prompt = llm.get_tokenizer().encode(PROMPT)
    params = SamplingParams(temperature=0, logprobs=5)
    blocks = -(-(len(prompt) + 4) // runner.block_size)
    first = runner.execute(SchedulerOutput(
        new_requests=[NewRequest(0, prompt, [], params, None, [list(range(1, blocks + 1))], [0], 0)],
        num_scheduled_tokens={0: len(prompt)},
    ))
    k_tokens = [first.sampled_token_ids[0][0], 5, 9, 13]  # the sampled token, then three drafts
    verified = runner.execute(SchedulerOutput(
        running_requests=[RunningRequest(0, k_tokens, [[]], [0], len(prompt))], num_scheduled_tokens={0: len(k_tokens)},
    ))
    whole = prompt + k_tokens
    reference = runner.execute(SchedulerOutput(
        new_requests=[NewRequest(1, whole, [], params, None, [list(range(blocks + 1, 2 * blocks + 1))], [0], 0)],
        num_scheduled_tokens={1: len(whole)},
        finished_req_ids=[0],
    ))
    # One sequence at most: the engine traced steps of 1 row when it started, the k-token step traced 4.
    assert (runner.capture is None) if enforce_eager else (sorted(runner.capture.traces) == [1, 4])
    assert verified.sampled_token_ids == reference.sampled_token_ids
    (lp, rank, ids, lps), (ref_lp, ref_rank, ref_ids, ref_lps) = verified.logprobs[0][0], reference.logprobs[0][0]
    assert ids == ref_ids and rank == ref_rank
    assert abs(lp - ref_lp) < 1e-5 and max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-5
