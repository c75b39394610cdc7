"""Request state: one Sequence per generated completion (a request with n > 1 has n of them).

Torch-free, so the scheduler and block manager that read it are tested without a model.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from nimblelm.outputs import Logprob, RequestMetrics
from nimblelm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, index: int = 0):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.token_ids = list(prompt_token_ids)  # prompt, then the generated tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_hashes: list[bytes] = []  # of its full blocks, for the prefix cache (kv_cache/manager.py)
        self.matcher = None  # its grammar state (engine/structured.py) when the output is structured
        self.spec_token_ids: list[int] = []  # drafts proposed to follow its tokens, verified when next scheduled
        self.spec_parents: list[int] | None = None  # the drafts' parents when they are a tree, else None
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text = ""
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"Sequence({self.seq_id}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, {self.status.value})"


@dataclass
class Request:
    """A user's request: its prompt and the n sequences that complete it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    seqs: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
