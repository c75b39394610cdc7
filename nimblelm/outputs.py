"""What the engine hands back to callers, shaped like vLLM's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nimblelm.prompting.compression import CompressedPrompt
    from nimblelm.prompting.skeleton import SkeletonInfo


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: list[dict[int, Logprob]] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """time.perf_counter() timestamps of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    spec: SpecDecodeStats | None = None  # with speculative decoding


@dataclass
class SpecDecodeStats:
    """Speculative decoding of one request (or of the engine so far): steps that verified drafts, the draft
    tokens they verified and those kept, and per draft position how often it was kept."""

    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def add(self, num_drafts: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        grow = num_accepted - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(0, grow)
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verifying step: the kept drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # With SamplingParams.prompt_logprobs: per prompt token, its logprob and the top alternatives; None for
    # the first token, which nothing predicts.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: RequestMetrics = field(repr=False, default=None)  # type: ignore[assignment]
    # With prompt compression (LLM.generate's prompt_compression): the prompt sent, its tokens before and after.
    prompt_compression: CompressedPrompt | None = None
    # With output_organization="skeleton": whether Skeleton-of-Thought answered, its points, its stages' times.
    skeleton: SkeletonInfo | None = None
