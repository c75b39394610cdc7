"""Structured output: JSON schemas compiled to grammars, and a matcher per sequence that says which
tokens keep the output inside the grammar.

The grammar engine is llguidance (chosen by measurement, see docs/architecture.md): it needs no
other package, compiles a schema in about 2 ms and computes a 49k-token mask in ~0.05 ms on
average, far below the cost of a decode step. Masks come as bitmasks, 32 tokens per int32 word.
"""

from __future__ import annotations

import json
import re

import torch

from nimblelm.errors import InvalidRequestError
from nimblelm.sampling_params import StructuredOutputParams

# Compact, json.dumps-like separators and no free whitespace: a small model allowed any whitespace
# can spend its whole budget on newlines. A schema's own "x-guidance" options still win.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputBackend:
    """One per engine: the tokenizer's index for the grammar engine, built on first use (~0.6 s)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        eos = list(eos_token_ids) or None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size

    def compile(self, spec: StructuredOutputParams) -> str:
        """The grammar for `spec`; raises InvalidRequestError with the reason when the schema or regex is
        invalid."""
        what = "JSON schema" if spec.regex is None and spec.choice is None else "regex"
        try:
            if spec.regex is not None:
                grammar = self._ll.LLMatcher.grammar_from_regex(spec.regex)
            elif spec.choice is not None:
                grammar = self._ll.LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in spec.choice))
            else:
                schema = {"type": "object"} if spec.json_object else spec.json_schema
                grammar = self._ll.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(f"invalid {what}: {e}") from None
        error = self._ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidRequestError(f"invalid {what}: {error}")
        return grammar

    def matcher(self, grammar: str) -> GrammarMatcher:
        return GrammarMatcher(self._ll.LLMatcher(self.tokenizer, grammar, log_level=0))


class GrammarMatcher:
    """The grammar state of one sequence: advanced by every token the sequence appends."""

    def __init__(self, matcher):
        self._matcher = matcher

    def fill_bitmask(self, words: torch.Tensor) -> None:
        """Write the allowed next tokens into `words`, a contiguous int32 CPU row of ceil(vocab / 32)."""
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())

    def fill_draft_bitmasks(self, drafts: list[int], words: torch.Tensor) -> None:
        """Rows 0..len(drafts) of `words`: the tokens allowed next after the sequence's tokens and its first j
        drafts. Rows after a draft the grammar refuses allow every token: the verifier, masked by the row
        before, rejects that draft, and the rows after it are never used. The state is left as it was."""
        self.fill_bitmask(words[0])
        consumed = 0
        for j, token in enumerate(drafts, 1):
            if self._matcher.try_consume_tokens([token]) == 0:
                words[j:] = -1
                break
            consumed += 1
            self.fill_bitmask(words[j])
        self._matcher.rollback(consumed)

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar did not allow it (the sampler masks, so
        only a bug or a token forced past the mask gets here)."""
        return self._matcher.consume_token(token)

    @property
    def is_finished(self) -> bool:
        """The output is complete: nothing may follow (a closed JSON value, or EOS consumed), or an error."""
        return self._matcher.is_stopped() or self._matcher.is_error()


def grammar_bitmask(matchers: list[GrammarMatcher], drafts: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Per matcher, the tokens its grammar allows next, then after each of its sequence's drafts in turn:
    int32 [sum of 1 + len(drafts), ceil(vocab / 32)]."""
    words = torch.empty((sum(1 + len(d) for d in drafts), (vocab_size + 31) // 32), dtype=torch.int32)
    row = 0
    for matcher, d in zip(matchers, drafts):
        if d:
            matcher.fill_draft_bitmasks(d, words[row : row + 1 + len(d)])
        else:
            matcher.fill_bitmask(words[row])
        row += 1 + len(d)
    return words


def apply_bitmask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Logits with -inf at the tokens a row's bitmask forbids (words: int32 [rows, ceil(vocab / 32)])."""
    rows, vocab = logits.shape
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((words[:, :, None] >> bits) & 1).bool().reshape(rows, -1)[:, :vocab]
    # A matcher in an error state may allow nothing; an unmasked row beats NaNs from an all -inf row,
    # and the engine ends that sequence after this token anyway.
    allowed[~allowed.any(dim=1)] = True
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
