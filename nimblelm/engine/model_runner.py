"""Runs the model on the device: owns the weights, the paged KV tensors, and what it holds of each
sequence (tokens, sampling params, block tables, RNG).

Its only input is the step contract (engine/step.py): it applies what changed, turns the step into flat
batch tensors once (token ids, positions, and per KV group the slot mapping and block tables), runs one
forward pass, and samples the sequences whose tokens are all computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from nimblelm import hugepages
from nimblelm.config import ModelConfig
from nimblelm.engine.kv_cache.manager import kv_groups
from nimblelm.engine.step import ModelRunnerOutput, SchedulerOutput
from nimblelm.engine.step_capture import StepCapture
from nimblelm.kernels import ops_for
from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.linear import LinearMethod
from nimblelm.layers.sampler import Sampler, SamplingBatch, token_logprobs
from nimblelm.models.decoder import DecoderLM
from nimblelm.quantization.kv_int8 import float_kv_layers, int8_attention_errors
from nimblelm.sampling_params import SamplingParams
from nimblelm.speculative import SpeculativeConfig, make_proposer, scratch_blocks, speculates
from nimblelm.speculative.budget import Acceptance, StepCost, draft_budget
from nimblelm.speculative.verifier import verify


@dataclass
class _SeqState:
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[list[int]]  # per KV group
    kv_offsets: list[int]  # per KV group, position minus KV entry (the tokens dropped from the table's front)
    num_computed_tokens: int
    acceptance: Acceptance = field(default_factory=Acceptance)  # of its drafts, with speculative decoding


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        block_size: int,
        seed: int,
        linear_method: LinearMethod | None = None,
        kv_cache_dtype: torch.dtype,
        enforce_eager: bool = False,
        quantized: dict[str, tuple[str, dict[str, torch.Tensor]]] | None = None,
        speculative: SpeculativeConfig | None = None,
    ):
        """Builds the model: the layers in `quantized` (module name -> (format name, tensors), as the loader
        gives them) adopt their tensors, the others load from `weights` and take `linear_method`. The KV
        cache comes with allocate_kv, once the engine has sized it."""
        self.config = config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        with torch.device("meta"):
            model = DecoderLM(config, max_positions=max_model_len)
        self.model = model.materialize(device, dtype, weights, linear_method, quantized)
        self.weights_nbytes = _weights_nbytes(self.model)
        self.token_nbytes = _weights_nbytes(self.model, per_token=True)
        self.kv_groups = kv_groups(config.layer_windows)
        # Layer i of every group keeps its K/V in tensor i, so a block of any group is the same bytes.
        self.kv_tensor_of_layer = [0] * config.num_layers
        self.group_of_layer = [0] * config.num_layers
        for g, group in enumerate(self.kv_groups):
            for i, layer in enumerate(group.layers):
                self.kv_tensor_of_layer[layer] = i
                self.group_of_layer[layer] = g
        num_tensors = len(self.kv_groups[0].layers)
        # Per tensor, how its K/V are stored: an int8 cache keeps the layers int8 would distort in `dtype`.
        self.kv_dtypes = [kv_cache_dtype] * num_tensors
        self.int8_kv_errors: list[float] = []
        if kv_cache_dtype == torch.int8:
            self.int8_kv_errors = int8_attention_errors(
                self.model, max_len=max_model_len, block_size=block_size, dtype=dtype, device=device
            )
            for layer in float_kv_layers(self.int8_kv_errors):
                self.kv_dtypes[self.kv_tensor_of_layer[layer]] = dtype
        self.num_blocks = 0
        self.kv_caches: list[KVCache] = []  # per layer (layers of one tensor share it)
        self.kernels = ops_for(torch.empty(0, dtype=dtype, device=device)) is not None
        # Decode steps replayed from traces of the model (step_capture.py) where its kernels serve it.
        self.capturing = not enforce_eager and self.kernels
        self.capture: StepCapture | None = None
        self.sampler = Sampler()
        self.max_model_len = max_model_len
        self.speculative = speculative
        self.proposer = None  # made with the KV cache (a draft model sizes its own after the target's)
        self.step_cost: StepCost | None = None  # of decode steps by rows, measured when they are replayed
        self.seqs: dict[int, _SeqState] = {}
        self.generators: dict[int, torch.Generator] = {}
        torch.manual_seed(seed)

    def allocate_kv(self, num_blocks: int, max_num_seqs: int) -> None:
        """Every tensor's K/V (and int8 scales) as views of one buffer, on CPU one of huge pages; then the
        traces of decode steps of up to max_num_seqs rows, when steps are replayed."""
        cfg = self.config
        # Block num_blocks, beyond those the KV cache manager hands out, is scratch for padding rows; a
        # proposer that drafts with the target's own layers writes past it.
        drafting = scratch_blocks(self.speculative, self.block_size, len(self.kv_groups))
        shape = (2, num_blocks + 1 + drafting, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        offsets, nbytes = [], 0
        for kv_dtype in self.kv_dtypes:
            values_at = nbytes
            nbytes = _aligned(nbytes + math.prod(shape) * kv_dtype.itemsize)
            scales_at = nbytes
            if kv_dtype == torch.int8:
                nbytes = _aligned(nbytes + math.prod(shape[:-1]) * 4)
            offsets.append((values_at, scales_at))
        if self.device.type == "cpu":
            buf = hugepages.empty(nbytes).zero_()
        else:
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        tensors = []
        for kv_dtype, (values_at, scales_at) in zip(self.kv_dtypes, offsets):
            values = buf[values_at:].narrow(0, 0, math.prod(shape) * kv_dtype.itemsize).view(kv_dtype).view(shape)
            scales = None
            if kv_dtype == torch.int8:
                scales = buf[scales_at:].narrow(0, 0, math.prod(shape[:-1]) * 4).view(torch.float32).view(shape[:-1])
            tensors.append(KVCache(values, scales))
        self.num_blocks = num_blocks
        self.kv_caches = [tensors[i] for i in self.kv_tensor_of_layer]
        if self.speculative is not None:
            self.proposer = make_proposer(self.speculative, self, num_blocks, max_num_seqs)
        if self.capturing:
            windows = [group.window for group in self.kv_groups]
            self.capture = StepCapture(self.model, self.kv_caches, windows, self.group_of_layer, num_blocks,
                                       self.block_size)
            if self.proposer is None:
                self.capture.warm_up(max_num_seqs)
            else:  # a sequence verifying k drafts takes k + 1 rows
                self.capture.warm_up(max_num_seqs * (1 + self.speculative.num_speculative_tokens))
                self.step_cost = StepCost(self.capture.seconds_by_rows())

    def kv_bytes_per_block(self) -> int:
        cfg = self.config
        per_head = sum(cfg.head_dim * t.itemsize + (4 if t == torch.int8 else 0) for t in self.kv_dtypes)  # + scale
        return 2 * cfg.num_kv_heads * per_head * self.block_size

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's changes, run it, and return the tokens sampled."""
        self._update(sched)
        if sched.is_empty:
            return ModelRunnerOutput([], [])
        input_ids, positions, group_metas, sample_rows, sample_ids, prompt_rows = self._prepare(sched)
        drafts = [sched.spec_token_ids.get(i, []) for i in sample_ids]
        if self.capture is not None and self.capture.applies(len(input_ids), group_metas):
            hidden = self.capture(input_ids, positions, group_metas)
        else:
            metas = [group_metas[g] for g in self.group_of_layer]
            hidden = self.model(input_ids, positions, self.kv_caches, metas)
        prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows) if prompt_rows else {}
        if not sample_ids:
            return ModelRunnerOutput([], [], prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[sample_rows])
        # One sampling row per logits row: a sequence with drafts has one for its last token and each draft.
        row_ids = [i for i, d in zip(sample_ids, drafts) for _ in range(len(d) + 1)]
        states = [self.seqs[i] for i in row_ids]
        sampling = SamplingBatch.build(
            [s.params for s in states],
            [s.token_ids for s in states],
            [s.num_prompt_tokens for s in states],
            [self.generators.get(i) for i in row_ids],
            self.config.vocab_size,
            self.device,
            _bitmask_rows(sched, row_ids),
        )
        if any(drafts):
            verified = verify(self.sampler, logits, sampling, drafts)
            tokens, logprobs = verified.token_ids, verified.logprobs
        else:
            sampled = self.sampler(logits, sampling)
            tokens = [[t] for t in sampled.token_ids]
            logprobs = None if sampled.logprobs is None else [[entry] for entry in sampled.logprobs]
        proposals = {}
        if self.proposer is not None:
            # The hidden state of each sequence's last kept row: the one that chose its newest token.
            hidden_rows = None
            if self.proposer.uses_hidden:
                last, row = [], 0
                for d, t in zip(drafts, tokens):
                    last.append(row + len(t) - 1)
                    row += len(d) + 1
                hidden_rows = hidden[sample_rows[last]]
            proposals = self._propose(sample_ids, drafts, tokens, hidden_rows)
        return ModelRunnerOutput(sample_ids, tokens, logprobs, prompt_logprobs, proposals)

    def _propose(self, sample_ids: list[int], drafts: list[list[int]], tokens: list[list[int]],
                 hidden_rows: torch.Tensor | None) -> dict[int, list[int]]:
        """Drafts to follow each sampled sequence's new tokens, within its token and context limits and, where
        decode steps are timed, what pays for its rows (speculative/budget.py): the budget is drawn first,
        so that a large batch, where few drafts pay, spends no time drafting the rest."""
        room = {}
        for req_id, verified, new in zip(sample_ids, drafts, tokens):
            state = self.seqs[req_id]
            if verified:
                state.acceptance.update(len(verified), len(new) - 1)
            if not speculates(state.params):
                continue
            num_tokens = len(state.token_ids) + len(new)
            # The next step emits up to k + 1 tokens: room for them all in max_tokens and the context.
            n = min(self.speculative.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if state.params.max_tokens is not None:
                n = min(n, state.params.max_tokens - (num_tokens - state.num_prompt_tokens) - 1)
            if n > 0:
                room[req_id] = n
        if self.step_cost is not None and room:
            rates = {req_id: self.seqs[req_id].acceptance.rate for req_id in room}
            room = draft_budget(room, rates, len(sample_ids), self.step_cost, self.proposer.pass_seconds)
        new_tokens = dict(zip(sample_ids, tokens))
        requests = {req_id: (self.seqs[req_id].token_ids + new_tokens[req_id], self.seqs[req_id].num_prompt_tokens, n)
                    for req_id, n in room.items()}
        if hidden_rows is None:
            return self.proposer.propose_all(requests)
        row_of = {req_id: i for i, req_id in enumerate(sample_ids)}
        return self.proposer.propose_all(requests, hidden_rows[[row_of[r] for r in requests]])

    def _prompt_logprobs(self, hidden: torch.Tensor, prompt_rows: list[tuple[int, list[int], list[int]]]):
        """Per sequence: the entries of the prompt tokens that this step's rows predict."""
        rows = [r for _, seq_rows, _ in prompt_rows for r in seq_rows]
        targets = [t for _, _, seq_targets in prompt_rows for t in seq_targets]
        k = max(self.seqs[req_id].params.prompt_logprobs for req_id, _, _ in prompt_rows)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        entries = token_logprobs(logits, torch.tensor(targets, device=self.device), k)
        out, start = {}, 0
        for req_id, seq_rows, _ in prompt_rows:
            wanted = self.seqs[req_id].params.prompt_logprobs
            out[req_id] = [(lp, rank, ids[:wanted], lps[:wanted]) for lp, rank, ids, lps in
                           entries[start : start + len(seq_rows)]]
            start += len(seq_rows)
        return out

    def _update(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.seqs.pop(req_id, None)
            self.generators.pop(req_id, None)
        if self.proposer is not None:
            self.proposer.forget(sched.finished_req_ids)
        for new in sched.new_requests:
            self.seqs[new.req_id] = _SeqState(
                new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids), new.params,
                [list(ids) for ids in new.block_ids], [d * self.block_size for d in new.num_dropped_blocks],
                new.num_computed_tokens,
            )
            if new.seed is not None and new.req_id not in self.generators:  # a resumed sequence's RNG goes on
                g = torch.Generator(device=self.device)
                g.manual_seed(new.seed)
                self.generators[new.req_id] = g
        for running in sched.running_requests:
            state = self.seqs[running.req_id]
            state.token_ids.extend(running.new_token_ids)
            for g, (table, ids, dropped) in enumerate(zip(state.block_ids, running.new_block_ids,
                                                          running.num_dropped_blocks)):
                offset = dropped * self.block_size
                del table[: (offset - state.kv_offsets[g]) // self.block_size]
                table.extend(ids)
                state.kv_offsets[g] = offset
            state.num_computed_tokens = running.num_computed_tokens

    def _prepare(self, sched: SchedulerOutput):
        # Decode rows go first, in one batched attention call: a sequence's single new token, or the few
        # tokens after its prompt that a step computes at once (speculative verification), each row
        # attending over the cache up to itself. Longer runs of tokens are prefill chunks.
        scheduled = [(self.seqs[i], n, i) for i, n in sched.num_scheduled_tokens.items()]
        decodes = [x for x in scheduled if _is_decode(*x[:2])]
        prefills = [x for x in scheduled if not _is_decode(*x[:2])]
        bs = self.block_size
        num_groups = len(self.kv_groups)

        tokens: list[int] = []
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in range(num_groups)]
        decode_contexts: list[list[int]] = [[] for _ in range(num_groups)]  # per decode row, as it attends
        decode_seqs: list[_SeqState] = []  # per decode row, its sequence
        for seq, n, req_id in decodes:
            start = seq.num_computed_tokens
            drafts = sched.spec_token_ids.get(req_id, [])
            tokens.extend(seq.token_ids[start : start + n - len(drafts)] + drafts)
            positions.extend(range(start, start + n))
            decode_seqs.extend([seq] * n)
            for g, (table, offset) in enumerate(zip(seq.block_ids, seq.kv_offsets)):
                for i in range(start - offset, start + n - offset):  # each row's KV entry
                    slots[g].append(table[i // bs] * bs + i % bs)
                    decode_contexts[g].append(i + 1)  # each row sees up to itself
        prefill_blocks: list[list[torch.Tensor]] = [[] for _ in range(num_groups)]
        prefill_contexts: list[list[int]] = [[] for _ in range(num_groups)]
        for seq, n, _ in prefills:
            start = seq.num_computed_tokens
            tokens.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            for g, (table, offset) in enumerate(zip(seq.block_ids, seq.kv_offsets)):
                entries = np.arange(start - offset, start + n - offset)
                slots[g].extend((np.asarray(table)[entries // bs] * bs + entries % bs).tolist())
                prefill_blocks[g].append(torch.tensor(table, device=self.device))
                prefill_contexts[g].append(start + n - offset)
        sample_rows: list[int] = []
        sample_ids: list[int] = []
        prompt_rows = []  # (req_id, rows, the prompt tokens they predict) of sequences with prompt_logprobs
        row = 0
        for seq, n, req_id in decodes + prefills:
            start = seq.num_computed_tokens
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                end = min(start + n, seq.num_prompt_tokens - 1)
                prompt_rows.append((req_id, list(range(row, row + end - start)), seq.token_ids[start + 1 : end + 1]))
            row += n
            num_drafts = len(sched.spec_token_ids.get(req_id, []))
            if start + n - num_drafts == len(seq.token_ids):  # its last token's row, then its drafts'
                sample_rows.extend(range(row - 1 - num_drafts, row))
                sample_ids.append(req_id)

        device = self.device
        num_rows = len(decode_seqs)
        query_lens = [n for _, n, _ in prefills]

        def metadata(g: int) -> AttentionMetadata:
            window = self.kv_groups[g].window
            tables = np.zeros((num_rows, max((len(s.block_ids[g]) for s in decode_seqs), default=0)), dtype=np.int64)
            for i, seq in enumerate(decode_seqs):
                tables[i, : len(seq.block_ids[g])] = seq.block_ids[g]
            contexts = torch.tensor(decode_contexts[g], dtype=torch.long, device=device)
            return AttentionMetadata(
                slot_mapping=torch.tensor(slots[g], dtype=torch.long, device=device),
                num_decodes=num_rows,
                decode_block_tables=torch.from_numpy(tables).to(device),
                decode_context_lens=contexts,
                decode_mask=(  # torch's attention needs it; the kernels do not
                    AttentionMetadata.decode_mask_for(contexts, max(decode_contexts[g]), window)
                    if num_rows and not self.kernels else None
                ),
                prefill_query_lens=query_lens,
                prefill_context_lens=prefill_contexts[g],
                prefill_block_tables=prefill_blocks[g],
                prefill_masks=[
                    AttentionMetadata.prefill_mask_for(q, c, window, device)
                    for q, c in zip(query_lens, prefill_contexts[g])
                ],
                sliding_window=window,
            )

        return (
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            [metadata(g) for g in range(num_groups)],
            torch.tensor(sample_rows, dtype=torch.long, device=device),
            sample_ids,
            prompt_rows,
        )


# Tokens after the prompt that a step may compute as decode rows (a speculative step verifies its draft
# tokens and the next one at once); beyond, attending row by row reads the cache once per row too often.
MAX_DECODE_QUERY = 16


def _is_decode(seq: _SeqState, num_tokens: int) -> bool:
    return num_tokens == 1 or (num_tokens <= MAX_DECODE_QUERY and seq.num_computed_tokens >= seq.num_prompt_tokens)


def _bitmask_rows(sched: SchedulerOutput, row_ids: list[int]) -> torch.Tensor | None:
    """The grammar bitmask rows of the sampling rows (each sequence's rows in turn: its last token's, then its
    drafts'); all ones for sequences without a grammar."""
    if sched.grammar_bitmask is None:
        return None
    first_row, at = {}, 0
    for req_id in sched.grammar_req_ids:
        first_row[req_id] = at
        at += 1 + len(sched.spec_token_ids.get(req_id, []))
    words = torch.full((len(row_ids), sched.grammar_bitmask.shape[1]), -1, dtype=torch.int32)
    seen: dict[int, int] = {}
    for row, req_id in enumerate(row_ids):
        if req_id in first_row:
            words[row] = sched.grammar_bitmask[first_row[req_id] + seen.get(req_id, 0)]
            seen[req_id] = seen.get(req_id, 0) + 1
    return words


def _aligned(nbytes: int) -> int:
    return -(-nbytes // hugepages.ALIGN) * hugepages.ALIGN


def _weights_nbytes(model: torch.nn.Module, per_token: bool = False) -> int:
    """Bytes of weights the model holds: parameters and quantized buffers, tied tensors once. per_token:
    those a decode step reads for each token, i.e. without an untied token table (one row of it is read;
    a tied one is counted as the output layer)."""
    tensors = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("rotary."):  # the cos/sin tables are a cache, not weights
            continue
        if per_token and name.startswith("embed_tokens."):
            continue
        tensors[t.data_ptr()] = t.nbytes
    return sum(tensors.values())
