"""Decode steps replayed from a trace of the model's own forward: the CPU fast path.

A decode step of a small model on the CPU is bound by the cost of calling its ops from Python: SmolLM2-135M
makes 300 kernel calls and several hundred view and indexing ops per step, about a fifth of a batch-1
step on 2 threads. TorchScript's tracer records the Python forward once per row count, with the kernels as
torch custom ops, and its C++ interpreter replays it (without the GIL). Whatever the Python layer
computes (any architecture, any LinearMethod built from torch or custom ops) is what the trace records,
so there is no second copy of the layer to keep in step with the first.

A trace fixes the number of rows and every Python decision made from it (which kernel a linear method
picks for that many rows), and holds the weights and the KV cache tensors by reference. Each replay takes
the step's token ids, positions and, per KV group, its slot mapping, block tables (of any width) and
context lengths (and a low-bit cache's residual rows, layers/kivi.py, or H2O's draft ranks beside speculative
decoding, layers/attention.py). Decode rows only: prefill chunks
attend with shapes that change every step. Traces are made for a few row counts (BUCKETS), when the engine
starts: a step's rows are padded up to the next one with rows that write and read only a scratch block of
the cache (and residual row 0 of a low-bit one), and their outputs are dropped.

TorchScript is deprecated in favour of torch.compile and torch.export, which need a compiler and minutes
of compile time per shape on the CPU; a trace costs one eager step and no compiler, and its replay ran a
batch-1 SmolLM2-135M step as fast as a hand-written C++ stack of the same kernels did.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.kivi import LowBitPlan
from nimblelm.layers.linear import SKINNY_MAX_ROWS
from nimblelm.models.decoder import DecoderLM

# The row counts traced: few enough to trace them all at start (~0.1 s each for SmolLM2-135M). A padding
# row costs about what a real one does: up to 6 rows, where one sequence verifying its drafts lands, every
# count has its own (a 5-row step padded to 8 cost Qwen2.5-Coder-1.5B 18% more); above 8 rows a step pads
# by at most 3.
BUCKETS = (1, 2, 3, 4, 5, 6, 8, *range(12, SKINNY_MAX_ROWS + 1, 4))


class StepCapture:
    """The decode-step traces of one model over one KV cache, one per bucket of row counts."""

    def __init__(self, model: DecoderLM, kv_caches: list[KVCache], windows: list[int | None],
                 group_of_layer: list[int], scratch_block: int, block_size: int, accumulates: bool = False):
        """windows: each KV group's sliding window; group_of_layer: each layer's KV group; scratch_block: a
        block of the cache no sequence uses, for padding rows; accumulates: H2O's, the full-attention layers
        add up the attention their entries receive (a kernel the trace records like the others)."""
        self.model = model
        self.kv_caches = kv_caches
        self.windows = windows
        self.accumulates = accumulates
        self.group_of_layer = group_of_layer
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.lowbit = any(c is not None and c.lowbit is not None for c in kv_caches)
        # H2O's draft ranks; a low-bit cache's decode rows are never drafts (those verify as prompt chunks).
        self.ranked = not self.lowbit and any(c is not None and c.received_regions is not None for c in kv_caches)
        self.traces: dict[int, torch.jit.ScriptFunction] = {}

    @staticmethod
    def applies(num_rows: int, group_metas: list[AttentionMetadata]) -> bool:
        # A token tree's step writes some K/V twice (AttentionMetadata.extra_write_rows), which no trace
        # records: it runs eagerly.
        return (num_rows <= BUCKETS[-1] and group_metas[0].num_decodes == num_rows
                and group_metas[0].extra_write_rows is None)

    def _padding(self, bucket: int):
        """The inputs of a step of padding rows alone."""
        ids = torch.zeros(0, dtype=torch.long, device=self.kv_caches[0].values.device)
        empty = AttentionMetadata.decodes(ids, ids.view(0, 1), ids, None,
                                          lowbit=LowBitPlan.decodes(ids) if self.lowbit else None,
                                          draft_ranks=ids if self.ranked else None)
        return self._padded(ids, ids, [empty] * len(self.windows), bucket)

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> None:
        """Trace every bucket up to the one that holds max_rows (the others are traced when first needed)."""
        for bucket in BUCKETS[: BUCKETS.index(_bucket(min(max_rows, BUCKETS[-1]))) + 1]:
            if bucket not in self.traces:
                self.traces[bucket] = self._trace(self._padding(bucket))

    @torch.inference_mode()
    def seconds_by_rows(self) -> dict[int, float]:
        """Each traced bucket's replay time (the better of two), on padding rows that attend to one slot:
        what a step's weights and per-row work cost, with little attention."""
        seconds = {}
        for bucket, trace in sorted(self.traces.items()):
            inputs = _flat(self._padding(bucket))
            times = []
            with torch.jit.optimized_execution(False):
                for _ in range(2):
                    start = time.perf_counter()
                    trace(*inputs)
                    times.append(time.perf_counter() - start)
            seconds[bucket] = min(times)
        return seconds

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 group_metas: list[AttentionMetadata]) -> torch.Tensor:
        """The step's last hidden states, as DecoderLM.forward returns them."""
        num_rows = len(input_ids)
        bucket = _bucket(num_rows)
        inputs = self._padded(input_ids, positions, group_metas, bucket)
        trace = self.traces.get(bucket)
        if trace is None:
            # Tracing runs the step once; the replay below writes the same K/V to the same slots again.
            trace = self.traces[bucket] = self._trace(inputs)
        # Without the profiling executor: it runs each graph's first two calls 4-5x slower to profile it,
        # and its optimizations gained nothing here (a 32-row SmolLM2 step: 35.5 ms either way).
        with torch.jit.optimized_execution(False):
            return trace(*_flat(inputs))[:num_rows]

    def _padded(self, input_ids, positions, group_metas: list[AttentionMetadata], bucket: int):
        """The trace's inputs, with rows added up to `bucket` that write to the scratch block's first slot
        and attend to it alone."""
        pad = bucket - len(input_ids)
        slots = [F.pad(m.slot_mapping, (0, pad), value=self.scratch_slot) for m in group_metas]
        tables = [F.pad(m.decode_block_tables, (0, 0, 0, pad), value=self.scratch_block) for m in group_metas]
        lens = [F.pad(m.decode_context_lens, (0, pad), value=1) for m in group_metas]
        padded = F.pad(input_ids, (0, pad)), F.pad(positions, (0, pad)), slots, tables, lens
        if self.lowbit:
            return *padded, [F.pad(m.lowbit.decode_residual, (0, pad), value=0) for m in group_metas]
        if self.ranked:
            return *padded, [F.pad(m.draft_ranks, (0, pad), value=0) for m in group_metas]
        return padded

    def _step(self, input_ids, positions, slot_mappings, block_tables, context_lens, extra=None) -> torch.Tensor:
        """extra: per group, a low-bit cache's residual rows, or H2O's draft ranks."""
        group_metas = [
            AttentionMetadata.decodes(slots, tables, lens, window, accumulate=self.accumulates and window is None,
                                      lowbit=LowBitPlan.decodes(extra[g]) if self.lowbit else None,
                                      draft_ranks=extra[g] if self.ranked else None)
            for g, (slots, tables, lens, window) in enumerate(zip(slot_mappings, block_tables, context_lens,
                                                                  self.windows))
        ]
        metas = [group_metas[g] for g in self.group_of_layer]
        return self.model(input_ids, positions, self.kv_caches, metas)

    def _trace(self, inputs) -> torch.jit.ScriptFunction:
        """The step's graph as a function of its inputs flattened (as __call__ passes them), in a compilation
        unit of its own: torch.jit.trace would add it to TorchScript's global one, where it and the weights
        and KV cache it holds would stay for as long as the process runs."""
        with warnings.catch_warnings():
            # Warnings that Python values (the row count, the number of rope variants) become constants:
            # they are meant to.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            graph, _ = torch.jit._get_trace_graph(self._step, inputs)
        return torch._C.CompilationUnit().create_function("decode_step", graph)


def _flat(inputs) -> list[torch.Tensor]:
    input_ids, positions, *per_group = inputs
    return [input_ids, positions, *(t for tensors in per_group for t in tensors)]


def _bucket(num_rows: int) -> int:
    return next(b for b in BUCKETS if b >= num_rows)
