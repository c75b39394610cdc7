"""The weight-only int8 and int4 linears by activation rows per call: the integer kernels on the weights as
stored (int8_linear, int4_linear) and the GEMMs that dequantize them a slice at a time (int8_dequant_linear,
int4_dequant_linear; "sliced": on the CPU's bfloat16 products where they serve, else float32 FMAs), on a model's four layer shapes (qkv, o, gate_up, down), one set per
decoder layer of the model so that the weights stream from memory as in a step; best of 5 passes. Prints ms
per decoder layer, the weight bytes read per second and GFLOP/s.

Usage: python benchmarks/scripts/quant_linear.py [--model qwen2.5-coder-1.5b|smollm2-135m] [--threads 2]
       [--rows 1,2,3,4,6,8,16,32,40] [--bf16-products off|dot|amx]
"""

import argparse
import time

import torch

from nimblelm.bench.machine import cpu_features, cpu_model
from nimblelm.kernels import cpu_ops, kernels_in_use
from nimblelm.quantization import tiles
from nimblelm.quantization.int4 import pack_int4, quantize_int4

MODELS = {  # decoder layers, and the four layer shapes (N, K)
    "qwen2.5-coder-1.5b": (28, [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]),
    "smollm2-135m": (30, [(960, 576), (576, 576), (3072, 576), (576, 1536)]),
}
GROUP = 32


def int8_layer(n: int, k: int) -> dict:
    w = torch.randn(n, k)
    scales = w.reshape(n, k // GROUP, GROUP).abs().amax(-1) / 127
    q = (w.reshape(n, k // GROUP, GROUP) / scales[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
    return tiles.tile({"qweight": q, "scales": scales}) | {"n": n}


def q6_k_layer(n: int, k: int, six_bit: bool) -> dict:
    """GGUF's Q6_K as nimblelm holds it: int8 values in [-32, 31], groups of 16 with int8 scales and a float16 factor
    per 256 weights; in six-bit tiles, or (six_bit False) the same values in 8-bit tiles."""
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8)
    scales = torch.randint(-127, 128, (n, k // 16), dtype=torch.int8)
    t = tiles.tile({"qweight": q, "scales": scales, "scale_factors": (torch.rand(n, k // 256) * 1e-3).half()})
    return t | {"qweight": tiles.six_bit(t["qweight"]) if six_bit else t["qweight"], "n": n}


def int4_layer(n: int, k: int) -> dict:
    q, scales, _ = quantize_int4(torch.randn(n, k), GROUP, True)
    return tiles.tile({"qweight": pack_int4(q), "scales": scales, "mins": None}) | {"n": n}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=MODELS, default="qwen2.5-coder-1.5b")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,3,4,6,8,16,32,40")
    p.add_argument("--kinds", default="int8,int4", help="comma list of int8, int4 (integer kernels), "
                   "int8 sliced, int4 sliced (a slice dequantized at a time), q6_k (GGUF's Q6_K held in six bits), "
                   "q6_k8 (the same values in 8 bits), q6_k sliced")
    p.add_argument("--bf16-products", choices=["off", "dot", "amx"],
                   help="the bfloat16 products the sliced kernels use (default: those chosen at start)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops = cpu_ops()
    if args.bf16_products:
        ops.set_bf16_products(args.bf16_products)
    layer_count, shapes = MODELS[args.model]
    print(f"{args.model}, {cpu_model()} ({' '.join(cpu_features())}), {torch.get_num_threads()} threads; "
          f"{kernels_in_use()}; bfloat16 products: {ops.bf16_products()}")
    makers = {"int8": int8_layer, "int4": int4_layer, "q6_k": lambda n, k: q6_k_layer(n, k, True),
              "q6_k8": lambda n, k: q6_k_layer(n, k, False)}
    kinds = args.kinds.split(",")
    layers = {fmt: [[make(n, k) for n, k in shapes] for _ in range(layer_count)]
              for fmt, make in makers.items() if any(kind.split()[0] == fmt for kind in kinds)}
    q6_k = lambda x, t: ops.int8_linear(x, t["qweight"], t["scales"], None, 16, t["scale_factors"])
    calls = {
        "q6_k": q6_k,
        "q6_k8": q6_k,
        "q6_k sliced": lambda x, t: ops.int8_dequant_linear(x, t["qweight"], t["scales"], None, 16, t["scale_factors"]),
        "int8": lambda x, t: ops.int8_linear(x, t["qweight"], t["scales"], None, GROUP),
        "int8 sliced": lambda x, t: ops.int8_dequant_linear(x, t["qweight"], t["scales"], None, GROUP),
        "int4": lambda x, t: ops.int4_linear(x, t["qweight"], t["scales"], t["mins"], None, GROUP),
        "int4 sliced": lambda x, t: ops.int4_dequant_linear(x, t["qweight"], t["scales"], t["mins"], None, GROUP),
    }
    weights = sum(n * k for n, k in shapes)
    print("| kernel | rows | ms a layer | weight GB/s | GFLOP/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        call = calls[kind]
        fmt = kind.split()[0]
        stack = layers[fmt]
        nbytes = sum(t.numel() * t.element_size() for layer in stack[:1] for ts in layer for t in ts.values()
                     if isinstance(t, torch.Tensor))
        for rows in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(rows, k) for _, k in shapes]
            best = float("inf")
            for _ in range(6):
                start = time.perf_counter()
                for layer in stack:
                    for x, t in zip(xs, layer):
                        call(x, t)
                best = min(best, (time.perf_counter() - start) / layer_count)
            print(f"| {kind} | {rows} | {best * 1e3:.2f} | {nbytes / best / 1e9:.1f} | "
                  f"{2 * rows * weights / best / 1e9:.0f} |")


if __name__ == "__main__":
    main()
