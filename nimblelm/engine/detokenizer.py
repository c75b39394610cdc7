"""Incremental detokenization that never emits half a character or a wrong leading space."""

from __future__ import annotations

# Tokens decoded before the new ones, so that a word-initial token keeps its leading space.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_len: int, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = max(prompt_len - _CONTEXT_TOKENS, 0)
        self.read_offset = prompt_len

    def step(self, token_ids: list[int], final: bool = False) -> str:
        """The text that the newest tokens in `token_ids` add; "" while a character is incomplete,
        unless `final`: then the bytes that never completed a character come out as U+FFFD."""
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        full = decode(token_ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        return full[len(prefix) :]
