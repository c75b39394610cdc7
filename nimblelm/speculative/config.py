"""SpeculativeConfig: which proposer drafts tokens and how many, shaped like vLLM's `speculative_config`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from nimblelm.errors import InvalidRequestError

METHODS = ("ngram", "draft_model")
# A step verifies a sequence's drafts and the token before them as decode rows; the model runner takes up to
# 16 such rows per sequence (MAX_DECODE_QUERY).
MAX_SPECULATIVE_TOKENS = 15


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram (prompt lookup): the longest and shortest suffix of the tokens so far searched for earlier in them.
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1
    # draft_model: the drafter (an alias, folder or .gguf with the target's tokenizer) and its own
    # quantization (None: unquantized, in the target's compute dtype).
    model: str | None = None
    quantization: str | None = None

    @classmethod
    def from_dict(cls, options: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """A config from vLLM-style options, or one clear error naming what is wrong."""
        if isinstance(options, SpeculativeConfig):
            return options
        if not isinstance(options, dict):
            raise InvalidRequestError(f"speculative_config must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(f"speculative_config: unknown option(s) {', '.join(unknown)}")
        if "method" not in options or "num_speculative_tokens" not in options:
            raise InvalidRequestError("speculative_config needs 'method' and 'num_speculative_tokens'")
        config = cls(**options)
        config._validate()
        return config

    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"speculative_config: {msg}")

        if self.method not in METHODS:
            raise bad(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise bad(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if (self.method == "draft_model") != (self.model is not None):
            raise bad("'model' names the drafter of method draft_model, and only of it")
        if self.quantization is not None and self.method != "draft_model":
            raise bad("'quantization' applies to a draft model only")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise bad(f"need integers 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}")
