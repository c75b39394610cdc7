"""Perplexity on a fixed text set, so a quantized (or otherwise changed) model can be compared run to run.

Protocol (recorded in every result): the text is tokenized with the model's tokenizer without special
tokens (no BOS); the first `max_tokens` tokens are cut into windows of `window` tokens every `stride`
tokens; in each window every next-token prediction is scored (window − 1 per full window), each window
starting with an empty context. Perplexity = exp(mean negative log-likelihood over all scored tokens).
Compare perplexities only under the same protocol, text set and tokenizer: e.g. llama.cpp's
llama-perplexity scores only the second half of each window and gives other numbers.

Text sets, each fixed by its source and a seed, with a sha256 of the exact text recorded:
- `pydoc` (default): CPython's `pydoc_data.topics` (in every Python install), the topics joined by blank
  lines in sorted key order. The seed is unused. Reference: with 32,768 tokens in 64 windows of 512 the
  fp32-dequantized SmolLM2-135M scored 14.5695 in transformers fp32 on Python 3.11 (shared/peers.md).
- `sharegpt`: model-side turns (the first model answer of each conversation) of the packaged ShareGPT
  file, in a seeded shuffle, joined by blank lines.
- `humaneval`: HumanEval prompt + canonical solution of each problem, in a seeded shuffle.
"""

from __future__ import annotations

import hashlib
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from nimblelm import corpora
from nimblelm.errors import InvalidRequestError

TEXT_SETS = ("pydoc", "sharegpt", "humaneval")


@dataclass
class PerplexityResult:
    model: str
    backend: str
    text_set: str
    seed: int
    text_sha256: str
    num_tokens: int
    window: int
    stride: int
    num_windows: int
    scored_tokens: int
    nll: float  # mean negative log-likelihood (nats per token)
    ppl: float
    elapsed_s: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def load_text_set(name: str = "pydoc", seed: int = 0, max_chars: int | None = None) -> str:
    """The text of a named set (see the module doc); max_chars cuts it (tests)."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[k] for k in sorted(topics))
    elif name == "sharegpt":
        pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path()))
        answers = [a for _, a in pairs if a.strip()]
        random.Random(seed).shuffle(answers)
        text = "\n\n".join(answers[:2000])
    elif name == "humaneval":
        problems = corpora.load_humaneval(corpora.humaneval_path())
        order = list(range(len(problems)))
        random.Random(seed).shuffle(order)
        text = "\n\n".join(problems[i]["prompt"] + problems[i]["canonical_solution"] for i in order)
    else:
        raise InvalidRequestError(f"unknown text set {name!r}: choose from {', '.join(TEXT_SETS)}")
    return text[:max_chars] if max_chars else text


def windows(token_ids: Sequence[int], window: int, stride: int, max_tokens: int | None = None) -> list[list[int]]:
    """Windows of `window` tokens every `stride` tokens over the first max_tokens ids; a shorter last window
    is kept when it has at least 2 tokens (one prediction)."""
    if window < 2:
        raise InvalidRequestError(f"window must be >= 2, got {window}")
    if stride < 1:
        raise InvalidRequestError(f"stride must be >= 1, got {stride}")
    ids = list(token_ids[:max_tokens] if max_tokens else token_ids)
    out = []
    for start in range(0, len(ids), stride):
        w = ids[start:start + window]
        if len(w) >= 2:
            out.append(w)
        if start + window >= len(ids):
            break
    return out


def nll_of_logits(logits, ids) -> tuple[float, int]:
    """Sum of next-token NLL (nats) of ids[1:] under logits[:-1] ([T, V]), and the count."""
    import torch
    import torch.nn.functional as F

    target = torch.as_tensor(ids[1:], dtype=torch.long, device=logits.device)
    nll = F.cross_entropy(logits[:-1].float(), target, reduction="sum")
    return float(nll), len(ids) - 1


# ------------------------------------------------------------------------------------------- scorers


class NimbleLMScorer:
    """Scores a window through nimblelm's engine, as a request for its prompt logprobs (no token generated):
    the serving path's scheduler, paged KV cache, kernels and attention."""

    name = "nimblelm"

    def __init__(self, model: str | None = None, dtype: str = "float32", threads: int | None = None,
                 max_len: int = 512, kv_cache_dtype: str = "auto", llm=None):
        """Loads `model`, or scores through an `llm` already loaded."""
        if llm is None:
            from nimblelm import LLM

            llm = LLM(model=model, dtype=dtype, max_model_len=max_len, max_num_seqs=1, num_threads=threads,
                      kv_cache_dtype=kv_cache_dtype)
        self.llm = llm
        self.runner = self.llm.llm_engine.runner
        self.tokenizer = self.llm.tokenizer

    def __call__(self, ids: Sequence[int]) -> tuple[float, int]:
        from nimblelm import SamplingParams

        ids = list(ids)
        out = self.llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0), use_tqdm=False)[0]
        return -math.fsum(entry[t].logprob for t, entry in zip(ids[1:], out.prompt_logprobs[1:])), len(ids) - 1


class TransformersScorer:
    """The oracle: transformers' Llama/Qwen2 holding the loader's tensors (as the bench's transformers peer)."""

    name = "transformers"

    def __init__(self, model: str, dtype: str = "float32", threads: int | None = None):
        from nimblelm.bench.backends import hf_model_from
        from nimblelm.models.loader import load_model

        lm = load_model(model)
        self.model = hf_model_from(lm.config, lm.weights, dtype)
        self.tokenizer = lm.tokenizer

    def __call__(self, ids: Sequence[int]) -> tuple[float, int]:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
            return nll_of_logits(logits, ids)


def make_scorer(backend: str, model: str, dtype: str = "float32", threads: int | None = None, window: int = 512,
                kv_cache_dtype: str = "auto"):
    if backend == "nimblelm":
        return NimbleLMScorer(model, dtype, threads, max_len=window, kv_cache_dtype=kv_cache_dtype)
    if backend == "transformers":
        if kv_cache_dtype != "auto":
            raise InvalidRequestError("kv_cache_dtype applies to the nimblelm backend only")
        return TransformersScorer(model, dtype, threads)
    raise InvalidRequestError(f"unknown perplexity backend {backend!r}: choose nimblelm or transformers")


def encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        return list(tokenizer.encode(text, add_special_tokens=False))


def perplexity(model: str = "smollm2-135m", *, backend: str = "nimblelm", text_set: str = "pydoc", seed: int = 0,
               window: int = 512, stride: int | None = None, max_tokens: int = 32768, dtype: str = "float32",
               threads: int | None = None, scorer: Callable[[Sequence[int]], tuple[float, int]] | None = None,
               tokenizer=None, text: str | None = None, progress: bool = False,
               kv_cache_dtype: str = "auto") -> PerplexityResult:
    """Perplexity of `model` on a text set under the protocol of the module doc.

    Pass `scorer` (ids -> (sum NLL, count)) and `tokenizer` to score another model implementation (e.g. a
    quantized one) on exactly the same windows.
    """
    stride = stride or window
    if max_tokens < 2:
        raise InvalidRequestError(f"max_tokens must be >= 2, got {max_tokens}")
    if scorer is None:
        scorer = make_scorer(backend, model, dtype, threads, window, kv_cache_dtype)
        tokenizer = tokenizer or scorer.tokenizer
        backend = scorer.name
    if tokenizer is None:
        raise InvalidRequestError("a custom scorer needs its tokenizer")
    text = load_text_set(text_set, seed) if text is None else text
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    ids = encode(tokenizer, text)
    wins = windows(ids, window, stride, max_tokens)
    if not wins:
        raise InvalidRequestError("the text set gives no window to score")
    total, count, per = 0.0, 0, []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(wins), desc="perplexity", unit="window", leave=False)
    t0 = time.perf_counter()
    for w in wins:
        s, c = scorer(w)
        total += s
        count += c
        per.append(round(s / c, 6))
        if bar is not None:
            bar.update()
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    nll = total / count
    return PerplexityResult(model=model, backend=backend, text_set=text_set, seed=seed, text_sha256=sha,
                            num_tokens=min(len(ids), max_tokens), window=window, stride=stride, num_windows=len(wins),
                            scored_tokens=count, nll=nll, ppl=math.exp(nll), elapsed_s=elapsed, window_nll=per,
                            extra={"python": platform.python_version(), "dtype": dtype, "kv_cache_dtype": kv_cache_dtype,
                                   "text_chars": len(text), "text_tokens": len(ids)})
