"""One decoder-only transformer for the Llama family (Llama, Mistral, SmolLM2, Qwen2).

It works on a flat batch of tokens ([tokens, hidden]) and knows nothing about scheduling: the paged
KV cache and the AttentionMetadata come from the model runner.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nimblelm import hugepages
from nimblelm.config import ModelConfig
from nimblelm.kernels import ops_for
from nimblelm.layers.attention import AttentionMetadata, KVCache, PagedAttention
from nimblelm.layers.linear import SKINNY_MAX_ROWS, Linear, LinearMethod, RowsEmbedding
from nimblelm.layers.rotary import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); or, given the residual stream, (norm(x + residual), x + residual)."""
        ops = ops_for(x)
        if ops is not None:
            if residual is None:
                return ops.rms_norm(x, self.weight, self.eps)
            ops.add_rms_norm_(x, residual, self.weight, self.eps)
            return x, residual
        if residual is not None:
            residual = x + residual
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        # q, k and v are one matmul: one pass over the activations instead of three.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        ops = ops_for(qkv)
        if ops is not None:
            cos, sin = rope
            ops.rope_(qkv, cos, sin, (self.q_size + self.kv_size) // self.head_dim, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.q_size // self.head_dim, self.head_dim)
        k = k.view(-1, self.kv_size // self.head_dim, self.head_dim)
        v = v.view(-1, self.kv_size // self.head_dim, self.head_dim)
        if ops is None:
            cos, sin = (t.unsqueeze(1) for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = ops_for(gate_up)
        if ops is not None:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, rope, kv_cache, meta):
        """Takes and returns the pair (this sublayer's output, residual stream before it is added)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class TiedEmbedding(nn.Module):
    """The token embedding read from the output layer it is tied to, in whatever form that layer stores
    its weight."""

    def __init__(self, lm_head: Linear):
        super().__init__()
        self.lm_head = [lm_head]  # in a list: not a submodule, so its weights are not counted twice

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.lm_head[0]
        return head.method.rows(head, ids)


class DecoderLM(nn.Module):
    # Checkpoint tensors that load into a slice of a fused parameter: (fused name, slice index).
    packed: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.decode_stack = None
        self._tie_weights()

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight

    def materialize(
        self, device: torch.device, dtype: torch.dtype, weights: dict[str, torch.Tensor],
        linear_method: LinearMethod | None = None,
        prequantized: dict[str, tuple[LinearMethod, dict[str, torch.Tensor]]] | None = None,
    ) -> DecoderLM:
        """Turn a model built on the meta device into a real one holding `weights`, its linear layers
        stored and multiplied as `linear_method` says (default: unquantized).

        `prequantized` maps module names to (method, tensors in its format) that the layer adopts as they
        are (GGUF direct loading); `weights` then lacks those layers, and no fp32 copy of them is ever
        made. "embed_tokens" there is the token table, read back by rows (the lm_head's when tied). The
        dict is emptied as the layers adopt its entries, so that packing frees each tensor it moves.
        """
        prequantized = {} if prequantized is None else prequantized
        if "embed_tokens" in prequantized:
            with torch.device("meta"):
                self.embed_tokens = RowsEmbedding(self.config.hidden_size, self.config.vocab_size)
        if self.config.tie_word_embeddings and "lm_head" in prequantized:
            self.embed_tokens = TiedEmbedding(self.lm_head)
        for name in prequantized:
            self.get_submodule(name).weight = None  # so that to_empty makes no storage for it
        self.to_empty(device=device)
        self._tie_weights()  # to_empty gave the tied pair two separate tensors
        self.rotary.reset_buffers()
        self.load_weights(weights)
        self.to(dtype)
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                if name in prequantized:
                    method, tensors = prequantized.pop(name)
                    module.adopt(method, {key: t.to(device) for key, t in tensors.items()}, dtype)
                else:
                    module.prepare(linear_method)
        if self.config.tie_word_embeddings and self.lm_head.method.has_rows and isinstance(self.embed_tokens, nn.Embedding):
            self.embed_tokens = TiedEmbedding(self.lm_head)  # drops the embedding's own copy
        if device.type == "cpu":
            hugepages.pack_module(self)
            hugepages.trim_heap()
        self.decode_stack = self._build_decode_stack()
        return self.eval()

    def _build_decode_stack(self):
        """The C++ decode stack over these layers' weights, when the kernels apply to all of them."""
        ops = ops_for(self.norm.weight)
        if ops is None or len(set(self.config.layer_windows)) > 1:
            return None
        specs = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [lin.method.kernel_spec(lin) for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if None in linears:
                return None
            specs.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *linears))
        cfg = self.config
        return ops.DecodeStack(specs, cfg.rms_norm_eps, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(
        self, input_ids, positions, kv_caches: list[KVCache], metas: list[AttentionMetadata]
    ) -> torch.Tensor:
        """metas: each layer's attention metadata (layers with the same window share one)."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary(positions)
        meta = metas[0]
        if self.decode_stack is not None and meta.num_decodes == x.shape[0] <= SKINNY_MAX_ROWS:
            # Decode-only steps run every layer in one C++ call; mixed and prefill steps layer by layer.
            return self.decode_stack.forward(
                x, *rope, kv_caches, meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens,
                meta.sliding_window or 0,
            )
        for layer, kv_cache, layer_meta in zip(self.layers, kv_caches, metas):
            x, residual = layer(x, residual, rope, kv_cache, layer_meta)
        return x + residual

    def whole_prompt_metadata(self, n: int, block_size: int, device) -> list[AttentionMetadata]:
        """Per layer, the metadata of one n-token prompt in one chunk, its K/V in blocks 0, 1, ..."""
        by_window = {w: AttentionMetadata.whole_prompt(n, block_size, w, device) for w in set(self.config.layer_windows)}
        return [by_window[w] for w in self.config.layer_windows]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()

    @torch.no_grad()
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy Hugging Face-named tensors in, packing q/k/v and gate/up into their fused parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights.items():
            target, shard = name.removeprefix("model."), None
            for part, (fused, index) in self.packed.items():
                if f".{part}." in target:
                    target, shard = target.replace(part, fused), index
                    break
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            if shard is None:
                param.copy_(tensor)
            else:
                sizes = self._shard_sizes(target)
                offset = sum(sizes[:shard])
                param.narrow(0, offset, sizes[shard]).copy_(tensor)
            loaded.add(target)
        missing = set(params) - loaded
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {min(missing)!r}")

    def _shard_sizes(self, name: str) -> list[int]:
        cfg = self.config
        if "qkv_proj" in name:
            kv = cfg.num_kv_heads * cfg.head_dim
            return [cfg.num_heads * cfg.head_dim, kv, kv]
        return [cfg.intermediate_size, cfg.intermediate_size]
