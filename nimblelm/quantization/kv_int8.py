"""Which layers an int8 KV cache would hurt, measured once when the engine starts.

Rounding a key to int8 with one scale per token and head moves its attention logits by up to about
max|k| / 254 * sum|q| / sqrt(d). Where logits span a few units that is noise. In a few layers of some
models they span hundreds: in Qwen2.5-Coder-0.5B's layer 0 the logits of a HumanEval prompt had a
standard deviation of 318 and int8 keys moved them by up to 10, enough to change which positions a
query attends to. int8 K/V there changed the layer's attention output by 40%, against 1-3% in most
layers, and with every layer int8 the model's perplexity rose 3.58% (benchmarks/README.md).

So before the cache is allocated, a prompt of seeded random tokens runs through the model with a float
cache, and each layer's attention output is compared with what int8 K/V would give; layers it would
change by more than MAX_ERROR keep K/V in the model's dtype. Random tokens single out the same layers
as real text does (the 0.5B's layers 0, 1, 2, 4 and 8 either way), so the probe needs no data set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nimblelm.layers.attention import KVCache, dequantize_kv, quantize_kv

PROBE_TOKENS = 256
MAX_ERROR = 0.05  # relative L2 change of a layer's attention output under int8 K/V
SEED = 0


def int8_attention_errors(
    model, *, max_len: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[float]:
    """Per layer: ||attn(q, int8 K, int8 V) - attn(q, K, V)|| / ||attn(q, K, V)|| on the probe prompt; 0 for the
    layers a pipeline stage does not hold. Every stage runs the probe at once: their forwards pass the prompt's
    hidden states on as a step's do."""
    cfg = model.config
    held = range(cfg.num_layers) if model.stage is None else model.stage.layers
    n = min(PROBE_TOKENS, max_len)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(cfg.vocab_size, (n,), generator=g).to(device)
    blocks = -(-n // block_size)
    caches = [KVCache(torch.zeros(2, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device))
              if i in held else None for i in range(cfg.num_layers)]
    metas = model.whole_prompt_metadata(n, block_size, device)
    errors = [0.0] * cfg.num_layers

    def measure(layer: int, module, args) -> None:
        q, k, v = (x.transpose(0, 1)[None].float() for x in args[:3])
        mask = metas[layer].prefill_masks[0]

        def attend(k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  scale=module.scale, enable_gqa=True)

        exact = attend(k, v)
        rounded = attend(*(dequantize_kv(*quantize_kv(x), torch.float32) for x in (k, v)))
        errors[layer] = ((rounded - exact).norm() / exact.norm()).item()

    hooks = [model.layers[i].self_attn.attn.register_forward_hook(
        lambda module, args, _out, i=i: measure(i, module, args)) for i in held]
    try:
        with torch.inference_mode():
            model(ids, torch.arange(n, device=device), caches, metas)
    finally:
        for h in hooks:
            h.remove()
    return errors


def float_kv_layers(errors: list[float]) -> list[int]:
    """The layers whose K/V stay in the model's dtype in an int8 cache."""
    return [i for i, e in enumerate(errors) if e > MAX_ERROR]
