"""The linear kernels for 16-bit weights, by rows per call: nimblelm's panel kernel over float32, bfloat16
and float16 panels (16-bit weights widened in registers, float32 FMAs), its bfloat16 products for bfloat16
panels (bfloat16 activations: AVX-512 BF16 dot products and AMX tiles, where the CPU has them), and torch's
bfloat16 F.linear (oneDNN; AMX tiles where the CPU has them, with bfloat16 activations).

60 distinct SmolLM2-shaped layers (1536 x 576), so the weights stream from memory as in a decode step; the
best of 5 passes. Usage: python benchmarks/scripts/half_linear.py [--threads 2] [--rows 1,2,4,8]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from nimblelm.bench.machine import cpu_features, cpu_model
from nimblelm.kernels import cpu_ops, kernels_in_use

LAYERS, N, K = 60, 1536, 576


def gflops(step, rows: int) -> float:
    x = torch.randn(rows, K)
    for i in range(3):
        step(x, i)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for i in range(LAYERS):
            step(x, i)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * N * K * LAYERS / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,8,16,32,64,128,512")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ops = cpu_ops()
    weights = [torch.randn(N, K) for _ in range(LAYERS)]
    bf16 = [w.bfloat16() for w in weights]
    fp32_panels = [ops.pack_panels(w) for w in weights]
    bf16_panels = [ops.pack_panels(w) for w in bf16]
    fp16_panels = [ops.pack_panels(w.half()) for w in weights]
    print(f"{cpu_model()} ({' '.join(cpu_features())}), {torch.get_num_threads()} threads; {kernels_in_use()}; "
          "GFLOP/s")
    print("| rows | float32 panels | bfloat16 panels | bfloat16 dot products | bfloat16 on AMX tiles | "
          "float16 panels | torch bfloat16 F.linear |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

    before = ops.bf16_products()
    kinds = [kind for kind in ("dot", "amx") if ops.set_bf16_products(kind)]

    def panels(all_panels, rows, products="off"):
        if products != "off" and products not in kinds:
            return None
        ops.set_bf16_products(products)
        return gflops(lambda x, i: ops.packed_linear(x, all_panels[i], N, None), rows)

    for rows in (int(r) for r in args.rows.split(",")):
        cells = [
            panels(fp32_panels, rows),
            panels(bf16_panels, rows),
            panels(bf16_panels, rows, "dot"),
            panels(bf16_panels, rows, "amx"),
            panels(fp16_panels, rows),
            gflops(lambda x, i: F.linear(x.bfloat16(), bf16[i]).float(), rows),
        ]
        print(f"| {rows} | " + " | ".join("-" if c is None else f"{c:.0f}" for c in cells) + " |")
    ops.set_bf16_products(before)


if __name__ == "__main__":
    main()
