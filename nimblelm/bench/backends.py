"""Bench backends: the same workload in, the same metrics out, so that peers are measured in one run.

A backend is measured on the weights nimblelm runs: transformers gets a model built from nimblelm's
ModelConfig with the loader's dequantized fp32 tensors, llama.cpp a GGUF written from the same file at
the same precision class. A backend that cannot run says so in one line (`check()` / BackendUnavailable)
and is skipped.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nimblelm.bench import prefix_cache
from nimblelm.bench.datasets import BenchRequest, random_prompt
from nimblelm.errors import InvalidRequestError

BACKEND_NAMES = ("nimblelm", "nimblelm-nocache", "transformers", "llama.cpp", "vllm")
_ALIASES = {"hf": "transformers", "llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp"}
DTYPES = ("float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8", "int4", "int2")


class BackendUnavailable(Exception):
    """The backend cannot run here; the message is the one-line reason shown to the user."""


def nimblelm_weights(ctx: BenchContext) -> str:
    """How nimblelm holds the linear weights under the run's options, for the report."""
    import torch

    from nimblelm.kernels import bf16_products_in_words, cpu_ops

    # On the CPU kernels a 16-bit dtype stores the float linear weights in it and computes in float32.
    half = ctx.dtype in ("bfloat16", "float16") and not torch.cuda.is_available() and cpu_ops() is not None
    compute = "float32" if half else ctx.dtype
    q = ctx.quantization
    if q == "gguf":
        weights = f"the GGUF's own linear tensors as stored (int8/int4 formats), {ctx.dtype} where a layer falls back"
    elif q:
        weights = f"{q} linear weights (quantized at load)"
    elif half:
        weights = f"{ctx.dtype} linear weights"
    else:
        return f"{ctx.dtype} (dequantized by the nimblelm loader)"
    if not half:
        return f"{weights}, {compute} activations"
    products = bf16_products_in_words() if ctx.dtype == "bfloat16" else ""
    products = f"; bfloat16 linears {products}" if products else ""
    return f"{weights}, float32 activations (the CPU kernels compute in float32{products})"


def float_only(ctx: BenchContext) -> None:
    """For a peer without CPU integer kernels (transformers, vLLM's CPU build here): skip it on a quantized run.

    Measuring it in float beside nimblelm's integer weights or KV cache would compare precisions, not engines.
    Beside a float16 KV cache it runs with its own float cache (the model's dtype), as its info says.
    """
    if ctx.quantization:
        raise BackendUnavailable(f"no CPU kernel matching nimblelm's {ctx.quantization} weights "
                                 "(run without --quantization to measure it)")
    if ctx.kv_cache_dtype in ("int8", "int4", "int2"):
        raise BackendUnavailable(f"no CPU KV cache matching nimblelm's {ctx.kv_cache_dtype} one "
                                 "(run with --kv-cache-dtype auto to measure it)")


def parse_backends(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        name = _ALIASES.get(name, name)
        if name not in BACKEND_NAMES:
            raise InvalidRequestError(
                f"unknown backend {raw.strip()!r}: choose from {', '.join(BACKEND_NAMES)}")
        if name not in names:
            names.append(name)
    if not names:
        raise InvalidRequestError("no backend given: choose from " + ", ".join(BACKEND_NAMES))
    return names


@dataclass(frozen=True)
class LatencyTest:
    """A llama-bench style test on `batch` sequences: 'pp' (a prompt of n_tokens), 'tg' (n_tokens generated),
    or 'pg' (a prompt of n_prompt tokens, then n_tokens generated: end-to-end generated tokens/s, the
    survey's batch-1 inference figure)."""

    kind: str
    n_tokens: int
    batch: int = 1
    n_prompt: int = 0

    @property
    def name(self) -> str:
        if self.kind == "pg":
            return f"pg{self.n_prompt}+{self.n_tokens}"
        return f"{self.kind}{self.n_tokens}"


@dataclass
class BenchContext:
    """What every backend of one run shares: the model, precision, threads and the loaded weights."""

    model: str
    dtype: str = "float32"
    threads: int = 1
    max_model_len: int = 2048
    max_num_seqs: int = 64
    seed: int = 0
    quantization: str | None = None  # nimblelm's LLM(quantization=...); None: unquantized weights
    kv_cache_dtype: str = "auto"  # nimblelm's LLM(kv_cache_dtype=...)
    loaded: object | None = None  # the loader's LoadedModel (config, weights, tokenizer, source)
    prompts_drawn: int = field(default=0, init=False, repr=False)  # see prompt()

    def load(self):
        if self.loaded is None:
            from nimblelm.models.loader import load_model  # the project's loader

            self.loaded = load_model(self.model)
        return self.loaded

    @property
    def config(self):
        return self.load().config

    @property
    def tokenizer(self):
        return self.load().tokenizer

    def special_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = list(getattr(tok, "all_special_ids", []) or [])
        return [i for i in ids if i is not None]

    def prompt(self, length: int, seed: int) -> list[int]:
        """Random token ids that no earlier call returned: the draw is seeded by seed and the number of
        prompts drawn before it. A prompt that repeated an earlier one, or the start of one, would be
        served from a prefix cache, and a timed prefill would compute only part of it."""
        self.prompts_drawn += 1
        return random_prompt(length, self.config.vocab_size, seed * 1_000_003 + self.prompts_drawn,
                             exclude_ids=self.special_ids())


@dataclass
class ThroughputRun:
    """One timed pass over a throughput workload."""

    elapsed_s: float
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    extra: dict = field(default_factory=dict)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    if not xs:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return xs[0], 0.0
    return statistics.fmean(xs), statistics.stdev(xs)


class Backend:
    """Base class. Subclasses implement check/load/latency_once/throughput_once/close."""

    name = "base"
    #: how the figures are obtained, for the report
    method = ""

    def __init__(self, ctx: BenchContext):
        self.ctx = ctx

    def check(self) -> None:
        """Raise BackendUnavailable with a one-line reason if this backend cannot run (cheap, no loading)."""

    def load(self) -> None:
        """Load the model (may raise BackendUnavailable)."""

    def info(self) -> dict:
        """Version, weight format and size, for the report."""
        return {}

    def weights_nbytes(self) -> int | None:
        """Bytes of weights the backend holds, if known."""
        return None

    def token_nbytes(self) -> int | None:
        """Bytes of weights a batch-1 decode step reads (for GB/s): all but an untied token table, of which
        a step reads one row."""
        return self.weights_nbytes()

    def prefix_cache_run(self) -> dict | None:
        """The prefix cache's figure over everything this backend ran since load (see bench/prefix_cache),
        or None when it exposes none."""
        return None

    def latency(self, test: LatencyTest, repeat: int, warmup: int, progress: Callable[[], None] | None = None
                ) -> list[float]:
        """tok/s of `repeat` timed runs of `test` (after `warmup` untimed ones)."""
        out = []
        for i in range(warmup + repeat):
            tps = self.latency_once(test, seed=self.ctx.seed * 1_000_003 + i)
            if i >= warmup:
                out.append(tps)
            if progress is not None:
                progress()
        return out

    def latency_once(self, test: LatencyTest, seed: int) -> float:
        raise NotImplementedError

    def throughput(self, requests: Sequence[BenchRequest]) -> ThroughputRun:
        raise NotImplementedError

    def warmup_throughput(self, concurrency: int) -> None:
        """One small untimed pass so lazy initialisation does not land in the timed run."""

    def close(self) -> None:
        gc.collect()


# --------------------------------------------------------------------------------------- nimblelm


class NimbleLMBackend(Backend):
    name = "nimblelm"
    method = ("LLM.generate; pp = batch*p/(last first_token_time - first arrival_time), max_tokens=1; "
              "tg = batch*(n-1)/(last finished_time - first first_token_time), 1-token prompts, ignore_eos")

    def __init__(self, ctx: BenchContext, prefix_caching: bool = True):
        super().__init__(ctx)
        self.llm = None
        self.prefix_caching = prefix_caching
        if not prefix_caching:
            self.name = "nimblelm-nocache"

    def check(self) -> None:
        try:
            from nimblelm import LLM, SamplingParams  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"nimblelm engine not importable ({e})") from None

    def load(self) -> None:
        from nimblelm import LLM

        self.llm = LLM(model=self.ctx.model, dtype=self.ctx.dtype, max_model_len=self.ctx.max_model_len,
                       max_num_seqs=self.ctx.max_num_seqs, num_threads=self.ctx.threads,
                       quantization=self.ctx.quantization, kv_cache_dtype=self.ctx.kv_cache_dtype,
                       enable_prefix_caching=self.prefix_caching)

    def info(self) -> dict:
        info = {"weights": nimblelm_weights(self.ctx), "quantization": self.ctx.quantization or "none",
                "kv_cache_dtype": self.ctx.kv_cache_dtype, "prefix_caching": self.prefix_caching,
                "weights_nbytes": self.weights_nbytes(), "token_nbytes": self.token_nbytes()}
        if self.llm is not None:  # what auto became
            from nimblelm.platform import KV_CACHE_DTYPES

            info["kv_cache_type"] = {v: k for k, v in KV_CACHE_DTYPES.items()}[self.llm.llm_engine.kv_dtype]
        return info

    def _cache_counters(self) -> tuple[int, int]:
        stats = self.llm.llm_engine.stats()
        return stats.prefix_cache_queries, stats.prefix_cache_hits

    def prefix_cache_run(self) -> dict | None:
        if not self.prefix_caching:
            return prefix_cache.disabled()
        return prefix_cache.counted(*self._cache_counters(), "LLMEngine.stats()")

    def weights_nbytes(self) -> int | None:
        n = getattr(self.llm, "weights_nbytes", None)
        return int(n) if n else None

    def token_nbytes(self) -> int | None:
        return self.llm.llm_engine.runner.token_nbytes if self.llm is not None else None

    def _params(self, max_tokens: int):
        from nimblelm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def latency_once(self, test: LatencyTest, seed: int) -> float:
        b = test.batch
        if test.kind == "pp":
            prompts = [self.ctx.prompt(test.n_tokens, seed * 1000 + j) for j in range(b)]
            outs = self.llm.generate(prompts, self._params(1), use_tqdm=False)
            t = max(o.metrics.first_token_time for o in outs) - min(o.metrics.arrival_time for o in outs)
            return b * test.n_tokens / t
        if test.kind == "pg":
            prompts = [self.ctx.prompt(test.n_prompt, seed * 1000 + j) for j in range(b)]
            outs = self.llm.generate(prompts, self._params(test.n_tokens), use_tqdm=False)
            t = max(o.metrics.finished_time for o in outs) - min(o.metrics.arrival_time for o in outs)
            return b * test.n_tokens / t
        prompts = [self.ctx.prompt(1, seed * 1000 + j) for j in range(b)]
        n = test.n_tokens
        outs = self.llm.generate(prompts, self._params(n), use_tqdm=False)
        for o in outs:
            got = len(o.outputs[0].token_ids)
            if got != n:
                raise RuntimeError(f"nimblelm generated {got} tokens instead of {n} with ignore_eos")
        t = max(o.metrics.finished_time for o in outs) - min(o.metrics.first_token_time for o in outs)
        return b * (n - 1) / t

    def phase_times(self, batch: int, input_len: int, output_len: int, seed: int) -> tuple[float, float, float]:
        """(prefill, decode, end-to-end) seconds of `batch` random prompts of input_len tokens, each generating
        output_len tokens: prefill = arrival to the last first token, decode = from there to the last finish."""
        prompts = [self.ctx.prompt(input_len, seed * 1000 + j) for j in range(batch)]
        outs = self.llm.generate(prompts, self._params(output_len), use_tqdm=False)
        start = min(o.metrics.arrival_time for o in outs)
        first = max(o.metrics.first_token_time for o in outs)
        end = max(o.metrics.finished_time for o in outs)
        return first - start, end - first, end - start

    def _generate_requests(self, requests: Sequence[BenchRequest]):
        prompts = [list(r.prompt_token_ids) for r in requests]
        lens = {r.output_len for r in requests}
        if len(lens) == 1:
            return self.llm.generate(prompts, self._params(lens.pop()), use_tqdm=False)
        # One SamplingParams per request (vLLM-style list); each request generates exactly its own length.
        params = [self._params(r.output_len) for r in requests]
        return self.llm.generate(prompts, params, use_tqdm=False)

    def warmup_throughput(self, concurrency: int) -> None:
        reqs = [BenchRequest(tuple(self.ctx.prompt(16, 10_000 + i)), 4) for i in range(2)]
        self._generate_requests(reqs)

    def throughput(self, requests: Sequence[BenchRequest]) -> ThroughputRun:
        before = self._cache_counters()
        t0 = time.perf_counter()
        outs = self._generate_requests(requests)
        elapsed = time.perf_counter() - t0
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs
                if getattr(o, "metrics", None) is not None]
        extra = {"mean_ttft_s": statistics.fmean(ttft)} if ttft else {}
        extra["prefix_cache"] = (prefix_cache.delta(before, self._cache_counters(), "LLMEngine.stats()")
                                 if self.prefix_caching else prefix_cache.disabled())
        return ThroughputRun(elapsed, prompt_tokens, out_tokens, len(outs), extra)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        shutdown = getattr(llm, "shutdown", None) or getattr(llm, "close", None)
        if callable(shutdown):
            shutdown()
        del llm
        super().close()


# ------------------------------------------------------------------------------------ transformers


def hf_model_from(cfg, weights: dict, dtype: str = "float32"):
    """A transformers causal LM holding exactly `weights` (HF-named tensors, shared where the dtype is theirs),
    in eval mode, built by transformers' own loading so that every buffer outside the weights is its own."""
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.utils import logging

    from nimblelm.models.hf_config import hf_config_from

    hf_cfg = hf_config_from(cfg, dtype)
    state = {k: v for k, v in weights.items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model, info = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_cfg)].from_pretrained(
            None, config=hf_cfg, state_dict=state, dtype=getattr(torch, dtype), attn_implementation="sdpa",
            output_loading_info=True)
    finally:
        if bars:
            logging.enable_progress_bar()
    missing = [k for k in info["missing_keys"] if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or info["unexpected_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"weights do not match the transformers model: missing {missing[:3]}, "
                           f"unexpected {sorted(info['unexpected_keys'])[:3]}, "
                           f"mismatched {sorted(info['mismatched_keys'])[:3]}")
    return model.eval()


class _StepClock:
    """A StoppingCriteria that records when each generated token is appended (never stops)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class TransformersBackend(Backend):
    name = "transformers"
    method = ("model.generate (greedy, min_new_tokens = max_new_tokens); pp = batch*p / time to the first "
              "generated token; tg = batch*(n-1) / time from the first to the last generated token")

    def __init__(self, ctx: BenchContext, batch_size: int | None = None):
        super().__init__(ctx)
        self.model = None
        self.batch_size = batch_size  # throughput: requests per static generate batch (None: all)

    def check(self) -> None:
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"transformers not installed ({e})") from None
        float_only(self.ctx)

    def load(self) -> None:
        from nimblelm.errors import UnsupportedModelError

        lm = self.ctx.load()
        try:
            self.model = hf_model_from(lm.config, lm.weights, self.ctx.dtype)
        except UnsupportedModelError as e:
            raise BackendUnavailable(str(e)) from None
        tok = lm.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            eos = list(lm.config.eos_token_ids)
            pad = eos[0] if eos else 0
        self.pad_id = int(pad)

    def prefix_cache_run(self) -> dict | None:
        return prefix_cache.disabled()  # generate() starts every batch from an empty cache

    def info(self) -> dict:
        import transformers

        return {"version": transformers.__version__,
                "weights": f"{self.ctx.dtype} (the nimblelm loader's tensors, load_state_dict)",
                "kv_cache_dtype": self.ctx.dtype, "weights_nbytes": self.weights_nbytes()}

    def weights_nbytes(self) -> int | None:
        if self.model is None:
            return None
        seen, total = set(), 0
        for p in self.model.parameters():  # tied parameters appear once
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
        return total

    def token_nbytes(self) -> int | None:
        total = self.weights_nbytes()
        if total is None:
            return None
        table, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight
        return total if table.data_ptr() == head.data_ptr() else total - table.numel() * table.element_size()

    def _generate(self, batch_ids: list[list[int]], new_tokens: int):
        """Left-padded batched greedy generate of exactly new_tokens; returns (t0, clock, output)."""
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(x) for x in batch_ids)
        ids = torch.full((len(batch_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for i, x in enumerate(batch_ids):
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        clock = _StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=self.pad_id,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        t_end = time.perf_counter()
        got = out.shape[1] - width
        if got != new_tokens:
            raise RuntimeError(f"transformers generated {got} tokens instead of {new_tokens}")
        return t0, clock.times, t_end

    def latency_once(self, test: LatencyTest, seed: int) -> float:
        b = test.batch
        if test.kind == "pp":
            prompts = [self.ctx.prompt(test.n_tokens, seed * 1000 + j) for j in range(b)]
            t0, times, _ = self._generate(prompts, 1)
            return b * test.n_tokens / (times[0] - t0)
        if test.kind == "pg":
            prompts = [self.ctx.prompt(test.n_prompt, seed * 1000 + j) for j in range(b)]
            t0, times, _ = self._generate(prompts, test.n_tokens)
            return b * test.n_tokens / (times[-1] - t0)
        n = test.n_tokens
        prompts = [self.ctx.prompt(1, seed * 1000 + j) for j in range(b)]
        t0, times, _ = self._generate(prompts, n)
        return b * (n - 1) / (times[-1] - times[0])

    def warmup_throughput(self, concurrency: int) -> None:
        self._generate([self.ctx.prompt(16, 10_000 + i) for i in range(2)], 4)

    def throughput(self, requests: Sequence[BenchRequest]) -> ThroughputRun:
        """Static batches in request order; each batch runs to its longest output.

        Counted: each request's own prompt tokens and its own output_len tokens. Padding, and the tokens
        a shorter request is made to generate while its batch finishes, are computed but not counted.
        """
        bs = self.batch_size or min(len(requests), self.ctx.max_num_seqs)
        padded_prompt = computed_out = 0
        t0 = time.perf_counter()
        for start in range(0, len(requests), bs):
            chunk = requests[start:start + bs]
            new = max(r.output_len for r in chunk)
            self._generate([list(r.prompt_token_ids) for r in chunk], new)
            padded_prompt += len(chunk) * max(r.prompt_len for r in chunk)
            computed_out += len(chunk) * new
        elapsed = time.perf_counter() - t0
        return ThroughputRun(
            elapsed, sum(r.prompt_len for r in requests), sum(r.output_len for r in requests), len(requests),
            {"batch_size": bs, "computed_prompt_positions": padded_prompt, "computed_output_tokens": computed_out,
             "prefix_cache": prefix_cache.disabled()})

    def close(self) -> None:
        self.model = None
        super().close()


def make_backend(name: str, ctx: BenchContext, **opts) -> Backend:
    if name in ("nimblelm", "nimblelm-nocache"):
        return NimbleLMBackend(ctx, prefix_caching=name == "nimblelm")
    if name == "transformers":
        return TransformersBackend(ctx, batch_size=opts.get("hf_batch_size"))
    if name == "llama.cpp":
        from nimblelm.bench.llamacpp import LlamaCppBackend

        return LlamaCppBackend(ctx, gguf_type=opts.get("llamacpp_gguf_type"))
    if name == "vllm":
        from nimblelm.bench.vllm_peer import VllmBackend

        return VllmBackend(ctx)
    raise InvalidRequestError(f"unknown backend {name!r}: choose from {', '.join(BACKEND_NAMES)}")
