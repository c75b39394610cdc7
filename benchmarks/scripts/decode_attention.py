"""The decode attention kernels by KV cache dtype: paged_decode_attention (float32, float16, bfloat16: its scores on
AMX tiles where bf16_products is "amx"), its int8 variant and lowbit_decode_attention (int4, int2; layers/kivi.py),
on a model's head shapes, `--rows` sequences of `--context`
positions each, one cache per decoder layer of the model so that the caches stream from memory as in a step;
best of 5 passes. Prints ms per decoder layer and the cache bytes read per second.

The low-bit caches read each sequence's last --residual-length positions (default 128) from its residual ring, in
--residual-dtype (the model's dtype: float32, or bfloat16 for dtype="auto" on AVX2 and AVX-512 CPUs); their bytes
read per second count the packed blocks alone.

Usage: python benchmarks/scripts/decode_attention.py [--model smollm2-135m|qwen2.5-coder-0.5b] [--threads 2]
       [--rows 1,8,32] [--context 512] [--residual-length 128] [--residual-dtype float32|bfloat16|float16]
"""

import argparse
import time

import torch

from nimblelm.bench.machine import cpu_features, cpu_model
from nimblelm.kernels import cpu_ops, kernels_in_use
from nimblelm.layers import kivi

MODELS = {  # decoder layers, query heads, KV heads, head_dim
    "smollm2-135m": (30, 9, 3, 64),
    "qwen2.5-coder-0.5b": (24, 14, 2, 64),
}
BLOCK = 16
DTYPES = ("float32", "float16", "bfloat16", "int8", "int4", "int2")


def layer_call(dtype: str, rows: int, context: int, heads: int, kv_heads: int, head_dim: int, length: int,
               ring: torch.dtype):
    """A closure running one layer's decode attention over a fresh random cache, and the cache's bytes."""
    ops = cpu_ops()
    per_row = -(-context // BLOCK)
    num_blocks = rows * per_row
    tables = torch.arange(num_blocks).view(rows, per_row)
    lens = torch.full((rows,), context)
    q, scale = torch.randn(rows, heads, head_dim), head_dim**-0.5
    out = torch.empty_like(q)
    shape = (num_blocks, BLOCK, kv_heads, head_dim)
    if dtype in ("float32", "float16", "bfloat16"):
        k, v = torch.randn(shape).to(getattr(torch, dtype)), torch.randn(shape).to(getattr(torch, dtype))
        return (lambda: ops.paged_decode_attention(out, q, k, v, tables, lens, scale, 0)), 2 * k.nbytes
    if dtype == "int8":
        k, v = torch.randint(-127, 128, shape, dtype=torch.int8), torch.randint(-127, 128, shape, dtype=torch.int8)
        ks, vs = torch.rand(shape[:-1]) / 100, torch.rand(shape[:-1]) / 100
        return (lambda: ops.paged_decode_attention_int8(out, q, k, v, ks, vs, tables, lens, scale, 0)), 2 * (
            k.nbytes + ks.nbytes)
    bits = int(dtype.removeprefix("int"))
    lowbit = kivi.LowBitKV.empty(bits, num_blocks, BLOCK, kv_heads, head_dim, rows, length, ring, "cpu")
    for t in (lowbit.k_scale, lowbit.k_min, lowbit.v_scale, lowbit.v_min):
        t.copy_(torch.rand(t.shape) / 10)
    lowbit.residual.normal_()
    values = torch.randint(0, 256, (2, *shape[:-1], head_dim * bits // 8), dtype=torch.uint8)
    residual_slots = torch.arange(rows) * length
    nbytes = kivi.LowBitKV.bytes_per_block(bits, BLOCK, kv_heads, head_dim) * num_blocks

    def call():
        ops.lowbit_decode_attention(out, q, values, lowbit.k_scale, lowbit.k_min, lowbit.v_scale, lowbit.v_min,
                                    lowbit.residual, tables, lens, residual_slots, scale, 0, bits, length, length)

    return call, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--residual-length", type=int, default=kivi.RESIDUAL_LENGTH)
    parser.add_argument("--residual-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layers, heads, kv_heads, head_dim = MODELS[args.model]
    print(f"{cpu_model()} ({' '.join(cpu_features())}), {args.threads} threads; {kernels_in_use()}")
    print(f"{args.model}: {layers} layers, {heads} query heads, {kv_heads} KV heads of {head_dim}; "
          f"{args.context} positions a sequence, low-bit residuals of {args.residual_length} in {args.residual_dtype}")
    print("| rows | " + " | ".join(f"{d} ms" for d in DTYPES) + " | " + " | ".join(f"{d} GB/s" for d in DTYPES) + " |")
    print("| ---: |" + " ---: |" * 2 * len(DTYPES))
    for rows in (int(r) for r in args.rows.split(",")):
        ms, rates = [], []
        for dtype in DTYPES:
            calls = [layer_call(dtype, rows, args.context, heads, kv_heads, head_dim, args.residual_length,
                                getattr(torch, args.residual_dtype)) for _ in range(layers)]
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for call, _ in calls:
                    call()
                best = min(best, (time.perf_counter() - start) / layers)
            ms.append(f"{1e3 * best:.3f}")
            rates.append(f"{calls[0][1] / best / 1e9:.1f}")
        print(f"| {rows} | " + " | ".join(ms) + " | " + " | ".join(rates) + " |")


if __name__ == "__main__":
    main()
