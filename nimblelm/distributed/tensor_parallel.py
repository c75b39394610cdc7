"""Tensor parallelism (Megatron-style) over torch.distributed: how each rank's share of the model is cut, and
the collectives the one model definition (models/decoder.py) calls between its layers.

A rank holds some attention heads, a slice of the MLP's intermediate features and a slice of the vocabulary:
q/k/v and gate/up are split by output features (column parallel), o_proj and down_proj by input features (row
parallel: their partial outputs are summed across ranks), the token table and the output layer by vocabulary
rows. Query heads go with their KV head, so grouped-query attention stays within a rank; a model with fewer KV
heads than ranks replicates each KV head on the ranks its query heads are spread over. Splits need not be even
(SmolLM2-135M's 3 KV heads go 1 + 2 on two ranks): the rank with more computes longer.

The linear weights are cut before any linear method stores them, so int8, int4 and W8A8 quantize each rank's
slice with its own scales; heads are cut whole, and MLP and vocabulary slices are whole multiples of QUANTUM
features (or of the widest smaller power of two the sizes allow), so that no quantization group straddles two
ranks. Layers that arrive quantized (a GGUF served as stored, a quantized folder) are cut along the same lines,
with their scales.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from nimblelm.config import ModelConfig
from nimblelm.errors import InvalidRequestError
from nimblelm.quantization import stacked

QUANTUM = 128  # features: the widest quantization group along a weight's input (int4's)

# Seconds this process has spent in the model's all-reduces (waiting for the slowest rank included).
collective_seconds = 0.0


@torch.library.custom_op("nimblelm::all_reduce_", mutates_args=("x",))
def _all_reduce_(x: torch.Tensor, group: str) -> None:
    # A registered op rather than a plain call: the decode-step traces (engine/step_capture.py) record it.
    global collective_seconds
    start = time.perf_counter()
    dist.all_reduce(x, group=dist.distributed_c10d._resolve_process_group(group))
    collective_seconds += time.perf_counter() - start


@dataclass(frozen=True)
class TensorParallel:
    """One rank's place in a tensor-parallel group, and the cut of the model it implies."""

    rank: int
    size: int
    group: str  # the torch.distributed process group's name

    @staticmethod
    def check(cfg: ModelConfig, size: int) -> None:
        """InvalidRequestError when the model's heads cannot be spread over `size` ranks."""
        heads, kv = cfg.num_heads, cfg.num_kv_heads
        if size > heads:
            raise InvalidRequestError(f"tensor_parallel_size={size} exceeds the model's {heads} attention heads")
        if size > kv and (size % kv or heads % size):
            raise InvalidRequestError(
                f"tensor_parallel_size={size} exceeds the model's {kv} KV heads: it must then be a multiple of them "
                f"and divide its {heads} query heads"
            )

    def _kv_heads(self, cfg: ModelConfig) -> range:
        kv, n, r = cfg.num_kv_heads, self.size, self.rank
        if kv >= n:
            return range(r * kv // n, (r + 1) * kv // n)
        return range(r // (n // kv), r // (n // kv) + 1)  # replicated over n // kv ranks

    def _q_heads(self, cfg: ModelConfig) -> range:
        kv = self._kv_heads(cfg)
        if cfg.num_kv_heads >= self.size:
            group = cfg.num_heads // cfg.num_kv_heads
            return range(kv.start * group, kv.stop * group)
        per_rank = cfg.num_heads // self.size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)

    def _features(self, total: int) -> range:
        quantum = next(q for q in (QUANTUM, 64, 32, 16, 1) if total % q == 0 and total // q >= self.size)
        units = total // quantum
        return range(self.rank * units // self.size * quantum, (self.rank + 1) * units // self.size * quantum)

    def vocab(self, cfg: ModelConfig) -> range:
        """The token ids whose embedding rows and logits this rank holds."""
        return self._features(cfg.vocab_size)

    def vocab_slices(self, vocab_size: int) -> list[range]:
        """Every rank's slice of the vocabulary, in rank order."""
        return [replace(self, rank=r)._features(vocab_size) for r in range(self.size)]

    def local_config(self, cfg: ModelConfig) -> ModelConfig:
        """The model as this rank builds it: its own heads and MLP features (the vocabulary stays whole: the
        logits are gathered)."""
        return replace(cfg, num_heads=len(self._q_heads(cfg)), num_kv_heads=len(self._kv_heads(cfg)),
                       intermediate_size=len(self._features(cfg.intermediate_size)))

    def _slices(self, cfg: ModelConfig) -> tuple[range, range, range, range]:
        """The features this rank keeps of: the query projections, the key (and value) projections, the MLP's
        intermediate features, the vocabulary."""
        d = cfg.head_dim
        q, kv = self._q_heads(cfg), self._kv_heads(cfg)
        return (range(q.start * d, q.stop * d), range(kv.start * d, kv.stop * d),
                self._features(cfg.intermediate_size), self.vocab(cfg))

    def shard(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of the full model's weights (Hugging Face names), which are consumed as they are cut."""
        q, kv, mlp, vocab = self._slices(cfg)
        rows = {  # tensor name suffix -> (dimension cut, the range kept)
            "q_proj.weight": (0, q),
            "q_proj.bias": (0, q),
            "k_proj.weight": (0, kv),
            "k_proj.bias": (0, kv),
            "v_proj.weight": (0, kv),
            "v_proj.bias": (0, kv),
            "o_proj.weight": (1, q),
            "gate_proj.weight": (0, mlp),
            "up_proj.weight": (0, mlp),
            "down_proj.weight": (1, mlp),
            "embed_tokens.weight": (0, vocab),
            "lm_head.weight": (0, vocab),
        }
        out = {}
        for name in list(weights):
            tensor = weights.pop(name)
            cut = next((c for suffix, c in rows.items() if name.endswith(suffix)), None)
            if cut is not None:
                dim, kept = cut
                tensor = tensor.narrow(dim, kept.start, len(kept)).contiguous()
            out[name] = tensor
        return out

    def _module_cuts(self, cfg: ModelConfig) -> tuple[dict[str, list[range]], dict[str, tuple[range, int]]]:
        """How the decoder's modules are cut, by their last name: by outputs (the ranges kept, in order), and by
        inputs (the range kept, of how many)."""
        q, kv, mlp, vocab = self._slices(cfg)
        queries, keys, features = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        by_outputs = {"qkv_proj": [q, _shift(kv, queries), _shift(kv, queries + keys)],
                      "gate_up_proj": [mlp, _shift(mlp, features)], "lm_head": [vocab], "embed_tokens": [vocab]}
        return by_outputs, {"o_proj": (q, queries), "down_proj": (mlp, features)}

    def shard_quantized(
        self, cfg: ModelConfig, quantized: dict[str, tuple[str, dict[str, torch.Tensor]]]
    ) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
        """This rank's slices of the layers that arrive quantized (the loader's module name -> (format, tensors):
        fused q/k/v and gate/up, a GGUF's token table), consumed as they are cut. Every tensor of a format is
        [outputs, ...], and its second dimension, where it has one, runs along the inputs at a fixed number of
        entries per input (int4 bytes: 1/2, scales: 1/group), so a cut by inputs takes the same share of each."""
        by_outputs, by_inputs = self._module_cuts(cfg)
        out = {}
        for module in list(quantized):
            fmt, tensors = quantized.pop(module)
            kind = module.rsplit(".", 1)[-1]
            if kind in by_outputs:
                index = torch.cat([torch.arange(r.start, r.stop) for r in by_outputs[kind]])
                if stacked.is_stacked(fmt):
                    fmt, tensors = stacked.select_rows(fmt, tensors, index)
                else:
                    tensors = {name: t.index_select(0, index) for name, t in tensors.items()}
            elif kind in by_inputs:
                tensors = {name: t[:, _input_columns(t.shape[1], *by_inputs[kind], module, fmt)].contiguous()
                           if t.dim() == 2 else t for name, t in tensors.items()}
            out[module] = (fmt, tensors)
        return out

    @staticmethod
    def check_quantized(cfg: ModelConfig, size: int, quantized: dict[str, tuple[str, dict[str, torch.Tensor]]]) -> None:
        """InvalidRequestError when some rank's cut of the layers that arrive quantized would split one of their
        quantization groups (shard_quantized's cut, on shapes alone)."""
        for rank in range(size):
            _, by_inputs = TensorParallel(rank, size, "")._module_cuts(cfg)
            for module, (fmt, tensors) in quantized.items():
                kind = module.rsplit(".", 1)[-1]
                for t in tensors.values() if kind in by_inputs else ():
                    if t.dim() == 2:
                        _input_columns(t.shape[1], *by_inputs[kind], module, fmt)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x across the ranks, in place."""
        torch.ops.nimblelm.all_reduce_(x, self.group)
        return x

    def embed(self, table: torch.nn.Module, ids: torch.Tensor, vocab: range) -> torch.Tensor:
        """The embedding rows of `ids` from a vocabulary-parallel table: each rank looks up the ids it holds,
        zeros the others, and the ranks' rows are summed."""
        local = ids - vocab.start
        held = (local >= 0) & (local < len(vocab))
        rows = table(torch.where(held, local, 0))
        return self.all_reduce_(rows * held.unsqueeze(-1).to(rows.dtype))

    def gather_logits(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's logits [rows, its vocabulary slice] joined into [rows, vocab_size] on each rank."""
        return self.gather_columns(logits, [len(v) for v in self.vocab_slices(vocab_size)])

    def share_kv_head_scores(self, cfg: ModelConfig, scores: torch.Tensor) -> torch.Tensor:
        """A KV policy's scores [this rank's KV heads, entries] from its own query heads, made those of all the query
        heads of each KV head: where ranks replicate a KV head, its ranks' scores are summed (the policies rank
        entries by them, so SnapKV's means over query heads choose as their sums do); `cfg` is the whole model's."""
        if cfg.num_kv_heads >= self.size:
            return scores
        heads = self._kv_heads(cfg)
        every = scores.new_zeros(cfg.num_kv_heads, scores.shape[1])
        every[heads.start : heads.stop] = scores
        return self.all_reduce_(every)[heads.start : heads.stop]

    def gather_columns(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Every rank's x [rows, sizes[rank]] joined, in rank order, into [rows, sum(sizes)] on each rank."""
        padded = torch.nn.functional.pad(x, (0, max(sizes) - x.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self._group())
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=-1)

    def broadcast(self, obj):
        """Rank 0's obj (any picklable value), on every rank."""
        group = self._group()
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        return box[0]

    def _group(self) -> dist.ProcessGroup:
        return dist.distributed_c10d._resolve_process_group(self.group)

def _shift(features: range, by: int) -> range:
    return range(features.start + by, features.stop + by)


def _input_columns(entries: int, kept: range, total: int, module: str, fmt: str) -> slice:
    """The columns of a quantized tensor [outputs, entries] that hold inputs `kept` of `total`."""
    for edge in (kept.start, kept.stop):
        if edge * entries % total:
            raise InvalidRequestError(
                f"{module} ({fmt}) cannot be split at input {edge} of {total}: one of its quantization groups would "
                "straddle two ranks; use fewer ranks"
            )
    return slice(kept.start * entries // total, kept.stop * entries // total)
