"""Disaggregated prefill and decode: a prompt's KV blocks computed by one engine, imported by another, which must
then generate exactly what an engine that computed the prompt itself generates (float32: identical greedy tokens,
log-probabilities to float rounding) while computing only the prompt's last, partial block."""

import concurrent.futures
import json
import re

import httpx2 as httpx
import pytest
from server_process import ServerProcess
from tiny_models import make_tiny_hf_model

from nimblelm import LLM, InvalidRequestError, SamplingParams
from nimblelm.cli import main

PROMPTS = [
    "Rivers flow to the sea, mountains rise toward the sky, and forests cover the rolling hills. " * 3,
    "The scheduler decides which sequences run, and the model runner decides how they run on the device.",
]
PARAMS = SamplingParams(max_tokens=16, temperature=0, logprobs=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("disagg")
    return {arch: str(make_tiny_hf_model(root / arch, arch=arch, initializer_range=0.3)) for arch in ("qwen2", "gemma3")}


def _same(ref, out) -> None:
    for a, b in zip(ref, out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            token = next(iter(x))
            assert abs(x[token].logprob - y[token].logprob) < 1e-4 * max(1.0, abs(x[token].logprob))


@pytest.mark.parametrize("arch,options", [
    ("qwen2", {}),
    ("gemma3", {}),  # sliding-window layers: only the window's blocks travel for them
    ("qwen2", {"kv_cache_dtype": "int8"}),  # scales travel with the values
    ("qwen2", {"tensor_parallel_size": 2}),  # each rank's heads to the same rank of the other engine
    ("qwen2", {"kv_cache_dtype": "int4", "kv_residual_length": 32}),  # packed levels, their scales and minimums
])
def test_imported_prefix_decodes_as_if_computed_here(tiny, arch, options):
    """A low-bit cache reads a prefix cache hit as stored (layers/kivi.py), where a prompt computed whole reads its
    residual at full precision: its reference is the exporting engine's own run through its cached blocks."""
    options = {"dtype": "float32", "max_model_len": 256, **options}
    lowbit = options.get("kv_cache_dtype") == "int4"
    ref = None if lowbit else LLM(tiny[arch], **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    prefill, decode = LLM(tiny[arch], **options), LLM(tiny[arch], **options)
    prefill.generate(PROMPTS, SamplingParams(max_tokens=1), use_tqdm=False)
    written = sum(decode.llm_engine.import_prefix(prefill.llm_engine.export_prefix(p)) for p in PROMPTS)
    assert written > 0
    if lowbit:
        ref = prefill.generate(PROMPTS, PARAMS, use_tqdm=False)
        with pytest.raises(AssertionError):  # the hit read as stored moves the log-probabilities: the test can tell
            _same(ref, LLM(tiny[arch], **options).generate(PROMPTS, PARAMS, use_tqdm=False))
    _same(ref, decode.generate(PROMPTS, PARAMS, use_tqdm=False))
    stats = decode.llm_engine.stats()
    bs = decode.llm_engine.config.block_size
    lengths = [len(decode.tokenizer.encode(p)) for p in PROMPTS]
    assert stats.prefix_cache_hits == sum((n - 1) // bs * bs for n in lengths)  # only the last block computed


@pytest.mark.parametrize("other", [{"kv_cache_dtype": "float16"}, {"dtype": "bfloat16", "kv_cache_dtype": "float32"}],
                         ids=["cache dtype", "weights dtype"])
def test_blocks_from_another_layout_are_refused(tiny, other):
    prefill = LLM(tiny["qwen2"], dtype="float32", max_model_len=256)
    prefill.generate(PROMPTS[0], SamplingParams(max_tokens=1), use_tqdm=False)
    prefix = prefill.llm_engine.export_prefix(PROMPTS[0])
    with pytest.raises(InvalidRequestError, match="differ"):
        LLM(tiny["qwen2"], **{"dtype": "float32", "max_model_len": 256, **other}).llm_engine.import_prefix(prefix)


@pytest.mark.slow
def test_prefill_and_decode_instances_on_ray(tiny, local_ray):
    from nimblelm.distributed.disaggregated import DisaggregatedLLM, colocated, serve_online

    options = {"dtype": "float32", "max_model_len": 256}
    ref = LLM(tiny["qwen2"], **options).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = DisaggregatedLLM(tiny["qwen2"], **options)
    _same(ref, llm.generate(PROMPTS, PARAMS))
    prefill_stats, decode_stats = llm.stats()
    assert decode_stats.prefix_cache_hits > 0 and prefill_stats.prefix_cache_hits == 0
    # Online: each request handed to the decode instance once prefilled, timed from its arrival.
    online = llm.serve([(p, PARAMS, 0.05 * i) for i, p in enumerate(PROMPTS)])
    _same(ref, online)
    assert all(o.metrics.arrival_time < o.metrics.first_token_time < o.metrics.finished_time for o in online)
    llm.close()
    engine = colocated(tiny["qwen2"], cpus=1, **options)
    _same(ref, serve_online([(p, PARAMS, 0.0) for p in PROMPTS], engine))
    local_ray.kill(engine)


@pytest.mark.slow
def test_a_server_with_a_prefill_instance(tiny):
    """`nimblelm serve --disaggregated-prefill`: every prompt computed on the prefill instance first, its blocks
    imported by the server's engine (prefix-cache hits), which answers, streams and refuses as one engine does."""
    model = tiny["qwen2"]
    params = SamplingParams(max_tokens=16, temperature=0)
    ref = LLM(model, dtype="float32", max_model_len=256).generate(PROMPTS, params, use_tqdm=False)
    server = ServerProcess(model, "--dtype", "float32", "--max-model-len", "256", "--disaggregated-prefill",
                           "--prefill-threads", "1", "--threads", "1", "--shutdown-timeout", "1")

    def complete(prompt, **extra) -> httpx.Response:
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, **extra}
        return httpx.post(server.base_url + "/completions", json=body, timeout=120)

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # at once: the prefill instance batches them
            answers = list(pool.map(complete, PROMPTS + PROMPTS))
        assert [a.json()["choices"][0]["text"] for a in answers] == [r.outputs[0].text for r in ref] * 2
        with httpx.stream("POST", server.base_url + "/completions", timeout=120, json={
                "model": model, "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0, "stream": True}) as stream:
            chunks = [line for line in stream.iter_lines() if line.startswith("data: {")]
        assert len(chunks) > 2
        assert "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks) == ref[1].outputs[0].text
        too_long = complete("word " * 300)
        assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
        metrics = httpx.get(server.url + "/metrics").text
        hits = float(re.search(r"^nimblelm_prefix_cache_hits_total\S* (\S+)$", metrics, re.MULTILINE).group(1))
        bs = 16  # the default block size: of each prompt, all but its last partial block came from the prefill instance
        lengths = [len(r.prompt_token_ids) for r in ref]
        assert hits >= 2 * sum((n - 1) // bs * bs for n in lengths)
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("args,message", [
    (["--prefill-threads", "1"], "with --disaggregated-prefill"),
    (["--disaggregated-prefill", "--data-parallel-size", "2"], "cannot be combined with replicas"),
])
def test_impossible_serve_options_are_one_line(tiny, args, message, capsys):
    assert main(["serve", "--model", tiny["qwen2"], *args]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
