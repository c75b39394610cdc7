"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM-compatible names)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nimblelm.errors import InvalidRequestError


@dataclass(frozen=True)
class StructuredOutputParams:
    """Constrain the output (vLLM's structured outputs): to JSON, any object (`json_object=True`) or one valid
    against `json_schema`; to the whole text a `regex` matches; or to one of the strings in `choice`.

    The engine compiles it into a grammar when the request is added (an invalid schema or regex is an
    InvalidRequestError then) and masks, at every step, the tokens that would leave the grammar.
    """

    json_schema: dict[str, Any] | bool | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        given = [self.json_schema is not None, bool(self.json_object), self.regex is not None, self.choice is not None]
        if sum(given) != 1:
            raise InvalidRequestError("structured output needs exactly one of json_schema, json_object=True, regex "
                                      "or choice")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool)):
            raise InvalidRequestError("json_schema must be a JSON schema object")
        if self.regex is not None and not isinstance(self.regex, str):
            raise InvalidRequestError("regex must be a string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice) or not self.choice:
                raise InvalidRequestError("choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to max_model_len; 0: the prompt only (for its prompt_logprobs)
    temperature: float = 1.0  # 0 means greedy and deterministic
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per token, besides the sampled one
    prompt_logprobs: int | None = None  # the same for each prompt token after the first (as vLLM)
    # Prompt logprobs wanted from this prompt position on only: the tokens before it may come from the
    # prefix cache, and their entries are then None (a scorer that extends a context it scored before).
    prompt_logprobs_start: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    structured_output: StructuredOutputParams | None = None
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        stop = self.stop
        self.stop_strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 0):
            raise bad(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")  # torch generators take 64 bits
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise bad(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.prompt_logprobs_start, int) or self.prompt_logprobs_start < 0:
            raise bad(f"prompt_logprobs_start must be an integer >= 0, got {self.prompt_logprobs_start!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise bad("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be non-negative integers")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutputParams):
            raise bad("structured_output must be a StructuredOutputParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
