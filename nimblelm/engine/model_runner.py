"""Runs the model on the device: owns the weights, the paged KV tensors and the per-request RNGs.

It turns a SchedulerOutput into flat batch tensors once per step (token ids, positions, slot
mapping, block tables), runs one forward pass, and samples the sequences whose prompt is complete.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from nimblelm import hugepages
from nimblelm.config import ModelConfig
from nimblelm.engine.scheduler import SchedulerOutput
from nimblelm.engine.sequence import Sequence
from nimblelm.layers.attention import AttentionMetadata, KVCache
from nimblelm.layers.linear import LinearMethod
from nimblelm.layers.sampler import Sampler, SamplerOutput, SamplingBatch
from nimblelm.models.decoder import DecoderLM
from nimblelm.quantization.kv_int8 import float_kv_layers, int8_attention_errors
from nimblelm.quantization.saved import SavedQuantization


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
        prequantized: dict | None = None,
        saved: SavedQuantization | None = None,
    ):
        """Builds the model (with a quantized folder's tensors copied in, `saved`); the KV cache comes with
        allocate_kv, once the engine has sized it."""
        self.config = config
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        with torch.device("meta"):
            model = DecoderLM(config, max_positions=max_model_len)
        self.model = model.materialize(device, dtype, weights, linear_method, prequantized)
        if saved is not None:
            saved.load_into(self.model)
        self.weights_nbytes = _weights_nbytes(self.model)
        self.token_nbytes = _weights_nbytes(self.model, per_token=True)
        # Per layer, how its K/V are stored: an int8 cache keeps the layers int8 would distort in `dtype`.
        self.kv_dtypes = [kv_cache_dtype] * config.num_layers
        self.int8_kv_errors: list[float] = []
        if kv_cache_dtype == torch.int8:
            self.int8_kv_errors = int8_attention_errors(
                self.model, max_len=max_model_len, block_size=block_size, dtype=dtype, device=device
            )
            for i in float_kv_layers(self.int8_kv_errors):
                self.kv_dtypes[i] = dtype
        self.num_blocks = 0
        self.kv_caches: list[KVCache] = []
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        torch.manual_seed(seed)

    def allocate_kv(self, num_blocks: int) -> None:
        """Every layer's K/V (and int8 scales) as views of one buffer, on CPU one of huge pages."""
        cfg = self.config
        shape = (2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
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
        caches = []
        for kv_dtype, (values_at, scales_at) in zip(self.kv_dtypes, offsets):
            values = buf[values_at:].narrow(0, 0, math.prod(shape) * kv_dtype.itemsize).view(kv_dtype).view(shape)
            scales = None
            if kv_dtype == torch.int8:
                scales = buf[scales_at:].narrow(0, 0, math.prod(shape[:-1]) * 4).view(torch.float32).view(shape[:-1])
            caches.append(KVCache(values, scales))
        self.num_blocks = num_blocks
        self.kv_caches = caches

    def kv_bytes_per_block(self) -> int:
        cfg = self.config
        per_head = sum(cfg.head_dim * t.itemsize + (4 if t == torch.int8 else 0) for t in self.kv_dtypes)  # + scale
        return 2 * cfg.num_kv_heads * per_head * self.block_size

    def release(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput | None]:
        """Run one step; returns the sequences that sampled a token and the sampler's output for them."""
        batch = self._prepare(sched)
        input_ids, positions, metas, sample_rows, sample_seqs = batch
        hidden = self.model(input_ids, positions, self.kv_caches, metas)
        if not sample_seqs:
            return [], None
        logits = self.model.compute_logits(hidden[sample_rows])
        sampling = SamplingBatch.build(
            [s.params for s in sample_seqs],
            [s.token_ids for s in sample_seqs],
            [s.num_prompt_tokens for s in sample_seqs],
            [self._generator(s) for s in sample_seqs],
            self.config.vocab_size,
            self.device,
        )
        return sample_seqs, self.sampler(logits, sampling)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        g = self.generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seq.params.seed + seq.index)
            self.generators[seq.seq_id] = g
        return g

    def _prepare(self, sched: SchedulerOutput):
        # Decodes (one query token) go first so they share one batched attention call.
        pairs = list(zip(sched.seqs, sched.num_new_tokens))
        decodes = [(s, n) for s, n in pairs if n == 1]
        prefills = [(s, n) for s, n in pairs if n > 1]
        bs = self.block_size

        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for seq, n in decodes:
            pos = seq.num_computed_tokens
            tokens.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(seq.block_ids[pos // bs] * bs + pos % bs)
        prefill_blocks = []
        for seq, n in prefills:
            start = seq.num_computed_tokens
            tokens.extend(seq.token_ids[start : start + n])
            pos = np.arange(start, start + n)
            positions.extend(pos.tolist())
            slots.extend((np.asarray(seq.block_ids)[pos // bs] * bs + pos % bs).tolist())
            prefill_blocks.append(torch.tensor(seq.block_ids, device=self.device))
        row = 0
        for seq, n in decodes + prefills:
            row += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                sample_rows.append(row - 1)
                sample_seqs.append(seq)

        max_blocks = max((len(s.block_ids) for s, _ in decodes), default=0)
        tables = np.zeros((len(decodes), max_blocks), dtype=np.int64)
        for i, (seq, _) in enumerate(decodes):
            tables[i, : len(seq.block_ids)] = seq.block_ids
        device = self.device
        context = [s.num_computed_tokens + 1 for s, _ in decodes]
        context_t = torch.tensor(context, dtype=torch.long, device=device)
        query_lens = [n for _, n in prefills]
        context_lens = [s.num_computed_tokens + n for s, n in prefills]
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        decode_tables = torch.from_numpy(tables).to(device)

        def metadata(window: int | None) -> AttentionMetadata:
            return AttentionMetadata(
                slot_mapping=slot_mapping,
                num_decodes=len(decodes),
                decode_block_tables=decode_tables,
                decode_context_lens=context_t,
                decode_mask=AttentionMetadata.decode_mask_for(context_t, max(context), window) if decodes else None,
                prefill_query_lens=query_lens,
                prefill_context_lens=context_lens,
                prefill_block_tables=prefill_blocks,
                prefill_masks=[
                    AttentionMetadata.prefill_mask_for(q, c, window, device) for q, c in zip(query_lens, context_lens)
                ],
                sliding_window=window,
            )

        windows = self.config.layer_windows
        by_window = {w: metadata(w) for w in set(windows)}
        return (
            torch.tensor(tokens, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            [by_window[w] for w in windows],
            torch.tensor(sample_rows, dtype=torch.long, device=device),
            sample_seqs,
        )


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
