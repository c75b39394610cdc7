"""KV cache policies (engine/kv_cache/policy.py) against an oracle: Hugging Face transformers with the same
weights, its cache pruned by the policy's rule after the prompt (and, for streaming, as decoding grows it),
SnapKV's votes taken from transformers' own attention weights. Greedy output must match token for token.
The selection is checked against kvpress itself in test_kvpress_peer.py."""

import random

import pytest
import torch
from tiny_models import make_tiny_hf_model
from transformers import AutoModelForCausalLM

from nimblelm import LLM, SamplingParams
from nimblelm.bench import kvpress_peer
from nimblelm.engine.kv_cache.policy import KVPolicy
from nimblelm.errors import InvalidRequestError

BLOCK = 16


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 300) for _ in range(n)]


def _hf_reference(folder, prompt: list[int], policy: KVPolicy, max_tokens: int, chunk: int | None = None) -> list[int]:
    """Greedy tokens of transformers whose cache keeps, per layer and KV head, what `policy` selects; the prompt
    goes in chunks of `chunk` tokens (None: at once)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    kv_heads, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    full = [t == "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers]

    depths = [i / max(1, cfg.num_hidden_layers - 1) for i in range(cfg.num_hidden_layers)]
    entries = [0] * cfg.num_hidden_layers  # per layer, as a layer's budget may be its own (pyramidkv)
    received = [torch.zeros(kv_heads, 0) for _ in entries]  # h2o: per layer, the attention each entry received
    h2o = policy.method == "h2o"

    def receive(attentions) -> None:  # [1, heads, rows, entries] per layer
        for i, weights in enumerate(attentions):
            if not full[i]:
                continue
            got = weights[0].view(kv_heads, group, weights.shape[2], -1).sum((1, 2))
            received[i] = torch.cat([received[i], torch.zeros(kv_heads, got.shape[1] - received[i].shape[1])], 1)
            received[i] += got

    def prune(num_new: int, completes: bool, attentions=None) -> None:
        for i, layer in enumerate(cache.layers):
            keep = policy.kept_entries(len(prompt), entries[i], num_new, completes, BLOCK, depths[i])
            if not full[i] or keep is None:  # a sliding window bounds the layer already: the policy leaves it alone
                continue
            votes = received[i] if h2o else None
            if attentions is not None:  # [1, heads, L, L] -> the window's rows, per KV head
                w = min(policy.window_size, entries[i])
                votes = attentions[i][0, :, -w:].view(kv_heads, group, w, -1).mean((1, 2))
            kept = policy.select(keep, entries[i], kv_heads, votes)  # [kv_heads, keep]
            if h2o:
                received[i] = received[i].gather(1, kept)
            index = kept[None, :, :, None].expand(1, kv_heads, keep, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
            if policy.cache_positions:  # the moved keys rotated back by the distance they moved
                cos, sin = model.model.rotary_emb(layer.keys, torch.tensor([[entries[i] - keep]]))
                moved = layer.keys[:, :, policy.num_sinks :]
                half = moved.shape[-1] // 2
                layer.keys[:, :, policy.num_sinks :] = moved * cos - torch.cat([-moved[..., half:], moved[..., :half]],
                                                                               -1) * sin
            entries[i] = keep

    with torch.no_grad():
        cache, tokens = None, []
        for start in range(0, len(prompt), chunk or len(prompt)):
            ids = prompt[start : start + (chunk or len(prompt))]
            positions = torch.arange(start, start + len(ids))
            out = model(torch.tensor([ids]), cache=cache, position_ids=positions[None], cache_position=positions,
                        use_cache=True, output_attentions=policy.needs_votes or h2o)
            cache, entries[:] = out.past_key_values, [e + len(ids) for e in entries]
            if h2o:
                receive(out.attentions)
            prune(len(ids), start + len(ids) == len(prompt), out.attentions if policy.needs_votes else None)
        logits = out.logits[0, -1]
        if policy.method == "pyramidkv":
            # A decode row needs no mask, and SDPA takes none, where layers now hold different numbers of entries:
            # transformers sizes one mask for all layers by the first.
            model.set_attn_implementation("sdpa")
        for position in range(len(prompt), len(prompt) + max_tokens):
            tokens.append(int(logits.argmax()))
            ids = torch.tensor([[tokens[-1]]])
            if policy.cache_positions:  # its place in the cache
                position = entries[0]
            out = model(ids, cache=cache, position_ids=torch.tensor([[position]]),
                        cache_position=torch.tensor([position]), use_cache=True, output_attentions=h2o)
            entries[:] = [e + 1 for e in entries]
            if h2o:
                receive(out.attentions)
            prune(1, True)
            logits = out.logits[0, -1]
    return tokens


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _record_scores(monkeypatch) -> dict:
    """Filled as engines run: every compaction's scores (H2O's), layer by layer, by the sequence's prompt length and
    the tokens computed then."""
    from nimblelm.engine.model_runner import ModelRunner

    scores, at = {}, []
    compact, select = ModelRunner._compact, KVPolicy.select

    def recording_compact(self, req_id, n, plan, batch):
        state = self.seqs[req_id]
        at[:] = [(state.num_prompt_tokens, state.num_computed_tokens + n)]
        return compact(self, req_id, n, plan, batch)

    def recording_select(self, keep, n, heads, votes, *args):
        if votes is not None:
            scores.setdefault(at[0], []).append(votes.clone())
        return select(self, keep, n, heads, votes, *args)

    monkeypatch.setattr(ModelRunner, "_compact", recording_compact)
    monkeypatch.setattr(KVPolicy, "select", recording_select)
    return scores


def _assert_same_scores(alone: dict, drafted: dict) -> None:
    """The scores a run with drafts compacted by are the token-at-a-time run's, up to the order of float sums."""
    assert alone and alone.keys() == drafted.keys()
    for key, layers in alone.items():
        assert len(layers) == len(drafted[key])
        for a, b in zip(layers, drafted[key]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


POLICIES = [
    {"method": "streaming", "budget": 64},
    {"method": "streaming", "ratio": 0.3, "num_sinks": 8},
    {"method": "snapkv", "ratio": 0.25, "window_size": 32},
    {"method": "snapkv", "budget": 100, "window_size": 48, "kernel_size": 7},
    {"method": "pyramidkv", "ratio": 0.25, "window_size": 16, "beta": 4},
    {"method": "h2o", "budget": 64, "window_size": 32},
]


@pytest.mark.parametrize("options", POLICIES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_greedy_matches_transformers_with_the_same_cache(tiny_qwen, options):
    prompt = _prompt(300)
    ref = _hf_reference(tiny_qwen, prompt, KVPolicy.from_dict(options), 40)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options)
    assert _generate(llm, [prompt], 40) == [ref]
    full = _generate(LLM(str(tiny_qwen), dtype="float32", max_model_len=512), [prompt], 40)
    assert full != [ref], "the policy changed nothing: the test cannot tell a kept entry from a dropped one"


def test_h2o_without_the_kernels_matches_transformers(tiny_qwen, monkeypatch):
    """torch's second pass over the keys for H2O's sums (prefill and decode), where the kernels add them up as
    they attend."""
    from nimblelm.kernels import cpu_ops

    monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
    cpu_ops.cache_clear()
    try:
        prompt = _prompt(300)
        llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=POLICIES[5])
        assert not llm.llm_engine.runner.kernels
        assert _generate(llm, [prompt], 40) == [_hf_reference(tiny_qwen, prompt, KVPolicy.from_dict(POLICIES[5]), 40)]
    finally:
        monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS")
        cpu_ops.cache_clear()


def test_streaming_with_cache_positions_generates_past_max_model_len(tiny_qwen):
    """StreamingLLM's positions: a token's place in the cache. 200 prompt tokens and 300 more run in a 256-position
    model, as the reference does with keys rotated back where they move."""
    options = {"method": "streaming", "budget": 64, "cache_positions": True}
    prompt = _prompt(200)
    ref = _hf_reference(tiny_qwen, prompt, KVPolicy.from_dict(options), 300)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_policy=options)
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and list(out.token_ids) == ref
    plain = LLM(str(tiny_qwen), dtype="float32", max_model_len=256, kv_policy=options | {"cache_positions": False})
    assert len(plain.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids) == 56


@pytest.mark.parametrize("options", POLICIES[:4:2] + POLICIES[5:], ids=["streaming", "snapkv", "h2o"])
def test_per_chunk_compacts_between_a_prompts_chunks(tiny_qwen, options):
    """per_chunk: each 64-token chunk of the prompt attends to what the policy kept of those before it, as the
    reference does when it prunes its cache between the chunks it feeds."""
    options = options | {"per_chunk": True}
    prompt = _prompt(300)
    ref = _hf_reference(tiny_qwen, prompt, KVPolicy.from_dict(options), 24, chunk=64)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options, max_num_batched_tokens=64)
    assert _generate(llm, [prompt], 24) == [ref]
    whole = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options | {"per_chunk": False},
                max_num_batched_tokens=64)
    assert _generate(whole, [prompt], 24) != [ref]


@pytest.mark.parametrize("options", POLICIES[::2] + POLICIES[5:], ids=["streaming", "snapkv", "pyramidkv", "h2o"])
def test_gemma3_compacts_its_global_layers_only(tmp_path_factory, options):
    """Gemma 3's sliding layers keep their window (their groups untouched); the global layer is compacted."""
    folder = make_tiny_hf_model(tmp_path_factory.mktemp("gemma3") / "hf", "gemma3", initializer_range=0.05)
    prompt = _prompt(300)
    ref = _hf_reference(folder, prompt, KVPolicy.from_dict(options), 30)
    llm = LLM(str(folder), dtype="float32", max_model_len=512, kv_policy=options)
    assert _generate(llm, [prompt], 30) == [ref]
    assert _generate(LLM(str(folder), dtype="float32", max_model_len=512), [prompt], 30) != [ref]


def test_gemma3_h2o_with_drafts_keeps_the_policys_output(tmp_path_factory, monkeypatch):
    """H2O's scores on Gemma 3, whose KV groups (five sliding, one global) share their KV tensors: drafts from the
    model itself on a full cache, some kept, score the global layer's entries as a token-at-a-time run does."""
    folder = str(make_tiny_hf_model(tmp_path_factory.mktemp("gemma3") / "hf", "gemma3", initializer_range=0.05))
    prompts = [_prompt(300, seed=1), _prompt(150, seed=2)]
    scores = _record_scores(monkeypatch)
    alone = _generate(LLM(folder, dtype="float32", max_model_len=512, kv_policy=POLICIES[5]), prompts, 40)
    scores_alone = dict(scores)
    scores.clear()
    llm = LLM(folder, dtype="float32", max_model_len=512, kv_policy=POLICIES[5],
              speculative_config={"method": "draft_model", "num_speculative_tokens": 3, "model": folder})
    llm.llm_engine.runner.step_cost = None
    assert _generate(llm, prompts, 40) == alone
    _assert_same_scores(scores_alone, scores)
    spec = llm.llm_engine.stats().spec
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens


@pytest.mark.parametrize("options", POLICIES[::2] + POLICIES[5:], ids=["streaming", "snapkv", "pyramidkv", "h2o"])
def test_chunking_batching_and_prefix_cache_keep_the_output(tiny_qwen, options):
    """A prompt's chunks (the last keeps snapkv's window whole), a batch of prompts of different lengths, and a
    prompt whose start another left cached give what one prompt alone gives. H2O turns prefix caching off: its
    blocks hold what their own sequence's queries gave them."""
    prompts = [_prompt(310, seed=1), _prompt(150, seed=2), _prompt(310, seed=1)[:200] + _prompt(90, seed=3)]
    alone = [_generate(LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options), [p], 24)[0]
             for p in prompts]
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options, max_num_batched_tokens=100)
    assert _generate(llm, prompts[:2], 24) == alone[:2]
    assert _generate(llm, prompts[2:], 24) == alone[2:]  # its first 192 tokens cached by the first prompt
    manager = llm.llm_engine.kv_cache_manager
    assert manager.num_hit_tokens >= 192 if options["method"] != "h2o" else manager.num_hit_tokens == 0
    assert manager.num_free_blocks == manager.num_blocks


def test_compaction_frees_blocks_during_the_run(tiny_qwen):
    """Once the prompt is in, a sequence holds its budget's blocks, not its context's; streaming keeps it there
    while it decodes."""
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy={"method": "streaming", "budget": 64})
    engine = llm.llm_engine
    engine.add_request("a", {"prompt_token_ids": _prompt(400)}, SamplingParams(max_tokens=100, temperature=0,
                                                                               ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        seqs = list(engine.scheduler.seqs.values())
        if seqs and seqs[0].num_computed_tokens >= 400:
            held.append(len(engine.kv_cache_manager.block_ids(seqs[0])[0]))
    assert held and max(held) <= -(-(64 + 2 * BLOCK) // BLOCK)  # budget plus a growing block, rounded up
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks


def test_preempted_sequences_finish_and_return_every_block(tiny_qwen):
    """32 blocks hold one 300-token prompt (19 blocks) and its compaction's 4; compacted, several decode at
    once until their growth preempts some, which are recomputed whole and compacted again."""
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, num_kv_blocks=32,
              kv_policy={"method": "snapkv", "budget": 64, "window_size": 32})
    outs = _generate(llm, [_prompt(300, seed=s) for s in range(4)], 150)
    assert all(len(o) == 150 for o in outs)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache_manager.num_free_blocks == engine.kv_cache_manager.num_blocks


@pytest.mark.parametrize("options, message", [
    ({"method": "h3o", "ratio": 0.2}, "method 'h3o'"),
    ({"method": "snapkv"}, "either 'budget'"),
    ({"method": "snapkv", "budget": 10, "ratio": 0.2}, "either 'budget'"),
    ({"method": "snapkv", "budget": 10}, "at least window_size"),
    ({"method": "streaming", "ratio": 1.5}, "ratio must be in (0, 1)"),
    ({"method": "snapkv", "ratio": 0.2, "kernel_size": 4}, "kernel_size must be odd"),
    ({"method": "snapkv", "ratio": 0.2, "windows": 4}, "unknown option(s) windows"),
])
def test_bad_policies_get_one_clear_error(options, message):
    with pytest.raises(InvalidRequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KVPolicy.from_dict(options)


def test_a_window_wider_than_a_step_is_refused(tiny_qwen):
    with pytest.raises(InvalidRequestError, match="window of 64 tokens must fit"):
        LLM(str(tiny_qwen), kv_policy={"method": "snapkv", "ratio": 0.2}, max_num_batched_tokens=32, max_num_seqs=8)


class _Answers:
    """A chain proposer that knows the answers: every draft is kept, so steps would run past the token whose step
    compacts (streaming's every block while decoding) unless the scheduler stops the drafts before it."""

    observes = False
    pass_seconds = 0.0

    def __init__(self, prompts: list[list[int]], answers: list[list[int]], k: int):
        self.answers, self.k = {tuple(p): a for p, a in zip(prompts, answers)}, k

    def propose_all(self, requests):
        out = {}
        for req_id, (tokens, prompt_len, room) in requests.items():
            drafts = self.answers[tuple(tokens[:prompt_len])][len(tokens) - prompt_len :][: min(self.k, room)]
            if drafts:
                out[req_id] = drafts
        return out

    def forget(self, req_ids) -> None:
        pass


SPECULATIVE = [{"method": "ngram", "num_speculative_tokens": 3},
               {"method": "draft_model", "num_speculative_tokens": 3},  # the target itself, on a full cache
               {"method": "layer_skip", "num_speculative_tokens": 3, "skip_layers": [1]}]


@pytest.mark.parametrize("options", [*POLICIES[::2], POLICIES[5]], ids=["streaming", "snapkv", "pyramidkv", "h2o"])
@pytest.mark.parametrize("speculative", [None, *SPECULATIVE], ids=["answers", "ngram", "draft_model", "layer_skip"])
def test_speculative_decoding_keeps_the_policys_output(tiny_qwen, options, speculative, monkeypatch):
    """Drafts verified on a compacted cache give the policy's token-at-a-time output; a step that compacts
    verifies none, so every row attends to the cache the plain run holds at that token. With drafts that are
    the answers (every one kept), a multi-token step reaches each of streaming's decode compactions. H2O's
    scores count the attention of the kept drafts' rows only (ngram's are all rejected here, layer_skip's
    some)."""
    prompts, max_tokens = [_prompt(300, seed=1), _prompt(150, seed=2)], 60
    scores = _record_scores(monkeypatch)
    alone = _generate(LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options), prompts, max_tokens)
    scores_alone = dict(scores)
    scores.clear()
    config = speculative or SPECULATIVE[0]
    if config["method"] == "draft_model":
        config = {**config, "model": str(tiny_qwen)}
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options, speculative_config=config)
    runner = llm.llm_engine.runner
    runner.step_cost = None  # every draft verified, whatever a step costs
    if speculative is None:
        runner.proposer = _Answers(prompts, alone, 3)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == alone
    if options["method"] == "h2o":
        _assert_same_scores(scores_alone, scores)
    spec = [o.metrics.spec for o in outs]
    assert sum(s.num_draft_tokens for s in spec) > 0  # ngram's drafts are all rejected here: rolled back
    if speculative is None:
        assert sum(s.num_accepted_tokens for s in spec) > 40
    manager = llm.llm_engine.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int4"])
@pytest.mark.parametrize("options", [POLICIES[0], POLICIES[5]], ids=["streaming", "h2o"])
def test_token_trees_keep_the_policys_output(tiny_qwen, tmp_path, options, kv_cache_dtype, monkeypatch):
    """Medusa's token trees, drafted by an oracle of the policy's own answers so that branches off the chain are
    kept too (copied into the sequence's slots of a compacted table); H2O's scores count the kept path's rows,
    whose weights a node off the chain left in its branch's scratch blocks (over an int4 cache: at the consecutive
    entries its branch's rows took)."""
    from test_speculative_medusa import _write
    from test_speculative_tree import _Oracle

    from nimblelm.models.loader import load_model

    prompts = [_prompt(200, seed=3), _prompt(120, seed=4)]
    base = {"dtype": "float32", "max_model_len": 512, "kv_policy": options, "kv_cache_dtype": kv_cache_dtype}
    scores = _record_scores(monkeypatch)
    alone = _generate(LLM(str(tiny_qwen), **base), prompts, 60)
    scores_alone = dict(scores)
    scores.clear()
    heads = _write(tmp_path / "zero.medusa.safetensors", 3, load_model(str(tiny_qwen)).weights["model.norm.weight"])
    tree = [[0], [0, 0], [0, 0, 0], [1], [1, 0], [1, 0, 0], [2]]
    llm = LLM(str(tiny_qwen), **base, speculative_config={
        "method": "medusa", "num_speculative_tokens": 3, "model": str(heads), "speculative_token_tree": tree})
    runner = llm.llm_engine.runner
    runner.proposer = _Oracle({tuple(p): a for p, a in zip(prompts, alone)}, runner.config.vocab_size)
    runner.step_cost = None
    assert _generate(llm, prompts, 60) == alone
    if options["method"] == "h2o":
        _assert_same_scores(scores_alone, scores)
    assert runner.proposer.steps > 20


def test_h2o_with_drafts_without_the_kernels_keeps_the_policys_output(tiny_qwen, monkeypatch):
    """torch's pass over the decode rows' keys adds each draft's rows into its own region, as the kernel does."""
    from nimblelm.kernels import cpu_ops

    monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
    cpu_ops.cache_clear()
    try:
        prompts = [_prompt(300, seed=1)]
        alone = _generate(LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=POLICIES[5]), prompts, 40)
        llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=POLICIES[5],
                  speculative_config=SPECULATIVE[2])
        assert not llm.llm_engine.runner.kernels
        llm.llm_engine.runner.step_cost = None
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)[0]
        assert [list(out.outputs[0].token_ids)] == alone
        assert 0 < out.metrics.spec.num_accepted_tokens < out.metrics.spec.num_draft_tokens  # some kept, some not
    finally:
        monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS")
        cpu_ops.cache_clear()


@pytest.mark.parametrize("method", ["draft_model", "lookahead"])
@pytest.mark.parametrize("kv_cache_dtype,kernels", [("int4", True), ("int2", False)], ids=["int4-kernels", "int2-torch"])
def test_h2o_with_drafts_over_a_low_bit_cache(tiny_qwen, kv_cache_dtype, kernels, method, monkeypatch):
    """A low-bit cache verifies drafts as a prompt chunk's last rows: each adds into its draft's region (where the
    fused kernel would sum the chunk's rows into one), and the kept ones are folded in as on a float cache. The
    draft model is the target on a full cache (most drafts kept, not all on a low-bit one); lookahead's token trees
    sit at consecutive entries there (test_token_trees_keep_the_policys_output keeps branches off their chains):
    plain H2O decoding's output, and every compaction's scores."""
    from nimblelm.kernels import cpu_ops

    if not kernels:
        monkeypatch.setenv("NIMBLELM_DISABLE_KERNELS", "1")
        cpu_ops.cache_clear()
    try:
        prompts, options = [_prompt(200, seed=1), _prompt(120, seed=2)], {
            "dtype": "float32", "max_model_len": 512, "kv_policy": POLICIES[5], "kv_cache_dtype": kv_cache_dtype}
        scores = _record_scores(monkeypatch)
        alone = _generate(LLM(str(tiny_qwen), **options), prompts, 50)
        scores_alone = dict(scores)
        scores.clear()
        speculative = {"method": method, "num_speculative_tokens": 3}
        if method == "draft_model":
            speculative["model"] = str(tiny_qwen)
        llm = LLM(str(tiny_qwen), **options, speculative_config=speculative)
        assert llm.llm_engine.runner.kernels == kernels
        llm.llm_engine.runner.step_cost = None
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == alone
        _assert_same_scores(scores_alone, scores)
        spec = [o.metrics.spec for o in outs]
        assert 0 < sum(s.num_accepted_tokens for s in spec) < sum(s.num_draft_tokens for s in spec)
    finally:
        monkeypatch.delenv("NIMBLELM_DISABLE_KERNELS", raising=False)
        cpu_ops.cache_clear()


@pytest.mark.integration
@pytest.mark.parametrize("method", ["snapkv", "streaming"])
def test_kept_entries_and_greedy_output_match_kvpress(smollm2_hf, kvpress_on_smollm2, method, monkeypatch):
    """On the packaged SmolLM2-135M (float32), every layer and KV head keeps the very positions kvpress's press
    keeps, and the greedy tokens match kvpress's up to its end of sequence. 320 tokens at ratio 0.25 keep 80,
    which leaves the next position on a block boundary: no entries beyond kvpress's count. kvpress compresses
    the prompt only: streaming's first compaction while decoding (a block past the budget) ends the comparison
    after 16 tokens."""
    folder, ids = smollm2_hf
    prompt = ids[:320]
    chosen = []
    select = KVPolicy.select
    monkeypatch.setattr(KVPolicy, "select", lambda self, *a: chosen.append(select(self, *a)) or chosen[-1])
    llm = LLM(str(folder), dtype="float32", max_model_len=1024, kv_policy={"method": method, "ratio": 0.25})
    ours = _generate(llm, [prompt], 24)[0]
    kept, theirs = kvpress_on_smollm2[method]  # the same prompt, ratio and press
    assert len(kept) == 30 and len(chosen) == (30 if method == "snapkv" else 2)  # streaming: one choice for all
    for layer, kept_here in enumerate(kept):
        assert kept_here.shape == (3, 80)
        assert torch.equal(chosen[layer if method == "snapkv" else 0], kept_here), f"layer {layer}"
    assert len(theirs) >= 8 and ours[: len(theirs)] == theirs


@pytest.fixture(scope="module")
def kvpress_on_gemma3():
    """A 320-token prompt in Gemma 3 270M's tokens, and kvpress's SnapKV and StreamingLLM at ratio 0.25 on the
    model exported to transformers as the bench does, from one worker: by method, (kept, 16 greedy tokens)."""
    from nimblelm.bench.backends import BenchContext
    from nimblelm.bench.vllm_peer import ensure_hf_folder

    ctx = BenchContext(model="gemma3-270m")
    text = " ".join(f"Crate {i} holds {i * 7 % 13} red and {i * 5 % 11} blue marbles." for i in range(100))
    prompt = ctx.tokenizer.encode(text, add_special_tokens=False)[:320]
    methods = ["snapkv", "streaming"]
    answers = kvpress_peer.kept_each(ensure_hf_folder(ctx), [(prompt, m, 0.25, {}) for m in methods], 16)
    return prompt, dict(zip(methods, answers))


@pytest.mark.integration
@pytest.mark.parametrize("method", ["snapkv", "streaming"])
def test_gemma3_global_layers_keep_what_kvpress_keeps(kvpress_on_gemma3, method, monkeypatch):
    """Gemma 3 270M (float32): the policy compacts its 3 global layers of 18, and kvpress's press, skipping the
    sliding layers as kvpress does for Gemma 3's multimodal model, keeps the very same positions there and every
    position elsewhere; the greedy tokens match."""
    prompt, answers = kvpress_on_gemma3
    chosen = []
    select = KVPolicy.select
    monkeypatch.setattr(KVPolicy, "select", lambda self, *a: chosen.append(select(self, *a)) or chosen[-1])
    llm = LLM("gemma3-270m", dtype="float32", max_model_len=1024, kv_policy={"method": method, "ratio": 0.25})
    ours = _generate(llm, [prompt], 24)[0]
    kept, theirs = answers[method]
    globals_ = [i for i, window in enumerate(llm.model_config.layer_windows) if window is None]
    assert len(kept) == 18 and globals_ == [5, 11, 17]
    for layer, kept_here in enumerate(kept):
        if layer not in globals_:
            assert kept_here.tolist() == [list(range(320))], f"layer {layer}"
            continue
        ours_kept = chosen[globals_.index(layer) if method == "snapkv" else 0]  # streaming: one choice for all
        assert kept_here.shape == (1, 80) and torch.equal(ours_kept, kept_here), f"layer {layer}"
    assert len(theirs) >= 8 and ours[: len(theirs)] == theirs


@pytest.mark.integration
def test_pyramidkv_keeps_what_kvpress_keeps_in_every_layer(smollm2_hf, kvpress_on_smollm2, monkeypatch):
    """PyramidKV on SmolLM2-135M: each layer's budget (140 entries in the first layer down to 20 in the last, with
    window_size 16 and beta 4 on 320 tokens at ratio 0.25) and its choice per KV head are kvpress's. Ours keeps up
    to block_size - 1 entries more, the next best by the same scores, so that its next position starts a block."""
    folder, ids = smollm2_hf
    prompt, params = ids[:320], {"window_size": 16, "kernel_size": 5, "beta": 4}
    chosen = []
    select = KVPolicy.select
    monkeypatch.setattr(KVPolicy, "select", lambda self, *a: chosen.append(select(self, *a)) or chosen[-1])
    llm = LLM(str(folder), dtype="float32", max_model_len=1024, kv_policy={"method": "pyramidkv", "ratio": 0.25,
                                                                             **params})
    _generate(llm, [prompt], 1)
    kept = kvpress_on_smollm2["pyramidkv"][0]  # the same prompt, ratio and params
    assert len(chosen) == len(kept) == 30
    assert kept[0].shape[1] == 140 and kept[-1].shape[1] == 20
    for layer, (ours, theirs) in enumerate(zip(chosen, kept)):
        assert 0 <= ours.shape[1] - theirs.shape[1] < BLOCK, f"layer {layer}"
        for head_ours, head_theirs in zip(ours.tolist(), theirs.tolist()):
            assert set(head_theirs) <= set(head_ours), f"layer {layer}"


def test_cli_and_server_take_a_policy(tiny_qwen):
    """--kv-policy reaches the engine from `generate` and `serve`: both give the API's greedy tokens for a prompt
    the policy compacts; a bad policy is one line and exit status 1."""
    import json
    import subprocess
    import sys

    from server_process import ServerProcess

    options = POLICIES[2]
    prompt = _prompt(300)
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text
    full = LLM(str(tiny_qwen), dtype="float32", max_model_len=512).generate([{"prompt_token_ids": prompt}], params,
                                                                           use_tqdm=False)[0].outputs[0].text
    assert want != full
    server = ServerProcess(tiny_qwen, "--dtype", "float32", "--max-model-len", "512", "--kv-policy", json.dumps(options))
    try:
        reply = server.post("/v1/completions", json={"model": str(tiny_qwen), "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want
    finally:
        server.stop()
    result = subprocess.run([sys.executable, "-m", "nimblelm", "generate", "--model", str(tiny_qwen), "--kv-policy",
                             '{"method": "snapkv"}', "hi"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: kv_policy: give either 'budget'")


def test_an_int8_cache_keeps_its_scales_with_the_entries(tiny_qwen):
    """Compaction gathers int8 K/V with their scales: after the prompt's compaction, the first layer's kept
    entries (its K/V depend on the embeddings alone) read back as the float cache's, within half a rounding
    step of their own scale. An entry moved without its scale reads back wrong by whole steps."""

    def kept_kv(kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=POLICIES[0],
                  kv_cache_dtype=kv_cache_dtype)
        engine = llm.llm_engine
        engine.add_request("a", {"prompt_token_ids": _prompt(300)}, SamplingParams(max_tokens=4, temperature=0))
        engine.step()  # the prompt, then its compaction
        seq = next(iter(engine.scheduler.seqs.values()))
        table = torch.tensor(engine.kv_cache_manager.block_ids(seq)[0])
        entries = torch.arange(seq.num_computed_tokens - engine.kv_cache_manager.dropped_blocks(seq)[0] * BLOCK)
        slots = table[entries // BLOCK] * BLOCK + entries % BLOCK
        cache = engine.runner.kv_caches[0]
        values = cache.values.flatten(1, 2)[:, slots].float()  # [2, entries, kv_heads, head_dim]
        scales = None if cache.scales is None else cache.scales.flatten(1, 2)[:, slots]
        return values, scales

    exact, _ = kept_kv("auto")
    rounded, scales = kept_kv("int8")
    assert exact.shape[1] == 64 + (300 - 64) % BLOCK
    error = (rounded * scales[..., None] - exact).abs()
    assert (error <= scales[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("options", POLICIES[::2] + POLICIES[5:], ids=["streaming", "snapkv", "pyramidkv", "h2o"])
def test_a_full_pool_compacts_in_place(tiny_qwen, options):
    """A pool that holds a 300-token prompt and no room for fresh blocks (20 per group: pyramidkv's layers are a
    group each), or prefix caching off, which needs none: the kept entries are gathered into the sequence's own
    first blocks, with the output of a roomy pool, where they are gathered into fresh ones."""
    prompt = _prompt(300)
    blocks = 20 * (2 if options["method"] == "pyramidkv" else 1)
    roomy = LLM(str(tiny_qwen), dtype="float32", max_model_len=320, kv_policy=options)
    tight = LLM(str(tiny_qwen), dtype="float32", max_model_len=320, kv_policy=options, num_kv_blocks=blocks)
    uncached = LLM(str(tiny_qwen), dtype="float32", max_model_len=320, kv_policy=options, enable_prefix_caching=False)
    want = _generate(roomy, [prompt], 16)
    assert _generate(tight, [prompt], 16) == want and _generate(uncached, [prompt], 16) == want
    assert tight.llm_engine.kv_cache_manager.num_free_blocks == blocks


def test_prompts_start_when_they_fit_whole(tiny_qwen):
    """40 blocks hold two 300-token prompts (19 blocks each) until their compaction: chunked prompts start only
    when all of them fits beside the others still prefilling, so none preempts another; compacted, they decode
    side by side."""
    options = {"method": "streaming", "budget": 64}
    prompts = [_prompt(300, seed=s) for s in range(6)]
    alone = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options)
    want = [_generate(alone, [p], 24)[0] for p in prompts]
    llm = LLM(str(tiny_qwen), dtype="float32", max_model_len=512, kv_policy=options, num_kv_blocks=40,
              max_num_batched_tokens=128)  # without the rule: 2 preemptions
    assert _generate(llm, prompts, 24) == want
    assert llm.llm_engine.scheduler.num_preemptions == 0
