"""Runs the model on the device: owns the weights, the paged KV tensors, and what it holds of each
sequence (tokens, sampling params, block tables, RNG).

Its only input is the step contract (engine/step.py): it applies what changed, turns the step into flat
batch tensors once (token ids, positions, and per KV group the slot mapping and block tables), runs one
forward pass, and samples the sequences whose tokens are all computed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nimblelm import hugepages
from nimblelm.config import ModelConfig
from nimblelm.distributed.pipeline import PipelineStage
from nimblelm.distributed.tensor_parallel import TensorParallel
from nimblelm.engine.kv_cache.manager import kv_groups
from nimblelm.engine.kv_cache.policy import KVPolicy
from nimblelm.engine.step import ModelRunnerOutput, SchedulerOutput
from nimblelm.engine.step_capture import StepCapture
from nimblelm.kernels import ops_for
from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.kivi import BITS, LowBitKV, LowBitPlan, compact, fill_ring, keep_branch
from nimblelm.layers.linear import LinearMethod
from nimblelm.layers.rotary import apply_rotary
from nimblelm.layers.sampler import Sampler, SamplingBatch, token_logprobs
from nimblelm.models.decoder import DecoderLM
from nimblelm.quantization.kv_int8 import float_kv_layers, int8_attention_errors
from nimblelm.sampling_params import SamplingParams
from nimblelm.speculative import (
    SPLIT_DRAFTERS,
    SpeculativeConfig,
    make_proposer,
    scratch_blocks,
    speculates,
    tree_branches,
)
from nimblelm.speculative.budget import Acceptance, PassTime, StepCost, draft_budget
from nimblelm.speculative.seen import Seen
from nimblelm.speculative.tree import DraftTree, as_tree, blocks_per_branch
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


@dataclass
class _TreeLayout:
    """Where a sequence's token tree is in a step (ModelRunner._lay_out_tree)."""

    tree: DraftTree
    start: int  # the position of the step's first row
    base: int  # rows before the nodes: the sequence's uncomputed tokens
    # per KV group: the sequence's table, its offset, and each branch's table
    tables: list[tuple[list[int], int, list[list[int]]]] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (group, block, scratch block) before the step
    homes: list[int | None] = field(default_factory=list)  # per node, the branch whose table its row reads (None: the chain)

    # Over a low-bit cache the rows are a prompt chunk at consecutive positions (layers/kivi.py: Segment).

    def stands_for(self) -> np.ndarray:
        """Each row's position in the text: the tokens', then each node's by its depth."""
        start, base = self.start, self.base
        return np.array(list(range(start, start + base)) + [start + base - 1 + d for d in self.tree.depths()])

    def visible(self, device) -> torch.Tensor:
        """[rows, rows]: the rows each row attends to, the tokens before the nodes and its own branch."""
        base, n = self.base, self.base + len(self.tree)
        seen = torch.ones(n, n, dtype=torch.bool).tril()
        for node, parent in enumerate(self.tree.parents):
            seen[base + node, base:] = False
            seen[base + node, base + node] = True
            if parent >= 0:
                seen[base + node] |= seen[base + parent]
        return seen.to(device)


@dataclass
class _Batch:
    """A step as flat tensors (ModelRunner._prepare)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    group_metas: list[AttentionMetadata]
    sample_rows: torch.Tensor  # the rows whose logits are sampled
    sample_ids: list[int]  # the sequences sampled, in order
    prompt_rows: list[tuple[int, list[int], list[int]]]
    spans: dict[int, tuple[int, int, int]]  # per sequence: its first row, that row's position, its rows
    trees: dict[int, _TreeLayout]  # of the sequences that verify a token tree
    voters: list[int]  # the sequences whose compaction votes, in the order of their prefill chunks


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
        kv_policy: KVPolicy | None = None,
        kv_residual_length: int | None = None,
        kv_residual_dtype: torch.dtype | None = None,
        tp: TensorParallel | None = None,
        stage: PipelineStage | None = None,
    ):
        """Builds the model: the layers in `quantized` (module name -> (format name, tensors), as the loader
        gives them) adopt their tensors, the others load from `weights` and take `linear_method`. The KV
        cache comes with allocate_kv, once the engine has sized it. With `tp`, this runner is one rank of a
        tensor-parallel group: `weights` are its share (TensorParallel.shard), and so are its heads and KV. With
        `stage`, it is one stage of a pipeline: it holds the stage's layers (PipelineStage.keep) and their KV."""
        self.full_config = config  # the whole model's: what a drafter holding whole layers of it builds (EAGLE's)
        self.config = config = config if tp is None else tp.local_config(config)
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        with torch.device("meta"):
            model = DecoderLM(config, max_positions=max_model_len, tp=tp, stage=stage)
        self.model = model.materialize(device, dtype, weights, linear_method, quantized)
        self.weights_nbytes = _weights_nbytes(self.model)
        self.token_nbytes = _weights_nbytes(self.model, per_token=True)
        self.kv_groups = kv_groups(config.layer_windows, kv_policy is not None and kv_policy.method == "pyramidkv")
        # Layer i of every group keeps its K/V in tensor i, so a block of any group is the same bytes.
        self.kv_tensor_of_layer = [0] * config.num_layers
        self.group_of_layer = [0] * config.num_layers
        for g, group in enumerate(self.kv_groups):
            for i, layer in enumerate(group.layers):
                self.kv_tensor_of_layer[layer] = i
                self.group_of_layer[layer] = g
        # Per tensor held (a pipeline stage holds its own layers'), how its K/V are stored: an int8 cache keeps
        # the layers int8 would distort in `dtype`.
        self.held_layers = held = range(config.num_layers) if stage is None else stage.layers
        self.kv_dtypes = {i: kv_cache_dtype for i in sorted({self.kv_tensor_of_layer[layer] for layer in held})}
        self.int8_kv_errors: list[float] = []
        if kv_cache_dtype == torch.int8:
            self.int8_kv_errors = int8_attention_errors(
                self.model, max_len=max_model_len, block_size=block_size, dtype=dtype, device=device
            )
            for layer in float_kv_layers(self.int8_kv_errors):
                self.kv_dtypes[self.kv_tensor_of_layer[layer]] = dtype
        self.num_blocks = 0
        self.kv_caches: list[KVCache | None] = []  # per layer (layers of one tensor share it; None: not held)
        self.kernels = ops_for(torch.empty(0, dtype=dtype, device=device)) is not None
        self.kv_bits = BITS.get(kv_cache_dtype)  # an int4 or int2 cache (layers/kivi.py)
        self.residual_length = kv_residual_length  # the entries a query reads at full precision
        self.residual_dtype = kv_residual_dtype or dtype  # and their dtype
        # A residual ring's entries: a speculative step writes its rows before its drafts are verified, and room
        # for all but one of them past the residual keeps every entry a rejection falls back to (layers/kivi.py).
        spare = 0 if speculative is None else -(-max(0, speculative.max_draft_nodes - 1) // block_size)
        self.ring_length = None if kv_residual_length is None else kv_residual_length + spare * block_size
        # Decode steps replayed from traces of the model (step_capture.py) where its kernels serve it; a pipeline
        # stage sends and receives.
        self.capturing = not enforce_eager and self.kernels and stage is None
        self.capture: StepCapture | None = None
        self.sampler = Sampler()
        self.max_model_len = max_model_len
        self.speculative = speculative
        self.kv_policy = kv_policy
        # H2O: the full-attention layers add up the attention each entry receives, in every step.
        self._accumulates = kv_policy is not None and kv_policy.method == "h2o"
        # With drafts, only what the rows of the tokens kept give counts: each draft's rows add into a region of
        # their own (KVCache.received_regions; one buffer for every KV tensor), folded once verified.
        self.received_regions: torch.Tensor | None = None
        self.proposer = None  # made with the KV cache (a draft model sizes its own after the target's)
        # Of a model split over ranks, the rank whose output the engine reads drafts; the others verify what the
        # step contract sends them. Drafters that read the output layer, which tensor-parallel ranks split, run on
        # every rank of the last stage, in step (speculative.SPLIT_DRAFTERS).
        drafting_stage = speculative is not None and (stage is None or stage.last)
        self.proposes = drafting_stage and (tp is None or tp.rank == 0)
        self.split_drafter = drafting_stage and tp is not None and speculative.method in SPLIT_DRAFTERS
        self.step_cost: StepCost | None = None  # of decode steps by rows, measured when they are replayed
        self.step_overhead = PassTime()  # seconds of a timed step outside its trace: LM head, sampling, verifying
        # Over a low-bit cache a step that verifies a token tree, or drafts under H2O, runs eagerly (those rows are a
        # prompt chunk there): what it takes beyond the trace of as many rows.
        self.verify_extra = PassTime()
        self.seqs: dict[int, _SeqState] = {}
        # A pipeline stage before the last: the step it ran last, when that verified drafts, whose kept nodes the
        # next step names (SchedulerOutput.kept_drafts).
        self.unverified: tuple[_Batch, SchedulerOutput] | None = None
        # A low-bit cache's residual rings (each sequence's last entries, at full precision): their rows, by
        # sequence, each row a ring per KV group.
        self.residual_rows: dict[int, int] = {}
        self.free_residual_rows: list[int] = []
        self.generators: dict[int, torch.Generator] = {}
        torch.manual_seed(seed)

    def allocate_kv(self, num_blocks: int, max_num_seqs: int) -> None:
        """Every tensor's K/V (and int8 scales) as views of one buffer, on CPU one of huge pages; then the
        traces of decode steps of up to max_num_seqs rows, when steps are replayed."""
        cfg = self.config
        # Block num_blocks, beyond those the KV cache manager hands out, is scratch for padding rows; a
        # proposer that drafts with the target's own layers, or the branches of token trees, write past it.
        drafting = scratch_blocks(self.speculative, self.block_size, len(self.kv_groups))
        self.tree_branches = tree_branches(self.speculative)
        self.tree_blocks_per_branch = blocks_per_branch(self.block_size)
        self.tree_scratch = drafting if self.tree_branches else 0
        shape = (2, num_blocks + 1 + drafting, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        if self.kv_bits is not None:
            self._allocate_lowbit(shape, num_blocks, max_num_seqs)
        else:
            self._allocate_blocks(shape, num_blocks)
        if self.proposes or self.split_drafter:
            self.proposer = make_proposer(self.speculative, self, num_blocks, max_num_seqs)
        if self.capturing:
            windows = [group.window for group in self.kv_groups]
            self.capture = StepCapture(self.model, self.kv_caches, windows, self.group_of_layer, num_blocks,
                                       self.block_size, accumulates=self._accumulates)
            if self.speculative is None:
                self.capture.warm_up(max_num_seqs)
            else:  # a sequence verifying k drafts takes k + 1 rows (alike on every rank: warming up runs collectives)
                self.capture.warm_up(max_num_seqs * (1 + self.speculative.num_speculative_tokens))
                self.step_cost = StepCost(self.capture.seconds_by_rows())

    def _allocate_blocks(self, shape: tuple[int, ...], num_blocks: int) -> None:
        """One buffer for every KV tensor's blocks (and an int8 cache's scales)."""
        offsets, nbytes = [], 0
        for kv_dtype in self.kv_dtypes.values():
            values_at = nbytes
            nbytes = _aligned(nbytes + math.prod(shape) * kv_dtype.itemsize)
            scales_at = nbytes
            if kv_dtype == torch.int8:
                nbytes = _aligned(nbytes + math.prod(shape[:-1]) * 4)
            offsets.append((values_at, scales_at))
        received = self._allocate_received(shape[1:-1])
        if self.device.type == "cpu":
            buf = hugepages.empty(nbytes).zero_()
        else:
            buf = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        tensors = {}
        for (i, kv_dtype), (values_at, scales_at) in zip(self.kv_dtypes.items(), offsets):
            values = buf[values_at:].narrow(0, 0, math.prod(shape) * kv_dtype.itemsize).view(kv_dtype).view(shape)
            scales = None
            if kv_dtype == torch.int8:
                scales = buf[scales_at:].narrow(0, 0, math.prod(shape[:-1]) * 4).view(torch.float32).view(shape[:-1])
            tensors[i] = KVCache(values, scales, *received.get(i, (None, None)))
        self.num_blocks = num_blocks
        self.kv_caches = [tensors.get(i) for i in self.kv_tensor_of_layer]

    def _allocate_received(self, entries: tuple[int, ...]) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
        """Per KV tensor, H2O's received and, with speculative decoding, its received_regions (KVCache), over
        `entries` (blocks, block_size, kv_heads): views of one buffer, which one fold per KV group updates."""
        if not self._accumulates:
            return {}
        regions = 1 + (self.speculative.max_draft_nodes if self.speculative is not None else 0)
        buf = torch.zeros((len(self.kv_dtypes), regions, *entries), dtype=torch.float32, device=self.device)
        if regions > 1:
            self.received_regions = buf
        return {i: (buf[j, 0], buf[j] if regions > 1 else None) for j, i in enumerate(self.kv_dtypes)}

    def _allocate_lowbit(self, shape: tuple[int, ...], num_blocks: int, max_num_seqs: int) -> None:
        """Packed values and LowBitKV per tensor, with a residual ring per sequence and KV group for
        max_num_seqs sequences (more are added when more sequences are held at once), after the rings of
        row 0, which replayed steps' padding rows write (step_capture.py)."""
        packed = (*shape[:-1], shape[-1] * self.kv_bits // 8)
        rings = (max_num_seqs + 1) * len(self.kv_groups)
        received = self._allocate_received(shape[1:-1])
        tensors = {i: KVCache(torch.zeros(packed, dtype=torch.uint8, device=self.device), None,
                              *received.get(i, (None, None)),
                              lowbit=LowBitKV.empty(self.kv_bits, shape[1], *shape[2:], rings, self.residual_length,
                                                    self.residual_dtype, self.device, self.ring_length))
                   for i in self.kv_dtypes}
        self.num_blocks = num_blocks
        self.free_residual_rows = list(range(max_num_seqs, 0, -1))
        self.kv_caches = [tensors.get(i) for i in self.kv_tensor_of_layer]

    def kv_bytes_beside_blocks(self, max_num_seqs: int) -> int:
        """Bytes of KV memory that are not blocks: a low-bit cache's residual rings."""
        if self.kv_bits is None:
            return 0
        cfg = self.config
        row = 2 * self.ring_length * cfg.num_kv_heads * cfg.head_dim * self.residual_dtype.itemsize
        return (max_num_seqs + 1) * len(self.kv_groups) * len(self.kv_dtypes) * row

    def kv_bytes_per_block(self) -> int:
        cfg = self.config
        if self.kv_bits is not None:
            return len(self.kv_dtypes) * LowBitKV.bytes_per_block(self.kv_bits, self.block_size, cfg.num_kv_heads,
                                                                  cfg.head_dim)
        per_head = sum(cfg.head_dim * t.itemsize + (4 if t == torch.int8 else 0)  # + scale
                       for t in self.kv_dtypes.values())
        return 2 * cfg.num_kv_heads * per_head * self.block_size

    def read_blocks(self, block_ids: list[list[int]]) -> list[tuple[torch.Tensor, Any] | None]:
        """Per layer, the K/V of its group's blocks block_ids[g] on the CPU, with their int8 scales, or a low-bit
        cache's packed levels with their (K scale, K minimum, V scale, V minimum) (sealed blocks: what a prefix
        cache hit reads, layers/kivi.py); None for a layer this runner does not hold."""
        out = []
        for cache, g in zip(self.kv_caches, self.group_of_layer):
            if cache is None:
                out.append(None)
                continue
            ids = torch.tensor(block_ids[g], dtype=torch.long, device=self.device)
            if cache.lowbit is not None:
                scales = tuple(x[ids].cpu() for x in cache.lowbit.block_params)
            else:
                scales = None if cache.scales is None else cache.scales[:, ids].cpu()
            out.append((cache.values[:, ids].cpu(), scales))
        return out

    def write_blocks(self, block_ids: list[list[tuple[int, int]]], kv: list[tuple[torch.Tensor, Any] | None]) -> None:
        """Into each layer's blocks, per group (index, block id), the K/V of read_blocks' entry `index`."""
        for cache, g, layer_kv in zip(self.kv_caches, self.group_of_layer, kv):
            if cache is None or not block_ids[g]:
                continue
            index = torch.tensor([i for i, _ in block_ids[g]], dtype=torch.long)
            ids = torch.tensor([b for _, b in block_ids[g]], dtype=torch.long, device=self.device)
            values, scales = layer_kv
            cache.values[:, ids] = values[:, index].to(self.device, cache.values.dtype)
            if cache.lowbit is not None:
                for x, got in zip(cache.lowbit.block_params, scales):
                    x[ids] = got[index].to(self.device)
            elif cache.scales is not None:
                cache.scales[:, ids] = scales[:, index].to(self.device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Apply the step's changes, run it, and return the tokens sampled."""
        start = time.perf_counter()
        self._update(sched)
        if sched.is_empty:
            return ModelRunnerOutput([], [])
        batch = self._prepare(sched)
        for layout in batch.trees.values():
            for g, src, dst in layout.copies:
                self._copy_kv(g, [src], [dst], whole_blocks=True)
        input_ids, group_metas, sample_ids = batch.input_ids, batch.group_metas, batch.sample_ids
        traced = None
        before = time.perf_counter()
        if self.capture is not None and self.capture.applies(len(input_ids), group_metas):
            hidden = self.capture(input_ids, batch.positions, group_metas)
            traced = time.perf_counter() - before
        else:
            metas = [group_metas[g] for g in self.group_of_layer]
            hidden = self.model(input_ids, batch.positions, self.kv_caches, metas)
            if self.kv_bits is not None and self.step_cost is not None and sched.spec_token_ids and all(
                    self.seqs[i].num_computed_tokens >= self.seqs[i].num_prompt_tokens for i in sched.num_scheduled_tokens):
                self.verify_extra.add(max(0.0, time.perf_counter() - before - self.step_cost(len(input_ids))))
        for req_id, plan in sched.compactions.items():  # every pipeline stage compacts its own layers
            self._compact(req_id, sched.num_scheduled_tokens[req_id], plan, batch)
        if hidden is None:  # a pipeline stage before the last: its output went on to the next stage
            self.unverified = (batch, sched) if sched.spec_token_ids else None
            return ModelRunnerOutput([], [])
        prompt_logprobs = self._prompt_logprobs(hidden, batch.prompt_rows) if batch.prompt_rows else {}
        if not sample_ids:
            if self.proposer is not None and self.proposer.observes:
                self.proposer.observe(self._seen(batch, hidden, {}))
            return ModelRunnerOutput([], [], prompt_logprobs=prompt_logprobs)
        logits = self.model.compute_logits(hidden[batch.sample_rows])
        trees = [batch.trees[i].tree if i in batch.trees else as_tree(sched.spec_token_ids.get(i, []))
                 for i in sample_ids]
        # One sampling row per logits row: a sequence with drafts has one for its last token and each draft.
        row_ids = [i for i, tree in zip(sample_ids, trees) for _ in range(len(tree) + 1)]
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
        if any(trees):
            verified = verify(self.sampler, logits, sampling, trees)
            tokens, logprobs = verified.token_ids, verified.logprobs
            paths, outputs = verified.paths, verified.outputs
            kept = {req_id: path if req_id in batch.trees else list(range(len(new) - 1))
                    for req_id, new, path in zip(sample_ids, tokens, paths) if sched.spec_token_ids.get(req_id)}
            self._keep_drafts(batch, sched, kept)
        else:
            sampled = self.sampler(logits, sampling)
            tokens = [[t] for t in sampled.token_ids]
            logprobs = None if sampled.logprobs is None else [[entry] for entry in sampled.logprobs]
            paths = outputs = [None] * len(sample_ids)
            kept = {}
        proposals = {}
        if self.proposer is not None:
            if traced is not None:
                self.step_overhead.add(time.perf_counter() - start - traced)
            if self.proposer.observes:
                self.proposer.observe(self._seen(batch, hidden, dict(zip(sample_ids, zip(tokens, trees, paths, outputs)))))
            proposals = self._propose(sample_ids, trees, tokens)
        return ModelRunnerOutput(
            sample_ids, tokens, logprobs, prompt_logprobs,
            {req_id: list(d.tokens) if isinstance(d, DraftTree) else d for req_id, d in proposals.items()},
            {req_id: d.parents for req_id, d in proposals.items() if isinstance(d, DraftTree)},
            kept,
        )

    def _seen(self, batch: _Batch, hidden: torch.Tensor, sampled: dict[int, tuple]) -> dict[int, Seen]:
        """Per sequence the step computed: the hidden states of its rows whose next token is now known (for a
        sampled sequence, its uncomputed tokens and the drafts it kept), with those tokens. sampled: per sampled
        sequence, its new tokens, the drafts it verified, the nodes it kept and the target's token at each row
        (the last two None without drafts)."""
        seen = {}
        for req_id, (row, start, n) in batch.spans.items():
            state = self.seqs[req_id]
            if req_id in sampled:
                new, tree, path, outputs = sampled[req_id]
                base = len(state.token_ids) - start
                rows = list(range(row, row + base)) + [row + base + node for node in path or []]
                seen[req_id] = Seen(start, hidden[rows], (state.token_ids + new)[start + 1 : start + 1 + len(rows)],
                                    tree or None, outputs)
            else:  # a prompt chunk that samples nothing
                seen[req_id] = Seen(start, hidden[row : row + n], state.token_ids[start + 1 : start + 1 + n])
        return seen

    def _keep_drafts(self, batch: _Batch, sched: SchedulerOutput, kept: dict[int, list[int]]) -> None:
        """The step's drafts verified, `kept` the nodes each sequence kept: its token tree's kept branch into its
        own slots, and H2O's scores of the kept rows folded in."""
        for req_id, layout in batch.trees.items():
            if self.kv_bits is None:
                self._keep_branch(layout, kept[req_id])
            else:
                self._keep_lowbit_branch(req_id, layout, kept[req_id])
        if self.received_regions is not None:
            self._fold_received(batch, sched, kept)

    def _fold_received(self, batch: _Batch, sched: SchedulerOutput, kept: dict[int, list[int]]) -> None:
        """H2O: add what the rows of the drafts kept gave their entries (node i's region, i + 1) to what the
        entries have received (region 0), as if those tokens had been decoded one at a time, each entry at its
        slot in the sequence's own table (a tree's node off the chain read its branch's); clear every draft
        region."""
        bs = self.block_size

        def slots(blocks: list[int], count: int) -> torch.Tensor:  # of entries 0 .. count - 1 in a table
            entries = torch.arange(count, device=self.device)
            return torch.tensor(blocks, device=self.device)[entries // bs] * bs + entries % bs

        for req_id, nodes in kept.items():
            state, (_, start, n) = self.seqs[req_id], batch.spans[req_id]
            layout = batch.trees.get(req_id)
            depths = layout.tree.depths() if layout is not None else range(1, n)
            base = n - len(sched.spec_token_ids[req_id])
            flat = self.received_regions.flatten(2, 3)  # [tensors, regions, slots, kv_heads]
            for g, group in enumerate(self.kv_groups):
                if group.window is not None:  # sliding layers add up nothing
                    continue
                table, offset = state.block_ids[g], state.kv_offsets[g]
                for node in nodes:
                    count = start + base + depths[node] - offset  # the entries the node's row read
                    if layout is not None and self.kv_bits is not None:
                        # Over a low-bit cache its branch's rows are at consecutive entries after the tokens'.
                        first = start + base - offset
                        step = slots(table, start + n - offset)
                        src = torch.cat([step[:first], step[[first + m for m in layout.tree.path(node)]]])
                    else:
                        home = layout.homes[node] if layout is not None else None
                        src = slots(table if home is None else layout.tables[g][2][home], count)
                    flat[:, 0, slots(table, count)] += flat[:, 1 + node, src]
                flat[:, 1:, slots(table, start + n - offset)] = 0
        if batch.trees:  # the branches' scratch blocks, once every sequence has folded what its rows left there
            self.received_regions[:, 1:, self.num_blocks + 1 :] = 0

    def _keep_branch(self, layout: _TreeLayout, path: list[int]) -> None:
        """A tree's kept nodes into the sequence's own slots, when they leave the primary chain (whose nodes are
        there already)."""
        if not path or path[-1] < layout.tree.chain_length():
            return
        branch = next(b for b, nodes in enumerate(layout.tree.branches()) if path[-1] in nodes)
        bs = self.block_size
        for g, (table, offset, tables) in enumerate(layout.tables):
            entries = [layout.start + layout.base + i - offset for i in range(len(path))]
            src = [tables[branch][e // bs] * bs + e % bs for e in entries]
            dst = [table[e // bs] * bs + e % bs for e in entries]
            self._copy_kv(g, src, dst)

    def _keep_lowbit_branch(self, req_id: int, layout: _TreeLayout, path: list[int]) -> None:
        """Over a low-bit cache, a tree's kept nodes off the primary chain into the entries they stand for, in the
        sequence's rings (kivi.keep_branch)."""
        if not path or path[-1] < layout.tree.chain_length():
            return
        state = self.seqs[req_id]
        for g, (table, offset) in enumerate(zip(state.block_ids, state.kv_offsets)):
            first = layout.start + layout.base - offset
            src = torch.tensor([first + node for node in path], device=self.device)
            dst = torch.arange(first, first + len(path), device=self.device)
            at = self._residual_slot(req_id, g)
            for layer in self.kv_groups[g].layers:
                cache = self.kv_caches[layer]
                if cache is not None:
                    keep_branch(cache.values, cache.lowbit, at, src, dst, table)

    def _shift(self, seq: _SeqState) -> int:
        """How far seq's rotary positions lag its positions in the text: with cache positions, the tokens its
        cache dropped (its one KV group's offset)."""
        return seq.kv_offsets[0] if self.kv_policy is not None and self.kv_policy.cache_positions else 0

    def _compact(self, req_id: int, n: int, plan: list[tuple[list[int], int] | None], batch: _Batch) -> None:
        """Gather the entries the sequence keeps (its policy picks them per layer and KV head) into the new
        blocks of its plan, which become its tables."""
        state, bs = self.seqs[req_id], self.block_size
        end = state.num_computed_tokens + n
        for g, step in enumerate(plan):
            if step is None:
                continue
            new_table, dropped = step
            table = torch.tensor(state.block_ids[g], device=self.device)
            num_entries, keep = end - state.kv_offsets[g], end - dropped * bs
            entries = torch.arange(max(num_entries, keep), device=self.device)
            old_slots = (table[entries[:num_entries] // bs] * bs + entries[:num_entries] % bs)
            new_slots = torch.tensor(new_table, device=self.device)[entries[:keep] // bs] * bs + entries[:keep] % bs
            meta = batch.group_metas[g]
            # Layer by layer (those this pipeline stage holds), each layer's votes of every voting chunk in turn.
            votes = meta.votes[batch.voters.index(req_id) :: len(batch.voters)] if meta.votes else None
            layers = [layer for layer in self.kv_groups[g].layers if layer in self.held_layers]
            heads = torch.arange(self.config.num_kv_heads, device=self.device)
            # A low-bit cache's key groups (layers/kivi.py): those a compaction made (the table dropped blocks
            # from its front) are kept or dropped whole.
            groups = (1, 0) if self.kv_bits is None else (
                bs, max(0, num_entries // bs * bs + bs - self.residual_length) if state.kv_offsets[g] else 0)
            kept = None
            for i, layer in enumerate(layers):
                cache = self.kv_caches[layer]
                if cache.received is not None:
                    votes_i = cache.received.flatten(0, 1)[old_slots].T
                else:
                    votes_i = None if votes is None else votes[i]
                if votes_i is not None and self.tp is not None:  # a KV head's query heads may be on other ranks
                    votes_i = self.tp.share_kv_head_scores(self.full_config, votes_i)
                if kept is None or votes_i is not None:  # without votes, every layer keeps the same entries
                    kept = self.kv_policy.select(keep, num_entries, self.config.num_kv_heads, votes_i,
                                                 *groups).to(self.device)
                src = old_slots[kept].T  # [keep, kv_heads]
                if cache.received is not None:
                    received = cache.received.flatten(0, 1)
                    received[new_slots] = received[src, heads]
                if cache.lowbit is not None:
                    rotate = None
                    if self.kv_policy.cache_positions:
                        distance = num_entries - keep
                        rotate = (self.model.rotary.cos[0][distance], self.model.rotary.sin[0][distance],
                                  self.kv_policy.num_sinks)
                    compact(cache.values, cache.lowbit, table, num_entries, kept,
                            torch.tensor(new_table, device=self.device), self._residual_slot(req_id, g),
                            self._residual_slot(req_id, g, dropped * bs), rotate)
                    continue
                for x in (cache.values, cache.scales):
                    if x is not None:
                        flat = x.flatten(1, 2)  # [2, slots, kv_heads, ...]
                        flat[:, new_slots] = flat[:, src, heads]
                if self.kv_policy.cache_positions:
                    self._rotate_back(cache, new_slots[self.kv_policy.num_sinks :], num_entries - keep)
            state.block_ids[g] = list(new_table)
            state.kv_offsets[g] = dropped * bs

    def _rotate_back(self, cache: KVCache, slots: torch.Tensor, distance: int) -> None:
        """Rotate the keys at `slots` back by `distance` positions, where they moved (rotary angles add up)."""
        cos, sin = self.model.rotary.cos[0][distance], self.model.rotary.sin[0][distance]
        keys = cache.k.flatten(0, 1)
        keys[slots] = apply_rotary(keys[slots], cos, -sin).to(keys.dtype)

    def _copy_kv(self, group: int, src: list[int], dst: list[int], whole_blocks: bool = False) -> None:
        """The K/V (and int8 scales) of the group's layers at slots src into slots dst (blocks, whole_blocks)."""
        for layer, g in enumerate(self.group_of_layer):
            if g != group:
                continue
            cache = self.kv_caches[layer]
            if cache is None:  # a layer of another pipeline stage
                continue
            values = cache.values if whole_blocks else cache.values.flatten(1, 2)
            values[:, dst] = values[:, src]
            if cache.scales is not None:
                scales = cache.scales if whole_blocks else cache.scales.flatten(1, 2)
                scales[:, dst] = scales[:, src]

    def _propose(self, sample_ids: list[int], trees: list[DraftTree],
                 tokens: list[list[int]]) -> dict[int, list[int] | DraftTree]:
        """Drafts to follow each sampled sequence's new tokens, within its token and context limits and, where
        decode steps are timed, what pays for its rows (speculative/budget.py): the budget is drawn first,
        so that a large batch, where few drafts pay, spends no time drafting the rest. A tree is cut to the
        nodes its room allows; to its primary chain for a sequence with a grammar (whose masks follow a
        chain), and beyond the branches the step's scratch blocks hold."""
        room, depth = {}, {}
        for req_id, verified, new in zip(sample_ids, trees, tokens):
            state = self.seqs[req_id]
            if verified:
                state.acceptance.update(max(verified.depths()), len(new) - 1)
            else:
                state.acceptance.idle()
            if not speculates(state.params):
                continue
            num_tokens = len(state.token_ids) + len(new)
            # The next step emits up to depth + 1 tokens: room for them all in max_tokens and the context.
            d = min(self.speculative.num_speculative_tokens, self.max_model_len - num_tokens - 1)
            if state.params.max_tokens is not None:
                d = min(d, state.params.max_tokens - (num_tokens - state.num_prompt_tokens) - 1)
            if d > 0:
                depth[req_id] = d
                room[req_id] = self.speculative.max_draft_nodes if self.speculative.proposes_trees else d
        if self.step_cost is not None and room:
            # A seeded sampling request drafts its whole room: which of its positions are drafts decides which
            # random draws make its tokens, so a budget that follows the machine's timings would give one
            # seed different outputs from run to run.
            seeded = {r: n for r, n in room.items() if self.seqs[r].params.seed is not None
                      and not self.seqs[r].params.greedy}
            timed = {r: n for r, n in room.items() if r not in seeded}
            rates = {req_id: self.seqs[req_id].acceptance.rate for req_id in timed}
            room = seeded | (draft_budget(timed, rates, len(sample_ids) + sum(seeded.values()), self.step_cost,
                                          self.proposer.pass_seconds, self.step_overhead.seconds,
                                          self.verify_extra.seconds) if timed else {})
        if self.split_drafter:  # every rank's drafter drafts for what the output rank's budget chose
            room = self.tp.broadcast(room)
        new_tokens = dict(zip(sample_ids, tokens))
        requests = {req_id: (self.seqs[req_id].token_ids + new_tokens[req_id], self.seqs[req_id].num_prompt_tokens, n)
                    for req_id, n in room.items()}
        proposals = self.proposer.propose_all(requests)
        if not self.proposes:
            return {}
        branches = 0
        for req_id, drafts in proposals.items():
            if isinstance(drafts, DraftTree):
                tree = drafts.limited(room[req_id], depth[req_id])
                too_many = branches + len(tree.branches()) > self.tree_branches
                if too_many or self.seqs[req_id].params.structured_output is not None:
                    tree = tree.truncated(tree.chain_length())
                branches += len(tree.branches())
                proposals[req_id] = tree if tree.branches() else tree.tokens
        return {req_id: d for req_id, d in proposals.items() if len(d)}

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
        if self.unverified is not None:  # with the tables of the step that laid out the drafts
            self._keep_drafts(*self.unverified, sched.kept_drafts)
            self.unverified = None
        for req_id in sched.finished_req_ids:
            self.seqs.pop(req_id, None)
            self.generators.pop(req_id, None)
            self._release_residual(req_id)
        if self.proposer is not None:
            self.proposer.forget(sched.finished_req_ids)
        for new in sched.new_requests:
            self._release_residual(new.req_id)  # a preempted sequence starts again at a block's start
            self.seqs[new.req_id] = _SeqState(
                new.prompt_token_ids + new.output_token_ids, len(new.prompt_token_ids), new.params,
                [list(ids) for ids in new.block_ids], [d * self.block_size for d in new.num_dropped_blocks],
                new.num_computed_tokens,
            )
            if self.kv_bits is not None and new.num_computed_tokens:
                self._fill_rings(new.req_id)
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

    def _fill_rings(self, req_id: int) -> None:
        """A sequence that starts after a prefix cache hit reads the hit's entries as stored (kivi.fill_ring)."""
        state = self.seqs[req_id]
        for g, (table, offset) in enumerate(zip(state.block_ids, state.kv_offsets)):
            at = self._residual_slot(req_id, g)
            blocks = torch.tensor(table, device=self.device)
            for layer in self.kv_groups[g].layers:
                cache = self.kv_caches[layer]
                if cache is not None:
                    fill_ring(cache.values, cache.lowbit, blocks, state.num_computed_tokens - offset, at)

    def _release_residual(self, req_id: int) -> None:
        if req_id in self.residual_rows:
            self.free_residual_rows.append(self.residual_rows.pop(req_id))

    def _residual_slot(self, req_id: int, group: int, offset: int | None = None) -> int:
        """The sequence's residual slot in the KV group (kivi.ring_slots), for its table's offset (default: the
        one it has now); its row of rings is taken if it has none."""
        if offset is None:
            offset = self.seqs[req_id].kv_offsets[group]
        if req_id not in self.residual_rows:
            if not self.free_residual_rows:  # more sequences held than max_num_seqs (preempted ones wait)
                rows = len(self.residual_rows) + 1  # and the padding rows'
                for lowbit in {id(c.lowbit): c.lowbit for c in self.kv_caches if c is not None}.values():
                    lowbit.grow(2 * rows * len(self.kv_groups))
                self.free_residual_rows = list(range(2 * rows - 1, rows - 1, -1))
                if self.capture is not None:  # its traces hold the residuals just replaced
                    self.capture.traces.clear()
            self.residual_rows[req_id] = self.free_residual_rows.pop()
        length = self.ring_length
        return (self.residual_rows[req_id] * len(self.kv_groups) + group) * length + offset % length

    def _prepare(self, sched: SchedulerOutput) -> _Batch:
        # Decode rows go first, in one batched attention call: a sequence's single new token, or the few
        # tokens after its prompt that a step computes at once (speculative verification), each row
        # attending over the cache up to itself. Longer runs of tokens are prefill chunks.
        scheduled = [(self.seqs[i], n, i) for i, n in sched.num_scheduled_tokens.items()]
        # A sequence whose compaction votes is a prefill chunk: its last rows' attention weights are taken there.
        voting = set(sched.compactions) if self.kv_policy is not None and self.kv_policy.needs_votes else set()
        chunked = set(voting)
        if self.kv_bits is not None:
            # Over a low-bit cache a token tree's rows attend along their branches, and H2O weighs drafts' rows by
            # rank, in a prompt chunk only (layers/kivi.py): the decode kernels read and seal the cache by position.
            chunked |= set(sched.spec_token_ids if self.received_regions is not None else sched.spec_parents)
        decodes = [x for x in scheduled if _is_decode(*x[:2]) and x[2] not in chunked]
        prefills = [x for x in scheduled if not _is_decode(*x[:2]) or x[2] in chunked]
        bs = self.block_size
        num_groups = len(self.kv_groups)

        tokens: list[int] = []
        positions: list[int] = []
        slots: list[list[int]] = [[] for _ in range(num_groups)]
        decode_contexts: list[list[int]] = [[] for _ in range(num_groups)]  # per decode row, as it attends
        decode_tables: list[list[list[int]]] = [[] for _ in range(num_groups)]  # per decode row, its blocks
        extra_writes: list[list[tuple[int, int]]] = [[] for _ in range(num_groups)]  # (row, slot), for trees
        trees: dict[int, _TreeLayout] = {}
        lowbit_spans: list[list[tuple]] = [[] for _ in range(num_groups)]  # per group: LowBitPlan.build's spans
        draft_ranks: list[int] = []  # per row, H2O's (AttentionMetadata.draft_ranks)
        scratch = iter(range(self.num_blocks + 1, self.num_blocks + 1 + self.tree_scratch))
        for seq, n, req_id in decodes:
            start = seq.num_computed_tokens
            drafts = sched.spec_token_ids.get(req_id, [])
            row0 = len(tokens)
            tokens.extend(seq.token_ids[start : start + n - len(drafts)] + drafts)
            draft_ranks.extend([0] * (n - len(drafts)) + list(range(1, len(drafts) + 1)))  # node i's: i + 1
            parents = sched.spec_parents.get(req_id)
            if parents is not None:
                trees[req_id] = self._lay_out_tree(seq, start, n - len(drafts), DraftTree(drafts, parents), row0,
                                                   scratch, positions, slots, decode_contexts, decode_tables,
                                                   extra_writes)
                continue
            positions.extend(range(start - self._shift(seq), start + n - self._shift(seq)))
            for g, (table, offset) in enumerate(zip(seq.block_ids, seq.kv_offsets)):
                if self.kv_bits is not None:
                    lowbit_spans[g].append((row0, start - offset, n, table, self._residual_slot(req_id, g), None))
                for i in range(start - offset, start + n - offset):  # each row's KV entry
                    slots[g].append(table[i // bs] * bs + i % bs)
                    decode_contexts[g].append(i + 1)  # each row sees up to itself
                    decode_tables[g].append(table)
        prefill_blocks: list[list[torch.Tensor]] = [[] for _ in range(num_groups)]
        prefill_contexts: list[list[int]] = [[] for _ in range(num_groups)]
        for seq, n, req_id in prefills:
            start = seq.num_computed_tokens
            drafts = sched.spec_token_ids.get(req_id, [])
            parents = sched.spec_parents.get(req_id)
            # A token tree over a low-bit cache: its rows at consecutive entries, each attending along its branch.
            layout = None
            if parents is not None and self.kv_bits is not None:
                layout = _TreeLayout(DraftTree(drafts, parents), start, n - len(drafts))
            stands_for = np.arange(start, start + n) if layout is None else layout.stands_for()
            if layout is not None:
                trees[req_id] = layout
            if self.kv_bits is not None:
                tree = None if layout is None else layout.visible(self.device)
                for g, (table, offset) in enumerate(zip(seq.block_ids, seq.kv_offsets)):
                    rows = None if tree is None else (torch.from_numpy(stands_for - offset).to(self.device), tree)
                    lowbit_spans[g].append((len(tokens), start - offset, n, table, self._residual_slot(req_id, g), rows))
            tokens.extend(seq.token_ids[start : start + n - len(drafts)] + drafts)
            draft_ranks.extend([0] * (n - len(drafts)) + list(range(1, len(drafts) + 1)))
            positions.extend((stands_for - self._shift(seq)).tolist())
            for g, (table, offset) in enumerate(zip(seq.block_ids, seq.kv_offsets)):
                entries = np.arange(start - offset, start + n - offset)
                slots[g].extend((np.asarray(table)[entries // bs] * bs + entries % bs).tolist())
                prefill_blocks[g].append(torch.tensor(table, device=self.device))
                prefill_contexts[g].append(start + n - offset)
        sample_rows: list[int] = []
        sample_ids: list[int] = []
        spans: dict[int, tuple[int, int, int]] = {}
        prompt_rows = []  # (req_id, rows, the prompt tokens they predict) of sequences with prompt_logprobs
        row = 0
        for seq, n, req_id in decodes + prefills:
            start = seq.num_computed_tokens
            spans[req_id] = (row, start, n)
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                end = min(start + n, seq.num_prompt_tokens - 1)
                prompt_rows.append((req_id, list(range(row, row + end - start)), seq.token_ids[start + 1 : end + 1]))
            row += n
            num_drafts = len(sched.spec_token_ids.get(req_id, []))
            if start + n - num_drafts == len(seq.token_ids):  # its last token's row, then its drafts'
                sample_rows.extend(range(row - 1 - num_drafts, row))
                sample_ids.append(req_id)

        device = self.device
        num_rows = len(decode_contexts[0]) if num_groups else 0
        query_lens = [n for _, n, _ in prefills]

        def metadata(g: int) -> AttentionMetadata:
            window = self.kv_groups[g].window
            tables = np.zeros((num_rows, max(map(len, decode_tables[g]), default=0)), dtype=np.int64)
            for i, table in enumerate(decode_tables[g]):
                tables[i, : len(table)] = table
            contexts = torch.tensor(decode_contexts[g], dtype=torch.long, device=device)
            extra = torch.tensor(extra_writes[g], dtype=torch.long, device=device).view(-1, 2)
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
                extra_write_rows=extra[:, 0] if trees else None,
                extra_write_slots=extra[:, 1] if trees else None,
                vote_rows=vote_rows if voting and window is None else None,
                votes=[] if voting and window is None else None,
                accumulate=window is None and self._accumulates,
                draft_ranks=ranks,
                lowbit=(LowBitPlan.build(lowbit_spans[g], num_rows, bs, self.residual_length, self.ring_length, device)
                        if self.kv_bits is not None else None),
            )

        vote_rows = [min(self.kv_policy.window_size, n) if req_id in voting else 0 for _, n, req_id in prefills]
        ranks = torch.tensor(draft_ranks, dtype=torch.long, device=device) if self.received_regions is not None else None

        return _Batch(
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            [metadata(g) for g in range(num_groups)],
            torch.tensor(sample_rows, dtype=torch.long, device=device),
            sample_ids,
            prompt_rows,
            spans,
            trees,
            [req_id for _, _, req_id in prefills if req_id in voting],
        )

    def _lay_out_tree(self, seq: _SeqState, start: int, base: int, tree: DraftTree, row0: int, scratch, positions,
                      slots, decode_contexts, decode_tables, extra_writes) -> _TreeLayout:
        """A token tree's rows (its sequence's base uncomputed tokens, then the nodes; the first is row row0),
        appended to the step's lists.

        The tokens and the primary chain's nodes are laid out as a chain's are, in the sequence's own slots.
        Each further branch (a leaf off the chain with its ancestors) reads a table of its own: the sequence's
        blocks before the step's first position, then scratch blocks, the first a copy of the sequence's block
        there. A node off the chain is computed once, its K/V written into every branch table that holds it;
        the tokens and chain nodes that a branch reads are written into its blocks too."""
        bs = self.block_size
        chain = tree.chain_length()
        branches = tree.branches()
        holders: list[list[int]] = [[] for _ in tree.tokens]  # per node, the branches that read it
        for b, path in enumerate(branches):
            for node in path:
                holders[node].append(b)
        row_positions = list(range(start, start + base)) + [start + base - 1 + d for d in tree.depths()]
        positions.extend(row_positions)
        layout = _TreeLayout(tree, start, base, homes=[holders[node][0] if node >= chain else None
                                                       for node in range(len(tree.tokens))])
        for g, (table, offset) in enumerate(zip(seq.block_ids, seq.kv_offsets)):
            first = (start - offset) // bs  # the block of the step's first position
            tables = []
            for _ in branches:
                blocks = [next(scratch) for _ in range(self.tree_blocks_per_branch)]
                if first < len(table):
                    layout.copies.append((g, table[first], blocks[0]))
                tables.append(table[:first] + blocks)
            layout.tables.append((table, offset, tables))
            for r, pos in enumerate(row_positions):
                entry, node = pos - offset, r - base
                if node < 0:  # a token before the drafts: every branch reads it
                    home, others = table, range(len(branches))
                elif node < chain:
                    home, others = table, holders[node]
                else:
                    home, others = tables[holders[node][0]], holders[node][1:]
                slots[g].append(home[entry // bs] * bs + entry % bs)
                decode_contexts[g].append(entry + 1)
                decode_tables[g].append(home)
                for b in others:
                    extra_writes[g].append((row0 + r, tables[b][entry // bs] * bs + entry % bs))
        return layout

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
