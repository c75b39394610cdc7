"""`nimblelm bench roofline`: this machine's memory bandwidth and matmul peak, and the limits they imply.

Batch-1 decode reads every weight once per token, so tokens/s ≤ bandwidth / bytes of weights read per
token. Prefill (and batched decode) multiply activations by weights at about 2 FLOPs per weight per
token, so tokens/s ≤ matmul peak / (2 × weights per token). Both numbers are measured here, with the
thread count the benchmarks use; nothing is taken from a data sheet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

#: bytes per weight of each storage format (GGUF block formats include their scales)
BYTES_PER_WEIGHT = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32,
                    "q4_1": 20 / 32}
MATMUL_SHAPES = ((512, 576, 1536), (1024, 1024, 1024))  # (M, K, N): SmolLM2's MLP at a 512-token prefill


def measure_bandwidth(nbytes: int = 256 << 20, repeats: int = 7, threads: int | None = None) -> dict:
    """Read bandwidth in GB/s: the best of `repeats` full reductions (sum) over an nbytes fp32 tensor.

    A sum streams every byte once from memory, like a decode step streams the weights. Working sets
    far over the last-level cache measure DRAM; small ones the caches.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = max(1024, nbytes // 4)
    x = torch.ones(n, dtype=torch.float32)
    x.sum()  # touch every page before timing
    best = float("inf")
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        x.sum()
        dt = time.perf_counter() - t0
        times.append(dt)
        best = min(best, dt)
    gbps = [n * 4 / t / 1e9 for t in times]
    return {"bytes": n * 4, "best_gbs": n * 4 / best / 1e9, "median_gbs": sorted(gbps)[len(gbps) // 2],
            "repeats": len(times), "threads": torch.get_num_threads()}


def measure_matmul(dtype: str = "float32", shape: Sequence[int] = MATMUL_SHAPES[0], budget_s: float = 1.0,
                   min_reps: int = 3) -> dict:
    """GFLOP/s of torch.matmul at `dtype` on [M×K]·[K×N]: best of as many repetitions as fit budget_s."""
    import torch

    m, k, n = (int(v) for v in shape)
    dt = getattr(torch, dtype)
    a = torch.randn(m, k).to(dt)
    b = torch.randn(k, n).to(dt)
    torch.matmul(a, b)  # warm-up (kernel selection, packing buffers)
    flops = 2.0 * m * k * n
    best = float("inf")
    reps = 0
    start = time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
        reps += 1
        if reps >= 10_000:
            break
    return {"dtype": dtype, "shape": [m, k, n], "best_gflops": flops / best / 1e9, "repeats": reps}


def matmul_weights_per_token(cfg) -> int:
    """Weights a decode step multiplies with (and reads), for a ModelConfig: all linear layers + LM head.

    The embedding lookup reads one row per token and is left out; norms are counted (tiny).
    """
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
    if getattr(cfg, "attention_bias", False):
        per_layer += q + 2 * kv
    return L * per_layer + cfg.vocab_size * d + d


def decode_limits(cfg, bandwidth_gbs: float, formats: Sequence[str] = ("float32", "float16", "q8_0", "q4_0")
                  ) -> list[dict]:
    """Batch-1 decode tokens/s limits implied by the bandwidth, per weight format."""
    w = matmul_weights_per_token(cfg)
    rows = []
    for fmt in formats:
        nbytes = w * BYTES_PER_WEIGHT[fmt]
        rows.append({"format": fmt, "bytes_per_token": int(nbytes), "max_tok_s": bandwidth_gbs * 1e9 / nbytes})
    return rows


def prefill_limit(cfg, gflops: float) -> float:
    """Prefill tokens/s limit from a matmul peak (2 FLOPs per weight per token; attention left out)."""
    return gflops * 1e9 / (2.0 * matmul_weights_per_token(cfg))


def quick_measure(threads: int | None = None, dtypes: Sequence[str] = ("float32",)) -> dict:
    """About a second of measurement for every run's machine record: DRAM bandwidth and the matmul peak of
    each dtype (float32, and the run's 16-bit dtype where it computes in one)."""
    bw = measure_bandwidth(256 << 20, repeats=5, threads=threads)
    mm = {dt: measure_matmul(dt, MATMUL_SHAPES[0], budget_s=0.5) for dt in dtypes}
    return {"memory_bandwidth_gbs": round(bw["best_gbs"], 2),
            "memory_bandwidth_median_gbs": round(bw["median_gbs"], 2),
            "bandwidth_working_set_bytes": bw["bytes"],
            "matmul_peak_gflops": {dt: round(m["best_gflops"], 1) for dt, m in mm.items()},
            "matmul_shape": MATMUL_SHAPES[0]}


def run_roofline(cfg, threads: int, dtypes: Sequence[str] = ("float32", "bfloat16", "float16"),
                 sizes_mib: Sequence[int] = (16, 64, 256, 1024), budget_s: float = 1.0) -> dict:
    """The full measurement for `bench roofline`."""
    bandwidth = [dict(measure_bandwidth(s << 20, repeats=15, threads=threads), working_set_mib=s)
                 for s in sizes_mib]
    dram = [b for b in bandwidth if b["working_set_mib"] >= 256] or bandwidth[-1:]
    dram_gbs = max(b["best_gbs"] for b in dram)
    matmul = [measure_matmul(dt, shape, budget_s=budget_s) for dt in dtypes for shape in MATMUL_SHAPES]
    peak = {dt: max(m["best_gflops"] for m in matmul if m["dtype"] == dt) for dt in dtypes}
    out = {"bandwidth": bandwidth, "dram_bandwidth_gbs": dram_gbs, "matmul": matmul, "matmul_peak_gflops": peak}
    if cfg is not None:
        w = matmul_weights_per_token(cfg)
        out["model"] = {"matmul_weights_per_token": w, "decode_limits": decode_limits(cfg, dram_gbs),
                        "prefill_limits": [{"dtype": dt, "max_tok_s": prefill_limit(cfg, g)} for dt, g in peak.items()]}
    return out


def roofline_markdown(report: dict) -> str:
    from nimblelm.bench.report import machine_lines

    r = report["roofline"]
    out = ["## nimblelm bench roofline", ""] + machine_lines(report) + [""]
    out += ["### Memory bandwidth (read, fp32 sum over a working set)", "",
            "| working set | best GB/s | median GB/s |", "| ---: | ---: | ---: |"]
    for b in r["bandwidth"]:
        out.append(f"| {b['working_set_mib']} MiB | {b['best_gbs']:.1f} | {b['median_gbs']:.1f} |")
    out += ["", "### Matmul peak (torch.matmul)", "", "| dtype | M×K×N | GFLOP/s |", "| --- | --- | ---: |"]
    for m in r["matmul"]:
        out.append(f"| {m['dtype']} | {'×'.join(map(str, m['shape']))} | {m['best_gflops']:.1f} |")
    if "model" in r:
        mdl = r["model"]
        out += ["", (f"### Limits for `{report['config'].get('model')}` "
                    f"({mdl['matmul_weights_per_token'] / 1e6:.1f} M weights read per token)"), "",
                f"Batch-1 decode at {r['dram_bandwidth_gbs']:.1f} GB/s (weights read once per token):", "",
                "| weight format | MiB per token | decode tok/s limit |", "| --- | ---: | ---: |"]
        for d in mdl["decode_limits"]:
            out.append(f"| {d['format']} | {d['bytes_per_token'] / 2**20:.0f} | {d['max_tok_s']:.1f} |")
        out += ["", "Prefill (2 FLOPs per weight per token, attention left out):", "",
                "| compute dtype | prefill tok/s limit |", "| --- | ---: |"]
        for p in mdl["prefill_limits"]:
            out.append(f"| {p['dtype']} | {p['max_tok_s']:.0f} |")
    act = r.get("other_activity") or {}
    if act.get("other_share") is not None:
        out += ["", (f"Quietness: other processes used {act['other_cpu_s']:.1f} CPU-s "
                     f"({100 * act['other_share']:.0f}% of the machine) and the hypervisor stole "
                     f"{act.get('steal_s', 0):.1f} s during the measurement; on a busy machine every figure here "
                     "is a lower bound.")]
    reps = r["bandwidth"][0]["repeats"] if r["bandwidth"] else "?"
    out += ["", (f"Bandwidth: best of {reps} timed `tensor.sum()` passes per working set; working sets over the "
                 "last-level cache measure DRAM. Matmul: best of repeated `torch.matmul` calls within the time "
                 "budget.")]
    return "\n".join(out) + "\n"
