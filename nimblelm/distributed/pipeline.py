"""Pipeline parallelism: the model's layers cut into consecutive stages, one per group of ranks. A stage computes
its layers for the whole step and hands the residual stream to the next stage (torch.distributed point-to-point);
the first stage embeds the tokens, the last computes the logits and samples.

Every stage receives the same step contract and lays out the same batch, so the stages need to send each other
nothing but the hidden states. One step is in flight at a time: the stages take turns, so pipeline parallelism
here divides the model's memory over machines, not its time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from nimblelm.errors import InvalidRequestError

T = TypeVar("T")


@dataclass(frozen=True)
class PipelineStage:
    index: int
    size: int
    num_layers: int  # of the whole model
    prev_rank: int  # the rank this one receives from (its peer in the stage before)
    next_rank: int  # the rank this one sends to

    @staticmethod
    def check(num_layers: int, size: int) -> None:
        if size > num_layers:
            raise InvalidRequestError(f"pipeline_parallel_size={size} exceeds the model's {num_layers} layers")

    @property
    def layers(self) -> range:
        """The layers this stage holds: consecutive, as even a share as the layer count allows."""
        return range(self.index * self.num_layers // self.size, (self.index + 1) * self.num_layers // self.size)

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.size - 1

    def keep(self, weights: dict[str, T]) -> dict[str, T]:
        """The weights this stage holds: its layers', and the embedding, final norm and output layer. Names are
        Hugging Face's ("model.layers.3.mlp...") or the decoder's modules' ("layers.3.mlp...")."""
        held = {str(i) for i in self.layers}

        def holds(name: str) -> bool:
            parts = name.removeprefix("model.").split(".")
            return parts[0] != "layers" or parts[1] in held

        return {name: t for name, t in weights.items() if holds(name)}

    def receive(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous stage's (output, residual stream) for this step's tokens."""
        both = torch.empty(2, num_tokens, hidden_size, dtype=dtype, device=device)
        dist.recv(both, self.prev_rank)
        return both[0], both[1]

    def send(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        dist.send(torch.stack([x, residual]), self.next_rank)
