"""One decoder-only transformer for the Llama family (Llama, Mistral, SmolLM2, Qwen2) and Gemma 3.

Gemma 3's layer is Llama's with options (ModelConfig): q/k norms, norms on the sublayer outputs, a GELU MLP,
its own attention scale, embeddings scaled by sqrt(hidden_size), and two rope tables (sliding-window layers
rotate with a smaller base than global ones).

It works on a flat batch of tokens ([tokens, hidden]) and knows nothing about scheduling: the paged
KV cache and the AttentionMetadata come from the model runner.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nimblelm import hugepages
from nimblelm.config import ModelConfig
from nimblelm.kernels import ops_for
from nimblelm.layers.attention import AttentionMetadata, KVCache, PagedAttention
from nimblelm.layers.linear import Linear, LinearMethod, RowsEmbedding
from nimblelm.layers.rotary import RotaryEmbedding, apply_rotary
from nimblelm.quantization import formats

if TYPE_CHECKING:
    from nimblelm.distributed.pipeline import PipelineStage
    from nimblelm.distributed.tensor_parallel import TensorParallel


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
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        # q, k and v are one matmul: one pass over the activations instead of three.
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False, reduce=tp)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        if cfg.query_pre_attn_scalar is not None:
            # Gemma's scores scale by query_pre_attn_scalar^-1/2, which need not be head_dim's (Gemma 3 27B).
            self.attn.scale = cfg.query_pre_attn_scalar**-0.5
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        ops = ops_for(qkv)
        # The kernel rotates the q and k heads inside qkv, in place; q/k norms must come before the
        # rotation, so with them the heads are rotated once normalized, by torch.
        fused_rope = ops is not None and self.q_norm is None
        if fused_rope:
            cos, sin = rope
            ops.rope_(qkv, cos, sin, (self.q_size + self.kv_size) // self.head_dim, self.head_dim)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.q_size // self.head_dim, self.head_dim)
        k = k.view(-1, self.kv_size // self.head_dim, self.head_dim)
        v = v.view(-1, self.kv_size // self.head_dim, self.head_dim)
        if self.q_norm is not None:
            q, k = self._norm_heads(self.q_norm, q), self._norm_heads(self.k_norm, k)
        if not fused_rope:
            cos, sin = (t.unsqueeze(1) for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attn(q, k, v, kv_cache, meta)
        return self.o_proj(out.flatten(1))

    def _norm_heads(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """Each head of [tokens, heads, head_dim] (a view into qkv) normalized on its own: the norm takes
        contiguous rows."""
        return norm(x.reshape(-1, self.head_dim).contiguous()).view(x.shape)


_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, reduce=tp)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fused_silu = cfg.hidden_act == "silu"  # the kernel computes silu(gate) * up only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        ops = ops_for(gate_up)
        if ops is not None and self.fused_silu:
            return self.down_proj(ops.silu_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope_index: int, tp: TensorParallel | None = None):
        super().__init__()
        self.rope_index = rope_index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)
        self.sandwich_norms = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, ropes, kv_cache, meta):
        """Takes and returns the pair (this sublayer's output, residual stream before it is added).

        ropes: the step's (cos, sin) of every rope variant (DecoderLM.rotary); the layer uses its own."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ropes[self.rope_index], kv_cache, meta)
        if not self.sandwich_norms:
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        # Gemma: each sublayer's output is normalized before it joins the residual stream, and the MLP's
        # input has a norm of its own.
        x, residual = self.pre_feedforward_layernorm(self.post_attention_layernorm(x), residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


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

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TensorParallel | None = None,
                 stage: PipelineStage | None = None):
        """tp: this rank's place in a tensor-parallel group; cfg is then the rank's share of the model
        (TensorParallel.local_config), and the token table and output layer hold the rank's vocabulary slice.
        stage: this rank's pipeline stage; it holds only the stage's layers (the others are empty places)."""
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.stage = stage
        self.vocab = range(cfg.vocab_size) if tp is None else tp.vocab(cfg)
        # Rope variant 0 serves every layer but the sliding-window ones when they have a base of their own (1).
        ropes = [(cfg.rope_theta, cfg.rope_scaling)]
        if cfg.sliding_rope_theta is not None:
            ropes.append((cfg.sliding_rope_theta, None))
        sliding_rope = len(ropes) - 1
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, ropes)
        self.embed_tokens = nn.Embedding(len(self.vocab), cfg.hidden_size)
        held = range(cfg.num_layers) if stage is None else stage.layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, 0 if window is None else sliding_rope, tp) if i in held else nn.Identity()
            for i, window in enumerate(cfg.layer_windows)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, len(self.vocab), bias=False)
        self._tie_weights()

    def _tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight

    def materialize(
        self, device: torch.device, dtype: torch.dtype, weights: dict[str, torch.Tensor],
        linear_method: LinearMethod | None = None,
        quantized: dict[str, tuple[str, dict[str, torch.Tensor]]] | None = None,
    ) -> DecoderLM:
        """Turn a model built on the meta device into a real one holding `weights` (fp32, Hugging Face
        names), the linear layers loaded from them stored and multiplied as `linear_method` says (default:
        unquantized).

        `quantized` maps module names to (format name, tensors in that format) that the layer adopts as
        they are, with the format's method (quantization/formats.py); `weights` then lacks those layers,
        and no fp32 copy of them is ever made. "embed_tokens" there is the token table, read back by rows,
        as is the lm_head's of a tied model whose `weights` lack the table. The dict is emptied as the
        layers adopt its entries, so that packing frees each tensor it moves.
        """
        quantized = {} if quantized is None else quantized
        if "embed_tokens" in quantized:
            with torch.device("meta"):
                self.embed_tokens = RowsEmbedding(self.config.hidden_size, len(self.vocab))
        # A tied table that came only as the quantized lm_head (a GGUF holds one tensor for both) is read
        # back from it; a saved folder keeps its own table in float beside its lm_head.
        table_in_head = self.config.tie_word_embeddings and "model.embed_tokens.weight" not in weights
        if table_in_head and "lm_head" in quantized:
            self.embed_tokens = TiedEmbedding(self.lm_head)
        for name in quantized:
            self.get_submodule(name).weight = None  # so that to_empty makes no storage for it
        self.to_empty(device=device)
        self._tie_weights()  # to_empty gave the tied pair two separate tensors
        self.rotary.reset_buffers()
        self.load_weights(weights)
        self.to(dtype)
        for name, module in list(self.named_modules()):  # stacked layers add their parts, adopted already
            if isinstance(module, Linear):
                if name in quantized:
                    fmt, tensors = quantized.pop(name)
                    tensors = {key: t.to(device) for key, t in tensors.items()}
                    module.adopt(formats.linear_method(fmt), tensors, dtype)
                else:
                    module.prepare(linear_method)
        if self.config.tie_word_embeddings and self.lm_head.method.has_rows and isinstance(self.embed_tokens, nn.Embedding):
            self.embed_tokens = TiedEmbedding(self.lm_head)  # drops the embedding's own copy
        if device.type == "cpu":
            hugepages.pack_module(self)
            hugepages.trim_heap()
        self.requires_grad_(False)  # an inference model: a trace of it (engine/step_capture.py) takes no grads
        return self.eval()

    def forward(
        self, input_ids, positions, kv_caches: list[KVCache], metas: list[AttentionMetadata],
        layers: list[int] | None = None,
    ) -> torch.Tensor:
        """metas: each layer's attention metadata (layers with the same window share one). layers: the
        indices of the layers to run, in order (default all, or the stage's); the others pass the residual stream
        on. A pipeline stage before the last sends its output on and returns None."""
        stage = self.stage
        if stage is None or stage.first:
            x, residual = self.embed(input_ids), None
        else:
            x, residual = stage.receive(len(input_ids), self.config.hidden_size, self.norm.weight.dtype,
                                        input_ids.device)
        ropes = self.rotary(positions)
        for i in (range(len(self.layers)) if stage is None else stage.layers) if layers is None else layers:
            x, residual = self.layers[i](x, residual, ropes, kv_caches[i], metas[i])
        if stage is not None and not stage.last:
            stage.send(x, residual)
            return None
        return x + residual

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            x = self.embed_tokens(input_ids)
        else:
            x = self.tp.embed(self.embed_tokens, input_ids, self.vocab)
        if self.config.scale_embeddings:
            # sqrt(hidden_size) rounded to the model's dtype first, as the reference does (bf16: 25.25, not 25.30).
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def whole_prompt_metadata(self, n: int, block_size: int, device) -> list[AttentionMetadata]:
        """Per layer, the metadata of one n-token prompt in one chunk, its K/V in blocks 0, 1, ..."""
        by_window = {w: AttentionMetadata.whole_prompt(n, block_size, w, device) for w in set(self.config.layer_windows)}
        return [by_window[w] for w in self.config.layer_windows]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden)).float()
        return logits if self.tp is None else self.tp.gather_logits(logits, self.config.vocab_size)

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
            if target.endswith("norm.weight") and self.config.norm_weight_offset:
                # Stored as the factor the norm multiplies by, so the norms (and their kernels) stay x/rms * w.
                tensor = tensor + self.config.norm_weight_offset
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
