"""nimblelm's ModelConfig as a transformers config: what a Hugging Face folder's config.json says.

Quantizing a GGUF writes one into its output folder (quantization/saved.py); the bench's and the
perplexity check's transformers peer builds its model from one.
"""

from __future__ import annotations

from transformers import Gemma3TextConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from nimblelm.config import ModelConfig
from nimblelm.errors import UnsupportedModelError


def hf_config_from(cfg: ModelConfig, dtype: str = "float32") -> PretrainedConfig:
    """A transformers LlamaConfig/Qwen2Config/Gemma3TextConfig equivalent to nimblelm's ModelConfig."""
    rope = dict(cfg.rope_scaling or {})
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = float(cfg.rope_theta)
    eos = list(cfg.eos_token_ids) or None
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": (eos[0] if eos and len(eos) == 1 else eos),
        "dtype": dtype,
    }
    if cfg.architecture == "gemma3":
        # The rope scaling applies to the global layers only; the sliding ones rotate by their own base, unscaled.
        sliding_rope = {"rope_type": "default", "rope_theta": float(cfg.sliding_rope_theta or cfg.rope_theta)}
        return Gemma3TextConfig(
            hidden_activation=cfg.hidden_act, query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),
            sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types or ["full_attention"] * cfg.num_layers),
            rope_parameters={"full_attention": rope, "sliding_attention": sliding_rope}, **common)
    common |= {"rope_parameters": rope, "hidden_act": "silu"}
    if cfg.architecture == "llama":
        return LlamaConfig(attention_bias=cfg.attention_bias, mlp_bias=False, **common)
    if cfg.architecture == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    raise UnsupportedModelError(f"no transformers equivalent for architecture {cfg.architecture!r}")
