"""The `llmlingua` package (Microsoft's LLMLingua and LongLLMLingua) as the peer of nimblelm's prompt compression.

It scores with transformers on the same weights as nimblelm's scorer: the nimblelm loader's tensors in a
transformers model, saved to a temporary folder that `PromptCompressor` loads on the CPU. llmlingua counts
its budgets in tiktoken's gpt-3.5-turbo tokens, a file it would download; here it counts in the scorer's own
tokens instead, the unit nimblelm's budgets use, so a rate means the same to both. And it reads and trims
the KV cache as transformers 4 returned it, a (key, value) pair per layer, where transformers 5 returns a
Cache object: `_PairsCache` converts between the two around each forward.
"""

from __future__ import annotations

import tempfile
import time
from unittest import mock

from nimblelm.bench.backends import BackendUnavailable, BenchContext, hf_model_from

METHODS = ("llmlingua", "longllmlingua")


class _ScorerTokens:
    """Stands in for tiktoken's encoding: llmlingua only calls encode() to count tokens."""

    def __init__(self):
        self.tokenizer = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


class _PairsCache:
    """The model as llmlingua 0.2.2 calls it: past_key_values in and out as (key, value) pairs per layer."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, past_key_values=None, **kwargs):
        from transformers.cache_utils import DynamicCache

        if past_key_values is not None:
            past_key_values = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values],
                                           config=self.model.config)
        out = self.model(*args, past_key_values=past_key_values, **kwargs)
        if out.past_key_values is not None:
            out.past_key_values = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


class LinguaCompressor:
    def __init__(self, scorer: str, threads: int):
        try:
            import llmlingua
        except ImportError as e:
            raise BackendUnavailable(f"llmlingua not installed ({e})") from None
        import torch

        torch.set_num_threads(threads)
        lm = BenchContext(model=scorer, threads=threads).load()
        counter = _ScorerTokens()
        with tempfile.TemporaryDirectory(prefix="nimblelm-lingua-") as folder:
            hf_model_from(lm.config, lm.weights).save_pretrained(folder)
            lm.tokenizer.save_pretrained(folder)
            with mock.patch("tiktoken.encoding_for_model", return_value=counter):
                self.compressor = llmlingua.PromptCompressor(folder, device_map="cpu")
        counter.tokenizer = self.compressor.tokenizer
        self.compressor.model = _PairsCache(self.compressor.model)
        self.version = getattr(llmlingua, "__version__", None) or _version()

    def compress(self, method: str, paragraphs: list[str], question: str, target_tokens: int) -> tuple[str, float]:
        """The context (its paragraphs) compressed to about target_tokens, and the seconds it took."""
        options = {}
        if method == "longllmlingua":  # the settings of LongLLMLingua's README
            options = {"question": question, "rank_method": "longllmlingua", "condition_in_question": "after_condition",
                       "reorder_context": "sort", "dynamic_context_compression_ratio": 0.3, "condition_compare": True,
                       "context_budget": "+100"}
        start = time.perf_counter()
        out = self.compressor.compress_prompt(paragraphs, target_token=target_tokens, concate_question=False,
                                              **options)
        return out["compressed_prompt"], time.perf_counter() - start


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmlingua")
    except PackageNotFoundError:
        return None
