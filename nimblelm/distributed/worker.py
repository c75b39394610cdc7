"""One rank of a model split over processes: it builds its share of the model and its KV cache, and runs the
steps it is sent (engine/step.py) in lockstep with the other ranks. Executors (distributed/executor.py) host
it in-process, in a local process or in a Ray actor; it is the same object in each.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from nimblelm.distributed import tensor_parallel
from nimblelm.distributed.pipeline import PipelineStage
from nimblelm.distributed.tensor_parallel import TensorParallel
from nimblelm.engine.model_runner import ModelRunner
from nimblelm.engine.step import ModelRunnerOutput, SchedulerOutput
from nimblelm.kernels import cpu_ops
from nimblelm.models.loader import load_model

# A rank that waits this long on another in a collective gives up: a peer has died or hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass
class RunnerSpec:
    """What every rank builds its ModelRunner from: the choices the engine made once, as plain data."""

    model: str
    gguf_direct: bool
    num_threads: int  # per rank
    options: dict = field(default_factory=dict)  # ModelRunner's keyword options (dtype, device, ...)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # The engine's bfloat16 products (kernels.choose_bf16_products, by a timing probe), which every rank takes
    # (none, on a CPU without that kind): ranks probing on their own could round prefill activations otherwise.
    bf16_products: str | None = None

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Worker:
    def __init__(self, runner: ModelRunner, rank: int = 0):
        self.runner = runner
        self.rank = rank

    @classmethod
    def start(cls, spec: RunnerSpec, rank: int, init_method: str, local_rank: int, local_size: int) -> Worker:
        """Rank `rank` of the spec's world: its threads pinned to its share of this machine's cores (CPU), its
        process groups joined, its share of the model loaded. Ranks go stage by stage: rank r is tensor-parallel
        rank r % tp of pipeline stage r // tp."""
        device = spec.options["device"]
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            _pin_threads(spec.num_threads, local_rank, local_size)
        torch.set_num_threads(spec.num_threads)
        if spec.bf16_products is not None and (ops := cpu_ops()) is not None:
            ops.set_bf16_products(spec.bf16_products)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init_method, rank=rank,
                                world_size=spec.world_size, timeout=COLLECTIVE_TIMEOUT)
        tp_size, pp_size = spec.tensor_parallel_size, spec.pipeline_parallel_size
        # Every rank makes every stage's group, in the same order, as torch.distributed requires.
        groups = [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        loaded = load_model(spec.model, progress=False, gguf_direct=spec.gguf_direct)
        weights, quantized, tp, stage = loaded.weights, loaded.quantized, None, None
        if pp_size > 1:
            stage = PipelineStage(rank // tp_size, pp_size, loaded.config.num_layers, rank - tp_size, rank + tp_size)
            weights, quantized = stage.keep(weights), stage.keep(quantized)
        if tp_size > 1:
            tp = TensorParallel(rank % tp_size, tp_size, groups[rank // tp_size].group_name)
            weights, quantized = tp.shard(loaded.config, weights), tp.shard_quantized(loaded.config, quantized)
        options = {**spec.options, "device": device}
        return cls(ModelRunner(loaded.config, weights, quantized=quantized, **options, tp=tp, stage=stage), rank)

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def kv_bytes_beside_blocks(self, max_num_seqs: int) -> int:
        return self.runner.kv_bytes_beside_blocks(max_num_seqs)

    def allocate_kv(self, num_blocks: int, max_num_seqs: int) -> None:
        self.runner.allocate_kv(num_blocks, max_num_seqs)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def read_blocks(self, block_ids: list[list[int]]) -> list:
        return self.runner.read_blocks(block_ids)

    def write_blocks(self, block_ids: list[list[tuple[int, int]]], kv_by_rank: list[list]) -> None:
        """kv_by_rank: every rank's read_blocks of the exporting engine, laid out as this one's ranks."""
        self.runner.write_blocks(block_ids, kv_by_rank[self.rank])

    def weights_nbytes(self) -> int:
        return self.runner.weights_nbytes

    def collective_seconds(self) -> float:
        """Seconds this rank has spent in the model's all-reduces since it started."""
        return tensor_parallel.collective_seconds

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pin_threads(num_threads: int, local_rank: int, local_size: int) -> None:
    """Keep each rank's threads on cores of its own, where the machine has enough for every rank."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= num_threads * local_size:
        os.sched_setaffinity(0, cores[local_rank * num_threads : (local_rank + 1) * num_threads])


def free_port() -> int:
    """A TCP port free on this machine now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
