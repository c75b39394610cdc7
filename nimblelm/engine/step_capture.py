"""Decode steps replayed from a trace of the model's own forward: the CPU fast path.

A decode step of a small model on the CPU is bound by the cost of calling its ops from Python: SmolLM2-135M
makes 300 kernel calls and about 500 view and indexing ops per step, a quarter of a batch-1 step on 2
threads. torch.jit.trace records the Python forward once per number of rows, with the kernels as torch
custom ops, and TorchScript's C++ interpreter replays it (without the GIL). Whatever the Python layer
computes (any architecture, any LinearMethod built from torch or custom ops) is what the trace records,
so there is no second copy of the layer to keep in step with the first.

A trace fixes the number of rows and every Python decision made from it (which kernel a linear method
picks for that many rows), and holds the weights and the KV cache tensors by reference. Each replay takes
the step's token ids, positions and, per KV group, its slot mapping, block tables (of any width) and
context lengths. Decode rows only: prefill chunks attend with shapes that change every step.

torch.jit.trace is deprecated in favour of torch.compile and torch.export; measured on SmolLM2-135M
(2 threads, fp32) its replay ran a batch-1 step in 15.2 ms where the layers from Python took 19.9 ms and a
hand-written C++ stack of the same kernels 15.3 ms, and it needs no compiler at run time.
"""

from __future__ import annotations

import warnings

import torch

from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.linear import SKINNY_MAX_ROWS
from nimblelm.models.decoder import DecoderLM


class StepCapture:
    """The decode-step traces of one model over one KV cache, made on first use of each row count."""

    def __init__(self, model: DecoderLM, kv_caches: list[KVCache], windows: list[int | None],
                 group_of_layer: list[int]):
        """windows: each KV group's sliding window; group_of_layer: each layer's KV group."""
        self.model = model
        self.kv_caches = kv_caches
        self.windows = windows
        self.group_of_layer = group_of_layer
        self.traces: dict[int, torch.jit.ScriptFunction] = {}

    @staticmethod
    def applies(num_rows: int, group_metas: list[AttentionMetadata]) -> bool:
        return num_rows <= SKINNY_MAX_ROWS and group_metas[0].num_decodes == num_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 group_metas: list[AttentionMetadata]) -> torch.Tensor:
        """The step's last hidden states, as DecoderLM.forward returns them."""
        inputs = (
            input_ids, positions, [m.slot_mapping for m in group_metas], [m.decode_block_tables for m in group_metas],
            [m.decode_context_lens for m in group_metas],
        )
        trace = self.traces.get(len(input_ids))
        if trace is None:
            # Tracing runs the step once; the replay below writes the same K/V to the same slots again.
            trace = self.traces[len(input_ids)] = self._trace(inputs)
        return trace(*inputs)

    def _step(self, input_ids, positions, slot_mappings, block_tables, context_lens) -> torch.Tensor:
        group_metas = [
            AttentionMetadata.decodes(slots, tables, lens, window)
            for slots, tables, lens, window in zip(slot_mappings, block_tables, context_lens, self.windows)
        ]
        metas = [group_metas[g] for g in self.group_of_layer]
        return self.model(input_ids, positions, self.kv_caches, metas)

    def _trace(self, inputs) -> torch.jit.ScriptFunction:
        with warnings.catch_warnings():
            # The deprecation notice (see the module's docstring), and warnings that Python values
            # (the row count, the number of rope variants) become constants: they are meant to.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(self._step, inputs, check_trace=False)
