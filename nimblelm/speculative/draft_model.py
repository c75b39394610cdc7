"""Draft-model proposals: a smaller model with the target's tokenizer decodes k tokens greedily for every
speculating sequence, batched, in a model runner of its own (its own weights, precision and paged KV cache).

The drafter holds each sequence's tokens and how many of them its cache has computed. Before proposing, a
sequence's tokens are compared with the target's: the drafts the target rejected (and anything after the
first difference) count as uncomputed again, so their slots are written over. Each proposal is one step
over every sequence's uncomputed tokens (after a kept run, usually the target's last token or two), then
k - 1 one-token decode steps. Greedy drafts are deterministic, so the verifier stays exact for greedy
requests and keeps the target's distribution for sampled ones (speculative/verifier.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from nimblelm.engine.kv_cache.manager import KVCacheManager
from nimblelm.engine.step import NewRequest, RunningRequest, SchedulerOutput
from nimblelm.errors import InvalidRequestError
from nimblelm.models.loader import load_model
from nimblelm.platform import resolve_kv_cache_dtype
from nimblelm.quantization import GGUF_DIRECT, linear_method, refuse_requantizing
from nimblelm.sampling_params import SamplingParams
from nimblelm.speculative.budget import PassTime

GREEDY = SamplingParams(temperature=0, max_tokens=None)


@dataclass
class _Draft:
    """A sequence as the drafter's KV cache manager sees it (the KVRequest protocol)."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    block_hashes: list[bytes] = field(default_factory=list)


class DraftModelProposer:
    observes = False

    def __init__(self, model: str, num_speculative_tokens: int, *, vocab_size: int, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, block_size: int, num_blocks: int, max_num_seqs: int,
                 quantization: str | None = None):
        from nimblelm.engine.model_runner import ModelRunner  # the runner builds its proposer: import late

        loaded = load_model(model, progress=False, gguf_direct=quantization == GGUF_DIRECT)
        refuse_requantizing(quantization, loaded.quantized)
        if loaded.config.vocab_size != vocab_size:
            raise InvalidRequestError(
                f"speculative_config: the draft model {model} has a vocabulary of {loaded.config.vocab_size} tokens, "
                f"the target {vocab_size}: a drafter needs the target's tokenizer")
        if loaded.config.max_position_embeddings < max_model_len:
            raise InvalidRequestError(
                f"speculative_config: the draft model {model} reads {loaded.config.max_position_embeddings} "
                f"positions, fewer than max_model_len={max_model_len}")
        self.k = num_speculative_tokens
        self.runner = ModelRunner(
            loaded.config, loaded.weights, dtype=dtype, device=device, max_model_len=max_model_len,
            block_size=block_size, seed=0, linear_method=linear_method(quantization),
            kv_cache_dtype=resolve_kv_cache_dtype("auto", dtype), quantized=loaded.quantized,
        )
        del loaded
        self.runner.allocate_kv(num_blocks, max_num_seqs)
        self.kv = KVCacheManager(num_blocks, block_size, [g.window for g in self.runner.kv_groups], False)
        self.seqs: dict[int, _Draft] = {}
        self._forgotten: list[int] = []
        self._pass_time = PassTime()

    @property
    def pass_seconds(self) -> float:
        return self._pass_time.seconds

    def forget(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            seq = self.seqs.pop(req_id, None)
            if seq is not None:
                self.kv.free(seq)
                self._forgotten.append(req_id)

    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, list[int]]:
        """Per sequence (its tokens, prompt length, room for drafts), up to min(k, room) greedy drafts."""
        batch = {}
        for req_id, (tokens, num_prompt, room) in requests.items():
            if room <= 0:
                continue
            seq = self.seqs.get(req_id)
            if seq is None:
                seq = self.seqs[req_id] = _Draft(req_id, [], num_prompt)
            same = _common_prefix(seq.token_ids, tokens)
            seq.token_ids = list(tokens)
            seq.num_computed_tokens = min(seq.num_computed_tokens, same, len(tokens) - 1)
            del seq.block_hashes[:]
            batch[req_id] = room
        drafts: dict[int, list[int]] = {req_id: [] for req_id in batch}
        for step in range(min(self.k, max(batch.values(), default=0))):
            active = [r for r in batch if len(drafts[r]) < min(self.k, batch[r])]
            if not active:
                break
            sched = self._schedule(active, first=step == 0)
            if sched is None:  # the drafter's cache is full: propose what there is
                break
            t0 = time.perf_counter()
            out = self.runner.execute(sched)
            # A pass of a few tokens per sequence; a first one that catches up on a new prompt is a prefill.
            if max(sched.num_scheduled_tokens.values()) <= self.k + 1:
                self._pass_time.add(time.perf_counter() - t0)
            for req_id, tokens in zip(out.req_ids, out.sampled_token_ids):
                seq = self.seqs[req_id]
                seq.num_computed_tokens += sched.num_scheduled_tokens[req_id]
                seq.token_ids.append(tokens[0])
                drafts[req_id].append(tokens[0])
        return {req_id: d for req_id, d in drafts.items() if d}

    def _schedule(self, active: list[int], first: bool) -> SchedulerOutput | None:
        """A step of every active sequence's uncomputed tokens: on the first step each is sent whole (its
        tokens may have been rolled back), after it only its new token."""
        sched = SchedulerOutput(finished_req_ids=self._forgotten)
        for req_id in active:
            seq = self.seqs[req_id]
            n = len(seq.token_ids) - seq.num_computed_tokens
            new_ids = self.kv.allocate_slots(seq, n)
            if new_ids is None:
                return None
            if first:
                blocks = self.kv.block_ids(seq)
                sched.new_requests.append(NewRequest(
                    req_id, seq.token_ids[: seq.num_prompt_tokens], seq.token_ids[seq.num_prompt_tokens :], GREEDY,
                    None, blocks, self.kv.dropped_blocks(seq), seq.num_computed_tokens))
            else:
                sched.running_requests.append(RunningRequest(
                    req_id, seq.token_ids[-1:], new_ids, self.kv.dropped_blocks(seq), seq.num_computed_tokens))
            sched.num_scheduled_tokens[req_id] = n
        self._forgotten = []
        return sched


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
