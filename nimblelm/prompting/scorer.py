"""Surprisal of prompt tokens (-log p of each token given the tokens before it) from a small LM that runs in
nimblelm's own engine, as requests for their prompt logprobs: what every prompt compression method ranks
tokens by."""

from __future__ import annotations

import math
from collections.abc import Sequence

from nimblelm.models.registry import DEFAULT_MODEL
from nimblelm.sampling_params import SamplingParams

#: The scorer when none is named: the smallest packaged model.
SCORER_MODEL = DEFAULT_MODEL


class Scorer:
    def __init__(self, model: str = SCORER_MODEL, *, max_model_len: int | None = None, num_threads: int | None = None,
                 llm=None):
        """Loads `model` (its whole context the window by default), or scores through an `llm` already loaded."""
        if llm is None:
            from nimblelm import LLM

            llm = LLM(model=model, max_model_len=max_model_len, num_threads=num_threads)
        self.llm = llm
        self.tokenizer = llm.tokenizer
        #: The most tokens one request may hold: its context and the tokens it scores.
        self.window = llm.llm_engine.config.max_model_len

    def tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of text (no special tokens) and each token's first character in it."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]

    def surprisals(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """For each (context, tokens): -log p of every token given the context and the tokens before it, in
        one batch. A token with nothing before it has no probability: inf (every method keeps it)."""
        prompts, spans, params = [], [], []
        for context, tokens in requests:
            ids = list(context) + list(tokens)
            if len(ids) > self.window:
                raise ValueError(f"{len(ids)} tokens to score in a window of {self.window}")
            prompts.append(ids)
            spans.append((len(context), len(ids)))
            # A context scored before (the text a method kept so far) comes back from the prefix cache.
            params.append(SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_start=len(context)))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        result = []
        for ids, (start, end), out in zip(prompts, spans, outs):
            entries = out.prompt_logprobs
            result.append([math.inf if entries[i] is None else -entries[i][ids[i]].logprob for i in range(start, end)])
        return result
