"""A model split over ranks (distributed/): tensor parallelism and pipeline stages, against one process on the
same weights.

The oracle is the engine's own single-process path: a model split over ranks computes the same sums in another
order, so in float32 greedy tokens are identical and log-probabilities agree to float rounding (TOLERANCE, relative
past 1 nat); a
wrong cut of heads, MLP features or vocabulary, a missing or doubled all-reduce moves them by tenths of a nat or
more. Ranks run as local processes (mp) and as Ray actors on a local cluster of 2 CPUs.
"""

import gc
import multiprocessing
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_gguf_direct import mixed_types
from tiny_models import make_tiny_gguf, make_tiny_hf_model

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.config import ModelConfig
from nimblelm.distributed.tensor_parallel import TensorParallel
from nimblelm.models.loader import load_model
from nimblelm.quantization import stacked
from nimblelm.quantization.int4 import dequantize_int4
from nimblelm.quantization.int8 import dequantize_int8
from nimblelm.quantization.kv_int8 import float_kv_layers
from nimblelm.quantization.quantize import quantize_model

TOLERANCE = 1e-4
PROMPTS = [
    "A small language model reads a prompt",
    "Hello world! How are",
    "Rivers flow to the sea, mountains rise toward the sky, and forests cover the rolling hills. " * 3,
]
PARAMS = SamplingParams(max_tokens=20, temperature=0, logprobs=2, prompt_logprobs=1)
OPTIONS = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": 8}  # 8: fewer decode traces to make


def _config(heads: int, kv_heads: int, head_dim: int = 8, intermediate: int = 96, vocab: int = 80) -> ModelConfig:
    return ModelConfig("llama", vocab, 48, intermediate, 1, heads, kv_heads, head_dim)


def _weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q, kv, d, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    attn = {"q_proj.weight": (q, d), "q_proj.bias": (q,), "k_proj.weight": (kv, d), "v_proj.weight": (kv, d),
            "o_proj.weight": (d, q)}
    mlp = {"gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f)}
    shapes = {f"model.layers.0.self_attn.{n}": s for n, s in attn.items()}
    shapes |= {f"model.layers.0.mlp.{n}": s for n, s in mlp.items()}
    shapes |= {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    return {name: torch.randn(shape) for name, shape in shapes.items()}


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 2), (9, 3, 2), (14, 2, 2), (4, 2, 4), (4, 1, 2), (8, 8, 3)])
def test_shards_cover_the_model_once(heads, kv_heads, size):
    """Each rank's query heads use only its own KV heads; column-parallel slices joined give the full weights,
    row-parallel ones too, and a KV head spread over several ranks is the same on each."""
    cfg = _config(heads, kv_heads)
    full = _weights(cfg)
    ranks = [TensorParallel(r, size, "unused") for r in range(size)]
    shards = [tp.shard(cfg, dict(full)) for tp in ranks]
    locals_ = [tp.local_config(cfg) for tp in ranks]
    assert sum(c.num_heads for c in locals_) == heads
    assert sum(c.intermediate_size for c in locals_) == cfg.intermediate_size
    assert all(c.num_heads % c.num_kv_heads == 0 and c.num_heads for c in locals_)
    for name, tensor in full.items():
        parts = [s[name] for s in shards]
        if any(key in name for key in ("k_proj", "v_proj")) and kv_heads < size:
            # Replicated: rank r holds KV head r // (size // kv_heads).
            width = cfg.head_dim
            for r, part in enumerate(parts):
                kv = r // (size // kv_heads)
                assert torch.equal(part, tensor[kv * width : (kv + 1) * width])
            continue
        dim = 1 if "o_proj" in name or "down_proj" in name else 0
        if name.endswith("norm.weight"):
            assert all(torch.equal(p, tensor) for p in parts)
        else:
            assert torch.equal(torch.cat(parts, dim=dim), tensor), name
    # Query head h attends with KV head h // group: on its own rank.
    group = heads // kv_heads
    q_at = 0
    for r, (tp, local) in enumerate(zip(ranks, locals_)):
        k = shards[r]["model.layers.0.self_attn.k_proj.weight"]
        for h in range(q_at, q_at + local.num_heads):
            kv = h // group
            row = full["model.layers.0.self_attn.k_proj.weight"][kv * cfg.head_dim : (kv + 1) * cfg.head_dim]
            held = [torch.equal(k[i * cfg.head_dim : (i + 1) * cfg.head_dim], row) for i in range(local.num_kv_heads)]
            assert any(held), (r, h)
        q_at += local.num_heads


@pytest.mark.parametrize("heads,kv_heads,size", [(9, 3, 4), (9, 3, 10), (6, 2, 4)])
def test_impossible_splits_are_refused(heads, kv_heads, size):
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
        TensorParallel.check(_config(heads, kv_heads), size)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {arch: make_tiny_hf_model(root / arch, arch=arch, initializer_range=0.3) for arch in ("qwen2", "llama", "gemma3")}


def _close(a: float, b: float, tolerance: float) -> bool:
    return abs(a - b) < tolerance * max(1.0, abs(a))  # float32 rounding grows with the magnitude


def _assert_same(ref, out, prompt_tolerance: float = TOLERANCE) -> None:
    for a, b in zip(ref, out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys()
            assert all(_close(x[token].logprob, y[token].logprob, TOLERANCE) for token in x)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            token = next(iter(x))
            assert _close(x[token].logprob, y[token].logprob, prompt_tolerance)


def _assert_follows(ref, out, tolerance: float = 0.05) -> None:
    """Log-probabilities within `tolerance` nats (relative past 1 nat for the prompt's), and greedy tokens the same
    up to the first place where one process's top two were a near-tie (within 2 * tolerance)."""
    for a, b in zip(ref, out):
        same = [x == y for x, y in zip(a.outputs[0].token_ids, b.outputs[0].token_ids)]
        first = same.index(False) if not all(same) else len(same)
        for x, y in zip(a.outputs[0].logprobs[: first + 1], b.outputs[0].logprobs):
            assert all(abs(x[token].logprob - y[token].logprob) < tolerance for token in x.keys() & y.keys())
        if first < len(same):
            best, second = sorted((lp.logprob for lp in a.outputs[0].logprobs[first].values()), reverse=True)
            assert best - second < 2 * tolerance, (first, best - second)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            token = next(iter(x))
            assert abs(x[token].logprob - y[token].logprob) < tolerance * max(1.0, abs(x[token].logprob))


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,options", [
    ("llama", 4, {}),  # 2 KV heads over 4 ranks: each replicated on two; tied embeddings
    ("gemma3", 2, {}),  # one KV head, q/k norms, sliding-window layers
    ("qwen2", 2, {"kv_cache_dtype": "int4"}),  # q/k/v biases, an untied output layer; the low-bit cache per rank
])
def test_greedy_output_matches_one_process(tiny_models, arch, size, options):
    options = {**OPTIONS, **options}
    ref = LLM(str(tiny_models[arch]), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(str(tiny_models[arch]), tensor_parallel_size=size, **options)
    ranks = llm.llm_engine.executor.procs
    assert len(ranks) == size and all(p.is_alive() for p in ranks)
    _assert_same(ref, llm.generate(PROMPTS, PARAMS, use_tqdm=False))
    del llm
    gc.collect()  # a dropped engine stops its ranks
    assert not any(p.is_alive() for p in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("arch,tp,pp", [("gemma3", 1, 3), ("qwen2", 2, 2)])
def test_pipeline_stages_match_one_process(tiny_models, arch, tp, pp):
    """Layers cut into stages (Gemma 3's six over three stages: its sliding and global layers on different ones),
    alone and with each stage split over two ranks."""
    options = OPTIONS
    ref = LLM(str(tiny_models[arch]), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(str(tiny_models[arch]), tensor_parallel_size=tp, pipeline_parallel_size=pp, **options)
    assert len(llm.llm_engine.executor.procs) == tp * pp
    _assert_same(ref, llm.generate(PROMPTS, PARAMS, use_tqdm=False))


@pytest.mark.slow
def test_ranks_follow_chunks_and_preemption(tiny_models):
    """Prefill in chunks of 8 tokens beside decodes, and a sequence preempted for want of blocks: the ranks know
    only what the step contract tells them."""
    options = {"dtype": "float32", "max_model_len": 128, "max_num_batched_tokens": 8, "max_num_seqs": 2,
               "num_kv_blocks": 8}
    params = SamplingParams(max_tokens=60, temperature=0, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    ref = LLM(str(tiny_models["llama"]), **options).generate(PROMPTS[:2], params, use_tqdm=False)
    llm = LLM(str(tiny_models["llama"]), tensor_parallel_size=2, **options)
    _assert_same(ref, llm.generate(PROMPTS[:2], params, use_tqdm=False))
    assert llm.llm_engine.stats().num_preemptions > 0


@pytest.mark.slow
def test_int4_weights_split_over_ranks(tiny_models):
    """Each rank quantizes its slice with its own scales, and int4 groups never straddle ranks: the same quantized
    weights, summed in another order. Where a prefill runs on the bfloat16 products that order moves the rounding of
    their products; where it runs on the integer kernels (AMD with AVX-512 keeps them to 256 rows), it turns into an
    int8 step of an activation now and then, which the cache carries into every later token: the third prompt's
    generated log-probabilities moved by 0.014 on Zen 4. As for a GGUF below: within 0.05 (a wrong cut or scale
    moves them by whole nats), the greedy tokens the same up to a near-tie."""
    options = {**OPTIONS, "quantization": "int4"}
    ref = LLM(str(tiny_models["qwen2"]), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    out = LLM(str(tiny_models["qwen2"]), tensor_parallel_size=2, **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    _assert_follows(ref, out)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_speculative_decoding_over_ranks(tiny_models, tp, pp):
    """The output rank drafts with a draft model of its own (the target itself, so that most drafts are kept), every
    rank verifies the drafts the step contract sends and keeps the same ones: as one process would."""
    target = str(tiny_models["qwen2"])
    options = {**OPTIONS, "speculative_config": {"method": "draft_model", "model": target, "num_speculative_tokens": 3}}
    ref = LLM(target, **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(target, tensor_parallel_size=tp, pipeline_parallel_size=pp, **options)
    _assert_same(ref, llm.generate(PROMPTS, PARAMS, use_tqdm=False))
    spec = llm.llm_engine.stats().spec
    assert spec.num_accepted_tokens > 0.5 * spec.num_draft_tokens


@pytest.fixture(scope="module")
def repetitive_qwen(tmp_path_factory):
    """The tiny qwen2 with the default init spread: it repeats itself, so that most drafts are kept."""
    return str(make_tiny_hf_model(tmp_path_factory.mktemp("repetitive") / "qwen2", arch="qwen2",
                                  initializer_range=0.02))


@pytest.mark.slow
def test_token_trees_over_pipeline_stages(repetitive_qwen):
    """Lookahead's token trees over 2 stages: a stage before the last never sees which branch the last kept, and
    copies it into the sequence's slots when the next step names it. Eager steps, so that no step costs prune the
    trees: one process keeps a branch off the primary chain 12 times in 105 trees here, and a first stage that
    does not copy them gives other tokens."""
    prompts = [*PROMPTS, "one two one two one two one two"]
    params = SamplingParams(max_tokens=150, temperature=0, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    options = {**OPTIONS, "max_model_len": 512}
    ref = LLM(repetitive_qwen, **options).generate(prompts, params, use_tqdm=False)
    llm = LLM(repetitive_qwen, pipeline_parallel_size=2, enforce_eager=True,
              speculative_config={"method": "lookahead", "num_speculative_tokens": 2}, **options)
    _assert_same(ref, llm.generate(prompts, params, use_tqdm=False))
    spec = llm.llm_engine.stats().spec
    assert spec.num_accepted_tokens > 0.3 * spec.num_draft_tokens


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,policy", [
    ("qwen2", 2, {"method": "snapkv", "budget": 32, "window_size": 8}),
    ("llama", 4, {"method": "snapkv", "budget": 32, "window_size": 8}),
    ("llama", 4, {"method": "h2o", "budget": 32, "window_size": 8}),
], ids=["snapkv-2", "snapkv-4", "h2o-4"])
def test_kv_policy_over_ranks(tiny_models, arch, size, policy):
    """Each rank chooses the entries its own KV heads keep. Where ranks replicate a KV head (2 KV heads over 4
    ranks), its query heads are spread over them: SnapKV's votes are averaged and H2O's sums added across those
    ranks first. The same entries kept as in one process, and the same output."""
    options = {**OPTIONS, "kv_policy": policy}
    ref = LLM(str(tiny_models[arch]), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    _assert_same(ref, LLM(str(tiny_models[arch]), tensor_parallel_size=size, **options).generate(
        PROMPTS, PARAMS, use_tqdm=False))


@pytest.mark.slow
@pytest.mark.parametrize("policy", [{"method": "snapkv", "budget": 32, "window_size": 8},
                                    {"method": "pyramidkv", "budget": 32, "window_size": 8},
                                    {"method": "h2o", "budget": 32, "window_size": 8}], ids=lambda p: p["method"])
def test_kv_policy_over_pipeline_stages(tiny_models, policy):
    """Each stage compacts its own layers in the step that plans it: SnapKV and PyramidKV from its layers' votes,
    H2O from the attention its layers' entries received; the same output as one process."""
    options = {**OPTIONS, "kv_policy": policy}
    ref = LLM(str(tiny_models["qwen2"]), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    _assert_same(ref, LLM(str(tiny_models["qwen2"]), pipeline_parallel_size=2, **options).generate(
        PROMPTS, PARAMS, use_tqdm=False))


@pytest.mark.slow
def test_int8_kv_over_pipeline_stages(tiny_models, tmp_path):
    """Every stage runs the int8 cache's start-up probe at once, over its own layers, the prompt's hidden states
    passed on as a step's: the stage holding the layer whose keys are sharp (its q and k scaled 30x) keeps that
    layer's K/V in float as one process does, and the output is one process's."""
    folder = tmp_path / "sharp"
    shutil.copytree(tiny_models["qwen2"], folder)
    weights = load_file(folder / "model.safetensors")
    for name in ("q_proj", "k_proj"):
        weights[f"model.layers.1.self_attn.{name}.weight"] *= 30
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    options = {**OPTIONS, "kv_cache_dtype": "int8"}
    one = LLM(str(folder), **options)
    errors = one.llm_engine.runner.int8_kv_errors
    assert float_kv_layers(errors) == [1], errors  # the layer this test is about, and only it
    ref = one.generate(PROMPTS, PARAMS, use_tqdm=False)
    del one
    llm = LLM(str(folder), pipeline_parallel_size=2, **options)
    _assert_same(ref, llm.generate(PROMPTS, PARAMS, use_tqdm=False))
    # A block of the stage holding layer 1 stores float K/V, the other's int8 with a scale per entry and head.
    cfg = llm.model_config
    entries = 2 * llm.llm_engine.config.block_size * cfg.num_kv_heads
    assert llm.llm_engine.executor.collective_rpc("kv_bytes_per_block") == [entries * (cfg.head_dim + 4),
                                                                            entries * cfg.head_dim * 4]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "lookahead"])
def test_h2o_with_drafts_over_pipeline_stages(repetitive_qwen, method):
    """H2O's scores count the rows of the drafts kept only: a stage before the last folds them in when the next
    step names the kept nodes, as the last stage does once it has verified them; the output of one process without
    drafts, whose compactions choose by the same scores. A first stage that folds nothing fails this; one that
    folds rejected drafts too passes it (their attention did not change what H2O kept here): that the fold counts
    the kept rows alone is checked score by score in test_kv_policy.py, in one process."""
    policy = {"method": "h2o", "budget": 32, "window_size": 8}
    prompts = [*PROMPTS, "one two one two one two one two"]
    params = SamplingParams(max_tokens=60, temperature=0, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    ref = LLM(repetitive_qwen, kv_policy=policy, **OPTIONS).generate(prompts, params, use_tqdm=False)
    llm = LLM(repetitive_qwen, pipeline_parallel_size=2, kv_policy=policy, enforce_eager=True,
              speculative_config={"method": method, "num_speculative_tokens": 2}, **OPTIONS)
    _assert_same(ref, llm.generate(prompts, params, use_tqdm=False))
    spec = llm.llm_engine.stats().spec
    assert spec.num_accepted_tokens > 0.3 * spec.num_draft_tokens


@pytest.fixture(scope="module")
def stored_quantized(tiny_models, tmp_path_factory):
    """The tiny qwen2 as a GGUF of mixed types (int8 and int4 families, a Q8_0 token table, layers that fall back
    to float) and as an int4 folder (RTN, groups of 32)."""
    root = tmp_path_factory.mktemp("stored")
    quantize_model(str(tiny_models["qwen2"]), "rtn", 4, root / "rtn4", group_size=32, progress=False)
    return {"gguf": make_tiny_gguf(root / "mixed.gguf", tiny_models["qwen2"], quant=mixed_types),
            "folder": root / "rtn4"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:2 linear layers dequantized")
@pytest.mark.parametrize("source,tp,pp", [("gguf", 2, 1), ("folder", 2, 2)])
def test_weights_stored_quantized_split_over_ranks(stored_quantized, source, tp, pp):
    """A GGUF served as stored and a quantized folder: each rank takes its rows or columns of the stored values and
    their scales, so the ranks multiply exactly the one process's weights, summed in another order. The integer
    kernels round activations to int8, which turns that order's last bits into an int8 step now and then: log-
    probabilities agree within 0.05 (a wrong cut or scale moves them by whole nats) and the greedy tokens are the
    same up to a near-tie of the one process's."""
    options = {**OPTIONS, "quantization": "gguf"} if source == "gguf" else OPTIONS
    model = str(stored_quantized[source])
    ref = LLM(model, **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    out = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, **options).generate(PROMPTS, PARAMS,
                                                                                             use_tqdm=False)
    _assert_follows(ref, out)


def test_each_rank_holds_its_slice_of_the_stored_weights(stored_quantized):
    """Dequantized, every rank's cut of the stored tensors (int8 and int4, with and without minimums, fused q/k/v and
    gate/up, a q/k/v stacked from int8 and int4 parts, the Q8_0 token table) is exactly what shard() cuts from the
    dequantized whole under Hugging Face names."""
    loaded = load_model(str(stored_quantized["gguf"]), progress=False, gguf_direct=True)
    cfg = loaded.config
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    assert {fmt for fmt, _ in loaded.quantized.values()} == {"int8-g32", "int4-g32",
                                                             f"stack:int8-g32x{q + kv}+int4-g32x{kv}"}
    parts = {"qkv_proj": {"q_proj": q, "k_proj": kv, "v_proj": kv}, "gate_up_proj": {"gate_proj": f, "up_proj": f}}
    for rank in range(2):
        tp = TensorParallel(rank, 2, "")
        for module, layer in tp.shard_quantized(cfg, dict(loaded.quantized)).items():
            stem, _, kind = module.rpartition(".")
            whole = _dequantized(*loaded.quantized[module])
            names = parts.get(kind, {kind: whole.shape[0]})
            hf = {f"{stem}.{name}.weight": w for name, w in zip(names, whole.split(list(names.values())))}
            expected = torch.cat(list(tp.shard(cfg, hf).values()))
            assert torch.equal(_dequantized(*layer), expected), module


def _dequantized(fmt: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if stacked.is_stacked(fmt):
        return torch.cat([_dequantized(part, stacked.part_tensors(tensors, index))
                          for index, (part, _) in enumerate(stacked.parts_of(fmt))])
    if fmt.startswith("int8"):
        return dequantize_int8(tensors["qweight"], tensors["scales"])
    return dequantize_int4(tensors["qweight"], tensors["scales"], tensors["mins"])


def test_a_cut_through_a_quantization_group_is_refused():
    """o_proj's 32 inputs (4 heads of 8) in int4 groups of 32: two ranks would each hold half a group."""
    cfg = _config(4, 2)
    layer = {"qweight": torch.zeros(48, 16, dtype=torch.uint8), "scales": torch.ones(48, 1), "mins": torch.zeros(48, 1)}
    TensorParallel.check_quantized(cfg, 1, {"layers.0.self_attn.o_proj": ("int4-g32", layer)})
    with pytest.raises(InvalidRequestError, match=r"o_proj \(int4-g32\) cannot be split at input 16 of 32"):
        TensorParallel.check_quantized(cfg, 2, {"layers.0.self_attn.o_proj": ("int4-g32", layer)})


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_ray_executor_runs_the_ranks(tiny_models, local_ray, tp, pp):
    """One Ray actor per rank on a local cluster of 2 CPUs: two tensor-parallel ranks, or two pipeline stages."""
    options = OPTIONS
    ref = LLM(str(tiny_models["qwen2"]), **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(str(tiny_models["qwen2"]), tensor_parallel_size=tp, pipeline_parallel_size=pp,
              distributed_executor_backend="ray", **options)
    assert len(llm.llm_engine.executor.actors) == 2
    _assert_same(ref, llm.generate(PROMPTS, PARAMS, use_tqdm=False))
    llm.llm_engine.executor.close()


@pytest.mark.parametrize("options,message", [
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, "runs one rank"),
    ({"tensor_parallel_size": 0}, "must be >= 1"),
    ({"tensor_parallel_size": 3}, "multiple of them"),  # 2 KV heads, 4 query heads
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "threads"}, "must be one of"),
    ({"pipeline_parallel_size": 2, "speculative_config": {"method": "layer_skip", "num_speculative_tokens": 2,
                                                           "skip_layers": [1]}}, "'layer_skip' over pipeline stages"),
    ({"pipeline_parallel_size": 3}, "exceeds the model's 2 layers"),
    ({"pipeline_parallel_size": 0}, "must be >= 1"),
])
def test_impossible_options_fail_at_start(tiny_models, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        LLM(str(tiny_models["qwen2"]), dtype="float32", max_model_len=256, **options)
    assert not multiprocessing.active_children()  # refused before any rank started


@pytest.mark.integration
def test_packaged_model_split_over_two_ranks():
    """SmolLM2-135M's 9 query heads in 3 KV groups go 3 + 6 over two ranks."""
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=1)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    options = {"dtype": "float32", "max_num_seqs": 4}
    ref = LLM("smollm2-135m", **options).generate(prompts, params, use_tqdm=False)
    out = LLM("smollm2-135m", tensor_parallel_size=2, **options).generate(prompts, params, use_tqdm=False)
    for a, b in zip(ref, out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            token = next(iter(x))
            assert abs(x[token].logprob - y[token].logprob) < 1e-3
