"""Exact per-input-channel rescaling of linear layers, for AWQ and SmoothQuant.

W x = (W diag(s)) (x / s): a layer's input channel j can be multiplied by s_j in the weight if the op
that produces that channel divides it by s_j. Every linear layer of the decoder has such a producer:
- qkv_proj and gate_up_proj: the RMSNorm before them (its weight scales each channel);
- o_proj: the v rows of qkv_proj, since attention mixes v over positions only, channel by channel.
  With GQA a v channel feeds the same dimension of every query head of its group, so o_proj's scales
  are tied across those heads: one scale per v channel;
- down_proj: the up rows of gate_up_proj, since silu(gate) * up is linear in up, channel by channel;
- lm_head: the final RMSNorm (a tied lm_head gets its own copy of the embedding first).
Scales are therefore chosen per producer channel (`reduce` a consumer-side statistic, `expand` back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nimblelm.layers.linear import Linear


@dataclass
class ScalableInput:
    name: str  # the consumer's module name
    linear: Linear
    producer: torch.Tensor  # the norm weight [K], or the producing rows [K, in] of a linear weight
    producer_bias: torch.Tensor | None
    tied: int  # consumer channels per producer channel: query heads per KV head for o_proj, else 1
    head_dim: int

    def reduce(self, stat: torch.Tensor, how: str) -> torch.Tensor:
        """A consumer-side per-channel statistic [K] as one value per producer channel ('mean' or 'max')."""
        if self.tied == 1:
            return stat
        heads = stat.view(-1, self.tied, self.head_dim)
        return heads.mean(1).flatten() if how == "mean" else heads.amax(1).flatten()

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Producer-channel scales as the consumer's per-input-channel scales."""
        if self.tied == 1:
            return s
        return s.view(-1, 1, self.head_dim).expand(-1, self.tied, -1).flatten()

    @torch.no_grad()
    def apply(self, s: torch.Tensor) -> None:
        """Multiply the consumer's input channels by s and divide the producer's outputs by s."""
        self.linear.weight.mul_(self.expand(s)[None, :])
        if self.producer.dim() == 1:
            self.producer.div_(s)
        else:
            self.producer.div_(s[:, None])
        if self.producer_bias is not None:
            self.producer_bias.div_(s)


def scalable_inputs(model) -> list[ScalableInput]:
    """Every linear layer of a DecoderLM with its producer, in forward order; unties a tied lm_head."""
    cfg = model.config
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
    heads_per_kv, hd = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    out = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        v = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
        up = slice(mlp.intermediate, 2 * mlp.intermediate)
        qkv_bias = attn.qkv_proj.bias
        out += [
            ScalableInput(f"layers.{i}.self_attn.qkv_proj", attn.qkv_proj, layer.input_layernorm.weight, None, 1, hd),
            ScalableInput(f"layers.{i}.self_attn.o_proj", attn.o_proj, attn.qkv_proj.weight[v],
                          qkv_bias[v] if qkv_bias is not None else None, heads_per_kv, hd),
            ScalableInput(f"layers.{i}.mlp.gate_up_proj", mlp.gate_up_proj, layer.post_attention_layernorm.weight,
                          None, 1, hd),
            ScalableInput(f"layers.{i}.mlp.down_proj", mlp.down_proj, mlp.gate_up_proj.weight[up], None, 1, hd),
        ]
    out.append(ScalableInput("lm_head", model.lm_head, model.norm.weight, None, 1, hd))
    return out
