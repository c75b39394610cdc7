"""Prefill attention over the paged cache (paged_prefill_attention) by KV cache dtype and bfloat16 products: a
prompt of --tokens positions as one chunk on a model's head shapes, one cache per decoder layer of the model, so
that the caches come from memory as in a step; the two product kinds alternated, best of 5 passes each. Prints
ms per decoder layer and GFLOP/s (causal: half of Q K^T and P V).

Usage: python benchmarks/scripts/prefill_attention.py [--model smollm2-135m|qwen2.5-coder-0.5b] [--threads 2]
       [--tokens 128,512] [--dtypes bfloat16,float16,float32]
"""

import argparse
import time

import torch

from nimblelm.bench.machine import cpu_features, cpu_model
from nimblelm.kernels import cpu_ops, kernels_in_use

MODELS = {  # decoder layers, query heads, KV heads, head_dim
    "smollm2-135m": (30, 9, 3, 64),
    "qwen2.5-coder-0.5b": (24, 14, 2, 64),
}
BLOCK = 16


def layer_call(ops, dtype: torch.dtype, tokens: int, heads: int, kv_heads: int, head_dim: int):
    """A closure running one layer's prefill attention over a fresh random cache."""
    blocks = -(-tokens // BLOCK)
    k, v = (torch.randn(blocks, BLOCK, kv_heads, head_dim).to(dtype) for _ in range(2))
    q = torch.randn(tokens, heads + 2 * kv_heads, head_dim)[:, :heads]  # a view of the fused qkv, as in a step
    out = torch.empty(tokens, heads, head_dim)
    tables, lens = torch.arange(blocks)[None], torch.tensor([tokens])
    return lambda: ops.paged_prefill_attention(out, q, k, v, None, None, tables, lens, lens, head_dim**-0.5, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", default="128,512")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = cpu_ops()
    layers, heads, kv_heads, head_dim = MODELS[args.model]
    chosen = ops.bf16_products()
    kinds = [kind for kind in ("off", "dot", "amx") if kind == "off" or ops.set_bf16_products(kind)]
    ops.set_bf16_products(chosen)
    print(f"{cpu_model()} ({' '.join(cpu_features())}), {args.threads} threads; {kernels_in_use()}")
    print(f"{args.model}: {layers} layers, {heads} query heads, {kv_heads} KV heads of {head_dim}; bfloat16 products "
          f"alternated: {', '.join(kinds)}")
    print("| tokens | cache | products | ms a layer | GFLOP/s |")
    print("| ---: | --- | --- | ---: | ---: |")
    for tokens in (int(t) for t in args.tokens.split(",")):
        flops = 2 * 2 * heads * head_dim * tokens * (tokens + 1) / 2
        for dtype in args.dtypes.split(","):
            calls = [layer_call(ops, getattr(torch, dtype), tokens, heads, kv_heads, head_dim) for _ in range(layers)]
            best = dict.fromkeys(kinds, float("inf"))
            for _ in range(5):
                for kind in kinds:
                    ops.set_bf16_products(kind)
                    start = time.perf_counter()
                    for call in calls:
                        call()
                    best[kind] = min(best[kind], (time.perf_counter() - start) / layers)
            ops.set_bf16_products(chosen)
            for kind in kinds:
                print(f"| {tokens} | {dtype} | {kind} | {1e3 * best[kind]:.3f} | {flops / best[kind] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
