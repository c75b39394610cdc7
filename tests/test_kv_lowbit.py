"""Low-bit KV cache (kv_cache_dtype="int4" / "int2", layers/kivi.py) against an oracle: Hugging Face transformers
with the same weights, attending in one teacher-forced pass by the rule the cache implements: each query reads
its residual (its own KV block and the blocks before it, kv_residual_length tokens) at full precision and earlier
blocks quantized (keys per channel over a block, values per token over channel groups, float16 scales and
minimums); with a KV policy, its cache pruned as the engine compacts a low-bit cache. Written here from the rule,
not from the module."""

import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_hf_model
from transformers import AttentionInterface, AutoModelForCausalLM

from nimblelm import LLM, SamplingParams
from nimblelm.engine.kv_cache.policy import KVPolicy
from nimblelm.engine.model_runner import ModelRunner
from nimblelm.errors import InvalidRequestError
from nimblelm.layers import kivi

BLOCK = 16
RESIDUAL = 3 * BLOCK  # the tests' kv_residual_length: a ring of three blocks


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory):
    """A tiny model with 64-channel heads, whose packed rows fill whole registers: the decode kernel widens them
    there, where the 16-channel heads of tiny_qwen go through a float scratch."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("wide") / "qwen2", arch="qwen2", initializer_range=0.3,
                              hidden_size=256, num_attention_heads=4, num_key_value_heads=2)


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 300) for _ in range(n)]


def _fake_quantize(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, low = ((hi - lo) / (2**bits - 1)).half().float(), lo.half().float()
    inv = torch.where(scale > 0, 1 / scale, 0.0)
    return torch.round((x - low) * inv).clamp(0, 2**bits - 1) * scale + low


def _rule_attention(bits: int | None, votes: list | None = None, window: int = 0, block: int = BLOCK,
                    residual: int = RESIDUAL, cached: int = 0, ring: torch.dtype = torch.float32,
                    received: list | None = None):
    """An attention function for transformers that reads K/V by the cache's rule in one pass; with `votes`, each
    layer appends SnapKV's votes of the last `window` rows, per KV head, as the rows read the entries; with
    `received`, H2O's sums: every row's weights per entry, summed over the rows and each KV head's query heads. The
    first `cached` entries (a prefix cache hit) are read as stored. Every entry passes through a residual ring of
    dtype `ring`: both its copies are of its K/V rounded to it."""

    def attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
        k, v = k.to(ring).float(), v.to(ring).float()
        n, d = k.shape[2:]
        full = n // block * block
        kq, vq = k.clone(), v.clone()
        kq[:, :, :full] = _fake_quantize(k[:, :, :full].unflatten(2, (-1, block)), 3, bits).flatten(2, 3)
        channels = 32 if d % 32 == 0 else 16  # a value scale's
        vq = _fake_quantize(v.unflatten(-1, (-1, channels)), -1, bits).flatten(-2)
        pos = torch.arange(n)
        visible = pos[None, :] <= pos[:, None]
        if sliding_window is not None:
            visible &= pos[None, :] > pos[:, None] - sliding_window
        recent = pos[None, :] // block > pos[:, None] // block - residual // block  # in the query's residual
        recent &= (pos[None, :] >= cached) | (pos[:, None] < cached)  # the hit's own queries ran before it
        mask = torch.cat([visible & ~recent, visible & recent], 1)
        o = F.scaled_dot_product_attention(q, torch.cat([kq, k], 2), torch.cat([vq, v], 2), attn_mask=mask,
                                           scale=scaling, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        if votes is not None or received is not None:
            logits = q[0] @ torch.cat([kq, k], 2)[0].repeat_interleave(group, 0).transpose(1, 2) * scaling
            weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
            weights = weights[..., :n] + weights[..., n:]  # each row reads one copy of an entry
        if votes is not None:
            votes.append(weights[:, -window:].reshape(k.shape[1], group, window, n).mean((1, 2)))
        if received is not None:
            received.append(weights.view(k.shape[1], group, -1, n).sum((1, 2)))
        return o.transpose(1, 2).contiguous(), None

    return attention


def _oracle_logprobs(folder, ids: list[int], bits: int | None, block: int = BLOCK, residual: int = RESIDUAL,
                     cached: int = 0, ring: torch.dtype = torch.float32) -> torch.Tensor:
    """log-softmax of transformers' logits at every position of ids, its attention reading the cache's rule
    with KV blocks of `block` tokens, residuals of `residual` in `ring`'s precision and the first `cached` entries
    as stored (bits None: plain attention)."""
    AttentionInterface.register("kivi_oracle", _rule_attention(bits, block=block, residual=residual, cached=cached,
                                                               ring=ring))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="sdpa" if bits is None else "kivi_oracle")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)


def _quantize_blocks(k: torch.Tensor, v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [kv_heads, n, d] of whole blocks as the cache stores them."""
    channels = 32 if k.shape[-1] % 32 == 0 else 16
    return (_fake_quantize(k.unflatten(1, (-1, BLOCK)), 2, bits).flatten(1, 2),
            _fake_quantize(v.unflatten(-1, (-1, channels)), -1, bits).flatten(-2))


def _residual_start(position: int) -> int:
    """The first entry a query at `position` reads at full precision."""
    return max(0, position // BLOCK * BLOCK + BLOCK - RESIDUAL)


def _oracle_with_policy(folder, prompt: list[int], policy: KVPolicy, bits: int, max_tokens: int) -> list[int]:
    """Greedy tokens of transformers whose cache keeps what `policy` selects and reads by the low-bit rule.

    Per layer it holds each entry's full-precision K/V and, for whole blocks, the stored ones. The prompt is one
    pass of _rule_attention. A compaction keeps what the policy selects for a low-bit cache (key groups made by an
    earlier compaction whole) and gathers each kept entry as the next query would read it (full precision in that
    query's residual, else stored), whole new blocks stored again from those. A decode row reads stored
    entries before its residual, full-precision ones in it. H2O's sums add up every row's weights."""
    votes: list[torch.Tensor] = []  # per layer, filled by the prompt's pass
    received: list[torch.Tensor] | None = [] if policy.method == "h2o" else None  # per layer, H2O's
    window = min(policy.window_size, len(prompt))
    AttentionInterface.register("kivi_policy", _rule_attention(bits, votes if policy.needs_votes else None, window,
                                                               received=received))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="kivi_policy")
    layers = model.config.num_hidden_layers
    kv_heads = model.config.num_key_value_heads
    depths = [i / max(1, layers - 1) for i in range(layers)]
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
    cache = out.past_key_values
    fp = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    stored = [_quantize_blocks(k[:, : k.shape[1] // BLOCK * BLOCK], v[:, : v.shape[1] // BLOCK * BLOCK], bits)
              for k, v in fp]

    compacted = [False] * layers

    def prune(i: int, num_new: int) -> None:
        n = fp[i][0].shape[1]
        keep = policy.kept_entries(len(prompt), n, num_new, True, BLOCK, depths[i])
        if keep is None:
            return
        first = _residual_start(n)  # of the next query's residual
        kept = policy.select(keep, n, kv_heads, received[i] if received else votes[i] if votes else None, BLOCK,
                             first if compacted[i] else 0)
        compacted[i] = True
        if received:
            received[i] = received[i].gather(1, kept)
        held = [torch.cat([s_[:, :first], f[:, first:]], 1) for s_, f in zip(stored[i], fp[i])]
        gathered = [x.gather(1, kept[..., None].expand(-1, -1, x.shape[-1])) for x in held]
        if policy.cache_positions:  # the moved keys rotated back by the distance they moved, then stored again
            cos, sin = model.model.rotary_emb(gathered[0], torch.tensor([[n - keep]]))
            moved = gathered[0][:, policy.num_sinks :]
            half = moved.shape[-1] // 2
            gathered[0][:, policy.num_sinks :] = moved * cos[0] - torch.cat([-moved[..., half:], moved[..., :half]],
                                                                             -1) * sin[0]
        fp[i] = tuple(gathered)
        whole = [x[:, : keep // BLOCK * BLOCK] for x in gathered]
        # A head's new block of one stored block's entries keeps them as stored (unless its keys were rotated).
        runs = kept[:, : keep // BLOCK * BLOCK].view(kv_heads, -1, BLOCK)
        same = (runs[..., 0] % BLOCK == 0) & (runs[..., -1] - runs[..., 0] == BLOCK - 1) & (runs[..., -1] < first)
        same &= not policy.cache_positions
        same = same.repeat_interleave(BLOCK, -1)[..., None]
        stored[i] = tuple(torch.where(same, x, q) for x, q in zip(whole, _quantize_blocks(*whole, bits)))

    step: list[torch.Tensor] = []  # a decode row's weights, per layer

    def decode_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = q.shape[1] // k.shape[1]
        weights = (q[0] @ k[0].repeat_interleave(group, 0).transpose(1, 2) * scaling).softmax(-1)  # [heads, 1, n]
        step.append(weights.view(k.shape[1], group, -1).sum(1))
        return (weights @ v[0].repeat_interleave(group, 0))[None].transpose(1, 2).contiguous(), None

    AttentionInterface.register("kivi_decode", decode_attention)
    for i in range(layers):
        prune(i, len(prompt))
    model.set_attn_implementation("kivi_decode")
    tokens, logits = [], out.logits[0, -1]
    for position in range(len(prompt), len(prompt) + max_tokens):
        tokens.append(int(logits.argmax()))
        for i, layer in enumerate(cache.layers):  # what the new row reads: stored before its residual
            first = _residual_start(fp[i][0].shape[1])
            layer.keys, layer.values = (torch.cat([s_[:, :first], f[:, first:]], 1)[None]
                                        for s_, f in zip(stored[i], fp[i]))
        step.clear()
        if policy.cache_positions:  # its place in the cache
            position = fp[0][0].shape[1]
        with torch.no_grad():
            out = model(torch.tensor([[tokens[-1]]]), cache=cache, position_ids=torch.tensor([[position]]),
                        cache_position=torch.tensor([position]), use_cache=True)
        for i, layer in enumerate(cache.layers):
            fp[i] = tuple(torch.cat([f, x[0, :, -1:]], 1) for f, x in zip(fp[i], (layer.keys, layer.values)))
            if received is not None:
                received[i] = torch.cat([received[i], received[i].new_zeros(kv_heads, 1)], 1) + step[i]
            n = fp[i][0].shape[1]
            if n % BLOCK == 0:  # its block is whole: stored
                new = _quantize_blocks(*(f[:, n - BLOCK :] for f in fp[i]), bits)
                stored[i] = tuple(torch.cat([s_, x], 1) for s_, x in zip(stored[i], new))
            prune(i, 1)
        logits = out.logits[0, -1]
    return tokens


def _run(llm: LLM, prompts: list[list[int]], max_tokens: int, logprobs: bool = True) -> list[tuple[list[int], list]]:
    """Per prompt: greedy tokens and the logprob of every prompt token after the first (with logprobs; a
    request for them computes its whole prompt, past any prefix cache hit)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                            prompt_logprobs=0 if logprobs else None)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [next(iter(e.values())).logprob for e in o.prompt_logprobs[1:]] if logprobs else None) for o in outs]


def _check(folder, prompt: list[int], tokens: list[int], prompt_lps: list[float] | None, bits: int,
           block: int = BLOCK, residual: int = RESIDUAL, cached: int = 0, min_effect: float = 0.1,
           ring: torch.dtype = torch.float32) -> None:
    """Each greedy token is the oracle's choice, and the prompt's logprobs are the oracle's."""
    ref = _oracle_logprobs(folder, prompt + tokens[:-1], bits, block, residual, cached, ring)
    assert ref[len(prompt) - 1 :].argmax(-1).tolist() == tokens
    if prompt_lps is None:
        return
    expected = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    # The engine's K/V differ from transformers' in the last bits, so now and then a value at a level's midpoint
    # rounds the other way, moving the logprobs after it by a few hundredths: what quantizing moves them by
    # is an order or more above.
    diff = (torch.tensor(prompt_lps) - expected).abs()
    plain = _oracle_logprobs(folder, prompt, None)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    effect = (expected - plain).abs()
    assert effect.max() > min_effect, "quantization changed nothing: the test cannot tell the rule"
    assert diff.max() < 0.05 and diff.mean() < 0.1 * effect.mean()


@pytest.mark.parametrize("heads", ["16-channel", "64-channel"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("bits", [4, 2])
def test_greedy_and_prompt_logprobs_match_the_oracle(tiny_qwen, wide_heads, bits, kernel, heads, monkeypatch,
                                                    replays):
    """With the kernels, the prompt through the fused prefill and every decode step replayed from a trace."""
    if not kernel:  # torch's attention for decode rows and prompt chunks alike, no step replayed
        monkeypatch.setattr(kivi, "ops_for", lambda x: None)
    folder = tiny_qwen if heads == "16-channel" else wide_heads
    prompt = _prompt(150)
    llm = LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_dtype=f"int{bits}", enforce_eager=not kernel,
              kv_residual_length=RESIDUAL)
    [(tokens, lps)] = _run(llm, [prompt], 40)
    _check(folder, prompt, tokens, lps, bits)
    assert replays == ([1] * 39 if kernel else [])


@pytest.fixture(scope="module")
def wide_heads_bf16(wide_heads, tmp_path_factory):
    """wide_heads with its weights rounded to bfloat16 (stored as float32): dtype="bfloat16" then multiplies by the
    very weights transformers does in float32."""
    folder = tmp_path_factory.mktemp("wide_bf16") / "qwen2"
    shutil.copytree(wide_heads, folder)
    path = folder / "model.safetensors"
    save_file({name: t.bfloat16().float() for name, t in load_file(path).items()}, path)
    return folder


@pytest.mark.parametrize("bf16_products", ["off"], indirect=True)
@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("bits", [4, 2])
def test_a_bfloat16_model_keeps_its_residual_in_bfloat16(wide_heads_bf16, bits, kernel, bf16_products, monkeypatch,
                                                        replays):
    """The ring holds K/V in the model's dtype, as an auto cache would: against an oracle that rounds every entry to
    bfloat16 before either copy is made (one that keeps them in float32 is off by more than the test allows)."""
    if not kernel:
        monkeypatch.setattr(kivi, "ops_for", lambda x: None)
    prompt = _prompt(150)
    llm = LLM(str(wide_heads_bf16), dtype="bfloat16", max_model_len=512, kv_cache_dtype=f"int{bits}",
              enforce_eager=not kernel, kv_residual_length=RESIDUAL)
    assert llm.llm_engine.runner.kv_caches[0].lowbit.residual.dtype == torch.bfloat16
    assert f"int{bits} (residual in bfloat16) KV cache" in llm.llm_engine.precision
    [(tokens, lps)] = _run(llm, [prompt], 40)
    _check(wide_heads_bf16, prompt, tokens, lps, bits, ring=torch.bfloat16)
    assert replays == ([1] * 39 if kernel else [])


@pytest.mark.parametrize("bits", [4, 2])
def test_blocks_of_32_tokens_are_the_key_groups_and_the_default_residual_four_of_them(wide_heads, bits, replays):
    """--block-size sets KIVI's key group: 32 tokens here, the default residual of 128 tokens four blocks, against
    an oracle of 32-token blocks (one of 16 fails it, or one residual of 48)."""
    prompt = _prompt(300)
    llm = LLM(str(wide_heads), dtype="float32", max_model_len=512, kv_cache_dtype=f"int{bits}", block_size=32)
    [(tokens, lps)] = _run(llm, [prompt], 40)
    _check(wide_heads, prompt, tokens, lps, bits, block=32, residual=128)
    assert replays == [1] * 39


def test_chunks_batches_and_preemption_keep_every_output(tiny_qwen):
    """The rule depends on positions only: prompts split into chunks that end mid-block, batched with others, or
    preempted and recomputed, give the oracle's output."""
    prompts = [_prompt(n, seed) for seed, n in enumerate([150, 70, 90, 120])]
    chunked = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_cache_dtype="int4", max_num_seqs=4,
                  max_num_batched_tokens=40, num_kv_blocks=20, kv_residual_length=RESIDUAL,
                  enable_prefix_caching=False)
    results = _run(chunked, prompts, 60)
    assert chunked.llm_engine.scheduler.num_preemptions > 0
    for prompt, (tokens, lps) in zip(prompts, results):
        _check(tiny_qwen, prompt, tokens, lps, 4)


def test_a_prefix_hit_is_read_as_stored(tiny_qwen):
    """The prefix cache keeps sealed blocks only: after a hit, every query reads the hit's entries as stored, those
    in its residual too (an oracle that reads them at full precision fails it)."""
    first = _prompt(150)
    second = first[:100] + _prompt(50, seed=1)  # shares six full blocks with the first
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_cache_dtype="int4", kv_residual_length=RESIDUAL,
              max_num_batched_tokens=40, max_num_seqs=4)
    _run(llm, [first], 1, logprobs=False)
    [(tokens, _)] = _run(llm, [second], 60, logprobs=False)
    assert llm.llm_engine.scheduler.kv.num_hit_tokens == 96
    _check(tiny_qwen, second, tokens, None, 4, cached=96)
    uncached = _oracle_logprobs(tiny_qwen, second + tokens[:-1], 4)[len(second) - 1 :].argmax(-1).tolist()
    assert uncached != tokens, "the hit read as stored changed nothing: the test cannot tell"


@pytest.mark.parametrize("residual", [BLOCK, RESIDUAL])
def test_gemma3_sliding_layers_read_their_window_of_quantized_blocks(tmp_path_factory, residual):
    """Its sliding layers' window (8 tokens) reaches into quantized blocks with a residual of one block; with
    three, only the global layers read quantized blocks (their effect is small in this model), and the sliding
    layers' rings must follow tables that drop a block at a time (the rule of a residual of four blocks is off by
    hundreds of times the difference allowed)."""
    folder = make_tiny_hf_model(tmp_path_factory.mktemp("gemma3") / "hf", "gemma3", initializer_range=0.05)
    prompt = _prompt(200)
    llm = LLM(str(folder), dtype="float32", max_model_len=512, kv_cache_dtype="int4", max_num_seqs=8,
              max_num_batched_tokens=48, kv_residual_length=residual)
    [(tokens, lps)] = _run(llm, [prompt], 30)
    _check(folder, prompt, tokens, lps, 4, residual=residual, min_effect=0.1 if residual == BLOCK else 0.005)


def test_the_same_memory_holds_several_times_the_blocks(tiny_qwen):
    def blocks(budget: int, dtype: str = "float32", **options) -> int:
        return LLM(str(tiny_qwen), dtype=dtype, max_model_len=512, max_num_seqs=32, kv_cache_memory_bytes=budget,
                   **options).llm_engine.scheduler.kv.num_blocks

    # A block of the tiny model's 2 layers (2 KV heads of 16 channels, 16 tokens): float32 2 * 2 * 2 * 16 * 16 * 4
    # bytes. int4 per layer: K and V packed, 256 bytes each, a float16 scale and minimum per channel for K
    # (2 * 16 * 4 bytes) and per token and 16 channels for V (16 * 2 * 4): 768. int2: 128 + 128 + 128 + 128. The
    # residual rings, float32 K and V of 2 layers (512 bytes an entry) per sequence and a ring that replayed
    # steps' padding rows write, come off the budget first: 33 rings of one block here.
    left = (1 << 20) - 33 * 16 * 512
    assert {kv: blocks(1 << 20, kv_cache_dtype=kv, **({} if kv == "auto" else {"kv_residual_length": BLOCK}))
            for kv in ("auto", "int4", "int2")} == {"auto": (1 << 20) // 8192, "int4": left // 1536, "int2": left // 1024}
    # The default residual, 128 tokens, takes eight times their memory; a bfloat16 model's rings half of it.
    assert blocks(3 << 20, kv_cache_dtype="int4") == ((3 << 20) - 33 * 128 * 512) // 1536
    assert blocks(2 << 20, "bfloat16", kv_cache_dtype="int4") == ((2 << 20) - 33 * 128 * 256) // 1536


def test_the_default_residual_is_no_longer_than_a_sequence(tiny_qwen):
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=40, kv_cache_dtype="int2")
    assert llm.llm_engine.config.kv_residual_length == 48  # 40 tokens in whole blocks, not 128
    assert llm.llm_engine.runner.kv_caches[0].lowbit.residual_length == 48


def test_pack_and_quantize_round_trip():
    torch.manual_seed(0)
    for bits in (4, 2):
        levels = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8)
        packed = kivi.pack(levels, bits)
        assert packed.shape == (3, 5, 64 * bits // 8)
        assert torch.equal(kivi.unpack(packed, bits), levels)
        x = torch.randn(16, 2, 64) * torch.linspace(0.1, 30, 64)  # channels of very different ranges
        q, scale, low = kivi.quantize(x, 0, bits)
        back = q.float() * scale.float() + low.float()
        assert ((back - x).abs() <= scale.float() / 2 + 1e-2 * x.abs().amax(0)).all()


@pytest.mark.parametrize("ring", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_the_decode_write_kernel_seals_as_torch_does(bits, head_dim, ring):
    """The C++ decode write, which replayed steps use, against the torch path on the same state: every residual
    entry, packed byte, scale and minimum equal, for rows that complete their block and rows that do not."""
    from nimblelm.kernels import cpu_ops
    from nimblelm.layers.attention import AttentionMetadata

    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    torch.manual_seed(bits * head_dim)
    rows, kv_heads, num_blocks = 5, 2, 12
    length = 3 * BLOCK
    lowbit = kivi.LowBitKV.empty(bits, num_blocks, BLOCK, kv_heads, head_dim, rings=rows, residual_length=length,
                                 dtype=ring, device="cpu")
    lowbit.residual.normal_()
    lowbit.residual[..., : head_dim // 2] *= 20  # channels of very different ranges
    values = torch.randint(0, 256, (2, num_blocks, BLOCK, kv_heads, head_dim * bits // 8), dtype=torch.uint8)
    k, v = torch.randn(rows, kv_heads, head_dim), torch.randn(rows, kv_heads, head_dim)
    tables = torch.randperm(num_blocks)[: rows * 2].view(rows, 2)
    lens = torch.tensor([16, 32, 7, 17, 1])  # the first two complete a block
    plan = kivi.LowBitPlan.decodes(torch.arange(rows) * length + torch.tensor([0, 1, 2, 2, 1]) * BLOCK)  # phases
    meta = AttentionMetadata.decodes(torch.zeros(rows, dtype=torch.long), tables, lens, None)
    meta.lowbit = plan
    states = []
    for use in (ops, None):
        state = kivi.LowBitKV(bits, *(t.clone() for t in (lowbit.k_scale, lowbit.k_min, lowbit.v_scale, lowbit.v_min,
                                                          lowbit.residual)), length, length)
        packed = values.clone()
        kivi.write_decodes(k, v, packed, state, meta, use)
        states.append((packed, state.k_scale, state.k_min, state.v_scale, state.v_min, state.residual))
    for ours, torchs in zip(*states):
        assert torch.equal(ours, torchs)
    assert not torch.equal(states[0][0], values), "nothing was sealed"


def test_residual_rings_grow_keeping_their_entries():
    lowbit = kivi.LowBitKV.empty(4, 8, BLOCK, 2, 16, rings=2, residual_length=2 * BLOCK, dtype=torch.float32,
                                 device="cpu")
    lowbit.residual.normal_()
    before = lowbit.residual.clone()
    lowbit.grow(5)
    assert lowbit.residual.shape[1] == 10 * BLOCK and torch.equal(lowbit.residual[:, : 4 * BLOCK], before)


@pytest.mark.parametrize("options", [
    {"method": "streaming", "budget": 64},
    {"method": "snapkv", "ratio": 0.25, "window_size": 32},
    {"method": "pyramidkv", "ratio": 0.25, "window_size": 16, "beta": 4},
    {"method": "h2o", "budget": 64, "window_size": 32},
    {"method": "streaming", "budget": 64, "cache_positions": True},
], ids=["streaming", "snapkv", "pyramidkv", "h2o", "streaming-cache_positions"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "torch"])
def test_policies_compact_a_low_bit_cache_as_the_oracle_does(tiny_qwen, options, kernel, monkeypatch):
    """The kept entries are gathered as the cache held them and stored again in whole blocks; SnapKV's window
    votes with the attention its rows give by the low-bit rule, and H2O's sums add up every row's (the kernels'
    decode steps replayed from traces)."""
    if not kernel:
        monkeypatch.setattr(kivi, "ops_for", lambda x: None)
    prompt = _prompt(300)
    ref = _oracle_with_policy(tiny_qwen, prompt, KVPolicy.from_dict(options), 4, 40)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_cache_dtype="int4", kv_policy=options,
              kv_residual_length=RESIDUAL, enforce_eager=not kernel)
    assert _run(llm, [prompt], 40, logprobs=False)[0][0] == ref
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_cache_dtype="int4", kv_residual_length=RESIDUAL,
                enforce_eager=not kernel)
    assert _run(plain, [prompt], 40, logprobs=False)[0][0] != ref, "the policy changed nothing"


def test_streaming_with_cache_positions_generates_past_max_model_len_over_a_low_bit_cache(tiny_qwen):
    """The oracle above checks the rotated keys; here 200 prompt tokens and 300 more run in a 256-position model."""
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_cache_dtype="int4", kv_residual_length=RESIDUAL,
              kv_policy={"method": "streaming", "budget": 64, "cache_positions": True})
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": _prompt(200)}], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 300


def test_a_block_kept_whole_moves_as_stored():
    """Sealed again from its own levels, a block need not get them back (a channel whose float16 minimum left
    its top level unused gets a narrower scale), so a compaction moves a head's block kept whole as stored."""
    bits, heads, d = 2, 2, 32
    lowbit = kivi.LowBitKV.empty(bits, 4, BLOCK, heads, d, 1, BLOCK, torch.float32, "cpu")
    values = torch.zeros(2, 4, BLOCK, heads, d * bits // 8, dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    keys = 4.45 + 0.002 * torch.randn(3 * BLOCK, heads, d, generator=g)  # a large offset, a small spread
    kivi._seal(values, lowbit, torch.tensor([0, 1, 2]), keys, torch.randn(3 * BLOCK, heads, d, generator=g))
    before = [x[1].clone() for x in (values[0], values[1], *lowbit.block_params)]
    kept = torch.stack([torch.arange(16, 32), torch.arange(8, 24)])  # head 0 keeps block 1 whole
    kivi.compact(values, lowbit, torch.tensor([0, 1, 2]), 3 * BLOCK, kept, torch.tensor([3]), 0, 0)
    after = [x[3] for x in (values[0], values[1], *lowbit.block_params)]
    for x, y in zip(before, after):
        head = (slice(None), 0) if x.dim() == 3 else 0  # [block_size, heads, ...] or [heads, ...]
        assert torch.equal(x[head], y[head])
    resealed = kivi.quantize(*kivi.dequantize_blocks(values, lowbit, torch.tensor([1]))[:1], 0, bits)
    assert not (torch.equal(resealed[1], before[2]) and torch.equal(resealed[2], before[3])), \
        "sealing again changed nothing: the test cannot tell"


def _partial_groups(kept: torch.Tensor, before: int) -> int:
    """How many key groups of entries [0, before) a head's kept entries hold part of."""
    counts = torch.bincount(kept[kept < before] // BLOCK, minlength=before // BLOCK)
    return int(((counts > 0) & (counts < BLOCK)).sum())


@pytest.mark.parametrize("method", ["streaming", "snapkv", "h2o"])
def test_a_low_bit_cache_regroups_no_entry_twice(method):
    """On a low-bit cache every method keeps the first key group whole, and the entries an earlier compaction
    grouped a whole group at a time, the best groups by their scores; the window still stays. Token by token,
    the same scores split groups."""
    policy = KVPolicy(method=method, budget=100, window_size=32)
    n, keep, grouped = 230, 102, 128
    votes = torch.rand(3, n, generator=torch.Generator().manual_seed(0))
    votes[1, 64:80] += 1  # a group head 1 attends to most
    kept = policy.select(keep, n, 3, votes, BLOCK, grouped)
    assert kept.shape == (3, keep)
    for h in range(3):
        assert torch.equal(kept[h], kept[h].unique())  # ascending, no entry twice
        assert set(range(BLOCK)) <= set(kept[h].tolist())
        assert _partial_groups(kept[h], grouped) == 0
        if method != "streaming":
            assert set(range(n - 32, n)) <= set(kept[h].tolist())
    if method != "streaming":
        assert set(range(64, 80)) <= set(kept[1].tolist())
        plain = policy.select(keep, n, 3, votes)
        assert plain.shape == (3, keep) and max(_partial_groups(plain[h], grouped) for h in range(3)) > 0
    # Before any compaction grouped them, entries are kept token by token, but for the first group.
    first = policy.select(keep, n, 3, votes, BLOCK)
    assert all(set(range(BLOCK)) <= set(first[h].tolist()) for h in range(3))
    if method != "streaming":
        assert max(_partial_groups(first[h], grouped) for h in range(3)) > 0


@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "torch"])
def test_drafts_rejected_across_a_block_fall_back_to_the_entries_the_ring_kept(tiny_qwen, kernel, monkeypatch):
    """Speculative decoding over an int2 cache: a step writes a token and its drafts (a prompt chunk here) before
    they are verified, sealing the blocks they complete. Drafted by the target's own weights over a float32 cache,
    some drafts are kept and some rejected where int2 moves the argmax, and every token is the oracle's, in a batch.
    A ring of the residual alone (no room for the drafts) fails it: a rejection then falls back to entries the
    drafts' rows overwrote."""
    if not kernel:
        monkeypatch.setattr(kivi, "ops_for", lambda x: None)
    prompts = [_prompt(n, seed) for seed, n in enumerate([40, 75, 90])]
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_cache_dtype="int2", kv_residual_length=BLOCK,
              enforce_eager=not kernel,
              speculative_config={"method": "draft_model", "model": str(tiny_qwen), "num_speculative_tokens": 5})
    runner = llm.llm_engine.runner
    runner.step_cost = None  # every draft verified
    assert runner.ring_length == 2 * BLOCK  # room for the four rows past a token and its first draft
    results = _run(llm, prompts, 60, logprobs=False)
    stats = llm.llm_engine.stats().spec
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    for prompt, (tokens, _) in zip(prompts, results):
        _check(tiny_qwen, prompt, tokens, None, 2, residual=BLOCK)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "torch"])
def test_token_trees_keep_the_branch_they_verify(tiny_qwen, kernel, monkeypatch):
    """Lookahead's token trees over an int2 cache: a tree's rows are a prompt chunk at consecutive entries, each
    attending to the entries before the step and its own branch at the positions they stand for. Where the target
    keeps a branch off the primary chain, its K/V move into the entries they stand for in the ring, and a block
    they complete is sealed again. Every token is the oracle's; a branch off the chain is kept at least once here (3
    times), and without the move, the second sealing or the branch mask some prompt's tokens differ."""
    if not kernel:
        monkeypatch.setattr(kivi, "ops_for", lambda x: None)
    off_chain = []
    keep = ModelRunner._keep_lowbit_branch

    def counted(self, req_id, layout, path):
        off_chain.append(bool(path) and path[-1] >= layout.tree.chain_length())
        keep(self, req_id, layout, path)

    monkeypatch.setattr(ModelRunner, "_keep_lowbit_branch", counted)
    prompts = [_prompt(n, seed) for seed, n in enumerate([40, 75, 90])] + [[11, 12, 13, 14] * 8]
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_cache_dtype="int2", kv_residual_length=2 * BLOCK,
              enforce_eager=not kernel, speculative_config={"method": "lookahead", "num_speculative_tokens": 3})
    llm.llm_engine.runner.step_cost = None  # every tree verified whole
    results = _run(llm, prompts, 100, logprobs=False)
    assert any(off_chain)
    for prompt, (tokens, _) in zip(prompts, results):
        _check(tiny_qwen, prompt, tokens, None, 2, residual=2 * BLOCK)


@pytest.mark.parametrize("options, message", [
    ({"speculative_config": {"method": "lookahead", "num_speculative_tokens": 2}, "kv_residual_length": 16},
     r"token trees over an int4 KV cache need kv_residual_length >= block_size \+ num_speculative_tokens \(18\), got 16"),
    ({"kv_residual_length": 40}, "kv_residual_length must be whole blocks of 16 tokens, got 40"),
    ({"kv_residual_length": 0}, "kv_residual_length must be whole blocks of 16 tokens, got 0"),
    ({"kv_cache_dtype": "int8", "kv_residual_length": 32}, "kv_residual_length applies to int4 and int2 KV caches"),
    ({"kv_cache_memory_bytes": 1 << 20}, (r"residual rings \(4259840 bytes: kv_residual_length=128 tokens for each "
                                          r"of max_num_seqs=64 sequences\) take all of kv_cache_memory_bytes=1048576")),
])
def test_what_a_low_bit_cache_cannot_do_yet_is_refused(tiny_qwen, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        LLM(str(tiny_qwen), dtype="float32", max_model_len=256, **{"kv_cache_dtype": "int4", **options})



@pytest.mark.parametrize("bits", [4, 2])
def test_the_write_kernel_seals_a_block_from_the_rows_of_its_step(bits):
    """A sequence's rows of one step (its token and drafts) across a block's end, beside another sequence's row:
    the C++ write puts every row's entry in its ring before sealing, as torch's does: the same levels, scales and
    ring, bit for bit."""
    from nimblelm.kernels import cpu_ops
    from nimblelm.layers.attention import AttentionMetadata

    ops = cpu_ops()
    if ops is None:
        pytest.skip("the C++ kernels are not built here")
    torch.manual_seed(0)
    kv_heads, dim = 2, 16
    cache = kivi.LowBitKV.empty(bits, 6, BLOCK, kv_heads, dim, 3, BLOCK, torch.float32, "cpu", ring_length=2 * BLOCK)
    values = torch.zeros(2, 6, BLOCK, kv_heads, dim * bits // 8, dtype=torch.uint8)
    cache.residual.normal_()
    rows = [(0, entry) for entry in range(10, 19)] + [(1, 31)]  # (sequence, entry): 15 ends block 0, 31 block 1
    tables = torch.tensor([[1, 2], [3, 4]])[[seq for seq, _ in rows]]
    lens = torch.tensor([entry + 1 for _, entry in rows])
    ring = torch.tensor([seq * 2 * BLOCK for seq, _ in rows])
    k, v = torch.randn(len(rows), kv_heads, dim), torch.randn(len(rows), kv_heads, dim)
    meta = AttentionMetadata.decodes(torch.zeros(len(rows), dtype=torch.long), tables, lens, None,
                                     lowbit=kivi.LowBitPlan.decodes(ring))
    copies = [(values.clone(), kivi.LowBitKV(bits, *(t.clone() for t in cache.block_params), cache.residual.clone(),
                                              BLOCK, 2 * BLOCK)) for _ in range(2)]
    for (vals, lowbit), kernel in zip(copies, (ops, None)):
        kivi.write_decodes(k, v, vals, lowbit, meta, kernel)
    (a, x), (b, y) = copies
    assert torch.equal(a, b) and a[:, [1, 4]].any()
    for s, t in zip((*x.block_params, x.residual), (*y.block_params, y.residual)):
        assert torch.equal(s, t)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_tokens_after_the_prompt_computed_at_once_equal_their_prefill(tiny_qwen, enforce_eager):
    """Several tokens of a sequence past its prompt in one step (a recomputation can send them, or a token and its
    drafts) run as decode rows over a low-bit cache, replayed or eager: every row's entry goes into the ring before
    the blocks they complete are sealed. Across a block's end, the last token's log-probabilities equal those of
    the same tokens computed as one prompt."""
    from nimblelm.engine.step import NewRequest, RunningRequest, SchedulerOutput

    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=128, max_num_seqs=1, kv_cache_dtype="int4",
              enforce_eager=enforce_eager)
    runner = llm.llm_engine.runner
    prompt, after = _prompt(27), _prompt(12, seed=1)  # positions 27-38 end block 1 and start block 2
    params = SamplingParams(temperature=0, logprobs=5)
    blocks = -(-(len(prompt) + len(after)) // runner.block_size)
    runner.execute(SchedulerOutput(
        new_requests=[NewRequest(0, prompt, [], params, None, [list(range(1, blocks + 1))], [0], 0)],
        num_scheduled_tokens={0: len(prompt)},
    ))
    at_once = runner.execute(SchedulerOutput(
        running_requests=[RunningRequest(0, after, [[]], [0], len(prompt))], num_scheduled_tokens={0: len(after)},
    ))
    whole = prompt + after
    reference = runner.execute(SchedulerOutput(
        new_requests=[NewRequest(1, whole, [], params, None, [list(range(blocks + 1, 2 * blocks + 1))], [0], 0)],
        num_scheduled_tokens={1: len(whole)},
        finished_req_ids=[0],
    ))
    (lp, rank, ids, lps), (ref_lp, ref_rank, ref_ids, ref_lps) = at_once.logprobs[0][0], reference.logprobs[0][0]
    assert ids == ref_ids and rank == ref_rank
    assert abs(lp - ref_lp) < 1e-4 and max(abs(a - b) for a, b in zip(lps, ref_lps)) < 1e-4
